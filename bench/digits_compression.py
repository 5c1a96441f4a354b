"""Compressed aggregation on the digits demo: accuracy and measured bytes per setting (2 ranks).

    python -m bench.digits_compression --out bench/results/digits_compression.md

Each row is a full 15-epoch DAT-PGD run of recipes/digits_dat_pgd.toml with only the comm.* values changed.
MB/iter is what a rank sent plus received per optimizer step, measured: the bytes gloo wrote to its sockets during
each exchange (``/proc/self/io``), doubled (each rank receives what it sends); theory is the paper's count (b/8
bytes per value, no scales, no padding). 7 runs of ~40 s on 2 cores; one seed each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.runs import launch

SETTINGS = [
    ("32-bit all-reduce (hpc)", []),
    ("32-bit ps", ['comm.topology="ps"']),
    ("16-bit ps 1-sided", ['comm.topology="ps"', "comm.bits=16"]),
    ("8-bit ps 1-sided", ['comm.topology="ps"', "comm.bits=8"]),
    ("8-bit ps 2-sided", ['comm.topology="ps"', "comm.bits=8", "comm.two_sided=true"]),
    ("4-bit ps 2-sided", ['comm.topology="ps"', "comm.bits=4", "comm.two_sided=true"]),
    (
        "4-bit ps 2-sided + error feedback",
        ['comm.topology="ps"', "comm.bits=4", "comm.two_sided=true", "comm.error_feedback=true"],
    ),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench/results/digits_compression.md"))
    p.add_argument("--runs", type=Path, default=Path("runs/digits_compression"))
    a = p.parse_args(argv)
    lines = [
        "# Compressed aggregation on the digits demo (DAT-PGD-7, 2 ranks, 15 epochs)",
        "",
        f"Command: `python -m bench.digits_compression --out {a.out}`",
        "",
        "| setting | TA % | RA % (PGD-20) | MB/iter measured (wire) | MB/iter theory | measured/theory | C (s/epoch) | T (s/epoch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, (label, ov) in enumerate(SETTINGS):
        recs = launch("digits_dat_pgd.toml", f"c{i}", a.runs, ov)
        last = recs[-1]
        c = sum(r["comm_time_s"] for r in recs) / len(recs)
        t = sum(r["epoch_time_s"] for r in recs) / len(recs)
        assert last["data_mb_source"] == "wire", last["data_mb_source"]
        mb, th = last["data_mb_per_iter"], last["data_mb_per_iter_theory"]
        lines.append(
            f"| {label} | {100 * last['clean_acc']:.2f} | {100 * last['pgd_acc']:.2f} | {mb:.4f} | {th:.4f} | "
            f"{mb / th:.3f} | {c:.3f} | {t:.2f} |"
        )
        print(lines[-1], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
