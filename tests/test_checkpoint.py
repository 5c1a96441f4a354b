"""Checkpoint bookkeeping without ranks: which folders count as complete."""

import json

import pytest

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
    (tag / "COMPLETE").write_text(json.dumps({"global_step": 4, "epoch": 0, "step_in_epoch": 4, "world_size": 1}))
    (tag / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "r" / "config.json").write_text("original record")
    args = ["recipes/digits_dat_pgd.toml", "--resume", "auto"]
    changed = ["comm.bits=16", "attack.eps=0.1", "train.epochs=30"]
    rc = main([*args, *[x for o in base + changed for x in ("--set", o)]])
    assert rc == 2
    assert (tmp_path / "r" / "config.json").read_text() == "original record", "nothing rewritten"

    from dat_ds.config import resume_differences

    refused, allowed = resume_differences(cfg.to_dict(), load_config("recipes/digits_dat_pgd.toml", base + changed))
    assert refused == ["attack.eps: 0.2 -> 0.1", "comm.bits: 32 -> 16"]
    assert allowed == ["train.epochs: 15 -> 30"]
