"""PNG plots in a run folder: training curves from metrics.jsonl, accuracy versus epsilon from eval.json."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from .run_folder import ACC_VS_EPS, CURVES, RunFolder

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(run_dir: Path) -> Path | None:
    recs = RunFolder(run_dir).read_metrics()
    if not recs:
        return None
    ep = [r["epoch"] for r in recs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (
        ("clean_acc", "clean (TA)"),
        ("pgd_acc", "PGD (RA)"),
        ("train_adv_acc", "train, adversarial"),
    ):
        pts = [(e, 100 * r[key]) for e, r in zip(ep, recs, strict=True) if key in r]
        if pts:
            a1.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    a1.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(ep, [r["train_loss"] for r in recs], marker="o", ms=3, color="C3")
    a2.set(xlabel="epoch", ylabel="training loss", title="loss")
    a2.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = RunFolder(run_dir).plot(CURVES)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_acc_vs_eps(run_dir: Path, per_eps: dict[str, dict[str, float]]) -> Path:
    eps = sorted(per_eps, key=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label in (("clean", "clean"), ("pgd", "PGD"), ("autoattack", "AutoAttack")):
        pts = [(float(e), 100 * per_eps[e][key]) for e in eps if key in per_eps[e]]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set(
        xlabel="epsilon (l-inf, [0,1] pixels)",
        ylabel="accuracy (%)",
        title=f"{Path(run_dir).name}: accuracy vs eps",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = RunFolder(run_dir).plot(ACC_VS_EPS)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
