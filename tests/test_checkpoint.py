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


def test_resume_refuses_a_changed_recipe_before_touching_the_run(tmp_path, digits_dir):
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
    rc = main([*args, *[x for o in base + changed for x in ("--set", o)]])
    assert rc == 2
    assert (tmp_path / "r" / "config.json").read_text() == "original record", "nothing rewritten"

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
