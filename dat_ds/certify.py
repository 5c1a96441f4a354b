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
0.05, the settings, the model's sha256, timings) and ``certified_accuracy.png``, and logs the certified accuracies
into the run's wandb run. The chunks run through ``dat_ds.stage``: each finished chunk is saved at once, verified
when reused; a killed certification, started again with the same arguments, continues with the chunks still
missing, and a second one on the same folder is refused while the first runs. Rank 0 shows its progress.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .cli import UsageError, add_examples, add_model, check_examples, command, number, parser
from .models import inference_model
from .run_folder import (
    CERTIFY_JSON,
    CERTIFY_PLOT,
    CERTIFY_TSV,
    PARTS,
    RunFolder,
    atomic_write,
    atomic_write_json,
)
from .smoothing import ABSTAIN, certify_counts, max_certifiable_radius, predict_counts, sample_counts
from .stage import Stage, file_sha256, stage_device

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


def out_folder(run: RunFolder, a) -> Path:
    which = f"every{a.every}" if a.every else f"subset{a.subset}_seed{a.seed}"
    return run.certify_dir(f"sigma{a.sigma:g}_n0{a.n0}_n{a.n}_alpha{a.alpha:g}_{which}")


def _tsv(cols: dict[str, np.ndarray], header: list[str]) -> str:
    lines = ["\t".join(header)]
    for i in range(len(cols["idx"])):
        lines.append(
            "\t".join(
                f"{cols[h][i]:.6g}" if cols[h].dtype.kind == "f" else str(int(cols[h][i])) for h in header
            )
        )
    return "\n".join(lines) + "\n"


