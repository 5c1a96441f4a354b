"""Two simulated hosts on one machine: gradient aggregation on a rate-limited link.

    sudo .venv/bin/python -m bench.comm_link --rate 1gbit --out bench/results/comm_1gbit.md

Creates two network namespaces joined by a veth pair (10.77.0.1 <-> 10.77.0.2, addresses that exist only inside
the namespaces this script creates), limits each direction with ``tc tbf``, starts one rank in each namespace
(plain ``python`` with the environment torchrun would set; rank 0's address is the rendezvous), runs
bench/comm_worker.py, writes the table, and removes the namespaces even when something fails.
The wire-time floor of a row is the larger of the bytes it sent or received per rank divided by the link rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

NS = ("datds_bench_a", "datds_bench_b")
ADDR = ("10.77.0.1", "10.77.0.2")
VETH = ("datds_va", "datds_vb")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def teardown() -> None:
    for ns in NS:
        sh("ip", "netns", "del", ns, check=False)


def setup(rate: str, mtu: int) -> None:
    teardown()
    for ns in NS:
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
    for ns, dev, addr in zip(NS, VETH, ADDR, strict=True):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "mtu", str(mtu), "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "netns",
            "exec",
            ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "512kb",
            "latency",
            "50ms",
        )


def rate_bytes_per_s(rate: str) -> float:
    m = re.fullmatch(r"([\d.]+)(k|m|g)bit", rate)
    if not m:
        raise SystemExit(f"--rate {rate}: use e.g. 1gbit, 500mbit")
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)] / 8


def run_on_link(
    rate: str, mtu: int, module: str, args: list[str], port: int, timeout_s: float = 1800
) -> dict:
    """Set up the two namespaces, run ``python -m module --out FILE *args`` as rank 0 and 1 (one per namespace,
    rank 0's address the rendezvous), return rank 0's JSON, and remove the namespaces whatever happens."""
    setup(rate, mtu)
    procs: list[subprocess.Popen] = []
    try:
        out = Path(tempfile.mkdtemp()) / "result.json"
        for r, (ns, dev) in enumerate(zip(NS, VETH, strict=True)):
            env = dict(
                os.environ,
                MASTER_ADDR=ADDR[0],
                MASTER_PORT=str(port),
                RANK=str(r),
                WORLD_SIZE="2",
                LOCAL_RANK="0",
                LOCAL_WORLD_SIZE="1",
                GLOO_SOCKET_IFNAME=dev,
                OMP_NUM_THREADS="1",
                PYTHONUNBUFFERED="1",
            )
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", module, "--out", str(out), *args]
            procs.append(
                subprocess.Popen(
                    cmd, env=env, stdout=None if r == 0 else subprocess.DEVNULL, stderr=subprocess.STDOUT
                )
            )
        codes = [p.wait(timeout=timeout_s) for p in procs]
        if any(codes):
            raise SystemExit(f"benchmark ranks exited with {codes}")
        return json.loads(out.read_text())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        teardown()


def run(rate: str, mtu: int, reps: int, bucket_mb: float, only: str = "") -> dict:
    args = ["--reps", str(reps), "--bucket-mb", str(bucket_mb), "--only", only]
    return run_on_link(rate, mtu, "bench.comm_worker", args, port=29700)


def table(res: dict, rate: str, cmd: str, mtu: int) -> str:
    bps = rate_bytes_per_s(rate)
    rows = res["rows"]
    fp32 = next(r for r in rows if r["name"] == "torch all_reduce fp32")["median_s"]
    lines = [
        f"# Gradient aggregation on a {rate} link (2 hosts simulated with network namespaces)",
        "",
        f"Command: `{cmd}`  ",
        f"Gradient: timm resnet50, {res['numel']:,} fp32 values; {res['world']} ranks, one per namespace, "
        f"veth MTU {mtu}, `tc tbf rate {rate}` each way; median of the timed repetitions; "
        f"{platform.machine()}, 1 torch thread per rank.",
        "",
        "| method | time (ms) | × fp32 all_reduce | wire sent/rank (MB) | floor (ms) | × floor | transport MB sent+recv/rank | theory MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wire = max(r["wire_sent_mb"], r["wire_recv_mb"]) * 1e6
        floor = wire / bps
        tr = f"{r['transport_sent_mb'] + r['transport_recv_mb']:.1f}" if "transport_sent_mb" in r else "–"
        th = f"{r['theory_mb']:.1f}" if "theory_mb" in r else "–"
        lines.append(
            f"| {r['name']} | {r['median_s'] * 1000:.0f} | {r['median_s'] / fp32:.2f} | {r['wire_sent_mb']:.1f} | "
            f"{floor * 1000:.0f} | {r['median_s'] / floor if floor > 0 else float('nan'):.2f} | {tr} | {th} |"
        )
    prof = [r for r in rows if r.get("phases_ms")]
    if prof:
        names = list(prof[0]["phases_ms"])
        lines += [
            "",
            "Where the ps rows' time goes (rank 0, ms per exchange, mean of 2 extra repetitions; the phases of "
            "successive rounds overlap each other and the wire, so they need not add up to the row's time):",
            "",
            "| method | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for r in prof:
            lines.append(
                f"| {r['name']} | " + " | ".join(f"{r['phases_ms'].get(k, 0):.0f}" for k in names) + " |"
            )
    lines += [
        "",
        "DDP rows are the time a hook adds to a backward pass of resnet50 (batch 2, 64 px) over the same "
        "backward without communication (`no_sync`); DDP overlaps part of its communication with the "
        "backward, so these are per-step costs, not isolated exchange times.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--mtu", type=int, default=1500)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/comm_1gbit.md"))
    p.add_argument("--only", default="", help="tuning: run only the dat-ds rows whose name contains this")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench.comm_link needs root (ip netns, tc); run it with sudo")
    res = run(a.rate, a.mtu, a.reps, a.bucket_mb, a.only)
    if a.only:
        return
    cmd = "python -m bench.comm_link " + " ".join(argv if argv is not None else sys.argv[1:])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(table(res, a.rate, cmd, a.mtu))
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    print(a.out.read_text())


if __name__ == "__main__":
    main()
