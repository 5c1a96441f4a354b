"""Checkpoint bookkeeping without ranks: which folders count as complete; refused recipes and files."""

import json
import os

import pytest
import torch

from dat_ds.checkpoint import Checkpointer


def test_resume_ignores_incomplete_checkpoints(tmp_path):
    """A save killed midway leaves a folder without COMPLETE and maybe a torn 'latest': neither is trusted."""
    ck = Checkpointer(tmp_path, keep=2, rank=0, world=2)
    for tag, step, complete in (
        ("epoch0001", 11, True),
        ("step00000016", 16, True),
        ("step00000020", 20, False),
    ):
        (ck.dir / tag).mkdir(parents=True)
        if complete:
            (ck.dir / tag / "COMPLETE").write_text(
                json.dumps({"global_step": step, "epoch": 1, "step_in_epoch": 5, "world_size": 2})
            )
    (ck.dir / "latest").write_text("")  # DeepSpeed's own pointer, torn
    assert ck.latest() == "step00000016"
    assert [t for _, t in ck.complete_tags()] == ["epoch0001", "step00000016"]
    with pytest.raises(SystemExit, match="step00000020 is not complete"):
        ck.load(None, "step00000020")


def test_resume_refuses_a_changed_recipe_before_touching_the_run(tmp_path, digits_dir, capsys):
    """A checkpoint written under one recipe, resumed under another: math and data changes are refused with
    each difference listed; the run folder is left as it was. Harmless changes (more epochs) are allowed."""
    import json

    from dat_ds.config import load_config
    from dat_ds.train import main

    base = [f'data.shards="{digits_dir}"', f'out_dir="{tmp_path}"', 'name="r"']
    cfg = load_config("recipes/digits_dat_pgd.toml", base)
    tag = tmp_path / "r" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text(
        json.dumps({"global_step": 4, "epoch": 0, "step_in_epoch": 4, "world_size": 1})
    )
    (tag / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "r" / "config.json").write_text("original record")
    args = ["recipes/digits_dat_pgd.toml", "--resume", "auto"]
    changed = ["comm.bits=16", "attack.eps=0.1", "train.epochs=30"]
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "r").rglob("*"))
    capsys.readouterr()
    rc = main([*args, *[x for o in base + changed for x in ("--set", o)]])
    assert rc == 2
    err = capsys.readouterr().err
    assert "attack.eps: 0.2 -> 0.1" in err and "comm.bits: 32 -> 16" in err, "each difference listed"
    assert (tmp_path / "r" / "config.json").read_text() == "original record", "nothing rewritten"
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "r").rglob("*"))
    assert after == before, "nothing created either: not even the run's lock file"

    from dat_ds.config import resume_differences

    refused, allowed = resume_differences(
        cfg.to_dict(), load_config("recipes/digits_dat_pgd.toml", base + changed)
    )
    assert refused == ["attack.eps: 0.2 -> 0.1", "comm.bits: 32 -> 16"]
    assert allowed == ["train.epochs: 15 -> 30"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """A model-states file whose pickle would run a command: refused with a clear message; the command never ran.
    The same load path DeepSpeed's engine takes after ``secure_checkpoint_engine``."""
    import types

    from dat_ds.checkpoint import UnsafeCheckpointError, safe_load, secure_checkpoint_engine

    marker = tmp_path / "PWNED"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "x": _Evil(marker)}, bad)
    engine = types.SimpleNamespace(checkpoint_engine=types.SimpleNamespace(load=None))
    secure_checkpoint_engine(engine)
    with pytest.raises(
        UnsafeCheckpointError, match="refusing to load .*mp_rank_00_model_states.pt.*never unpickles"
    ):
        engine.checkpoint_engine.load(str(bad), map_location=lambda s, loc: s)
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "steps": 3, "names": ["a"]}, good)
    assert safe_load(good)["steps"] == 3


@pytest.mark.launcher
def test_damaged_and_tampered_checkpoints_through_the_real_engine(tmp_path, digits_dir):
    """On real DeepSpeed files, through ``engine.load_checkpoint``: a truncated newest checkpoint is passed over for
    the one before it; a model-states file whose pickle would run a command (its size recorded as if whole) is
    refused with exit 2, the command never runs, and the supervisor does not restart a refusal."""
    import subprocess

    from tests.conftest import VENV_BIN, deepspeed_cmd, launch_env, read_metrics, run_launcher

    ov = [f'data.shards="{digits_dir}"', f'out_dir="{tmp_path}"', 'name="r"', "train.epochs=2",
          "train.max_steps_per_epoch=3", "attack.steps=2", "data.eval_limit=40"]  # fmt: skip
    first = run_launcher(tmp_path, "digits_dat_pgd.toml", ov, port=29691)
    assert first.returncode == 0, first.stderr[-2000:]
    ck = tmp_path / "r" / "checkpoints"
    # the layout of run folders written before 3 December 2026: the recipe as config.json (no timm model config)
    # in the run folder and in each checkpoint; it must still resume
    run = tmp_path / "r"
    (run / "config.json").unlink()
    (run / "recipe.json").rename(run / "config.json")
    for tag in ck.iterdir():
        if tag.is_dir():
            (tag / "recipe.json").rename(tag / "config.json")
            meta = json.loads((tag / "COMPLETE").read_text())
            meta["files"]["config.json"] = meta["files"].pop("recipe.json")
            (tag / "COMPLETE").write_text(json.dumps(meta))
    newest = ck / "epoch0002" / "mp_rank_00_model_states.pt"
    whole = newest.read_bytes()
    newest.write_bytes(whole[: len(whole) // 2])  # truncated
    res = run_launcher(tmp_path, "digits_dat_pgd.toml", ov, port=29692, extra=["--resume", "auto"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "epoch0002 is damaged" in res.stderr and "resumed from" in res.stdout and "epoch0001" in res.stdout
    assert [r["epoch"] for r in read_metrics(tmp_path / "r")] == [1, 2]

    # the resumed run wrote a new, whole epoch0002; now its model file carries code, size and marker matching
    marker = tmp_path / "PWNED"
    state = torch.load(newest, weights_only=False)
    state["x"] = _Evil(marker)
    torch.save(state, newest)
    meta = json.loads((ck / "epoch0002" / "COMPLETE").read_text())
    meta["files"][newest.name] = newest.stat().st_size
    (ck / "epoch0002" / "COMPLETE").write_text(json.dumps(meta))
    cmd = [str(VENV_BIN / "python"), "-m", "dat_ds.supervise", "--max-restarts", "2", "--delay", "0", "--",
           *deepspeed_cmd("digits_dat_pgd.toml", ov, port=29693), "--resume", "epoch0002"]  # fmt: skip
    sup = subprocess.run(cmd, cwd=tmp_path.parent, env=launch_env(tmp_path), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    out = sup.stdout + sup.stderr
    assert sup.returncode == 2, out[-2000:]
    assert "refusing to load" in out and "never unpickles" in out
    assert "refused (exit 2); not restarting" in out and "attempt 2" not in out
    assert not marker.exists(), "the pickle's command never ran"
