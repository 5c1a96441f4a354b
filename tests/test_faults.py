"""Faults a careful user meets: a busy run folder, values that would break a run, bad samples."""

import os
import signal
import subprocess
import sys
import time

import pytest

from dat_ds.run_lock import RunFolderBusy, RunLock
from tests.conftest import REPO


def _hold_lock(run_dir):
    code = f"from dat_ds.run_lock import RunLock; RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); import time; time.sleep(120)"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_and_kill9_releases_the_lock(tmp_path, digits_dir, capsys):
    from dat_ds.train import main

    holder = _hold_lock(tmp_path / "r")
    try:
        with pytest.raises(RunFolderBusy, match=f"in use by another run .*pid {holder.pid}"):
            RunLock(tmp_path / "r").acquire()
        args = ["--set", f'data.shards="{digits_dir}"', "--set", f'out_dir="{tmp_path}"', "--set", 'name="r"']
        assert main(["recipes/digits_dat_pgd.toml", *args]) == 2
        err = capsys.readouterr().err
        assert "is in use by another run" in err and f"pid {holder.pid}" in err and "--set name=" in err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    t0 = time.time()
    RunLock(tmp_path / "r").acquire().release()  # the kernel dropped the dead holder's lock
    assert time.time() - t0 < 1
    assert os.path.exists(tmp_path / "r" / ".lock")


def _corrupt_one_image(src, dst, number: int = 100):
    """A copy of the digits shards where one training image's bytes are garbage (same length: the tar is intact)."""
    import shutil

    import numpy as np

    shutil.copytree(src, dst)
    table = np.load(dst / "train.members.npy")
    shard, start, _, _ = (int(v) for v in table[number])
    path = dst / f"train-{shard:06d}.tar"
    data = bytearray(path.read_bytes())
    payload = start + 512  # the image member's payload follows its header
    data[payload : payload + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    return number


@pytest.mark.parametrize("workers", [0, 2])
def test_an_undecodable_image_is_named_or_skipped(tmp_path, digits_dir, workers):
    import torch

    from dat_ds.data.loader import IGNORE, StreamSpec, make_train_loader
    from dat_ds.data.shards import ShardError, load_index

    bad = _corrupt_one_image(digits_dir, tmp_path / "d")
    split = load_index(tmp_path / "d").split("train")
    spec = dict(
        split=split,
        channels=1,
        augment="none",
        image_size=8,
        micro_batch=32,
        batches=22,
        rank=0,
        world=2,
        seed=0,
        epoch=0,
        workers=workers,
    )
    # the bad sample must fall in rank 0's share for this test: find the epoch where it does
    from dat_ds.data.loader import epoch_order

    spec["epoch"] = next(
        e
        for e in range(50)
        if bad in epoch_order(split.count, 0, e)[: 1437 // 64 * 64].reshape(-1, 64)[:, :32]
    )
    with pytest.raises(
        ShardError, match=r"sample train\d+ \(number 100\) of shard .*train-00000\d\.tar: cannot decode"
    ):
        list(make_train_loader(StreamSpec(**spec)))
    batches = list(make_train_loader(StreamSpec(**spec, on_bad_sample="skip")))
    assert len(batches) == 22 and all(x.shape == (32, 1, 8, 8) for x, _ in batches)
    labels = torch.cat([y for _, y in batches])
    assert (labels == IGNORE).sum() == 1


def _corrupt_one_test_image(src, dst, number: int) -> None:
    import shutil

    import numpy as np

    shutil.copytree(src, dst)
    shard, start, _, _ = (int(v) for v in np.load(dst / "test.members.npy")[number])
    path = dst / f"test-{shard:06d}.tar"
    data = bytearray(path.read_bytes())
    data[start + 512 : start + 576] = b"\xff" * 64
    path.write_bytes(bytes(data))


def test_the_test_split_is_held_to_the_training_split_standards(tmp_path, digits_dir):
    """A corrupt test image is named (sample, number, shard) when the monitored split is first read, which
    training does before its first step, and data.on_bad_sample = "skip" leaves it out of the counts; the
    evaluation command names it too."""
    from dat_ds.data.loader import EvalStream
    from dat_ds.data.shards import ShardError, load_index
    from dat_ds.robust_eval import load_examples

    _corrupt_one_test_image(digits_dir, tmp_path / "d", 17)
    index = load_index(tmp_path / "d")
    kw = dict(rank=0, world=1, augment="none", image_size=8, batch_size=64)
    with pytest.raises(
        ShardError, match=r"sample \S+ \(number 17 of the test split\) of shard .*test-00000\d\.tar"
    ):
        EvalStream(index, "test", **kw).check()
    assert EvalStream(index, "test", on_bad_sample="skip", **kw).check() == index.split("test").count - 1
    with pytest.raises(ShardError, match="number 17 of the test split"):
        load_examples(index, list(range(20)), set(range(20)), "none", 8)
