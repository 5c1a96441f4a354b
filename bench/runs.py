"""Helpers for studies that launch real 2-rank training runs through the deepspeed launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
