"""Helpers for studies that launch real 2-rank training runs through the deepspeed launcher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dat_ds.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Row:
    """One training run of a paper-table study: its recipe overrides, world size, global batch, seed, the tables it
    appears in and whether its settings are the official code's or a dat-ds option."""

    key: str
    label: str
    ranks: int
    batch: int
    overrides: list[str] = field(default_factory=list)
    seed: int = 0
    tables: tuple[int, ...] = (1,)
    source: str = "official"  # "official": the official code's setting; "dat-ds": a dat-ds option
    autoattack: bool = True
    max_micro: int = 0  # a cap on the micro-batch per rank (0: none); the rest by gradient accumulation

    @property
    def micro(self) -> int:
        micro = self.batch // self.ranks
        return min(micro, self.max_micro) if self.max_micro else micro


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


def pct(vals: list, digits: int = 2) -> str:
    """Percentages of one cell over seeds: the mean and each seed's value; ``None`` is a seed not run yet."""
    n = len(vals)
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{100 * vals[0]:.{digits}f}" + (f" (1 of {n} seeds so far)" if n > 1 else "")
    mean = sum(vals) / len(vals)
    return f"{100 * mean:.{digits}f} ({' / '.join(f'{100 * v:.{digits}f}' for v in vals)})"


def row_summary(run: Path, key: str, times: dict) -> dict | None:
    """A finished, evaluated run's figures (``dat_ds.report.summarize``) with its step count, the theory's MB per
    iteration and the wall time of its stages; ``None`` while it has no evaluation."""
    from dat_ds.report import summarize

    folder = RunFolder(run)
    if not folder.eval_file().is_file():
        return None
    s = summarize(run)
    last = folder.read_metrics()[-1]
    s["theory"] = last["data_mb_per_iter_theory"]
    s["steps"] = last["steps"]
    for stage in ("train", "eval", "autoattack"):
        s[f"{stage}_s"] = times.get(f"{stage}_{key}", float("nan"))
    return s


@dataclass
class Claim:
    """One of the paper's claims as a paired comparison of two rows: ``a - b`` in RA points, ``expect`` its sign
    (">" a gain, "<" a loss, "≈" no difference). ``{seed}`` in a key pairs the two rows seed by seed."""

    text: str
    a: str
    b: str
    expect: str


def noise_points(p_a: float, p_b: float, n: int) -> float:
    """Twice the standard error of the difference of two accuracies on n test images, as if the two were
    independent (a paired comparison on the same images varies less, so this errs towards "within noise")."""
    return 200 * ((p_a * (1 - p_a) + p_b * (1 - p_b)) / n) ** 0.5


def verdict(delta: float, noise: float, expect: str) -> str:
    """reproduced, not reproduced (the difference the claim needs is within noise, or a claimed tie is not one) or
    contradicted (a difference beyond noise the other way)."""
    seen = "≈" if abs(delta) <= noise else (">" if delta > 0 else "<")
    if seen == expect:
        return "reproduced"
    return "not reproduced" if "≈" in (seen, expect) else "contradicted"


def claims_table(claims: list[Claim], done: dict, n: int) -> str:
    """The claims as a markdown table from the finished rows' summaries (``row_summary``); a claim whose rows have
    not run yet is left out. The verdict reads RA (the claims are about robustness); the clean accuracy's difference
    stands beside it, and AutoAttack's on seed 0 where both rows carry it. The noise of a comparison is the larger
    of ``noise_points`` and the spread of its difference over seeds."""
    lines = [
        "| the paper's claim (or dat-ds's) | comparison (a − b) | expected | ΔRA per seed (points) | mean ΔRA | noise (points) | at this scale | mean ΔTA | ΔAA, seed 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        ds, ta, noise = [], [], 0.0
        for seed in (0, 1) if "{seed}" in c.a and "{seed}" in c.b else (0,):
            x, y = done.get(c.a.format(seed=seed)), done.get(c.b.format(seed=seed))
            if x and y:
                ds.append(100 * (x["RA"] - y["RA"]))
                ta.append(100 * (x["TA"] - y["TA"]))
                noise = max(noise, noise_points(x["RA"], y["RA"], n))
        if not ds:
            continue
        mean = sum(ds) / len(ds)
        noise = max(noise, max(ds) - min(ds))
        x, y = done.get(c.a.format(seed=0)) or {}, done.get(c.b.format(seed=0)) or {}
        aa = (
            f"{100 * (x['AA'] - y['AA']):+.1f}"
            if x.get("AA") is not None and y.get("AA") is not None
            else "–"
        )
        lines.append(
            f"| {c.text} | {c.a.format(seed='*')} − {c.b.format(seed='*')} | {c.expect} | "
            f"{' / '.join(f'{d:+.1f}' for d in ds)} | {mean:+.2f} | {noise:.1f} | {verdict(mean, noise, c.expect)} | "
            f"{sum(ta) / len(ta):+.2f} | {aa} |"
        )
    return "\n".join(lines)


def certified_claim(text: str, a: dict, b: dict, expect: str, radii: list[str] | None = None) -> str | None:
    """A claim about certified accuracy as one markdown row: ``a`` and ``b`` are two certifications' reports
    (``certify.json``: ``certified_accuracy`` by radius, ``n_examples``) of the same test images. At each radius
    the difference a − b is set against ``noise_points``; the verdict counts the radii where it lies beyond noise
    either way: reproduced when some radii show the expected sign and none the other (for a claimed tie: none
    beyond noise), contradicted when only the other sign shows, not reproduced otherwise. None when either
    certification has not run yet. ``radii``: the radii (keys of ``certified_accuracy``) to judge; all shared
    ones when None."""
    if not a or not b:
        return None
    n = min(a["n_examples"], b["n_examples"])
    pairs = [(a["certified_accuracy"][r], b["certified_accuracy"][r]) for r in radii or a["certified_accuracy"]
             if r in a["certified_accuracy"] and r in b["certified_accuracy"]]  # fmt: skip
    deltas = [100 * (pa - pb) for pa, pb in pairs]
    noises = [noise_points(pa, pb, n) for pa, pb in pairs]
    above = sum(d > e for d, e in zip(deltas, noises, strict=True))
    below = sum(d < -e for d, e in zip(deltas, noises, strict=True))
    if expect == "≈":
        result = "reproduced" if not above and not below else "not reproduced"
    else:
        want, other = (above, below) if expect == ">" else (below, above)
        result = (
            "reproduced" if want and not other else "contradicted" if other and not want else "not reproduced"
        )
    return (
        f"| {text} | {expect} | {' / '.join(f'{d:+.1f}' for d in deltas)} | {max(noises):.1f} | "
        f"{above} / {len(deltas) - above - below} / {below} | {result} |"
    )


CERTIFIED_CLAIMS_HEAD = [
    "| the paper's claim (or dat-ds's) | expected | Δ certified accuracy at each radius (points) | noise, largest (points) | radii above / within / below noise | at this scale |",
    "|---|---|---|---|---|---|",
]
