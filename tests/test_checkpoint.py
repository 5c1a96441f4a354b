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
