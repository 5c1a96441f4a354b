"""Certified l2 robustness of a smoothed classifier, over ranks (Cohen et al. 2019's CERTIFY and PREDICT).

    deepspeed --num_gpus 2 --module dat_ds.certify RUN --sigma 0.25 [--N0 100 --N 100000 --alpha 0.001]
        [--every 20 | --subset 500 --seed 0] [--chunk 10] [--batch 1000] [--predict-n 0]
    python -m dat_ds.certify RUN --sigma 0.25 ...            # one process

RUN is a finished run folder (its ``model.safetensors``); its test split is certified. Test examples are chosen
and cut into fixed chunks as ``dat_ds.evaluate`` does (chunk ``c`` to rank ``c % world``), and the noise of chunk
``c`` comes from a generator seeded by (seed, c), batched across the chunk's examples and draws, so every
prediction and radius is the same for any number of ranks. Per example: CERTIFY draws n0 noisy copies to pick a
class, n more to bound its probability from below with a one-sided Clopper-Pearson bound at level alpha (scipy),
and returns the class with radius sigma * Phi^-1(p_lower), or abstains (-1) when p_lower < 1/2. With
``--predict-n N``, PREDICT (the smoothed prediction with abstention, N fresh draws, two-sided binomial test) runs too.

Writes ``RUN/certify/sigma<S>_n<n>_...``: ``certify.tsv`` (Cohen's columns: idx, label, predict, radius, correct,
time; plus predict_smoothed with --predict-n), ``certify.json`` (certified accuracy at radii 0 to 1 in steps of
0.05, the settings, timings) and ``certified_accuracy.png``. Each finished chunk is saved at once under ``parts/``:
a killed certification, started again with the same arguments, continues with the chunks still missing. Rank 0
prints progress with an estimate of the time left.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .models import inference_model
from .smoothing import ABSTAIN, certify_counts, predict_counts, sample_counts

RADII = [round(0.05 * i, 2) for i in range(21)]  # 0, 0.05, ..., 1.0
COLUMNS = ["idx", "label", "predict", "radius", "correct", "time"]


def certify_chunk(
    model, x, y, *, sigma, n0, n, alpha, num_classes, generator, batch, predict_n
) -> list[list]:
    """Rows (label, predict, radius, correct, seconds per example[, predict_smoothed]) for one chunk."""
    t0 = time.perf_counter()
    counts0 = sample_counts(model, x, sigma, n0, num_classes, generator, batch).numpy()
    counts = sample_counts(model, x, sigma, n, num_classes, generator, batch).numpy()
    pred_counts = (
        sample_counts(model, x, sigma, predict_n, num_classes, generator, batch).numpy()
        if predict_n
        else None
    )
    per = (time.perf_counter() - t0) / len(x)
    rows = []
    for i in range(len(x)):
        c, r = certify_counts(counts0[i], counts[i], n, sigma, alpha)
        label = int(y[i])
        row = [label, c, r, int(c == label), per]
        if pred_counts is not None:
            row.append(predict_counts(pred_counts[i], alpha))
        rows.append(row)
    return rows


def certified_accuracy(radius: np.ndarray, correct: np.ndarray, radii=RADII) -> dict[str, float]:
    """Fraction of examples classified correctly with a certified radius of at least r, for each r."""
    return {f"{r:.2f}": float(((radius >= r) & (correct == 1)).mean()) for r in radii}


def _write_rows(path: Path, rows: list[list], header: list[str]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_rows(path: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in path.read_text().splitlines()[1:] if ln.strip()]


def out_folder(run_dir: Path, a) -> Path:
    which = f"every{a.every}" if a.every else f"subset{a.subset}_seed{a.seed}"
    tag = f"sigma{a.sigma:g}_n0{a.n0}_n{a.n}_alpha{a.alpha:g}_{which}"
    return run_dir / "certify" / tag


def run_certification(a) -> dict | None:
    from .data.shards import load_index
    from .evaluate import load_examples, progress, select_indices
    from .export import load_exported

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    path = a.model or a.run_dir / "model.safetensors"
    model, meta = load_exported(path, device)
    model = inference_model(model)  # BN folded, channels-last: the same classifier, counted faster
    cfg = json.loads(meta["config"])
    index = load_index(cfg["data"]["shards"])
    num_classes = int(meta["num_classes"])
    count = index.split("test").count
    # Cohen's certify.py --skip K: every K-th test example (the order fixed by the converter)
    wanted = list(range(0, count, a.every)) if a.every else select_indices(count, a.subset, a.seed, a.indices)
    chunks = [list(range(i, min(i + a.chunk, len(wanted)))) for i in range(0, len(wanted), a.chunk)]
    mine = [c for c in range(len(chunks)) if c % world == rank]
    out = out_folder(a.run_dir, a)
    parts = out / "parts"
    settings = {
        "sigma": a.sigma, "n0": a.n0, "n": a.n, "alpha": a.alpha, "subset": a.subset, "seed": a.seed,
        **({"every": a.every} if a.every else {}),
        "indices": str(a.indices) if a.indices else None, "chunk": a.chunk, "batch": a.batch,
        "predict_n": a.predict_n, "model": str(path),
    }  # fmt: skip
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
        sfile = out / "settings.json"
        if sfile.is_file() and json.loads(sfile.read_text()) != settings:
            raise SystemExit(
                f"{out} holds a certification with other settings ({sfile}); remove it or change them"
            )
        sfile.write_text(json.dumps(settings, indent=1))
    if dist.is_initialized():
        dist.barrier()
    todo = [c for c in mine if not (parts / f"chunk{c:06d}.tsv").is_file()]
    data = load_examples(
        index,
        wanted,
        {p for c in todo for p in chunks[c]},
        cfg["data"]["augment"],
        cfg["data"]["image_size"] or index.image_size,
    )
    header = [*COLUMNS, *(["predict_smoothed"] if a.predict_n else [])]
    t0 = time.perf_counter()
    for k, c in enumerate(todo):
        x = torch.stack([data[p][0] for p in chunks[c]]).float().div_(255).to(device)
        y = [data[p][1] for p in chunks[c]]
        g = torch.Generator().manual_seed(a.seed * 1_000_003 + c)
        rows = certify_chunk(
            model, x, y, sigma=a.sigma, n0=a.n0, n=a.n, alpha=a.alpha, num_classes=num_classes, generator=g,
            batch=a.batch, predict_n=a.predict_n,
        )  # fmt: skip
        rows = [[wanted[p], *row] for p, row in zip(chunks[c], rows, strict=True)]
        _write_rows(parts / f"chunk{c:06d}.tsv", rows, header)
        if rank == 0:
            progress(f"certify: rank 0 chunk {c} ({len(chunks)} in all)", k + 1, len(todo), t0)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    rows = [r for c in range(len(chunks)) for r in _read_rows(parts / f"chunk{c:06d}.tsv")]
    with open(out / "certify.tsv.tmp", "w") as f:
        f.write("\t".join(header) + "\n")
        f.writelines("\t".join(r) + "\n" for r in rows)
    os.replace(out / "certify.tsv.tmp", out / "certify.tsv")
    radius = np.array([float(r[3]) for r in rows])
    correct = np.array([int(r[4]) for r in rows])
    predict = np.array([int(r[2]) for r in rows])
    report = {
        **settings,
        "n_examples": len(rows),
        "world_size": world,
        "certified_accuracy": certified_accuracy(radius, correct),
        "abstain_rate": float((predict == ABSTAIN).mean()),
        "seconds_per_example": float(np.mean([float(r[5]) for r in rows])),
        "certify_time_s_this_process": time.perf_counter() - t0,
    }
    if a.predict_n:
        ps = np.array([int(r[6]) for r in rows])
        labels = np.array([int(r[1]) for r in rows])
        report["predict_accuracy"] = float((ps == labels).mean())
        report["predict_abstain_rate"] = float((ps == ABSTAIN).mean())
    (out / "certify.json").write_text(json.dumps(report, indent=1))
    plot_certified(out / "certified_accuracy.png", {f"σ = {a.sigma:g}": (radius, correct)})
    return report


def plot_certified(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (radius, correct) in curves.items():
        rs = np.linspace(0, max(1.0, float(radius.max()) if len(radius) else 1.0), 200)
        ax.plot(rs, [((radius >= r) & (correct == 1)).mean() for r in rs], label=label)
    ax.set_xlabel("ℓ2 radius")
    ax.set_ylabel("certified accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sigma", type=float, required=True, help="noise level of the smoothed classifier")
    # Cohen's certify.py spells them --N0 and --N; the deepspeed launcher would take a lower-case --n for an
    # abbreviation of its own --num_gpus/--num_nodes and stop.
    p.add_argument("--N0", "--n0", dest="n0", type=int, default=100, help="draws that select the class (100)")
    p.add_argument(
        "--N", dest="n", type=int, default=100_000, help="draws that bound its probability (100,000)"
    )
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (Cohen: 0.001)")
    p.add_argument(
        "--subset", type=int, default=0, help="certify a random subset of N test examples (0: all)"
    )
    p.add_argument(
        "--every",
        type=int,
        default=0,
        help="certify every K-th test example, as Cohen et al.'s --skip (20: 500 of CIFAR-10's 10,000)",
    )
    p.add_argument("--indices", type=Path, default=None, help="file of test-split indices to certify")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chunk", type=int, default=10, help="examples per chunk (the unit of work, seeding, resume)"
    )
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass")
    p.add_argument("--predict-n", type=int, default=0, help="also run PREDICT with this many draws (0: off)")
    p.add_argument(
        "--model", type=Path, default=None, help="a safetensors export (default: RUN/model.safetensors)"
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    problem = None
    if not (a.model or a.run_dir / "model.safetensors").is_file():
        problem = f"{a.model or a.run_dir / 'model.safetensors'} is missing: certify a finished run"
    elif a.sigma <= 0:
        problem = f"--sigma {a.sigma} must be > 0"
    elif a.n0 < 1 or a.n < 1 or a.chunk < 1 or a.batch < 1 or a.predict_n < 0:
        problem = "--N0, --N, --chunk and --batch must be >= 1, --predict-n >= 0"
    elif not 0 < a.alpha < 0.5:
        problem = f"--alpha {a.alpha} must be in (0, 0.5)"
    elif a.every < 0 or (a.every and (a.subset or a.indices)):
        problem = "--every K (K >= 1) picks the examples on its own: leave out --subset and --indices"
    if problem:
        if rank == 0:
            print(f"dat-ds: error: {problem}", file=sys.stderr)
        return 2
    from .engine import start_stage

    start_stage(24 * 3600)  # hours: ranks wait for the slowest one's chunks
    report = run_certification(a)
    if report is not None:
        ca = report["certified_accuracy"]
        print(
            f"certified accuracy (σ = {a.sigma:g}, n = {a.n}, {report['n_examples']} examples): "
            + "  ".join(f"r={r}: {100 * ca[r]:.1f}" for r in ("0.00", "0.25", "0.50", "0.75", "1.00"))
            + f" | abstain {100 * report['abstain_rate']:.1f} % | {report['seconds_per_example']:.3f} s/example"
        )
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
