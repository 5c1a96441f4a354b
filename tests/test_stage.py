"""Stages that are safe to run twice and inputs that are named when they are wrong (issue 27): the stage lock, part
files verified by count and checksum, a damaged model export, a full disk during certification, and shard sets
with out-of-range labels, a sample without an image, or a member table that lies about offsets."""

from __future__ import annotations

import errno
import io
import json
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dat_ds.config import load_config
from dat_ds.data.shards import Sample, ShardError, load_index, write_index, write_tar
from dat_ds.stage import Stage
from tests.conftest import REPO, launch_env, refused


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_dir):
    """A run folder with an exported digits model (untrained: the stages' plumbing is what is tested)."""
    from dat_ds.export import export_safetensors
    from dat_ds.models import build_model

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "recipes/digits_dat_pgd.toml", [f'data.shards="{digits_dir}"'])
    (run / "recipe.json").write_text(json.dumps(cfg.to_dict()))
    torch.manual_seed(0)
    export_safetensors(
        build_model(cfg.model, 10, 1, [0.5], [0.25]), cfg, load_index(digits_dir), run / "model.safetensors"
    )
    return run


def _copy(run, dest):
    dest.mkdir()
    for f in ("recipe.json", "model.safetensors"):
        shutil.copy(run / f, dest / f)
    return dest


# ------------------------------------------------------------------------------------------------ the lock


def test_a_second_stage_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    import os

    with Stage(tmp_path / "parts", {"a": 1}, 10, 4, "evaluate"):
        with pytest.raises(SystemExit, match=rf"in use by another dat_ds evaluate \(.*pid {os.getpid()}"):
            Stage(tmp_path / "parts", {"a": 1}, 10, 4, "evaluate")
    with Stage(tmp_path / "parts", {"a": 1}, 10, 4, "evaluate") as again:  # released: a later run goes on
        assert again.start() == [0, 1, 2]


