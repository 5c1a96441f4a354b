"""Converters for ImageNet-style trees and CIFAR batches, on small files in the real formats."""

import io
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dat_ds.data.loader import StreamSpec, make_eval_loader, make_train_loader
from dat_ds.data.shards import load_index, read_shard
from tests.conftest import refused


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
    """The reduced-scale JPEG decode of a training crop gives (nearly) the same crop as decoding at full size."""
    import random

    from dat_ds.data import transforms

    data = next(imagenet_tree.rglob("*.JPEG")).read_bytes()
    fast = transforms.decode(
        data, channels=3, augment="imagenet", train=True, image_size=64, rng=random.Random(3)
    )
    img = Image.open(io.BytesIO(data)).convert("RGB")
    rng = random.Random(3)
    x0, y0, cw, ch = transforms._rrc_box(rng, *img.size)
    ref = torch.from_numpy(np.array(img.resize((64, 64), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))))
    if rng.random() < 0.5:
        ref = ref.flip(1)
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


def test_imagenet_flat_val_and_the_robustbench_subset_evaluate(imagenet_tree, tmp_path):
    """The ILSVRC flat layout (val/*.JPEG + a labels file) converts like the re-foldered one; an evaluation subset
    named by file, in RobustBench's `val/<wnid>/<file>` lines, evaluates exactly those images, each resized to 256
    on its short side and center-cropped to 224."""
    import json
    import shutil
    from types import SimpleNamespace

    from dat_ds.config import load_config
    from dat_ds.evaluate import main as evaluate_main
    from dat_ds.export import export_safetensors
    from dat_ds.models import build_model
    from dat_ds.robust_eval import load_examples
    from data_prep.imagenet import IMAGENET_MEAN, IMAGENET_STD
    from data_prep.imagenet import main as imagenet_main

    flat = tmp_path / "ilsvrc"
    shutil.copytree(imagenet_tree / "train", flat / "train")
    (flat / "val").mkdir()
    labels = []
    for i, p in enumerate(
        sorted((imagenet_tree / "train").rglob("*.JPEG"))[:6]
    ):  # 6 val images, both classes
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        shutil.copy(p, flat / "val" / name)
        labels.append(f"{name} {p.parent.name}")
    (tmp_path / "val_labels.txt").write_text("\n".join(labels) + "\n")
    shards = tmp_path / "shards"
    imagenet_main([str(flat), str(shards), "--val-labels", str(tmp_path / "val_labels.txt")])
    index = load_index(shards)
    assert index.split("test").count == 6
    files = (shards / "test.files.txt").read_text().split()
    assert files == [f"val/ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 7)]

    # RobustBench names its images as val/<wnid>/<file>: matched by file name
    wnid = {ln.split()[0]: ln.split()[1] for ln in labels}
    pick = ["ILSVRC2012_val_00000005.JPEG", "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000006.JPEG"]
    (tmp_path / "ids.txt").write_text("".join(f"val/{wnid[n]}/{n}\n" for n in pick))

    cfg = load_config(
        "recipes/imagenet_r50_dat_pgd.toml",
        [f'data.shards="{shards}"', 'model.name="dat_digits_cnn"', "model.channels_last=false"],
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, 3, IMAGENET_MEAN, IMAGENET_STD)
    export_safetensors(
        model.eval(), cfg, SimpleNamespace(num_classes=2, channels=3), run / "model.safetensors"
    )
    args = [str(run), "--indices", str(tmp_path / "ids.txt"), "--no-autoattack", "--pgd-steps", "2",
            "--pgd-restarts", "1", "--chunk", "2"]  # fmt: skip
    assert evaluate_main(args) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["n_examples"] == 3 and report["subset"]["indices"] == [1, 4, 5]

    # the protocol's preprocessing: short side to 256, center 224 x 224 (the recipe's image_size at crop_pct 0.875)
    ((x, y),) = load_examples(index, [4], {0}, "imagenet", cfg.data.image_size).values()
    classes = json.loads((shards / "classes.json").read_text())
    assert x.shape == (3, 224, 224) and y == classes.index(labels[4].split()[1])
    img = Image.open(flat / "val" / pick[0]).convert(
        "RGB"
    )  # torchvision's Resize(256) + CenterCrop(224), by hand
    w, h = img.size
    img = img.resize((int(256 * w / h), 256) if w > h else (256, int(256 * h / w)), Image.BILINEAR)
    left, top = int(round((img.size[0] - 224) / 2.0)), int(round((img.size[1] - 224) / 2.0))
    ref = torch.from_numpy(np.array(img.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1)
    assert torch.equal(x, ref), "the same pixels as the protocol's preprocessing"


# ------------------------------------------------------------------------------ class-folder trees (data_prep.folders)


@pytest.fixture
def folder_tree(tmp_path):
    """Real photographs cut into 32 x 32 JPEGs in three classes whose files share names across classes, as in
    the CIFAR-10 JPEG copy (airplane/0001.jpg, bird/0001.jpg, ...), train/ and test/."""
    from sklearn.datasets import load_sample_images

    root = tmp_path / "tree"
    photos = load_sample_images().images
    for split, n in (("train", 6), ("test", 3)):
        for c, cls in enumerate(("zebra", "apple", "moth")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                crop = photos[c % 2][10 * i + c : 10 * i + c + 32, 20 * i : 20 * i + 32]
                Image.fromarray(np.ascontiguousarray(crop)).save(d / f"{i:04d}.jpg", quality=75)
    return root


def test_class_folders_convert_with_unique_keys_bytes_and_order(folder_tree, tmp_path):
    from dat_ds.data.shards import SampleReader
    from data_prep.folders import main

    out = tmp_path / "out"
    main(
        [str(folder_tree), str(out), "--classes", "zebra,apple,moth", "--shard-mb", "0.01", "--workers", "1"]
    )
    index = load_index(out)
    assert index.num_classes == 3 and index.image_size == 32
    assert index.split("train").count == 18 and index.split("test").count == 9
    train = SampleReader(index.split("train"))
    keys = [train[i].key for i in range(18)]
    assert len(set(keys)) == 18, "the same file name in three classes gives three samples"
    # labels follow --classes, not the alphabet; bytes are the files' own
    for i in range(18):
        s = train[i]
        cls, stem = s.key.split("/")
        assert s.label == ("zebra", "apple", "moth").index(cls)
        assert s.image == (folder_tree / "train" / cls / f"{stem}.jpg").read_bytes()
    # the test order is (class, file name), whatever the file system lists
    test = SampleReader(index.split("test"))
    assert [test[i].key for i in range(9)] == [
        f"{c}/{i:04d}" for c in ("zebra", "apple", "moth") for i in range(3)
    ]
    assert (out / "test.files.txt").read_text().split()[0] == "test/zebra/0000.jpg"
    # pixel statistics from the training images themselves
    pixels = (
        np.stack([np.asarray(Image.open(p)) for p in sorted((folder_tree / "train").rglob("*.jpg"))]) / 255
    )
    assert index.mean == pytest.approx(pixels.reshape(-1, 3).mean(0), abs=1e-4)
    # without --classes the sorted class folders are the label order
    main([str(folder_tree), str(tmp_path / "sorted"), "--workers", "1"])
    assert json.loads((tmp_path / "sorted" / "classes.json").read_text()) == ["apple", "moth", "zebra"]


def test_class_folders_refuse_colliding_keys_and_name_a_corrupt_image(folder_tree, tmp_path, capsys):
    from data_prep.folders import main

    # two names that would be one sample key: refused before any shard is written
    shutil.copy(folder_tree / "train/apple/0001.jpg", folder_tree / "train/apple/00.01.jpg")
    shutil.copy(folder_tree / "train/apple/0001.jpg", folder_tree / "train/apple/00_01.jpg")
    rc = main([str(folder_tree), str(tmp_path / "a"), "--workers", "1"])
    refused(capsys, rc, r"00[._]01.jpg and .*00[._]01.jpg would both be sample 'apple/00_01'")
    assert not (tmp_path / "a").exists()
    (folder_tree / "train/apple/00_01.jpg").unlink()
    # a corrupt JPEG (cut in half) is named, before anything is written
    bad = folder_tree / "test/moth/0002.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    rc = main([str(folder_tree), str(tmp_path / "b"), "--workers", "1"])
    refused(capsys, rc, r"test/moth/0002.jpg cannot be decoded")
    assert not (tmp_path / "b").exists()
    main([str(folder_tree), str(tmp_path / "c"), "--workers", "1", "--skip-bad"])
    index = load_index(tmp_path / "c")
    assert index.split("test").count == 8
    assert json.loads((tmp_path / "c" / "index.json").read_text())["skipped_bad_files"] == [str(bad)]
    # an unknown class folder is refused with the fix
    (folder_tree / "train" / "extra").mkdir()
    rc = main([str(folder_tree), str(tmp_path / "d"), "--classes", "zebra,apple,moth"])
    refused(capsys, rc, r"\['extra'\] are not among the classes")


def test_imagenet_keys_are_unique_across_classes(imagenet_tree, tmp_path):
    """The ImageNet converter keys samples <wnid>/<stem>: two classes holding the same file name convert (the
    converter keyed them <split>_<stem> and stopped after the first shard: "holds 8536 samples, not the 8538")."""
    from data_prep.imagenet import main

    tree = tmp_path / "tree"
    shutil.copytree(imagenet_tree, tree)
    a, b = sorted((tree / "train").iterdir())[:2]
    shutil.copy(a / next(p.name for p in sorted(a.iterdir())), b / "same.JPEG")
    shutil.copy(b / next(p.name for p in sorted(b.iterdir())), a / "same.JPEG")
    main([str(tree), str(tmp_path / "shards")])
    assert load_index(tmp_path / "shards").split("train").count == 12
