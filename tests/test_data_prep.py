"""Converters for ImageNet-style trees and CIFAR batches, on small files in the real formats."""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from dat_ds.data.loader import StreamSpec, make_eval_loader, make_train_loader
from dat_ds.data.shards import load_index, read_shard


@pytest.fixture(scope="module")
def imagenet_tree(tmp_path_factory):
    """Real photographs (scikit-learn's sample images), cut into 12 JPEGs in 2 classes, train/ and val/."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("inet")
    photos = load_sample_images().images
    for split, n in (("train", 5), ("val", 1)):
        for wnid, photo in zip(("n01440764", "n01443537"), photos, strict=True):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(n):
                crop = photo[i * 40 : i * 40 + 300, i * 50 : i * 50 + 400]
                Image.fromarray(crop).save(d / f"{wnid}_{split}_{i}.JPEG", quality=90)
    return root


def test_imagenet_shards_copy_jpeg_bytes(imagenet_tree, tmp_path):
    from data_prep.imagenet import main

    out = tmp_path / "shards"
    main([str(imagenet_tree), str(out), "--shard-mb", "0.05"])
    index = load_index(out)
    assert index.num_classes == 2 and index.split("train").count == 10 and index.split("test").count == 2
    assert len(index.split("train").shards) > 1, "many shards, sized by --shard-mb"
    originals = {p.read_bytes() for p in imagenet_tree.rglob("*.JPEG")}
    for info in index.split("train").shards + index.split("test").shards:
        for s in read_shard(info.url, info.count):
            assert s.ext == "jpg" and s.image in originals, "JPEG bytes are copied, never re-encoded"

    spec = StreamSpec(
        split=index.split("train"),
        channels=3,
        augment="imagenet",
        image_size=64,
        micro_batch=5,
        batches=2,
        rank=0,
        world=1,
        seed=0,
        epoch=0,
    )
    batches = list(make_train_loader(spec))
    assert [x.shape for x, _ in batches] == [(5, 3, 64, 64)] * 2
    ((x, y),) = list(
        make_eval_loader(index, "test", rank=0, world=1, augment="imagenet", image_size=64, batch_size=8)
    )
    assert x.shape == (2, 3, 64, 64) and sorted(y.tolist()) == [0, 1]


def test_imagenet_crop_decode_matches_full_decode(imagenet_tree):
    """The reduced-scale JPEG decode gives (nearly) the same crop as decoding at full size."""
    import random

    from dat_ds.data import transforms

    data = next(imagenet_tree.rglob("*.JPEG")).read_bytes()
    fast = transforms.decode(data, channels=3, augment="imagenet", train=False, image_size=64, rng=None)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    x0, y0, cw, ch = transforms._center_box(*img.size, 64)
    ref = torch.from_numpy(np.array(img.resize((64, 64), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))))
    assert (fast.permute(1, 2, 0).float() - ref.float()).abs().mean() < 6.0
    a = transforms.decode(
        data, channels=3, augment="imagenet", train=True, image_size=32, rng=random.Random(1)
    )
    b = transforms.decode(
        data, channels=3, augment="imagenet", train=True, image_size=32, rng=random.Random(1)
    )
    assert torch.equal(a, b)


def write_cifar10(root, digits_dir):
    """CIFAR-10's python batch format, filled with real digit scans upscaled to 32x32x3."""
    from data_prep.digits import digits_samples

    train, test = digits_samples()
    root.mkdir()

    def batch(samples):
        imgs = [np.asarray(Image.open(io.BytesIO(s.image)).resize((32, 32))) for s in samples]
        data = np.stack([np.stack([i, i, i]) for i in imgs]).reshape(len(imgs), -1)
        return {b"data": data, b"labels": [s.label for s in samples], b"batch_label": b"x"}

    for k in range(1, 3):
        (root / f"data_batch_{k}").write_bytes(pickle.dumps(batch(train[(k - 1) * 30 : k * 30])))
    (root / "test_batch").write_bytes(pickle.dumps(batch(test[:20])))


def test_cifar_batches_to_shards(tmp_path, digits_dir):
    from data_prep.cifar import main

    write_cifar10(tmp_path / "cifar-10-batches-py", digits_dir)
    main([str(tmp_path / "cifar-10-batches-py"), str(tmp_path / "out"), "--per-shard", "25"])
    index = load_index(tmp_path / "out")
    assert index.name == "cifar10" and index.split("train").count == 60 and index.split("test").count == 20
    assert [s.count for s in index.split("train").shards] == [25, 25, 10]
    spec = StreamSpec(
        split=index.split("train"),
        channels=3,
        augment="cifar",
        image_size=32,
        micro_batch=10,
        batches=3,
        rank=0,
        world=1,
        seed=0,
        epoch=0,
    )
    assert [x.shape for x, _ in make_train_loader(spec)] == [(10, 3, 32, 32)] * 3


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    import os

    from data_prep.cifar import load_batch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match=r"asks to load posix\.system.*refused"):
        load_batch(tmp_path / "data_batch_1")
