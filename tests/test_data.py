"""Shards and the streaming loader: equal batches per rank for any world size, exact resume, clear errors."""

import collections
import itertools
import tarfile

import pytest
import torch

from dat_ds.data.loader import StreamSpec, TrainStream, batches_per_epoch, make_eval_loader, make_train_loader
from dat_ds.data.shards import ShardError, load_index, read_shard, write_index, write_split
from data_prep.digits import digits_samples

UNEVEN = [50, 3, 17, 40, 1, 29, 60, 100]


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory):
    """Real digit images in 8 shards of very different sizes (1 to 100 samples)."""
    out = tmp_path_factory.mktemp("uneven")
    train, test = digits_samples()
    entries, it = [], iter(train)
    for i, n in enumerate(UNEVEN):
        entries += write_split(list(itertools.islice(it, n)), out, f"train{i}", n)
    tests = write_split(test[:50], out, "testa", 31) + write_split(test[50:57], out, "testb", 7)
    write_index(
        out,
        name="uneven",
        num_classes=10,
        channels=1,
        image_size=8,
        mean=[0.3],
        std=[0.4],
        splits={"train": entries, "test": tests},
    )
    return out


def spec_for(index, rank, world, *, epoch=0, skip=0, workers=0, micro=16, batches=None):
    n = index.split("train").count
    return StreamSpec(
        shards=index.split("train").shards,
        channels=1,
        augment="none",
        image_size=8,
        micro_batch=micro,
        batches=batches or batches_per_epoch(n, micro * world),
        rank=rank,
        world=world,
        seed=7,
        epoch=epoch,
        skip=skip,
        shuffle_buffer=64,
        workers=workers,
    )


def keys_of(spec):
    """The sample keys a rank sees, batch by batch (the images are decoded too)."""
    out = []
    ds = TrainStream(spec)
    raw = list(itertools.islice(ds._raw_samples(spec.rank, spec.world), spec.batches * spec.micro_batch))
    for b in range(spec.batches):
        out.append([s.key for s in raw[b * spec.micro_batch : (b + 1) * spec.micro_batch]])
    return out


def test_shards_roundtrip_and_index(digits_dir):
    index = load_index(digits_dir)
    assert index.split("train").count == 1437 and index.split("test").count == 360
    assert index.num_classes == 10 and index.channels == 1 and index.image_size == 8
    samples = list(read_shard(index.split("test").shards[0].url, index.split("test").shards[0].count))
    assert all(s.ext == "png" and 0 <= s.label < 10 for s in samples)
    for name in tarfile.open(index.split("test").shards[0].url).getnames():
        assert name.endswith((".png", ".cls")), "nothing but image bytes and labels (no pickle) in shards"


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_number_of_batches(uneven_dir, world, workers):
    index = load_index(uneven_dir)
    counts = []
    for rank in range(world):
        spec = spec_for(index, rank, world, workers=workers)
        batches = list(make_train_loader(spec))
        assert all(
            x.shape == (16, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (16,) for x, y in batches
        )
        counts.append(len(batches))
    assert counts == [batches_per_epoch(300, 16 * world)] * world


def test_ranks_read_disjoint_shards_and_epochs_reshuffle(uneven_dir):
    index = load_index(uneven_dir)
    a = {k for b in keys_of(spec_for(index, 0, 2)) for k in b}
    b = {k for b in keys_of(spec_for(index, 1, 2)) for k in b}
    assert not a & b
    assert keys_of(spec_for(index, 0, 2, epoch=0)) != keys_of(spec_for(index, 0, 2, epoch=1))
    assert keys_of(spec_for(index, 0, 2)) == keys_of(spec_for(index, 0, 2)), "streams are deterministic"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_to_the_same_batches(digits_dir, workers):
    index = load_index(digits_dir)
    kw = dict(workers=workers, micro=32)
    full = list(make_train_loader(spec_for(index, 1, 2, **kw)))
    tail = list(make_train_loader(spec_for(index, 1, 2, skip=5, **kw)))
    assert len(tail) == len(full) - 5
    for (xa, ya), (xb, yb) in zip(full[5:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_stream_with_and_without_workers(digits_dir):
    index = load_index(digits_dir)
    a = list(make_train_loader(spec_for(index, 0, 2, workers=0)))
    b = list(make_train_loader(spec_for(index, 0, 2, workers=0)))
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("limit", [0, 40])
def test_eval_split_covers_every_example_once(uneven_dir, world, limit):
    index = load_index(uneven_dir)
    seen = collections.Counter()
    for rank in range(world):
        for x, y in make_eval_loader(
            index, "test", rank=rank, world=world, augment="none", image_size=8, batch_size=8, limit=limit
        ):
            seen.update(x.flatten(1).sum(1).tolist())
            seen["n"] += len(y)
    assert seen["n"] == (limit or 57)


def test_truncated_shard_is_refused(tmp_path, digits_dir):
    import shutil

    d = tmp_path / "trunc"
    shutil.copytree(digits_dir, d)
    shard = d / "train-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: 90 * 2048])  # cut after sample 90 (2 files of 1 KiB each): tar sees no error
    index = load_index(d)
    info = index.split("train").shards[3]
    with pytest.raises(ShardError, match="train-000003.tar holds .* samples but its index says 180"):
        list(read_shard(info.url, info.count))


def test_shard_cut_inside_a_member_is_refused(tmp_path, digits_dir):
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(digits_dir, d)
    shard = d / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[: 10 * 2048 + 700])
    info = load_index(d).split("test").shards[0]
    with pytest.raises(ShardError, match="test-000000.tar ends inside a member: the file is truncated"):
        list(read_shard(info.url, info.count))


def test_shards_stream_through_pipe_commands(digits_dir):
    info = load_index(digits_dir).split("test").shards[1]
    a = [s.key for s in read_shard(info.url, info.count)]
    b = [s.key for s in read_shard(f"pipe:cat {info.url}", info.count)]
    assert a == b and len(a) == info.count


def test_missing_shard_and_folder_errors(tmp_path, digits_dir):
    import shutil

    with pytest.raises(ShardError, match="does not exist; make it with data_prep"):
        load_index(tmp_path / "nothing")
    d = tmp_path / "missing"
    shutil.copytree(digits_dir, d)
    (d / "train-000002.tar").unlink()
    with pytest.raises(ShardError, match="train-000002.tar listed in .* is missing"):
        load_index(d)


def test_too_small_split_for_the_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        batches_per_epoch(100, 128)
