"""Checkpoints that resume a run exactly, and survive a kill at any moment.

DeepSpeed saves weights, optimizer, LR schedule and step counters. dat-ds adds, per rank, what an exact resume
also needs (RNG states, data position, the epoch's running sums) in ``dat_rank{r}.pt`` (tensors only, read with
``weights_only=True``). A checkpoint counts only once rank 0 has written ``COMPLETE`` into its folder, after every
rank finished writing; ``latest`` is then replaced atomically. ``--resume auto`` trusts ``COMPLETE`` markers,
never ``latest`` (DeepSpeed writes it before all ranks are done), so a kill during a save falls back to the
previous checkpoint. Older complete checkpoints beyond ``keep`` are removed only after a newer one is complete.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .run_folder import (
    CHECKPOINTS,
    LATEST,
    MARKER,
    RANK_FILE,
    atomic_path,
    atomic_write,
    checkpoint_recipe,
    fsync_path,
    read_checkpoint_recipe,
)

log = logging.getLogger("dat_ds")


class UnsafeCheckpointError(SystemExit):
    """A checkpoint file holds something other than tensors and plain data; it is not loaded."""


def safe_load(path: str | Path, map_location=None) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings and containers only, never code.

    DeepSpeed 0.19.8's own checkpoint engine unpickles with ``weights_only=False``; ``secure_checkpoint_engine``
    routes it through here. The files DeepSpeed writes at ZeRO stage 0 for dat-ds's optimizers hold nothing else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds more than tensors and plain data ({first}). dat-ds never unpickles "
            "checkpoint files; this one was not written by dat-ds as it is (tampered with, or from another "
            "program). Resume from another checkpoint (--resume <tag>) or start a new run."
        ) from None


def secure_checkpoint_engine(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file through ``safe_load``."""
    engine.checkpoint_engine.load = safe_load


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    npy = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": py[0],
        "python_state": torch.tensor(py[1], dtype=torch.int64),
        "numpy_keys": torch.from_numpy(npy[1].astype(np.int64)),
        "numpy_pos": npy[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()), None))
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def rank0_decides(value: int, device: torch.device) -> int:
    """Collective: every rank gets rank 0's ``value`` (decisions others must follow, not re-derive from their
    own disk)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, 0)
    return int(t.item())


class Checkpointer:
    """Saving and finding checkpoints. The run folder must be on a filesystem every host sees (rank 0 decides
    what to load and writes the markers; every rank writes and reads its own files there)."""

    def __init__(self, run_dir: Path, keep: int, rank: int, world: int):
        self.dir = Path(run_dir) / CHECKPOINTS
        self.keep = max(1, keep)
        self.rank, self.world = rank, world

    def _room_for_one_more(self, engine) -> str | None:
        """Rank 0: does the disk hold one more checkpoint beside the ``keep`` ones (keep + 1 while saving)?"""
        tags = self.complete_tags()
        if tags:
            need = _tree_bytes(self.dir / tags[-1][1])
        else:  # weights + optimizer state (up to two moments) + a margin, before the first one exists
            need = 4 * sum(p.numel() * p.element_size() for p in engine.module.parameters())
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if free < 1.1 * need:
            return (
                f"{self.dir} has {free / 1e6:.0f} MB free; a checkpoint takes about {need / 1e6:.0f} MB and a save "
                f"needs room for checkpoint.keep + 1 = {self.keep + 1} of them. Free space, lower checkpoint.keep, "
                "or move out_dir. The newest complete checkpoint is intact: continue with --resume auto."
            )
        return None

    def complete_tags(self) -> list[tuple[int, str]]:
        """(global_step, tag) of every complete checkpoint, oldest first."""
        out = []
        if self.dir.is_dir():
            for d in self.dir.iterdir():
                marker = d / MARKER
                if d.is_dir() and marker.is_file():
                    try:
                        meta = json.loads(marker.read_text())
                    except (json.JSONDecodeError, OSError):
                        continue
                    out.append((int(meta["global_step"]), d.name))
        return sorted(out)

    def damaged(self, tag: str) -> str | None:
        """Why checkpoint ``tag`` cannot be trusted (a file shorter or longer than when it was saved, or gone), or
        None. Checkpoints from before the marker listed its files pass."""
        try:
            files = json.loads((self.dir / tag / MARKER).read_text()).get("files", {})
        except (json.JSONDecodeError, OSError) as e:
            return f"its {MARKER} marker is unreadable ({e})"
        for name, size in files.items():
            f = self.dir / tag / name
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != size:
                return f"{f} has {f.stat().st_size} bytes, {size} when it was saved"
        return None

    def latest(self) -> str | None:
        """The newest complete checkpoint whose files are whole; a damaged newer one is passed over, said so."""
        for _, tag in reversed(self.complete_tags()):
            why = self.damaged(tag)
            if why is None:
                return tag
            print(
                f"dat-ds: checkpoint {self.dir / tag} is damaged ({why}); trying the one before it",
                file=sys.stderr,
            )
        return None

    def save(self, engine, tag: str, client_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Collective: every rank calls it."""
        problem = self._room_for_one_more(engine) if self.rank == 0 else None
        if (
            self.rank == 0
        ):  # saving again into a tag (a resumed run redoing an epoch): not complete until it is
            (self.dir / tag / MARKER).unlink(missing_ok=True)
        if rank0_decides(int(problem is not None), engine.device):  # every rank stops, not only rank 0
            raise SystemExit(
                f"dat-ds: error: {problem}" if problem else "dat-ds: stopping: rank 0 found no room"
            )
        engine.save_checkpoint(str(self.dir), tag=tag, client_state={"dat": client_state}, save_latest=False)
        path = self.dir / tag / RANK_FILE.format(self.rank)
        with atomic_path(path) as tmp:
            torch.save(rank_state, tmp)
        dist.barrier()  # every rank's files are on disk
        if self.rank == 0:
            for f in (self.dir / tag).iterdir():  # DeepSpeed's files too: on disk before the marker says so
                if f.is_file():
                    fsync_path(f)
            fsync_path(self.dir / tag)
            atomic_write(checkpoint_recipe(self.dir / tag), json.dumps(client_state["config"], indent=1))
            meta = {
                "global_step": client_state["global_step"],
                "epoch": client_state["epoch"],
                "step_in_epoch": client_state["step_in_epoch"],
                "world_size": self.world,
                # every file's size: a truncated or replaced file is found before it is loaded (``damaged``)
                "files": {
                    f.name: f.stat().st_size
                    for f in sorted((self.dir / tag).iterdir())
                    if f.is_file() and f.name != MARKER
                },
            }
            atomic_write(self.dir / tag / MARKER, json.dumps(meta))
            fsync_path(self.dir / tag)
            atomic_write(self.dir / LATEST, tag)
            fsync_path(self.dir)
            self._prune(tag)
        dist.barrier()

    def _prune(self, newest: str) -> None:
        # Runs inside the collective save, so no other save is in flight: folders without a marker are leftovers
        # of killed saves.
        keep = {t for _, t in self.complete_tags()[-self.keep :]} | {newest}
        for d in self.dir.iterdir():
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def saved_config(self, tag: str) -> dict[str, Any] | None:
        """The resolved recipe a checkpoint was written under (None for checkpoints older than this file)."""
        return read_checkpoint_recipe(self.dir / tag)

    def load(self, engine, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if not (self.dir / tag / MARKER).is_file():
            done = ", ".join(t for _, t in self.complete_tags()) or "none"
            raise SystemExit(
                f"checkpoint {self.dir / tag} is not complete (no {MARKER}: missing, or killed while "
                f"saving); complete ones: {done}. Use --resume auto for the newest complete one."
            )
        why = self.damaged(tag)
        if why is not None:
            older = [t for _, t in self.complete_tags() if t != tag and self.damaged(t) is None]
            raise SystemExit(
                f"checkpoint {self.dir / tag} is damaged ({why}); resume from an intact one: --resume auto takes "
                f"the newest ({older[-1] if older else 'none left'})"
            )
        meta = json.loads((self.dir / tag / MARKER).read_text())
        if meta["world_size"] != self.world:
            raise SystemExit(
                f"checkpoint {self.dir / tag} was written by {meta['world_size']} ranks, this run has {self.world}; "
                "an exact resume needs the same world size (start a new run to change it)"
            )
        _, client = engine.load_checkpoint(
            str(self.dir),
            tag=tag,
            load_module_strict=True,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        rank_state = safe_load(self.dir / tag / RANK_FILE.format(self.rank))
        return client["dat"], rank_state
