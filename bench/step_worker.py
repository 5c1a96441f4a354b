"""One rank of the training-step benchmark (started by bench/comm_step.py inside a network namespace).

Each row trains a few DAT-PGD steps of the same model on the same micro-batches and times each step: T (the step's
wall time), the total communication time C (the reducer's time inside ``reduce_``) and the exposed part (the time
the step waited for it). The step is the one dat_ds.train runs: the recipe's attack and the DAT objective from
``dat_ds.objectives``, ``engine.backward``, ``engine.step`` (SGD with momentum).
  * dat-ds rows: the real DeepSpeed engine with the dat_ds.comm seam, without and with ``comm.overlap``.
  * DDP rows: the same step through torch DDP (which overlaps its all-reduce with backward), plain fp32 and with
    ``fp16_compress_hook``. DDP has no total communication counter: its exposed C is T minus the step under
    ``no_sync`` (the "local" row).
The micro-batches are crops of scikit-learn's two sample photographs (china.jpg, flower.jpg), the same on every
row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def photo_batches(n: int, batch: int, size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(im).permute(2, 0, 1).float() / 255 for im in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xs, ys = [], []
        for _ in range(batch):
            k = int(torch.randint(len(photos), (1,), generator=g))
            im = photos[k]
            crop = int(torch.randint(size, min(im.shape[1:]) + 1, (1,), generator=g))
            top = int(torch.randint(im.shape[1] - crop + 1, (1,), generator=g))
            left = int(torch.randint(im.shape[2] - crop + 1, (1,), generator=g))
            patch = im[:, top : top + crop, left : left + crop].unsqueeze(0)
            xs.append(
                torch.nn.functional.interpolate(patch, size=(size, size), mode="bilinear", antialias=True)
            )
            ys.append(k)
        out.append((torch.cat(xs).clamp(0, 1), torch.tensor(ys)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", default="recipes/imagenet_r50_dat_pgd.toml")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8, help="micro-batch per rank")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (after 2 warm-up steps)")
    p.add_argument("--overlap-bucket-mb", type=float, default=25.0)
    p.add_argument("--only", default="", help="run only the rows whose name contains this")
    a = p.parse_args()
    torch.set_num_threads(1)

    import timm
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dat_ds.config import CommConfig, load_config
    from dat_ds.engine import build_ds_config, init_distributed, make_engine
    from dat_ds.models import NormalizedModel
    from dat_ds.objectives import OBJECTIVES

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(
        a.recipe,
        [
            f'model.name="{a.model}"',
            f"train.micro_batch_size={a.batch}",
            f"train.global_batch_size={a.batch * world}",
        ],
    )
    objective = OBJECTIVES[cfg.loss.objective]
    warmup = 2
    batches = photo_batches(warmup + a.steps, a.batch, a.image_size, seed=1 + rank)

    def new_model() -> NormalizedModel:
        torch.manual_seed(0)
        return NormalizedModel(
            timm.create_model(a.model, num_classes=1000), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        )

    numel = sum(p.numel() for p in new_model().parameters())
    results: dict = {
        "model": a.model,
        "numel": numel,
        "batch": a.batch,
        "image_size": a.image_size,
        "world": world,
        "attack": f"{cfg.attack.method.upper()}-{cfg.attack.steps}",
        "recipe": a.recipe,
        "rows": [],
    }

    def timed_steps(step, stats=None) -> dict:
        times, comm, exposed, backward = [], [], [], []
        for i, (x, y) in enumerate(batches):
            dist.barrier()
            s0 = stats.snapshot() if stats is not None else None
            t0 = time.perf_counter()
            tb = step(x, y)
            t = time.perf_counter() - t0
            if i < warmup:
                continue
            times.append(t)
            backward.append(tb)
            if stats is not None:
                d = stats.since(s0)
                comm.append(d.seconds)
                exposed.append(d.exposed_seconds)
        med = statistics.median
        out = {"T_s": med(times), "T_min_s": min(times), "T_max_s": max(times), "backward_s": med(backward)}
        if stats is not None:
            out.update(C_s=med(comm), C_exposed_s=med(exposed))
        return out

    def record(name: str, res: dict, **extra) -> None:
        res.update(name=name, **extra)
        results["rows"].append(res)
        if rank == 0:
            c = f"C {res['C_s'] * 1000:7.1f} ms " if "C_s" in res else ""
            e = f"exposed {res['C_exposed_s'] * 1000:7.1f} ms " if "C_exposed_s" in res else ""
            print(f"{name:40s} T {res['T_s'] * 1000:8.1f} ms  {c}{e}backward {res['backward_s'] * 1000:7.1f} ms",
                  flush=True)  # fmt: skip

    settings = [
        ("local (dat-ds engine under no_sync)", dict(topology="hpc", bits=32), None),
        ("dat-ds hpc fp32, after backward", dict(topology="hpc", bits=32), False),
        ("dat-ds hpc fp32, overlapped", dict(topology="hpc", bits=32), True),
        ("dat-ds ps 8-bit 2-sided, after backward", dict(topology="ps", bits=8, two_sided=True), False),
        ("dat-ds ps 8-bit 2-sided, overlapped", dict(topology="ps", bits=8, two_sided=True), True),
        ("dat-ds ps 4-bit 2-sided, overlapped", dict(topology="ps", bits=4, two_sided=True), True),
    ]
    for name, s, overlap in settings:
        if a.only and a.only not in name:
            continue
        model = new_model()
        comm = CommConfig(**s, overlap=bool(overlap), overlap_bucket_mb=a.overlap_bucket_mb)
        engine, reducer = make_engine(  # the engine training builds, with this row's aggregation
            model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), None, build_ds_config(cfg, world),
            comm=comm, seed=0,
        )  # fmt: skip
        engine.train()

        def step(x, y, engine=engine, local=overlap is None) -> float:
            out = objective(engine, engine.module, x, y, cfg, epoch=0)
            tb = time.perf_counter()
            if local:  # the same step without any communication: DeepSpeed skips the reduction under no_sync
                with engine.no_sync():
                    engine.backward(out.loss)
            else:
                engine.backward(out.loss)
            tb = time.perf_counter() - tb
            engine.step()
            return tb

        if overlap is None:
            record(name, timed_steps(step), kind="local", engine="dat-ds")
            del engine, model
            continue
        res = timed_steps(step, reducer.stats)
        buckets = len(engine.dat_overlap.buckets) if engine.dat_overlap is not None else 1
        record(name, res, kind="dat-ds", overlap=overlap, buckets=buckets, **s)
        if engine.dat_overlap is not None:
            engine.dat_overlap.close()
        del engine, model

    ddp_rows = [("DDP fp32 all-reduce", None), ("DDP fp16_compress_hook", default_hooks.fp16_compress_hook)]
    if not a.only or any(a.only in n for n, _ in ddp_rows) or a.only in "local (DDP under no_sync)":
        for name, hook in [("local (DDP under no_sync)", None), *ddp_rows]:
            net = new_model()
            ddp = DDP(net)
            if hook is not None:
                ddp.register_comm_hook(None, hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
            local = name.startswith("local")

            def step(x, y, ddp=ddp, net=net, opt=opt, local=local) -> float:
                opt.zero_grad(set_to_none=True)
                if local:
                    with ddp.no_sync():
                        out = objective(ddp, net, x, y, cfg, epoch=0)
                        tb = time.perf_counter()
                        out.loss.backward()
                else:
                    out = objective(ddp, net, x, y, cfg, epoch=0)
                    tb = time.perf_counter()
                    out.loss.backward()
                tb = time.perf_counter() - tb
                opt.step()
                return tb

            record(name, timed_steps(step), kind="ddp" if not local else "local", engine="ddp")

    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
