"""DAT training under the DeepSpeed engine.

    deepspeed --num_gpus 2 --module dat_ds.train recipes/digits_dat_pgd.toml [--set train.epochs=3] [--resume auto]
    deepspeed --hostfile hostfile --module dat_ds.train recipes/imagenet_r50_dat_pgd.toml
    torchrun --nproc_per_node 2 -m dat_ds.train recipes/digits_dat_pgd.toml
    python -m dat_ds.train recipes/digits_dat_pgd.toml --check --world-size 36   # validate only, no ranks

Per step, in data-flow order: batch (labeled, plus pseudo-labelled samples with [unlabeled]) -> objective
(dat_ds/objectives.py: attack on engine.module, input gradients only, then the loss: DAT's lambda*CE(clean) +
CE(adv), TRADES, or Gaussian-noise / SmoothAdv training) -> engine.backward -> engine.step (the accumulation
boundary reduces the gradients once through dat_ds.comm, clips, applies the optimizer) -> running metrics. Per
epoch: sums over ranks -> TA/RA on the test split, with the ranks' BatchNorm statistics averaged on the side (each
rank trains and attacks with its own, as the official DAT code) -> metrics.jsonl + wandb -> checkpoint. ``run`` is
that sequence of phases (start_rank, choose_start, build_engine, restore, open_outputs, then per epoch
train_epoch, epoch_record, evaluate_epoch, close_epoch, and finish), each a function of the rank's ``Session``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .config import ConfigError, load_config
from .data.shards import ShardError
from .run_folder import RunFolder
from .training.phases import PEERS, run
from .training.plan import make_plan
from .training.resume import check_resume


def refuse(message: str, rank: int | None = None) -> int:
    """Exit status 2 with one line: the run is refused (a supervisor does not restart it; see dat_ds.supervise)."""
    where = f"rank {rank}: " if rank is not None else ""
    print(f"dat-ds: {where}error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get("DAT_DS_REFUSAL_FILE")
    if path:
        try:
            with open(path, "a") as f:
                f.write(message.splitlines()[0][:500] + "\n")
        except OSError:
            pass
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a TOML recipe under recipes/")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (repeatable), e.g. --set train.epochs=3",
    )
    p.add_argument("--resume", default="none", help="'auto' (newest complete checkpoint), 'none', or a tag")
    p.add_argument("--check", action="store_true", help="validate the recipe and data, then exit")
    p.add_argument("--world-size", type=int, default=None, help="with --check: the world size to plan for")
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    args = p.parse_args(argv)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.recipe, args.overrides)
        plan = make_plan(cfg, world)
    except (ConfigError, ShardError) as e:
        return refuse(str(e)) if rank == 0 else 2
    if args.check:
        print(
            f"ok: {args.recipe} | world {world} | accumulation {plan.grad_accum} | "
            f"{plan.steps_per_epoch} steps/epoch | {plan.index.split('train').count} train samples"
        )
        if cfg.finetune.init_from or cfg.finetune.freeze:
            print(plan.init.summary())
        return 0
    # Rank 0 alone decides about the run folder (a shared filesystem on a cluster); if it refuses, it exits and
    # the launcher stops the other ranks. The refusals read the folder only: nothing in it is touched, not even the
    # lock, before they pass.
    lock = None
    if rank == 0:
        from .run_lock import FolderBusy, RunLock

        if args.resume in ("none", "") and RunFolder(cfg.run_dir).has_checkpoints():
            return refuse(
                f"{cfg.run_dir} already holds checkpoints of an earlier run; continue it with --resume auto, or "
                "start a new one with --set name=<new name> (nothing was overwritten)"
            )
        if args.resume not in ("none", ""):
            problem = check_resume(cfg, args.resume, world)
            if problem:
                return refuse(problem)
        try:
            lock = RunLock(cfg.run_dir).acquire()
        except FolderBusy as e:
            return refuse(str(e))
    try:
        run(cfg, plan, args.resume)
    except ConfigError as e:
        return refuse(str(e)) if rank == 0 else 2
    except (
        ShardError
    ) as e:  # a bad sample or shard met mid-run: named, with its fix; a restart would meet it again
        return refuse(str(e), rank)
    except SystemExit as e:
        # A refusal from a lower floor (a checkpoint unsafe to load, damaged, from another world size; a disk too
        # full to save): exit 2, so that a supervisor does not restart what would be refused again.
        if not isinstance(e.code, str):
            raise
        return refuse(e.code.removeprefix("dat-ds: error: "), rank)
    except RuntimeError as e:  # gloo and NCCL report a lost peer or a timeout as RuntimeError (subclasses)
        collective = isinstance(e, torch.distributed.DistError) or any(
            k in str(e) for k in ("gloo", "NCCL", "Connection closed", "Timed out", "timed out")
        )
        if not PEERS or not collective:
            raise
        from .engine import describe_collective_failure

        msg = describe_collective_failure(e, PEERS, cfg.train.collective_timeout_s)
        print(f"dat-ds: rank {rank}: error: {msg}", file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
