"""One run folder, one run: an exclusive lock held by rank 0 for the run's lifetime.

``flock`` on ``<run>/.lock``: the kernel releases it when the process ends, kill -9 included, so a crashed run
never leaves a stale lock behind. The file records who holds it (host, pid, start time, command), so a refused
second launch can say which run is using the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path


class RunFolderBusy(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
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
            raise RunFolderBusy(
                f"{self.path.parent} is in use by another run ({who}); wait for it to finish or stop it, or "
                "start this one with --set name=<new name>"
            ) from None
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
