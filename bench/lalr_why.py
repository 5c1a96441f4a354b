"""Why LALR does not beat SGD at the large batch on MNIST (issue 13): per-layer evidence and ablations, every
comparison on a validation split held out of the training set, never on the test split.

    python -m bench.lalr_why                # every stage; an interrupted study resumes where it stopped
    python -m bench.lalr_why --report-only  # the report from the stages done so far

The paper-tables rows (docs/paper_tables.md) found DAT-PGD at 8B = 512 with LALR 2.4 RA points below SGD on both
seeds, and no large-batch loss for LALR to recover. This study asks what LALR does differently, per layer.

Setting, fixed before any run: recipes/mnist_paper_tables.toml at 8B (2 ranks x 256, seed 0), trained on
data/mnist_val5k (``python -m data_prep.holdout data/mnist data/mnist_val5k --n 5000 --seed 0``: 55,000 training
images, 5,000 held out as val), with every optimizer step's per-layer norms logged (``train.layer_stats_every=1``,
dat_ds/layer_stats.py). Each run is scored by dat_ds.evaluate on 1,000 val images (seeded subset), PGD-50 x 5.
Runs: SGD and LALR by the paper-tables rule; then LALR with one thing changed each:
  * ``cu_off``: c_u = 1e9 instead of 10 (does the upper clip bind?);
  * ``weights_only``: the trust ratio on conv/linear weights only, BatchNorm and biases at lr * u (LAMB's usual
    exclusion, ``optim.adapt_norm_and_bias=false``);
  * ``lr_half``, ``lr_double``: the LR rule's 0.057 halved and doubled.
Then, decided after seeing the runs above: seed 1 of SGD, LALR and ``weights_only``, the one change that scored
above the rule.
Bias correction needs no run: LALR divides the Adam direction by its norm, and bias correction scales m and v by
per-step constants, so it changes ``u / ||u||`` only through Adam's epsilon (1e-6).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.paper_tables import LALR, SGD, B
from bench.runs import BIN, REPO, Stages, ds_cmd
from dat_ds.data.shards import has_index
from dat_ds.run_folder import RunFolder

DATA = REPO / "data" / "mnist_val5k"
COMMON = [f'data.shards="{DATA}"', 'eval.split="val"', "train.layer_stats_every=1",
          f"train.global_batch_size={8 * B}", f"train.micro_batch_size={4 * B}", "train.seed=0"]  # fmt: skip
LR = 0.057  # the rule's LALR LR at 8B: 0.02 * sqrt(8)


def _lalr(**change: str) -> list[str]:
    out = [o for o in LALR if o.split("=")[0] not in change]
    return out + [f"{k}={v}" for k, v in change.items()]


RUNS = {
    "sgd": ("SGD (the rule: lr 0.4)", SGD),
    "lalr": ("LALR (the rule: lr 0.057, c_u 10, all tensors adapted)", LALR),
    "cu_off": ("LALR, c_u = 1e9", _lalr(**{"optim.c_upper": "1e9"})),
    "weights_only": ("LALR, BN and biases not adapted", LALR + ["optim.adapt_norm_and_bias=false"]),
    "lr_half": ("LALR, lr 0.028", _lalr(**{"optim.lr": f"{0.02 / 2}"})),
    "lr_double": ("LALR, lr 0.113", _lalr(**{"optim.lr": f"{0.02 * 2}"})),
    # added after the runs above, to check the one ablation that beat the rule with a second seed
    "lalr_s1": ("LALR (the rule), seed 1", LALR + ["train.seed=1"]),
    "weights_only_s1": (
        "LALR, BN and biases not adapted, seed 1",
        LALR + ["optim.adapt_norm_and_bias=false", "train.seed=1"],
    ),
    "sgd_s1": ("SGD (the rule), seed 1", SGD + ["train.seed=1"]),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "lalr_why")
    p.add_argument("--docs", type=Path, default=REPO / "docs")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args(argv)
    study = Stages(a.out)
    if not a.report_only:
        if not has_index(DATA):
            study.run(
                "data_holdout",
                False,
                [str(BIN / "python"), "-m", "data_prep.holdout", str(REPO / "data/mnist"), str(DATA),
                 "--n", "5000", "--seed", "0"],
            )  # fmt: skip
        port = 29700
        for key, (_, overrides) in RUNS.items():
            run = a.out / key
            port += 2
            study.run(
                f"train_{key}",
                RunFolder(run).model_file.is_file(),
                ds_cmd("dat_ds.train", str(REPO / "recipes/mnist_paper_tables.toml"), "--set", f'out_dir="{a.out}"',
                       "--set", f'name="{key}"', *[x for o in COMMON + overrides for x in ("--set", o)],
                       "--resume", "auto", port=port),
            )  # fmt: skip
            study.run(
                f"eval_{key}",
                (run / "eval_val.json").is_file(),
                ds_cmd("dat_ds.evaluate", str(run), "--split", "val", "--subset", "1000", "--seed", "0",
                       "--chunk", "125", "--no-autoattack", port=port + 1),
            )  # fmt: skip
            write_report(a, study.times)
    write_report(a, study.times)


def layer_table(out: Path) -> tuple[list[str], dict]:
    """Per tensor: the median relative step ||dtheta||/||theta|| over the steps after warm-up, SGD and LALR, and
    the share of LALR's steps at which ||theta|| exceeded c_u = 10 (the clip binds)."""
    from dat_ds.layer_stats import read_layer_stats

    files = {k: RunFolder(out / k).layer_stats_file for k in ("sgd", "lalr")}
    if not all((out / k / "eval_val.json").is_file() for k in files):
        return [], {}
    recs = {k: read_layer_stats(f) for k, f in files.items()}
    half = len(recs["sgd"]) // 4  # past the warm-up (half an epoch of two)
    lines = ["| tensor | shape role | SGD rel. step (median) | LALR rel. step (median) | LALR / SGD | SGD ‖θ‖ end | LALR ‖θ‖ end | LALR steps with ‖θ‖ > c_u |",
             "|" + "---|" * 8]  # fmt: skip
    for name in recs["sgd"][0]["layers"]:

        def rel(rs: list, name: str = name) -> float:
            return statistics.median(
                r["layers"][name][1] / max(r["layers"][name][0], 1e-12) for r in rs[half:]
            )

        s, lr_ = rel(recs["sgd"]), rel(recs["lalr"])
        above = sum(r["layers"][name][0] > 10 for r in recs["lalr"]) / len(recs["lalr"])
        role = "weight" if name.endswith("weight") and ".1." not in name else "BN/bias"
        lines.append(
            f"| {name} | {role} | {s:.2e} | {lr_:.2e} | {lr_ / s:.1f} | {recs['sgd'][-1]['layers'][name][0]:.2f} | "
            f"{recs['lalr'][-1]['layers'][name][0]:.2f} | {100 * above:.0f} % |"
        )
    return lines, recs


