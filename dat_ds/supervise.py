"""Unattended recovery: rerun a training command from its newest checkpoint when it fails.

    python -m dat_ds.supervise [--max-restarts 3] [--delay 10] -- \\
        deepspeed --num_gpus 2 --master_port 29500 --module dat_ds.train recipes/digits_dat_pgd.toml

The command runs as given. When it exits with a failure (a rank killed, a host lost, a collective timed out), the
whole command is started again, up to ``--max-restarts`` times, with ``--resume auto`` (replacing any ``--resume``
it had) and a free ``--master_port``/``--master-port`` (so no socket of the failed attempt is in the way); the run
continues from its newest complete checkpoint, exactly as a resume by hand would.

Why not ``torchrun --max-restarts``: with gloo, ranks restarted inside the same torchrun agent failed to reconnect
in about half the tries on this machine ("connectFullMesh failed ... Connection refused", or a hang), the same with a
plain torch script; a fresh launcher each time has none of that state. Multi-node: wrap the head node's
``deepspeed --hostfile ...`` command (its pdsh/ssh path starts every host again).

Not restarted: exit 0 (done), exit 2 (dat-ds refused the run: a recipe error, a locked run folder, a changed
recipe on resume; the same command would fail the same way), and a SIGINT/SIGTERM to this supervisor, which is
passed on to the command; each attempt's process group is gone before the next one starts. Killing this supervisor
stops the ranks too: they watch it as one of their launchers (``dat_ds/launch_guard.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFUSED = 2  # dat_ds.train's exit code when it refuses to run: restarting would not help
# A rank that refuses also writes why to this file (set by the supervisor for each attempt): the launcher reports
# only the first rank to exit, which may be a peer that lost its connection to the refusing rank (exit 1).
REFUSAL_FILE_ENV = "DAT_DS_REFUSAL_FILE"
PORT_FLAGS = ("--master_port", "--master-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def restart_command(cmd: list[str], port: int) -> list[str]:
    """``cmd`` with ``--resume auto`` and a new master port (the launcher's own flag, before the module)."""
    out: list[str] = []
    i = 0
    has_port = False
    while i < len(cmd):
        a = cmd[i]
        flag, eq, _ = a.partition("=")
        if flag == "--resume":
            i += 1 if eq else 2  # dropped; re-added at the end
            continue
        if flag in PORT_FLAGS and not has_port:
            out += [f"{flag}={port}"] if eq else [flag, str(port)]
            has_port = True
            i += 1 if eq else 2
            continue
        out.append(a)
        i += 1
    if not has_port and out:
        out.insert(
            1, f"--master_port={port}"
        )  # right after the launcher: deepspeed and torchrun both take it
    return [*out, "--resume", "auto"]


def _group_alive(pgid: int) -> bool:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _reap_group(pgid: int, grace: float = 30.0) -> None:
    """Wait for every process of the attempt to end; SIGKILL what is left after ``grace`` seconds."""
    t0 = time.monotonic()
    while _group_alive(pgid):
        if time.monotonic() - t0 > grace:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            grace = float("inf")
        time.sleep(0.2)


def supervise(cmd: list[str], max_restarts: int, delay: float) -> int:
    stop = {"sig": 0}
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        stop["sig"] = signum
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    attempt = 0
    while True:
        t0 = time.monotonic()
        print(f"dat-ds supervise: attempt {attempt + 1}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        # Its own process group, so that the whole attempt (launcher and ranks) can be waited for and stopped.
        refusal = Path(tempfile.gettempdir()) / f"dat_ds_refusal_{os.getpid()}_{attempt}"
        refusal.unlink(missing_ok=True)
        child = subprocess.Popen(
            cmd, start_new_session=True, env={**os.environ, REFUSAL_FILE_ENV: str(refusal)}
        )
        rc = child.wait()
        _reap_group(child.pid)
        refused = refusal.is_file()
        refusal.unlink(missing_ok=True)
        took = time.monotonic() - t0
        if stop["sig"]:
            print(f"dat-ds supervise: stopped by signal {stop['sig']}; not restarting", file=sys.stderr)
            return 128 + stop["sig"]
        if rc == 0:
            if attempt:
                print(f"dat-ds supervise: finished after {attempt} restart(s)", file=sys.stderr)
            return 0
        if rc == REFUSED or refused:
            print("dat-ds supervise: the run was refused (exit 2); not restarting", file=sys.stderr)
            return REFUSED
        if attempt >= max_restarts:
            print(
                f"dat-ds supervise: attempt {attempt + 1} failed (exit {rc}) after {took:.0f} s; "
                f"no restarts left (--max-restarts {max_restarts})",
                file=sys.stderr,
            )
            return rc
        attempt += 1
        cmd = restart_command(cmd, free_port())
        print(
            f"dat-ds supervise: attempt {attempt} failed (exit {rc}) after {took:.0f} s; restart "
            f"{attempt}/{max_restarts} in {delay:g} s from the newest checkpoint",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(delay)
        if stop["sig"]:
            return 128 + stop["sig"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-restarts", type=int, default=3, help="restarts after a failure (default 3)")
    p.add_argument("--delay", type=float, default=10.0, help="seconds to wait before a restart (default 10)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launcher command")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error(
            "give the command to supervise after --, e.g. -- deepspeed --num_gpus 2 --module dat_ds.train R"
        )
    if args.max_restarts < 0 or args.delay < 0:
        p.error("--max-restarts and --delay must be >= 0")
    return supervise(cmd, args.max_restarts, args.delay)


if __name__ == "__main__":
    sys.exit(main())
