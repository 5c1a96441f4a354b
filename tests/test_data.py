"""Shards and the streaming loader: equal batches per rank for any world size, exact resume, clear errors."""

import collections
import itertools
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dat_ds.data.loader import (
    StreamSpec,
    batches_per_epoch,
    epoch_order,
    make_eval_loader,
    make_train_loader,
    micro_batch_ids,
    worker_batches,
)
from dat_ds.data.shards import (
    SampleReader,
    ShardError,
    ShardInfo,
    Split,
    load_index,
    read_shard,
    write_index,
    write_split,
)
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


def spec_for(index, rank, world, *, epoch=0, skip=0, workers=0, micro=16, accum=1, batches=None):
    n = index.split("train").count
    return StreamSpec(
        split=index.split("train"),
        channels=1,
        augment="none",
        image_size=8,
        micro_batch=micro,
        batches=batches or batches_per_epoch(n, micro * world * accum) * accum,
        rank=rank,
        world=world,
        seed=7,
        epoch=epoch,
        skip=skip,
        workers=workers,
        accum=accum,
    )


def pixels(x):
    """One key per image: its raw pixel bytes."""
    return [bytes(im.numpy().tobytes()) for im in x]


def test_shards_roundtrip_and_index(digits_dir):
    index = load_index(digits_dir)
    assert index.split("train").count == 1437 and index.split("test").count == 360
    assert index.num_classes == 10 and index.channels == 1 and index.image_size == 8
    samples = list(read_shard(index.split("test").shards[0].url, index.split("test").shards[0].count))
    assert all(s.ext == "png" and 0 <= s.label < 10 for s in samples)
    for name in tarfile.open(index.split("test").shards[0].url).getnames():
        assert name.endswith((".png", ".cls")), "nothing but image bytes and labels (no pickle) in shards"
    # the member table reads every sample by number, identical to streaming the shards
    split = index.split("train")
    streamed = [s for info in split.shards for s in read_shard(info.url, info.count)]
    reader = SampleReader(split)
    assert [reader[i] for i in range(split.count)] == streamed
    assert split.members[:, 3].tolist() == [s.label for s in streamed]


def synthetic_split(sizes):
    """A split of ``sizes`` shards as the member table describes it (no files: the stream logic alone)."""
    shard = np.repeat(np.arange(len(sizes)), sizes)
    start = np.concatenate([np.arange(n) for n in sizes]) * 512
    members = np.stack([shard, start, start + 512, np.zeros_like(shard)], axis=1).astype(np.int64)
    return Split(tuple(ShardInfo(f"s{i}.tar", n) for i, n in enumerate(sizes)), members)