def test_two_evaluations_of_one_run_at_once_the_second_is_refused(finished_run, tmp_path, capsys):
    """A real second command while the first is running: refused with exit 2 naming the first; the first finishes
    and its eval.json names the model it describes."""
    from dat_ds.evaluate import main

    run = _copy(finished_run, tmp_path / "run")
    args = ["--subset", "200", "--chunk", "10", "--pgd-steps", "20", "--pgd-restarts", "2", "--no-autoattack"]
    first = subprocess.Popen([sys.executable, "-m", "dat_ds.evaluate", str(run), *args], cwd=REPO,
                             env=launch_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not list(run.glob("eval_parts/*/chunk*.npz")):  # the first is computing
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first evaluation never started"
            time.sleep(0.2)
        rc = main([str(run), *args])
        err = refused(capsys, rc, r"in use by another dat_ds evaluate \(.*pid " + str(first.pid))
        assert "wait for it to finish" in err
    finally:
        out, errs = first.communicate(timeout=300)
    assert first.returncode == 0, errs[-2000:]
    report = json.loads((run / "eval.json").read_text())
    from dat_ds.stage import file_sha256

    assert report["model_sha256"] == file_sha256(run / "model.safetensors")


# ------------------------------------------------------------------------------------------------ parts


def test_parts_are_verified_by_count_and_checksum(tmp_path, caplog):
    folder = tmp_path / "s"
    cols = {c: {"x": np.arange(c * 4, c * 4 + 4), "y": np.ones(4) * c} for c in range(3)}
    with Stage(folder, {"k": 1}, 12, 4, "certify") as st:
        for c in st.start():
            st.save(c, cols[c])
        st.barrier()
        whole = st.gather()
    part = lambda c: folder / f"chunk{c:07d}.npz"  # noqa: E731
    # cut to its first bytes; one byte changed in the middle; a valid part of the wrong chunk (its count is fine,
    # its rows are another chunk's: the checksum is of the columns, so a swapped file is caught by its contents)
    part(0).write_bytes(part(0).read_bytes()[:60])
    raw = bytearray(part(1).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    part(1).write_bytes(bytes(raw))
    with Stage(folder, {"k": 1}, 12, 4, "certify") as st, caplog.at_level("WARNING", logger="dat_ds"):
        todo = st.start()
        assert todo == [0, 1], "the damaged parts are computed again, the whole one is kept"
        assert caplog.text.count("is damaged") >= 2
        for c in todo:
            st.save(c, cols[c])
        st.barrier()
        again = st.gather()
    assert all(np.array_equal(whole[k], again[k]) for k in whole)
    # a part with the right checksum but a row count that disagrees with its chunk is refused when saved
    with (
        Stage(folder, {"k": 1}, 12, 4, "certify") as st,
        pytest.raises(ValueError, match="column x has 3 rows"),
    ):
        st.save(2, {"x": np.arange(3), "y": np.ones(3)})


def test_gather_names_a_missing_part_and_writes_nothing(tmp_path):
    with Stage(tmp_path / "s", {"k": 1}, 8, 4, "certify") as st:
        st.save(0, {"x": np.arange(4)})
        with pytest.raises(SystemExit, match=r"chunk 1's part .*chunk0000001.npz is missing or damaged"):
            st.gather()


# ------------------------------------------------------------------------------------------ damaged inputs


@pytest.mark.parametrize("command", ["evaluate", "certify"])
@pytest.mark.parametrize("damage", ["truncated", "overwritten", "missing"])
def test_a_damaged_model_export_is_named(command, damage, finished_run, tmp_path, capsys):
    import importlib

    run = _copy(finished_run, tmp_path / "run")
    model = run / "model.safetensors"
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[:1000])
    elif damage == "overwritten":
        model.write_bytes(b"\0" * 4096)
    else:
        model.unlink()
    main = importlib.import_module(f"dat_ds.{command}").main
    extra = (
        ["--sigma", "0.25", "--N", "100", "--subset", "4"] if command == "certify" else ["--no-autoattack"]
    )
    rc = main([str(run), *extra])
    pattern = "is missing" if damage == "missing" else "cannot be loaded .* it is damaged; export it again"
    refused(capsys, rc, re.escape(str(model)) + ".*" + pattern)
    assert not (run / "eval.json").exists() and not (run / "certify").exists()


def test_a_full_disk_during_certification_is_named_and_the_next_run_resumes(
    finished_run, tmp_path, capsys, monkeypatch
):
    import dat_ds.certify as cm

    run = _copy(finished_run, tmp_path / "run")
    args = [str(run), "--sigma", "0.25", "--N0", "10", "--N", "50", "--subset", "12", "--chunk", "4"]
    real = cm.atomic_write

    def full(path, data):
        if str(path).endswith("certify.tsv"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(cm, "atomic_write", full)
    rc = cm.main(args)
    refused(capsys, rc, r"no space left writing .*certify.tsv .*run the same command again")
    (out,) = (run / "certify").iterdir()
    assert len(list((out / "parts").glob("chunk*.npz"))) == 3, "every finished part kept"
    monkeypatch.setattr(cm, "atomic_write", real)
    assert cm.main(args) == 0
    assert len((out / "certify.tsv").read_text().splitlines()) == 13


# ------------------------------------------------------------------------------------------ shard sets


def _png(v: int) -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.full((8, 8), v, np.uint8)).save(b, format="PNG")
    return b.getvalue()


def _shard_set(d, label=lambda i: i % 10, no_image=()):
    d.mkdir()
    samples = [
        Sample(key=f"s{i:04d}", image=b"hello" if i in no_image else _png(i * 3), ext="txt" if i in no_image else "png",
               label=label(i))
        for i in range(64)
    ]  # fmt: skip
    write_tar(d / "train-000000.tar", samples[:48])
    write_tar(d / "test-000000.tar", samples[48:])
    write_index(d, name="probe", num_classes=10, channels=1, image_size=8, mean=[0.5], std=[0.25],
                splits={"train": [{"file": "train-000000.tar", "count": 48}],
                        "test": [{"file": "test-000000.tar", "count": 16}]})  # fmt: skip
    return d


def test_an_out_of_range_label_is_refused_when_the_index_loads(tmp_path, capsys):
    from dat_ds.train import main

    d = _shard_set(tmp_path / "labels", label=lambda i: 12 if i == 5 else i % 10)
    with pytest.raises(
        ShardError, match=r"outside 0\.\.9 .*sample number 5 \(label 12, in .*train-000000.tar\)"
    ):
        load_index(d)
    rc = main([str(REPO / "recipes/digits_dat_pgd.toml"), "--check", "--set", f'data.shards="{d}"'])
    refused(capsys, rc, "label outside 0..9")


def test_a_sample_without_an_image_is_named_or_skipped(tmp_path):
    import dataclasses

    from dat_ds.data.loader import StreamSpec, make_eval_loader, make_train_loader

    d = _shard_set(tmp_path / "noimage", no_image=(3, 50))
    index = load_index(d)
    spec = dict(rank=0, world=1, augment="none", image_size=8)
    with pytest.raises(ShardError, match=r"sample s0050 .* no image member .*on_bad_sample"):
        list(make_eval_loader(index, "test", batch_size=16, **spec))
    xs = list(make_eval_loader(index, "test", batch_size=16, on_bad_sample="skip", **spec))
    assert sum(len(y) for _, y in xs) == 15, "the imageless test sample left out"
    train = StreamSpec(split=index.split("train"), channels=1, augment="none", image_size=8, micro_batch=16,
                       batches=3, rank=0, world=1, seed=0, epoch=0)  # fmt: skip
    with pytest.raises(ShardError, match=r"sample s0003 \(number 3\) .* no image member .*on_bad_sample"):
        for _ in make_train_loader(train):
            pass
    skip = dataclasses.replace(train, on_bad_sample="skip")
    n_ignored = sum(int((b[1] < 0).sum()) for b in make_train_loader(skip))
    assert n_ignored == 1


def test_a_member_table_that_lies_about_offsets_is_named_with_the_fix(tmp_path):
    from dat_ds.data.shards import SampleReader

    d = _shard_set(tmp_path / "offsets")
    m = np.load(d / "train.members.npy")
    m[5, 1:3] += 100  # start and end moved into the middle of the sample's bytes
    np.save(d / "train.members.npy", m)
    reader = SampleReader(load_index(d).split("train"))
    assert reader[4].key == "s0004"
    with pytest.raises(
        ShardError,
        match=rf"sample number 5: .*does not match the shard; rebuild it with: python -m data_prep.members {d}",
    ):
        reader[5]
