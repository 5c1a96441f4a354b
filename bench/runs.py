"""Helpers for studies that launch real 2-rank training runs through the deepspeed launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dat_ds.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def launch(recipe: str, name: str, out_dir: Path, overrides: list[str], nproc: int = 2) -> list[dict]:
    """Run ``recipe`` as ``out_dir/name`` (replacing an earlier run of that name); return its metrics."""
    run = out_dir / name
    shutil.rmtree(run, ignore_errors=True)
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--module",
        "dat_ds.train",
        str(REPO / "recipes" / recipe),
        "--set",
        f'out_dir="{out_dir}"',
        "--set",
        f'name="{name}"',
    ]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), WANDB_SILENT="true")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return RunFolder(run).read_metrics()


class Stages:
    """A resumable study: each stage runs once (skipped when its result exists), its wall-clock time kept in
    ``out/times.json``, its output appended to ``out/study.log``."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.log = out / "study.log"
        self.times_file = out / "times.json"
        self.times: dict[str, float] = (
            json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        )

    def run(self, key: str, done: bool, cmd: list[str]) -> None:
        import time

        if done:
            print(f"{key}: done already")
            return
        print(f"{key}: running", flush=True)
        t0 = time.time()
        env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), WANDB_SILENT="true")
        with open(self.log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            r = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {self.log}")
        self.times[key] = time.time() - t0
        self.times_file.write_text(json.dumps(self.times, indent=1))
        print(f"{key}: {self.times[key]:.0f} s", flush=True)


def ds_cmd(module: str, *args: str, port: int, nproc: int = 2) -> list[str]:
    """A deepspeed launcher command for ``module`` on this machine."""
    return [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(port),
        "--module",
        module,
        *args,
    ]
