"""A chunked, resumable stage that ranks share: evaluation, certification and pseudo-labelling all run on this.

    examples 0..n-1 -> fixed chunks of ``chunk`` -> chunk c on rank c % world -> each finished chunk saved at once,
    in one verified format -> rank 0 gathers every chunk (verified) in order -> the stage writes its results

A chunk's part is a ``.npz`` of named columns (numpy arrays, no pickle) plus its row count and the sha256 of its
columns: a part is used again only when it loads and its count and checksum match; a truncated or altered part is
recomputed. Parts live in a folder whose ``settings.json`` names everything the results depend on (model sha256,
settings, examples, chunking); a second run of the same stage on the same folder waits for no one: it is refused
at once, naming the process that holds the folder (``.lock``, released by the kernel when that process dies). The
final file is written only after every part has been verified.

Where ranks run on hosts without a shared filesystem, each reads back only its own chunks; rank 0 needs every part,
so the parts folder must be shared, as the run folder is.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .progress import Progress
from .run_folder import SETTINGS, atomic_write, atomic_write_json
from .run_lock import FolderBusy, RunLock

log = logging.getLogger("dat_ds")


def world_and_rank() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def stage_device() -> torch.device:
    """This rank's device: its local GPU under a launcher, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _digest(cols: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(cols):
        a = np.ascontiguousarray(cols[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Stage:
    """One run of a chunked stage over ``n`` examples, its parts in ``folder``."""

    def __init__(self, folder: Path, settings: dict, n: int, chunk: int, what: str, parts: str = ""):
        """``parts``: the subfolder of ``folder`` that holds the part files ("": the folder itself, when it holds
        nothing but the stage's own files)."""
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.world, self.rank = world_and_rank()
        self.folder, self.settings, self.n, self.chunk, self.what = Path(folder), settings, n, chunk, what
        self.parts = self.folder / parts if parts else self.folder
        self.chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
        self.mine = [c for c in range(len(self.chunks)) if c % self.world == self.rank]
        self._lock: RunLock | None = None
        self._t0 = time.perf_counter()
        self._done = 0
        self._bar = None
        self._todo_rank0: list[int] = list(self.mine)  # start() narrows it to the chunks not found done
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                self._lock = RunLock(self.folder, what=f"dat_ds {what}").acquire()
            except FolderBusy as e:
                raise SystemExit(f"dat-ds: error: {e}") from None
            sfile = self.folder / SETTINGS
            if sfile.is_file():
                if json.loads(sfile.read_text()) != settings:
                    self.release()
                    raise SystemExit(
                        f"dat-ds: error: {self.folder} holds a {what} with other settings ({sfile}); remove that "
                        "folder or keep its settings"
                    )
            else:
                atomic_write_json(sfile, settings)
            self.parts.mkdir(exist_ok=True)
        self.barrier()

    # -------------------------------------------------------------------------------------------- parts

    def _part(self, c: int) -> Path:
        return self.parts / f"chunk{c:07d}.npz"

    def save(self, c: int, cols: dict[str, np.ndarray]) -> None:
        rows = len(self.chunks[c])
        for k, v in cols.items():
            if len(v) != rows:
                raise ValueError(f"{self.what} chunk {c}: column {k} has {len(v)} rows, the chunk {rows}")
        buf = io.BytesIO()
        np.savez(
            buf, **cols, __rows__=np.array(rows), __sha256__=np.frombuffer(_digest(cols).encode(), np.uint8)
        )
        atomic_write(self._part(c), buf.getvalue())
        self._done += 1
        self.report_progress()

    def load(self, c: int) -> dict[str, np.ndarray] | None:
        """Chunk ``c``'s columns if its part is whole and verified; None if missing (a damaged part is logged)."""
        f = self._part(c)
        if not f.is_file():
            return None
        try:
            with np.load(f, allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files if not k.startswith("__")}
                rows, digest = int(z["__rows__"]), bytes(z["__sha256__"]).decode()
            if rows != len(self.chunks[c]) or any(len(v) != rows for v in cols.values()):
                raise ValueError(f"{rows} rows, the chunk has {len(self.chunks[c])}")
            if digest != _digest(cols):
                raise ValueError("its checksum does not match its contents")
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            log.warning("%s: part %s is damaged (%s); computing that chunk again", self.what, f, e)
            return None
        return cols

    def pending(self) -> list[int]:
        """This rank's chunks without a verified part."""
        return [c for c in self.mine if self.load(c) is None]

    # -------------------------------------------------------------------------------------- progress

    def report_progress(self) -> None:
        if self.rank != 0:
            return
        if self._bar is None:
            self._bar = Progress(len(self._todo_rank0), f"{self.what} (rank 0's chunks)", "chunk", rank=0)
        self._bar.update(1)

    def start(self) -> list[int]:
        """This rank's chunks to run; says on rank 0 how many were found done."""
        todo = self.pending()
        if self.rank == 0:
            self._todo_rank0 = todo
            found = len(self.mine) - len(todo)
            if found:
                print(
                    f"{self.what}: resuming, {found} of rank 0's {len(self.mine)} chunks found done",
                    flush=True,
                )
        return todo

    # ------------------------------------------------------------------------------------------ gather

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def gather(self) -> dict[str, np.ndarray]:
        """Rank 0: every chunk's columns, verified, concatenated in chunk order. Call after ``barrier``."""
        if self._bar is not None:
            self._bar.close()
        parts = []
        for c in range(len(self.chunks)):
            cols = self.load(c)
            if cols is None:
                raise SystemExit(
                    f"dat-ds: error: {self.what}: chunk {c}'s part {self._part(c)} is missing or damaged after every "
                    "rank finished: the parts folder must be on a filesystem all ranks share; run the command again "
                    "to compute what is missing"
                )
            parts.append(cols)
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def seconds(self) -> float:
        return time.perf_counter() - self._t0

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc) -> None:
        self.release()  # on an error too: the lock goes, the finished parts stay for the next run

    def finish(self, remove: bool) -> None:
        """After the results are written: rank 0 releases the lock and, with ``remove``, deletes the stage's folder
        (parts, settings, lock); without, the verified parts stay for a later run to reuse."""
        self.barrier()
        if self.rank == 0:
            self.release()
            if remove:
                import shutil

                shutil.rmtree(self.folder, ignore_errors=True)
        self.release()
