"""One folder, one user: an exclusive lock held for a run's (or a stage's) lifetime.

``flock`` on ``<folder>/.lock``: the kernel releases it when the process ends, kill -9 included, so a crashed run
never leaves a stale lock behind. The file records who holds it (host, pid, start time, command), written only by
the process that got the lock, so a refused second launch can say which process is using the folder and leaves the
record as it was. Training locks its run folder; evaluation, certification and pseudo-labelling lock the folder of
their parts.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .run_folder import LOCK


class FolderBusy(RuntimeError):
    pass


RunFolderBusy = FolderBusy  # the name before stages locked their folders too


class RunLock:
    def __init__(self, folder: Path, what: str = "run"):
        self.path = Path(folder) / LOCK
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = ", ".join(f"{k} {v}" for k, v in holder.items()) or "another process"
            fix = (
                "wait for it to finish or stop it, or start this one with --set name=<new name>"
                if self.what == "run"
                else "wait for it to finish or stop it (it resumes where it stopped when run again)"
            )
            raise FolderBusy(f"{self.path.parent} is in use by another {self.what} ({who}); {fix}") from None
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
