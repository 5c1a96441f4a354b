"""A whole DAT-PGD training step on two simulated hosts: how much of the communication the step still waits for.

    sudo .venv/bin/python -m bench.comm_step --rate 1gbit --out bench/results/comm_step_1gbit.md

The same two network namespaces and rate-limited veth link as bench/comm_link.py, one rank in each, running
bench/step_worker.py. It writes a table with the following columns for every row:
  * T: the step time.
  * C total: the time the reducer spent reducing.
  * C exposed: the time the step waited for the reduction.
  * C exposed / T.
The rows: fp32 all-reduce, 8-bit 2-sided and 4-bit 2-sided, each reduced after backward or overlapped with it,
then DDP with and without its fp16 hook.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from bench.comm_link import run_on_link


def run(a) -> dict:
    args = ["--model", a.model, "--batch", str(a.batch), "--image-size", str(a.image_size), "--steps",
            str(a.steps), "--overlap-bucket-mb", str(a.overlap_bucket_mb), "--only", a.only]  # fmt: skip
    return run_on_link(a.rate, a.mtu, "bench.step_worker", args, port=29710, timeout_s=3600)


def table(res: dict, a, cmd: str) -> str:
    lines = [
        f"# A DAT training step on a {a.rate} link: total and exposed communication (2 simulated hosts)",
        "",
        f"Command: `{cmd}`  ",
        f"Step: {res['model']} ({res['numel']:,} parameters), {res['attack']} DAT step of `{res['recipe']}` "
        f"(attack, clean + adversarial forward, backward, SGD step), micro-batch {res['batch']} per rank at "
        f"{res['image_size']} px (crops of scikit-learn's sample photographs); {res['world']} ranks, one per "
        f"network namespace, veth MTU {a.mtu}, `tc tbf rate {a.rate}` each way; 1 torch thread per rank on a "
        f"2-core {platform.machine()} machine; median of {a.steps} timed steps after 2 warm-up steps. "
        f"Overlapped rows use {a.overlap_bucket_mb:g} MB buckets.",
        "",
        "| method | T (ms) | T min–max (ms) | backward (ms) | C total (ms) | C exposed (ms) | C exposed / T | T − local T (ms) | buckets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    locals_ = {r.get("engine"): r for r in res["rows"] if r["kind"] == "local"}
    for r in res["rows"]:
        local = locals_.get("ddp" if r["kind"] == "ddp" else r.get("engine", "dat-ds"))
        total = f"{r['C_s'] * 1000:.0f}" if "C_s" in r else "–"
        if "C_exposed_s" in r:
            exposed = r["C_exposed_s"]
        elif r["kind"] == "ddp" and local is not None:
            exposed = r["T_s"] - local["T_s"]
        else:
            exposed = None
        ex = f"{exposed * 1000:.0f}" if exposed is not None else "–"
        frac = f"{100 * exposed / r['T_s']:.1f} %" if exposed is not None else "–"
        extra = (
            f"{(r['T_s'] - local['T_s']) * 1000:.0f}" if local is not None and r["kind"] != "local" else "–"
        )
        lines.append(
            f"| {r['name']} | {r['T_s'] * 1000:.0f} | {r['T_min_s'] * 1000:.0f}–{r['T_max_s'] * 1000:.0f} | "
            f"{r['backward_s'] * 1000:.0f} | {total} | {ex} | {frac} | "
            f"{extra} | {r.get('buckets', '–')} |"
        )
    lines += [
        "",
        "C total is the wall time of the reducer's work, on the communication thread when overlapped. C exposed is "
        "the time the step waited for it at the end of backward; without overlap the two are the same. Backward "
        "is `engine.backward` (or `loss.backward()`), including that wait. DDP has no total counter: its exposed "
        "C is its T minus the local row's T (the same step under `no_sync`). T − local T is what communication "
        "costs the step in all: the exposed wait, and the CPU time the codec and transport take from compute "
        "where both ranks share the machine's 2 cores (on separate hosts, or with the codec on a GPU stream, "
        "that part would not compete).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--overlap-bucket-mb", type=float, default=25.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/comm_step_1gbit.md"))
    p.add_argument("--only", default="", help="tuning: run only the rows whose name contains this")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.comm_step needs root (ip netns, tc); run it with sudo")
    res = run(a)
    if a.only:
        return
    cmd = "python -m bench.comm_step " + " ".join(argv if argv is not None else sys.argv[1:])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(table(res, a, cmd))
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(a.out.read_text())


if __name__ == "__main__":
    main()
