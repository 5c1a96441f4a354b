"""The large-batch study: does LALR recover what plain SGD loses when DAT's batch grows? (digits, real runs)

    python -m bench.lalr_study            # writes docs/lalr_study.md and docs/lalr_study.png

Rows, all DAT-PGD-7 (eps 0.2, lambda 1) for the same number of epochs, warm-up 1 epoch then cosine:
  * single-worker AT at batch B = 64 (1 rank);
  * DAT at 2B = 128 (2 ranks x 64) with momentum SGD and with LALR;
  * DAT at 8B = 512 (2 ranks x 256) with momentum SGD (LR scaled linearly from B) and with LALR (LR scaled by
    the square root, the LAMB rule).
SGD's base LR is the demo's (0.1 at batch 128); LALR's base LR (0.02 at batch 64, Adam moments, c_l = 0,
c_u = 10, as the official DAT code) was fixed before the large-batch rows were run and not tuned on them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.runs import launch
from dat_ds.run_folder import RunFolder

B = 64
EPOCHS = 15
SGD = ['optim.name="sgd"', "optim.lr=0.1", 'optim.lr_scale="linear"', "optim.lr_ref_batch=128"]
LALR = [
    'optim.name="lalr"',
    "optim.lr=0.02",
    'optim.lr_scale="sqrt"',
    f"optim.lr_ref_batch={B}",
    "optim.weight_decay=1e-4",
]
ROWS = [
    ("AT, 1 worker", 1, B, B, SGD),
    ("DAT 2B, SGD", 2, 2 * B, B, SGD),
    ("DAT 2B, LALR", 2, 2 * B, B, LALR),
    ("DAT 8B, SGD", 2, 8 * B, 4 * B, SGD),
    ("DAT 8B, LALR", 2, 8 * B, 4 * B, LALR),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/lalr_study.md"))
    p.add_argument("--runs", type=Path, default=Path("runs/lalr_study"))
    p.add_argument(
        "--reuse", action="store_true", help="rebuild the table and plot from the runs already in --runs"
    )
    a = p.parse_args(argv)
    results = []
    for i, (label, ranks, batch, micro, opt) in enumerate(ROWS):
        if a.reuse:
            recs = RunFolder(a.runs / f"r{i}").read_metrics()
            results.append((label, ranks, batch, recs))
            continue
        ov = [
            f"train.epochs={EPOCHS}",
            f"train.global_batch_size={batch}",
            f"train.micro_batch_size={micro}",
            *opt,
        ]
        recs = launch("digits_dat_pgd.toml", f"r{i}", a.runs, ov, nproc=ranks)
        results.append((label, ranks, batch, recs))
        last = recs[-1]
        print(f"{label}: TA {last['clean_acc']:.4f} RA {last['pgd_acc']:.4f}", flush=True)

    lines = [
        "# Large-batch DAT with and without LALR (digits, DAT-PGD-7, eps 0.2)",
        "",
        f"Command: `python -m bench.lalr_study` (real runs through the deepspeed launcher on CPU ranks; "
        f"{EPOCHS} epochs each; RA is PGD-20 on the 360-image test split).",
        "",
        "| run | ranks | global batch | steps | TA % | RA % | T (s/epoch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, ranks, batch, recs in results:
        last = recs[-1]
        t = sum(r["epoch_time_s"] for r in recs) / len(recs)
        lines.append(
            f"| {label} | {ranks} | {batch} | {last['steps']} | {100 * last['clean_acc']:.2f} | "
            f"{100 * last['pgd_acc']:.2f} | {t:.2f} |"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n\n![accuracy per epoch](lalr_study.png)\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for (label, _, _, recs), c in zip(results, ("k", "C0", "C1", "C2", "C3"), strict=True):
        ep = [r["epoch"] for r in recs]
        style = "-" if "LALR" in label else "--"
        axes[0].plot(ep, [100 * r["clean_acc"] for r in recs], style, color=c, label=label)
        axes[1].plot(ep, [100 * r["pgd_acc"] for r in recs], style, color=c, label=label)
    axes[0].set(xlabel="epoch", ylabel="clean accuracy (%)", title="TA")
    axes[1].set(xlabel="epoch", ylabel="PGD-20 accuracy (%)", title="RA")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)
    print(a.out.read_text())


if __name__ == "__main__":
    main()
