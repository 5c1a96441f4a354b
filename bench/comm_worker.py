"""One rank of the communication benchmark (started by bench/comm_link.py inside a network namespace).

Measures, for a ResNet-50-sized gradient (timm resnet50: 25,557,032 fp32 values):
  * dat-ds aggregation through the DeepSpeed engine's real code path: ``engine.allreduce_gradients()`` (flatten,
    the dat_ds.comm seam, unflatten), for each codec/topology setting;
  * plain ``torch.distributed.all_reduce`` of the flat fp32 gradient, and an fp16 cast + all_reduce;
  * torch DDP's ``fp16_compress_hook`` and ``powerSGD_hook`` (rank 4): the time they add to a backward pass
    (backward with communication minus backward under ``no_sync``). PowerSGD's hook issues its collectives from
    gloo callbacks, so buckets can run in a different order on each rank ("collective mismatch" aborts); each
    bucket here waits for the previous bucket's future first, which serialises them and is the only change.
Wire bytes are read from /proc/self/io (``wchar``/``rchar`` count gloo's socket writes and reads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def io_bytes() -> tuple[int, int]:
    vals = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    return int(vals["wchar"]), int(vals["rchar"])


def timed(fn, reps: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        dist.barrier()
        fn()
    times, sent, recv = [], [], []
    for _ in range(reps):
        dist.barrier()
        w0, r0 = io_bytes()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        w1, r1 = io_bytes()
        sent.append(w1 - w0)
        recv.append(r1 - r0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "wire_sent_mb": statistics.median(sent) / 1e6,
        "wire_recv_mb": statistics.median(recv) / 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=4.0)
    p.add_argument("--only", default="", help="run only the rows whose name contains this (tuning)")
    a = p.parse_args()
    torch.set_num_threads(1)

    import timm

    from dat_ds.comm import engine_seam
    from dat_ds.config import CommConfig
    from dat_ds.engine import init_distributed, make_engine, make_reducer

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = timm.create_model("resnet50")
    numel = sum(p.numel() for p in model.parameters())
    ds_config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}  # fmt: skip
    # the engine training builds; each row below swaps in its own aggregation (after backward: the seam alone)
    engine, _ = make_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ds_config,
                            comm=CommConfig(overlap=False), seed=0)  # fmt: skip
    g = torch.Generator().manual_seed(1 + rank)
    grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in engine.module.parameters()]

    def set_grads() -> None:
        for p, gr in zip(engine.module.parameters(), grads, strict=True):
            p.grad = gr.clone()

    results = {"numel": numel, "world": world, "rows": []}

    def record(name: str, kind: str, res: dict, **extra) -> None:
        res.update(name=name, kind=kind, **extra)
        results["rows"].append(res)
        if rank == 0:
            print(
                f"{name:38s} {res['median_s'] * 1000:8.1f} ms  sent {res['wire_sent_mb']:7.1f} MB", flush=True
            )

    # --- dat-ds through the engine
    settings = [
        ("dat-ds hpc fp32", dict(topology="hpc", bits=32)),
        ("dat-ds hpc 16-bit (fp16)", dict(topology="hpc", bits=16)),
        ("dat-ds ps 32-bit", dict(topology="ps", bits=32)),
        ("dat-ds ps 16-bit 1-sided", dict(topology="ps", bits=16)),
        ("dat-ds ps 8-bit 1-sided", dict(topology="ps", bits=8)),
        ("dat-ds ps 8-bit 2-sided", dict(topology="ps", bits=8, two_sided=True)),
        ("dat-ds ps 4-bit 1-sided", dict(topology="ps", bits=4)),
        ("dat-ds ps 4-bit 2-sided", dict(topology="ps", bits=4, two_sided=True)),
    ]
    for name, s in settings:
        if a.only and a.only not in name:
            continue
        reducer = make_reducer(CommConfig(bucket_mb=a.bucket_mb, **s), seed=0)
        engine_seam.install(engine, reducer)

        def step() -> None:
            set_grads()
            engine.allreduce_gradients()

        # set_grads copies 100 MB; time it alone and subtract, so the row is the engine's reduction only
        copy = timed(set_grads, a.reps)["median_s"]
        before = reducer.stats.snapshot()
        res = timed(step, a.reps, warmup=2)
        d = reducer.stats.since(before)
        res["median_s"] -= copy
        res["min_s"] -= copy
        res["max_s"] -= copy
        phases = {}
        if (
            s["topology"] == "ps"
        ):  # where the time goes: wall time per phase of the exchange, mean of 2 more reps
            reducer.profile = {}
            for _ in range(2):
                dist.barrier()
                step()
            phases = {k: v / 2 * 1000 for k, v in reducer.profile.items()}
            reducer.profile = None
        record(
            name,
            "dat-ds",
            res,
            bits=s["bits"],
            two_sided=s.get("two_sided", False),
            topology=s["topology"],
            transport_sent_mb=d.bytes_sent / d.calls / 1e6,
            transport_recv_mb=d.bytes_recv / d.calls / 1e6,
            theory_mb=reducer.theory_bytes(numel, world) / 1e6,
            phases_ms=phases,
        )

    if a.only:
        settings = []
    # --- plain collectives on the flat gradient
    if a.only:
        if rank == 0:
            json.dump(results, open(a.out, "w"))
        return
    flat = torch.cat([gr.flatten() for gr in grads])
    buf = torch.empty_like(flat)

    def refill() -> None:
        buf.copy_(flat)

    def all_reduce_fp32() -> None:
        refill()
        dist.all_reduce(buf)

    # Timed like the dat-ds rows: the 100 MB copy that gives each repetition fresh input is timed alone and
    # subtracted, so both sides exclude it (the row once timed a clone() the dat-ds rows subtracted).
    res = timed(all_reduce_fp32, a.reps)
    copy = timed(refill, a.reps)["median_s"]
    for k in ("median_s", "min_s", "max_s"):
        res[k] -= copy
    record("torch all_reduce fp32", "peer", res)
    record("torch fp16 cast + all_reduce", "peer", timed(lambda: dist.all_reduce(flat.half()), a.reps))

    # --- DDP hooks: time added to a backward pass
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    x = torch.rand(2, 3, 64, 64)

    def ddp_model():
        torch.manual_seed(0)
        return DDP(timm.create_model("resnet50"))

    def backward(m) -> None:
        m(x).sum().backward()

    def added(m, name: str, warmup: int = 1) -> None:
        def local():
            with m.no_sync():
                backward(m)

        base = timed(local, a.reps)
        res = timed(lambda: backward(m), a.reps, warmup=warmup)
        res["backward_s"] = res["median_s"]
        res["local_backward_s"] = base["median_s"]
        for k in ("median_s", "min_s", "max_s"):
            res[k] -= base["median_s"]
        res["wire_sent_mb"] -= base["wire_sent_mb"]
        res["wire_recv_mb"] -= base["wire_recv_mb"]
        record(name, "peer", res)

    m = ddp_model()
    added(m, "DDP all-reduce fp32 (added to backward)")
    m = ddp_model()
    m.register_comm_hook(None, default_hooks.fp16_compress_hook)
    added(m, "DDP fp16_compress_hook (added to backward)")

    m = ddp_model()
    state = powerSGD_hook.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=4,
        start_powerSGD_iter=2,
        use_error_feedback=True,
        warm_start=True,
    )
    previous: list = [None]

    def serialised_powersgd(st, bucket):
        if previous[0] is not None:
            previous[0].wait()
        fut = powerSGD_hook.powerSGD_hook(st, bucket)
        previous[0] = fut
        return fut

    m.register_comm_hook(state, serialised_powersgd)
    added(m, "DDP powerSGD_hook rank 4 (added to backward)", warmup=4)

    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
