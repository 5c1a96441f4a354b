"""Results tables from run folders, in the layouts of the paper's Table 1 and Table 2.

    python -m dat_ds.report runs/demo/digits_dat_pgd runs/demo/digits_standard [--out table.md]
    python -m dat_ds.report --certified runs/cifar10_preact18_smooth_* [--out table2.md]

Table 2 (``--certified``): one row per certification found under each run's ``certify/`` (written by
``dat_ds.certify``): the training (objective, sigma, N noise samples per example), the certification's sigma and n,
and certified accuracy at the l2 radii 0.05 .. 0.5.

TA and RA come from the last epoch in ``metrics.jsonl`` (or from ``eval.json`` where the evaluation command wrote
one, which adds AA); T and C are the mean training and communication seconds per epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import command
from .run_folder import CERTIFY_JSON, METRICS, RunFolder


def _method(cfg: dict) -> str:
    a = cfg["attack"]["method"]
    name = {"pgd": f"DAT-PGD-{cfg['attack']['steps']}", "fgsm": "DAT-FGSM", "none": "standard"}[a]
    objective = cfg.get("loss", {}).get("objective", "dat")
    if objective in ("gaussian", "smoothadv"):
        sm = cfg["smoothing"]
        name = f"{'Gaussian' if objective == 'gaussian' else 'SmoothAdv'} σ={sm['sigma']:g} N={sm['noise_samples']}"
    elif objective == "trades":
        name = name.replace("DAT-", "DAT-TRADES-")
    if cfg["optim"]["name"] == "lalr":
        name += " +LALR"
    c = cfg["comm"]
    if c["bits"] != 32:
        name += f" {c['bits']}b{'-2s' if c['two_sided'] else ''}"
        if c.get("codec", "block") == "qsgd":
            name += " qsgd"
    return name


def summarize(run_dir: Path) -> dict:
    run = RunFolder(run_dir)
    recs = run.read_metrics()
    cfg = run.read_recipe()
    if not recs or cfg is None:
        raise SystemExit(
            f"{run_dir} has no {METRICS} or recipe: is it a dat-ds run folder, and did the run finish an epoch?"
        )
    last = recs[-1]
    row = {
        "run": run.path.name,
        "method": _method(cfg),
        "pxq": f"1x{last['world_size']}",
        "batch": cfg["train"]["global_batch_size"],
        "TA": last.get("clean_acc"),
        "RA": last.get("pgd_acc"),
        "AA": None,
        "C": sum(r["comm_time_s"] for r in recs) / len(recs),
        "T": sum(r["epoch_time_s"] for r in recs) / len(recs),
        "MB/iter": last.get("data_mb_per_iter"),
        "epochs": last["epoch"],
    }
    e = run.read_eval()
    if e is not None:
        row.update(
            TA=e.get("clean_acc", row["TA"]), RA=e.get("pgd_acc", row["RA"]), AA=e.get("autoattack_acc")
        )
    return row


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{100 * v:.2f}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    head = (
        "| run | method | p×q | batch | TA % | RA % | AA % | C (s/epoch) | T (s/epoch) | MB/iter | epochs |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['method']} | {r['pxq']} | {r['batch']} | {_fmt(r['TA'], True)} | "
            f"{_fmt(r['RA'], True)} | {_fmt(r['AA'], True)} | {_fmt(r['C'])} | {_fmt(r['T'])} | "
            f"{_fmt(r['MB/iter'])} | {r['epochs']} |"
        )
    return "\n".join(lines)


TABLE2_RADII = ("0.05", "0.10", "0.15", "0.20", "0.25", "0.30", "0.35", "0.40", "0.45", "0.50")


def certified_rows(run_dir: Path) -> list[dict]:
    run = RunFolder(run_dir)
    found = sorted(run.certify_dir().glob(f"*/{CERTIFY_JSON}"))
    if not found:
        raise SystemExit(f"{run_dir} has no certification results: run dat_ds.certify on it first")
    cfg = run.read_recipe()
    rows = []
    for f in found:
        c = json.loads(f.read_text())
        rows.append(
            {
                "run": run.path.name,
                "method": _method(cfg),
                "sigma": c["sigma"],
                "n": c["n"],
                "examples": c["n_examples"],
                "acc": c["certified_accuracy"],
            }
        )
    return rows


def certified_table(rows: list[dict]) -> str:
    head = (
        "| run | training | certified σ | n | examples | " + " | ".join(f"r={r}" for r in TABLE2_RADII) + " |"
    )
    lines = [head, "|" + "---|" * (5 + len(TABLE2_RADII))]
    for r in rows:
        accs = " | ".join(f"{r['acc'][k]:.3f}" if k in r["acc"] else "–" for k in TABLE2_RADII)
        lines.append(f"| {r['run']} | {r['method']} | {r['sigma']:g} | {r['n']} | {r['examples']} | {accs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "runs", nargs="+", type=Path, help="run folders (each with eval.json, or certify/ for --certified)"
    )
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    p.add_argument("--certified", action="store_true", help="Table 2: certified accuracy per l2 radius")
    a = p.parse_args(argv)
    if a.certified:
        text = certified_table([row for r in a.runs for row in certified_rows(r)])
    else:
        text = table([summarize(r) for r in a.runs])
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