def run_certification(a) -> dict | None:
    from .data.shards import load_index
    from .export import load_exported
    from .robust_eval import load_examples, select_indices

    run = RunFolder(a.run_dir)
    device = stage_device()
    path = a.model or run.model_file
    model, meta = load_exported(path, device)
    model = inference_model(model)  # BN folded, channels-last: the same classifier, counted faster
    cfg = json.loads(meta["config"])
    data_dir = Path(a.shards or cfg["data"]["shards"])
    index = load_index(data_dir)
    num_classes = int(meta["num_classes"])
    count = index.split("test").count
    # Cohen's certify.py --skip K: every K-th test example (the order fixed by the converter)
    wanted = list(range(0, count, a.every)) if a.every else select_indices(count, a.subset, a.seed, a.indices)
    model_sha = file_sha256(path)
    settings = {
        "sigma": a.sigma, "n0": a.n0, "n": a.n, "alpha": a.alpha, "subset": a.subset, "seed": a.seed,
        **({"every": a.every} if a.every else {}),
        "indices": str(a.indices) if a.indices else None, "chunk": a.chunk, "batch": a.batch,
        "predict_n": a.predict_n, "model": str(path), "model_sha256": model_sha, "shards": str(data_dir),
    }  # fmt: skip
    out = out_folder(run, a)
    with Stage(out, settings, len(wanted), a.chunk, "certify", parts=PARTS) as stage:
        todo = stage.start()
        data = load_examples(
            index, wanted, {p for c in todo for p in stage.chunks[c]}, cfg["data"]["augment"],
            cfg["data"]["image_size"] or index.image_size,
        )  # fmt: skip
        header = [*COLUMNS, *(["predict_smoothed"] if a.predict_n else [])]
        for c in todo:
            x = torch.stack([data[p][0] for p in stage.chunks[c]]).float().div_(255).to(device)
            y = [data[p][1] for p in stage.chunks[c]]
            g = torch.Generator().manual_seed(a.seed * 1_000_003 + c)
            rows = certify_chunk(
                model, x, y, sigma=a.sigma, n0=a.n0, n=a.n, alpha=a.alpha, num_classes=num_classes, generator=g,
                batch=a.batch, predict_n=a.predict_n,
            )  # fmt: skip
            cols = {h: np.array([r[j] for r in rows]) for j, h in enumerate(header[1:])}
            cols["idx"] = np.array([wanted[p] for p in stage.chunks[c]], dtype=np.int64)
            for h in ("label", "predict", "correct", *(["predict_smoothed"] if a.predict_n else [])):
                cols[h] = cols[h].astype(np.int64)
            cols["radius"], cols["time"] = cols["radius"].astype(np.float64), cols["time"].astype(np.float64)
            stage.save(c, cols)
        stage.barrier()
        report = None
        if stage.rank == 0:
            cols = stage.gather()
            atomic_write(out / CERTIFY_TSV, _tsv(cols, header))
            radius, correct, predict = cols["radius"], cols["correct"], cols["predict"]
            report = {
                **settings,
                "n_examples": len(radius),
                "world_size": stage.world,
                "certified_accuracy": certified_accuracy(radius, correct),
                "abstain_rate": float((predict == ABSTAIN).mean()),
                "max_certifiable_radius": max_certifiable_radius(a.sigma, a.n, a.alpha),
                "seconds_per_example": float(np.mean(cols["time"])),
                "certify_time_s_this_process": stage.seconds(),
            }
            if a.predict_n:
                ps = cols["predict_smoothed"]
                report["predict_accuracy"] = float((ps == cols["label"]).mean())
                report["predict_abstain_rate"] = float((ps == ABSTAIN).mean())
            atomic_write_json(out / CERTIFY_JSON, report)
            plot_certified(out / CERTIFY_PLOT, {f"σ = {a.sigma:g}": (radius, correct)})
            from .tracking import log_stage_results

            ca = report["certified_accuracy"]
            log_stage_results(
                a.run_dir, f"certify_sigma{a.sigma:g}", {f"certified_acc_r{r}": v for r, v in ca.items()}
            )
        stage.finish(remove=False)
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
    """The command: exit 0, or 2 with one line for an error a user can fix."""
    return command(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("run_dir", type=Path, help="a finished run folder (its model.safetensors)")
    p.add_argument(
        "--sigma", type=float, required=True, help="noise level of the smoothed classifier, in [0,1] pixels"
    )
    # Cohen's certify.py spells them --N0 and --N; the deepspeed launcher would take a lower-case --n for an
    # abbreviation of its own --num_gpus/--num_nodes and stop.
    p.add_argument("--N0", "--n0", dest="n0", type=int, default=100, help="draws that select the class (100)")
    p.add_argument(
        "--N", dest="n", type=int, default=100_000, help="draws that bound its probability (100,000)"
    )
    p.add_argument(
        "--alpha", type=float, default=0.001, help="failure probability, in (0, 0.5) (Cohen: 0.001)"
    )
    p.add_argument(
        "--every",
        type=int,
        default=0,
        help="certify every K-th test example, as Cohen et al.'s --skip (20: 500 of CIFAR-10's 10,000)",
    )
    p.add_argument("--indices", type=Path, default=None, help="file of test-split indices to certify")
    add_examples(
        p,
        "certify",
        chunk=10,
        batch=1000,
        batch_help="noisy copies per forward pass (default 1000): lower it to fit memory; the noise is drawn per "
        "pass, so it changes the draws",
    )
    p.add_argument("--predict-n", type=int, default=0, help="also run PREDICT with this many draws (0: off)")
    add_model(p)
    a = p.parse_args(argv)
    number(
        "--sigma",
        a.sigma,
        lo=0,
        hi=1,
        lo_open=True,
        fix="the Gaussian noise's std in [0,1] pixels, e.g. 0.25",
    )
    number("--alpha", a.alpha, lo=0, hi=0.5, lo_open=True, hi_open=True)
    number("--N0", a.n0, lo=1)
    number("--N", a.n, lo=1)
    number("--predict-n", a.predict_n, lo=0)
    number("--every", a.every, lo=0, fix="0: --subset or every example")
    check_examples(a)
    if a.batch < 1:
        raise UsageError(f"--batch {a.batch} must be >= 1 (noisy copies per forward pass)")
    if a.every and (a.subset or a.indices):
        raise UsageError("--every K picks the examples on its own: leave out --subset and --indices")
    model = a.model or RunFolder(a.run_dir).model_file
    if not model.is_file():
        raise UsageError(f"{model} is missing: certify a finished run")
    from .engine import start_stage

    start_stage(24 * 3600)  # hours: ranks wait for the slowest one's chunks
    report = run_certification(a)
    if report is not None:
        ca = report["certified_accuracy"]
        print(
            f"certified accuracy (σ = {a.sigma:g}, n = {a.n}, {report['n_examples']} examples): "
            + "  ".join(f"r={r}: {100 * ca[r]:.1f}" for r in ("0.00", "0.25", "0.50", "0.75", "1.00"))
            + f" | abstain {100 * report['abstain_rate']:.1f} % | {report['seconds_per_example']:.3f} s/example"
            + f" | no radius beyond {report['max_certifiable_radius']:.2f} can certify with n = {a.n} (raise --N)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
