"""Ranks stop when the command the user started goes away.

DeepSpeed's runner forwards signals to its ranks only in multi-node pdsh runs: on one host, SIGTERM or kill -9 of
the ``deepspeed`` command leaves ``launch.py`` and the ranks training, writing checkpoints and metrics, while the
user's shell says the job ended. Each rank therefore watches the launcher processes above it (the ``deepspeed``
runner, DeepSpeed's ``launch.py``, ``torchrun``) from a daemon thread, and ends itself within about a second of
any of them disappearing. On a remote host of a multi-node run the rank watches its own ``launch.py``; if the
user's command dies on the head node only, the remote ranks end when their next collective times out
(``train.collective_timeout_s``).
Under ``dat_ds.supervise`` the supervisor is one of the launchers watched: killing it stops the ranks too.
"""

from __future__ import annotations

import os
import sys
import threading
import time

LAUNCHERS = (
    "deepspeed.launcher.launch",
    "deepspeed.launcher.runner",
    "bin/deepspeed",
    "torchrun",
    "torch.distributed.run",
    "torch.distributed.launch",
    "dat_ds.supervise",
)


def _proc(pid: int) -> tuple[str, str] | None:
    """(start time, command line) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19], cmd  # field 22 of stat: start time, in clock ticks since boot


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def launcher_chain() -> list[tuple[int, str, str]]:
    """(pid, start time, command) of the launcher processes above this one, nearest first."""
    chain = []
    pid = os.getppid()
    while pid > 1:
        info = _proc(pid)
        if info is None or not any(k in info[1] for k in LAUNCHERS):
            break
        chain.append((pid, *info))
        pid = _parent(pid)
    return chain


def guard(poll_s: float = 1.0, on_lost=None) -> threading.Thread | None:
    """Start the watcher (no-op when not started by a launcher). ``on_lost`` defaults to ending the process."""
    chain = launcher_chain()
    if not chain:
        return None
    rank = os.environ.get("RANK", "?")

    def lost(pid: int, cmd: str) -> None:
        print(
            f"dat-ds: rank {rank}: the launcher process {pid} ({cmd.strip()[:120]}) is gone; stopping this rank",
            file=sys.stderr,
            flush=True,
        )
        os._exit(143)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            for pid, start, cmd in chain:
                info = _proc(pid)
                if info is None or info[0] != start:  # gone, or its pid reused
                    (on_lost or lost)(pid, cmd)
                    return

    t = threading.Thread(target=watch, name="dat-ds-launch-guard", daemon=True)
    t.start()
    return t