LAYOUTS = {
    "one shard": [944],
    "11 uneven": [10, 200, 37, 150, 12, 99, 180, 45, 61, 100, 50],
    "imagenet-like": [9150] * 140,
}
TOPOLOGIES = [(1, 1), (2, 1), (3, 2), (6, 2), (5, 3), (36, 1), (36, 8)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world,workers", TOPOLOGIES)
def test_every_sample_exactly_once_per_epoch(layout, world, workers):
    """For every rank x worker slot, the (shard, sample) pairs it reads: no repeats, nothing missed beyond the
    dropped remainder of one global batch, equal batches per rank, a new order each epoch, resume keeps it."""
    split = synthetic_split(LAYOUTS[layout])
    micro = 85 if layout == "imagenet-like" else 4
    accum = 2 if world < 6 else 1
    g = micro * world * accum
    steps = batches_per_epoch(split.count, g)
    firsts = []
    for epoch in (0, 1):
        order = epoch_order(split.count, 3, epoch)
        got = []
        for rank in range(world):
            spec = StreamSpec(split, 1, "none", 8, micro, steps * accum, rank, world, 3, epoch, accum=accum)
            bs = [b for w in range(workers) for b in worker_batches(spec, w, workers)]
            assert sorted(bs) == list(range(steps * accum)), "each micro-batch made by exactly one worker"
            for b in bs:
                ids = micro_batch_ids(order, b, rank=rank, world=world, micro=micro, accum=accum)
                assert len(ids) == micro
                got.append(ids)
        seen = np.bincount(np.concatenate(got), minlength=split.count)
        assert seen.max() == 1, "no sample twice in an epoch"
        assert split.count - seen.sum() < g, "only the remainder of one global batch is dropped"
        firsts.append(micro_batch_ids(order, 0, rank=0, world=world, micro=micro, accum=accum).tolist())
    assert firsts[0] != firsts[1], "the order changes with the epoch"


# (workers, skip): every case differs from the reference (no workers, no skip) in something
@pytest.mark.parametrize(("workers", "skip"), [(0, 5), (1, 0), (1, 5), (2, 0), (2, 5), (3, 0), (3, 5)])
def test_resume_and_workers_leave_the_stream_unchanged(digits_dir, workers, skip):
    """A rank's batches are the same for any number of workers, and a resumed stream is the tail of the full one."""
    index = load_index(digits_dir)
    ref = list(make_train_loader(spec_for(index, 1, 2, micro=32, accum=2)))
    got = list(make_train_loader(spec_for(index, 1, 2, micro=32, accum=2, workers=workers, skip=skip)))
    assert len(got) == len(ref) - skip
    for (xa, ya), (xb, yb) in zip(ref[skip:], got, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_gets_the_same_batches_and_all_images_once(uneven_dir, world, workers):
    index = load_index(uneven_dir)
    counts, seen = [], collections.Counter()
    for rank in range(world):
        spec = spec_for(index, rank, world, workers=workers)
        batches = list(make_train_loader(spec))
        assert all(
            x.shape == (16, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (16,) for x, y in batches
        )
        counts.append(len(batches))
        for x, _ in batches:
            seen.update(pixels(x))
    steps = batches_per_epoch(300, 16 * world)
    assert counts == [steps] * world
    split = index.split("train")
    everything = collections.Counter(pixels(torch.stack([_decode(s) for s in _all(split)])))
    assert sum(seen.values()) == steps * 16 * world
    assert not seen - everything, "only images of the split, none more often than it holds them"
    assert sum((everything - seen).values()) < 16 * world, "only the remainder of one global batch is missing"


def _all(split):
    return [s for info in split.shards for s in read_shard(info.url, info.count)]


def _decode(sample):
    from dat_ds.data.transforms import decode

    return decode(sample.image, channels=1, augment="none", train=False, image_size=8, rng=None)


def test_global_batch_does_not_depend_on_the_world_size(digits_dir):
    """Step s sees the same images whether 1 rank or 2 ranks (with half the accumulation) make it."""
    index = load_index(digits_dir)
    one = list(make_train_loader(spec_for(index, 0, 1, micro=32, accum=2)))
    two = [list(make_train_loader(spec_for(index, r, 2, micro=32, accum=1))) for r in range(2)]
    for step in range(len(two[0])):
        a = torch.cat([one[2 * step][0], one[2 * step + 1][0]])
        b = torch.cat([two[0][step][0], two[1][step][0]])
        assert torch.equal(a, b)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("limit", [0, 40])
def test_eval_split_covers_every_example_once(uneven_dir, world, limit):
    index = load_index(uneven_dir)
    seen = collections.Counter()
    for rank in range(world):
        for x, _ in make_eval_loader(
            index, "test", rank=rank, world=world, augment="none", image_size=8, batch_size=8, limit=limit
        ):
            seen.update(pixels(x))
    wanted = _all(index.split("test"))[: limit or None]
    assert seen == collections.Counter(pixels(torch.stack([_decode(s) for s in wanted])))


def test_truncated_shard_is_refused_at_load(tmp_path, digits_dir):
    import shutil

    d = tmp_path / "trunc"
    shutil.copytree(digits_dir, d)
    shard = d / "train-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: 90 * 2048])  # cut after sample 90 (2 files of 1 KiB each): tar sees no error
    with pytest.raises(
        ShardError, match="train-000003.tar has 184320 bytes but .* says 378880: the file is trunc"
    ):
        load_index(d)
    # the streaming reader (evaluation, converters) checks the count on its own
    info = load_index(d, check_files=False).split("train").shards[3]
    with pytest.raises(ShardError, match="train-000003.tar holds .* samples but its index says 180"):
        list(read_shard(info.url, info.count))


def test_shard_cut_inside_a_member_is_refused(tmp_path, digits_dir):
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(digits_dir, d)
    shard = d / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[: 10 * 2048 + 700])
    info = load_index(d, check_files=False).split("test").shards[0]
    with pytest.raises(ShardError, match="test-000000.tar ends inside a member: the file is truncated"):
        list(read_shard(info.url, info.count))


def test_empty_shard_and_lying_member_table_are_refused(tmp_path, digits_dir):
    import json
    import shutil

    d = tmp_path / "empty"
    shutil.copytree(digits_dir, d)
    raw = json.loads((d / "index.json").read_text())
    raw["splits"]["train"]["shards"][2]["count"] = 0
    (d / "index.json").write_text(json.dumps(raw))
    with pytest.raises(ShardError, match="train-000002.tar listed in .* has 0 samples"):
        load_index(d)
    d2 = tmp_path / "lying"
    shutil.copytree(digits_dir, d2)
    table = np.load(d2 / "train.members.npy")
    table[5, 0] = 4  # sample 5 claims to live in shard 4
    np.save(d2 / "train.members.npy", table)
    with pytest.raises(ShardError, match="does not match the shard counts .* python -m data_prep.members"):
        load_index(d2)


def test_old_shard_sets_get_member_tables(tmp_path, digits_dir):
    """A shard set written before member tables: a clear error, and the command that adds them."""
    import json
    import shutil

    from data_prep.members import main

    d = tmp_path / "old"
    shutil.copytree(digits_dir, d)
    raw = json.loads((d / "index.json").read_text())
    for split in raw["splits"].values():
        del split["members"]
        for e in split["shards"]:
            del e["bytes"]
    (d / "index.json").write_text(json.dumps(raw))
    for f in d.glob("*.members.npy"):
        f.unlink()
    with pytest.raises(ShardError, match="no member table .* python -m data_prep.members"):
        SampleReader(load_index(d).split("train"))
    main([str(d)])
    a, b = load_index(d).split("train"), load_index(digits_dir).split("train")
    assert np.array_equal(a.members, b.members)
    assert [(s.count, s.nbytes) for s in a.shards] == [(s.count, s.nbytes) for s in b.shards]


def test_url_shards_are_cached_for_random_access(tmp_path, digits_dir, monkeypatch):
    monkeypatch.setenv("DAT_DS_SHARD_CACHE", str(tmp_path / "cache"))
    split = load_index(digits_dir).split("test")
    piped = Split(
        tuple(ShardInfo(f"pipe:cat {s.url}", s.count, s.nbytes) for s in split.shards), split.members
    )
    reader, direct = SampleReader(piped), SampleReader(split)
    assert [reader[i] for i in range(0, split.count, 7)] == [direct[i] for i in range(0, split.count, 7)]
    assert len(list((tmp_path / "cache").glob("*.tar"))) == len(split.shards)


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


def _fetch(url: str, count: int, nbytes: int, cache: str, out: str) -> None:
    os.environ["DAT_DS_SHARD_CACHE"] = cache
    from dat_ds.data.shards import ShardInfo, local_copy

    Path(out).write_text(local_copy(ShardInfo(url, count, nbytes)))


def test_two_processes_of_a_node_fetch_a_url_shard_once(tmp_path, digits_dir):
    """The cache is per node and locked per shard: two processes wanting the same URL at once download it once
    (the command below counts its runs) and both read the same whole copy."""
    import multiprocessing as mp

    info = load_index(digits_dir).split("test").shards[0]
    counter = tmp_path / "fetches"
    url = f"pipe:sh -c 'echo x >> {counter}; sleep 1; cat {info.url}'"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_fetch, args=(url, info.count, info.nbytes, str(tmp_path / "cache"),
                                              str(tmp_path / f"out{i}"))) for i in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert counter.read_text().count("x") == 1, "one download for the node"
    paths = {(tmp_path / f"out{i}").read_text() for i in range(2)}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == Path(info.url).read_bytes()


def test_the_shard_cache_keeps_under_its_cap(tmp_path, digits_dir, monkeypatch):
    from dat_ds.data.shards import local_copy

    monkeypatch.setenv("DAT_DS_SHARD_CACHE", str(tmp_path / "cache"))
    shards = load_index(digits_dir).split("train").shards[:3]
    monkeypatch.setenv(
        "DAT_DS_SHARD_CACHE_GB", str(2.5 * max(s.nbytes for s in shards) / 1e9)
    )  # room for two
    paths = []
    for s in shards:
        paths.append(local_copy(ShardInfo(f"pipe:cat {s.url}", s.count, s.nbytes)))
        time.sleep(0.02)
    assert not Path(paths[0]).exists(), "the least recently used shard was evicted"
    assert Path(paths[1]).is_file() and Path(paths[2]).is_file()
    assert Path(paths[2]).read_bytes() == Path(shards[2].url).read_bytes()


def test_commands_in_an_index_and_files_outside_it_need_an_opt_in(tmp_path, digits_dir, monkeypatch):
    import shutil

    d = tmp_path / "set"
    shutil.copytree(digits_dir, d)
    raw = json.loads((d / "index.json").read_text())
    first = raw["splits"]["test"]["shards"][0]
    first["url"] = f"pipe:cat {d / first.pop('file')}"
    (d / "index.json").write_text(json.dumps(raw))
    monkeypatch.delenv("DAT_DS_ALLOW_PIPE", raising=False)
    with pytest.raises(ShardError, match="lists a shard as a shell command .* DAT_DS_ALLOW_PIPE=1"):
        load_index(d)
    monkeypatch.setenv("DAT_DS_ALLOW_PIPE", "1")
    assert load_index(d).split("test").count == load_index(digits_dir).split("test").count
    # an absolute path outside the folder
    first["url"] = str(digits_dir / "test-000000.tar")
    (d / "index.json").write_text(json.dumps(raw))
    monkeypatch.delenv("DAT_DS_ALLOW_OUTSIDE", raising=False)
    with pytest.raises(ShardError, match="outside its folder .* DAT_DS_ALLOW_OUTSIDE=1"):
        load_index(d)
    monkeypatch.setenv("DAT_DS_ALLOW_OUTSIDE", "1")
    load_index(d)