def write_report(a, times: dict) -> None:
    rows = ["| run | val TA % | val RA % (PGD-50×5) | val RA % (PGD-10×1) | train + eval (s) |",
            "|---|---|---|---|---|"]  # fmt: skip
    for key, (label, _) in RUNS.items():
        f = a.out / key / "eval_val.json"
        if not f.is_file():
            continue
        ev = json.loads(f.read_text())
        secs = times.get(f"train_{key}", float("nan")) + times.get(f"eval_{key}", 0.0)
        rows.append(
            f"| {label} | {100 * ev['clean_acc']:.2f} | {100 * ev['pgd_acc']:.2f} | "
            f"{100 * ev['pgd_short_acc']:.2f} | {secs:.0f} |"
        )
    lines, recs = layer_table(a.out)
    text = f"""# Why LALR does not beat SGD at 8B on MNIST: per-layer evidence (validation split only)

Made by `python -m bench.lalr_why` ({time.strftime("%Y-%m-%d")}, this 2-core CPU machine, 2 ranks through the
deepspeed launcher, one seed per run).

{__doc__.split(chr(10), 4)[-1].strip()}

## Validation accuracy (1,000 held-out training images; one seed: two binomial standard errors are about ±2.6 RA)

{chr(10).join(rows)}

## Per-layer relative step (SGD vs LALR, same data, same seed)

{chr(10).join(lines) if lines else "(not yet run)"}
"""
    if lines:
        plot(a.docs / "lalr_why.png", recs)
        text += "\n![relative step per layer over training, SGD vs LALR; LALR's weight norms against c_u](lalr_why.png)\n"
    a.docs.mkdir(exist_ok=True)
    (a.docs / "lalr_why.md").write_text(text)


def plot(path: Path, recs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    names = list(recs["sgd"][0]["layers"])
    weights = [n for n in names if n.endswith("weight") and ".1." not in n]
    groups = (weights, [n for n in names if n not in weights])
    titles = ("relative step, conv/fc weights", "relative step, BatchNorm scales and biases")
    for ax, group, title in zip(axes[:2], groups, titles, strict=True):
        for i, n in enumerate(group):
            for key, style in (("sgd", "--"), ("lalr", "-")):
                rs = recs[key]
                ax.plot([r["step"] for r in rs], [r["layers"][n][1] / max(r["layers"][n][0], 1e-12) for r in rs],
                        style, color=plt.cm.tab10(i), lw=1, label=f"{n.removeprefix('net.')} ({key})")  # fmt: skip
        ax.set(
            yscale="log",
            ylim=(1e-4, 0.3),
            xlabel="step",
            ylabel="‖Δθ‖ / ‖θ‖",
            title=f"{title} (-- SGD, — LALR)",
        )
        ax.legend(fontsize=6, ncol=2)
        ax.grid(alpha=0.3)
    a3 = axes[2]
    for i, n in enumerate(names):
        for key, style in (("sgd", "--"), ("lalr", "-")):
            rs = recs[key]
            a3.plot([r["step"] for r in rs], [r["layers"][n][0] for r in rs], style, color=plt.cm.tab20(i), lw=1,
                    label=n.removeprefix("net.") if key == "lalr" else None)  # fmt: skip
    a3.axhline(10, color="k", ls=":", lw=1, label="c_u = 10")
    a3.set(
        yscale="log",
        xlabel="step",
        ylabel="‖θ‖",
        title="tensor norms (-- SGD, — LALR) against LALR's clip c_u",
    )
    a3.legend(fontsize=6, ncol=2)
    a3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
