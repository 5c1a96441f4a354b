"""Choosing the checkpoint a run continues from, and refusing one that would silently change the run."""

from __future__ import annotations

import sys

import torch

from ..config import RunConfig
from ..run_folder import MARKER, RANK_FILE, RunFolder, checkpoint_recipe


def resume_tag(ckpt, resume: str, rank: int, device: torch.device) -> str | None:
    """Collective: the checkpoint rank 0 chose (``auto``: its newest complete one), checked visible to every rank."""
    import torch.distributed as dist

    chosen = ""
    if rank == 0:
        chosen = (ckpt.latest() or "") if resume == "auto" else ("" if resume in ("none", "") else resume)
    buf = torch.zeros(256, dtype=torch.uint8, device=device)
    raw = chosen.encode()[:256]
    buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    tag = bytes(buf.cpu().tolist()).rstrip(b"\0").decode()
    if not tag:
        return None
    sees = (ckpt.dir / tag / MARKER).is_file() and (ckpt.dir / tag / RANK_FILE.format(rank)).is_file()
    blind = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    blind[rank] = int(not sees)
    dist.all_reduce(blind)
    if blind.any():
        ranks = blind.nonzero().flatten().tolist()
        raise SystemExit(
            f"dat-ds: error: rank(s) {ranks} cannot see checkpoint {ckpt.dir / tag} that rank 0 chose: the run "
            "folder (out_dir) must be on a filesystem every host shares, at the same path"
        )
    return tag


def check_resume(cfg: RunConfig, resume: str, world: int) -> str | None:
    """Before anything in the run folder is touched: refuse to resume under a recipe that changes the math or the
    data stream. Returns the message, or None."""
    from ..checkpoint import Checkpointer
    from ..config import resume_differences

    ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint.keep, 0, world)
    tag = ckpt.latest() if resume == "auto" else resume
    if tag is None:
        return None
    saved = ckpt.saved_config(tag)
    if saved is None:
        saved = RunFolder(cfg.run_dir).read_recipe()
    if saved is None:
        return None
    refused, allowed = resume_differences(saved, cfg)
    if refused:
        return (
            f"checkpoint {ckpt.dir / tag} was trained under a different recipe; resuming would silently change "
            "the run:\n  "
            + "\n  ".join(refused)
            + "\nResume with the recipe it was written under (its resolved "
            f"copy is {checkpoint_recipe(ckpt.dir / tag)}), or start a new run with --set name=<new name> "
            "(nothing was changed)"
        )
    if allowed:
        print("dat-ds: resuming with changed settings:\n  " + "\n  ".join(allowed), file=sys.stderr)
    return None
