"""The official DAT training loop (dat-2022/dat ``main.py`` + ``attack.py``), re-expressed for CPU and digits, to
find where dat-ds's robust accuracy differs from it (issue 8, item 5). Not part of dat-ds.

    python -m bench.official_loop --seeds 6 [--drop-last] [--clamp-start] [--wd-all]

What the official loop does, as read from its code, and kept here: a ``DistributedSampler`` over the whole split
(shuffled per epoch, padded, no ``drop_last``: 2 ranks x 719 samples = 12 batches of 64 a rank, the last one of 15);
PGD in [0,1] with a random start that is *not* clamped to the image box before the first gradient, each step
clamped to [0,1] and then to the eps-ball; BN in eval mode during the attack; CE(adv) and CE(clean) backwarded one
after the other in train mode; every parameter tensor all-reduced and divided by the world size; plain SGD with weight
decay on every tensor. Kept from the review's adaptation: dat_digits_cnn with dat-ds's initial weights (same seed), 15
epochs, 2 x 64, eps 0.2, PGD-7 step 0.05, lr 0.1 with 1 warm-up epoch then cosine, per step, wd 5e-4. The switches
turn one difference off at a time. Evaluation is dat-ds's (PGD-20, step 2.5 eps / 20, one restart, seeded), on all
360 test images, with rank 0's weights and BN buffers (as the official code saves them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

EPS, ALPHA, STEPS, EPOCHS, BATCH, LR, WD = 0.2, 0.05, 7, 15, 64, 0.1, 5e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def official_pgd(model, x, y, clamp_start: bool):
    eta = torch.empty_like(x).uniform_(-EPS, EPS)
    if clamp_start:
        eta = (x + eta).clamp(0, 1) - x
    model.eval()
    for _ in range(STEPS):
        adv = (x + eta).requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y), [adv])
        adv = (adv.detach() + ALPHA * g.sign()).clamp(0, 1)
        eta = (adv - x).clamp(-EPS, EPS)
    return (x + eta).clamp(0, 1)


def _worker(rank: int, world: int, port: int, seed: int, opts: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from dat_ds.config import ModelConfig, OptimConfig
    from dat_ds.data.loader import make_eval_loader
    from dat_ds.data.shards import load_index
    from dat_ds.evaluate import evaluate
    from dat_ds.optim.factory import lr_factor

    index = load_index(opts["shards"])
    x, y = next(
        iter(
            make_eval_loader(index, "train", rank=0, world=1, augment="none", image_size=8, batch_size=10**6)
        )
    )
    ds = TensorDataset(x.float() / 255, y)
    sampler = DistributedSampler(ds, world, rank, shuffle=True, seed=seed, drop_last=opts["drop_last"])
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, drop_last=opts["drop_last"])
    from dat_ds.models import build_model

    torch.manual_seed(seed)  # dat-ds's initial weights for this seed
    model = build_model(ModelConfig(name="dat_digits_cnn"), 10, 1, index.mean, index.std)
    torch.manual_seed(seed + rank)
    if opts["wd_all"]:
        groups = [{"params": list(model.parameters()), "weight_decay": WD}]
    else:
        groups = [
            {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": WD},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ]
    opt = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    sched_cfg = OptimConfig(warmup_epochs=1, schedule="cosine")
    spe = len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg=sched_cfg, steps_per_epoch=spe, epochs=EPOCHS)
    )
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            adv = official_pgd(model, xb, yb, opts["clamp_start"])
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(adv), yb).backward()
            F.cross_entropy(model(xb), yb).backward()
            for p in model.parameters():  # one all_reduce per tensor, then divide (the official code)
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            sched.step()
        if opts["sync_bn"]:  # dat-ds averages BN buffers over ranks before each evaluation and save
            from timm.utils import distribute_bn

            distribute_bn(model, world, reduce=True)
    dist.destroy_process_group()  # evaluate alone (dat-ds's evaluate would all_reduce its counts)
    if rank == 0:
        loader = make_eval_loader(
            index, "test", rank=0, world=1, augment="none", image_size=8, batch_size=360
        )
        c = evaluate(
            model, loader, eps=EPS, steps=20, step_size=2.5 * EPS / 20, restarts=1, device=torch.device("cpu")
        )
        Path(out).write_text(
            json.dumps({"clean_acc": c.acc()[0], "pgd_acc": c.acc()[1], "steps_per_epoch": spe})
        )


def run(seed: int, opts: dict, out: Path) -> dict:
    if not out.is_file():
        mp.start_processes(
            _worker, args=(2, _free_port(), seed, opts, str(out)), nprocs=2, start_method="spawn"
        )
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--shards", default="data/digits")
    p.add_argument("--drop-last", action="store_true", help="11 full batches a rank, as dat-ds")
    p.add_argument("--clamp-start", action="store_true", help="clamp the random start to [0,1], as dat-ds")
    p.add_argument("--wd-all", action="store_true", help="weight decay on every tensor (the official code)")
    p.add_argument(
        "--sync-bn", action="store_true", help="average BN buffers over ranks each epoch, as dat-ds"
    )
    p.add_argument("--runs", type=Path, default=Path("runs/official_loop"))
    a = p.parse_args(argv)
    opts = dict(
        shards=a.shards, drop_last=a.drop_last, clamp_start=a.clamp_start, wd_all=a.wd_all, sync_bn=a.sync_bn
    )
    tag = "-".join(k for k in ("drop_last", "clamp_start", "wd_all", "sync_bn") if opts[k]) or "as-is"
    a.runs.mkdir(parents=True, exist_ok=True)
    ras = []
    for seed in range(a.seeds):
        r = run(seed, opts, a.runs / f"{tag}-seed{seed}.json")
        ras.append(100 * r["pgd_acc"])
        print(
            f"{tag} seed {seed}: TA {100 * r['clean_acc']:.2f} RA {ras[-1]:.2f} ({r['steps_per_epoch']} steps/epoch)"
        )
    print(
        f"{tag}: mean RA {statistics.mean(ras):.2f} (sd {statistics.stdev(ras) if len(ras) > 1 else 0:.2f})"
    )


if __name__ == "__main__":
    main()
