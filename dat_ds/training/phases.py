"""The run, phase by phase: each phase a function of the rank's ``Session``."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time

import torch

from ..config import ConfigError, RunConfig
from ..data.loader import make_eval_loader
from ..init_from import apply_init, write_record
from ..models import build_model, input_stats
from ..robust_eval import evaluate
from ..run_folder import RunFolder
from .plan import Plan
from .resume import resume_tag
from .state import SUMS, Session, TrainState
from .step import train_batches, train_step

log = logging.getLogger("dat_ds")
PEERS: list[str] = []  # every rank's address, by rank (names a lost peer when a collective fails)


def run(cfg: RunConfig, plan: Plan, resume: str) -> dict:
    """The run, phase by phase; each phase is a function below."""
    s = start_rank(cfg, plan)  # launcher guard, process group, logging, seeds, run folder
    choose_start(s, resume)  # rank 0 picks the checkpoint to resume (if any); every rank checks it sees it
    build_engine(s)  # model from its starting weights, optimizer, schedule, DeepSpeed engine, the comm seam
    restore(s)  # the chosen checkpoint, if any: weights, optimizer, RNG, data position, reducer
    open_outputs(s)  # metrics.jsonl + wandb on rank 0, the test-split loader
    last: dict = {}
    s.mark_epoch_start()
    while s.state.epoch < cfg.train.epochs:
        train_epoch(
            s
        )  # micro-batches -> objective -> backward -> step, progress lines, mid-epoch checkpoints
        record = epoch_record(s)  # sums over ranks, C, T, bytes, the exactly-once check
        record.update(evaluate_epoch(s))  # TA / RA on the test split, when due
        close_epoch(s, record)  # log, metrics.jsonl + wandb, the next epoch's state, the checkpoint
        last = record
    finish(s, last)  # safetensors export, summary, barrier
    return last


def start_rank(cfg: RunConfig, plan: Plan) -> Session:
    import torch.distributed as dist

    from ..engine import check_cuda, init_distributed, rank_addresses, set_cpu_threads, share_environment
    from ..launch_guard import guard

    guard()  # stop when the deepspeed/torchrun command the user started is gone
    check_cuda()  # GPUs that torch cannot use: a clear error, not a silent CPU run
    init_distributed(cfg.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device(f"cuda:{torch.cuda.current_device()}")
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    PEERS[:] = rank_addresses(device)
    assert world == plan.world
    adopted = share_environment(
        device
    )  # DAT_DS_* and OMP_NUM_THREADS as the launching host set them, everywhere
    if adopted and dist.get_rank() != 0:
        print(f"dat-ds: rank {rank}: {', '.join(sorted(adopted))} taken from rank 0 (not set on this host)",
              file=sys.stderr, flush=True)  # fmt: skip
    _setup_logging(rank)
    _seed_everything(cfg.train.seed, rank, cfg.train.deterministic)
    set_cpu_threads()
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        RunFolder(cfg.run_dir).write_recipe(cfg.to_dict())
    return Session(cfg, plan, rank, world, device)


def choose_start(s: Session, resume: str) -> None:
    from ..checkpoint import Checkpointer

    s.ckpt = Checkpointer(s.cfg.run_dir, s.cfg.checkpoint.keep, s.rank, s.world)
    s.tag = resume_tag(s.ckpt, resume, s.rank, s.device)
    if resume == "auto" and s.tag is None and s.rank == 0:
        log.info("--resume auto: no complete checkpoint in %s, starting fresh", s.ckpt.dir)


def build_model_for_run(s: Session) -> torch.nn.Module:
    """The network, its input normalization, frozen parameters and BatchNorm mode; its weights random (seeded
    alike on every rank) or, for a fresh start, [finetune]'s source. A resumed run takes them from its checkpoint."""
    cfg, index, init = s.cfg, s.plan.index, s.plan.init
    if s.tag is None and init.from_record:
        raise ConfigError(
            f"finetune.init_from={cfg.finetune.init_from} is gone and {cfg.run_dir} has no complete checkpoint to "
            "resume: nothing to start from"
        )
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DeepSpeed also broadcasts them)
    mean, std = input_stats(cfg.model, index.channels, init.mean or index.mean, init.std or index.std)
    model = build_model(cfg.model, index.num_classes, index.channels, mean, std)
    if s.tag is None:
        apply_init(model.net, init)  # loads, adapts, freezes
        if s.rank == 0 and (init.source or init.frozen):
            log.info("%s", init.summary())
            write_record(init, cfg.run_dir)
    else:
        apply_init(model.net, dataclasses.replace(init, source=""))  # freezing only
    model.bn_eval = cfg.finetune.bn_mode == "eval"
    torch.manual_seed(cfg.train.seed + s.rank)
    return model


def build_engine(s: Session) -> None:
    import torch.distributed as dist

    from ..engine import make_engine
    from ..optim import build_optimizer, build_schedule

    cfg = s.cfg
    model = build_model_for_run(s)
    optimizer = build_optimizer(
        model, cfg.optim, cfg.train.global_batch_size, f"net.{s.plan.init.head}", cfg.finetune.head_lr_scale
    )
    schedule = build_schedule(optimizer, cfg.optim, s.plan.steps_per_epoch, cfg.train.epochs)
    s.engine, s.reducer = make_engine(
        model, optimizer, schedule, s.plan.ds_config, comm=cfg.comm, seed=cfg.train.seed,
        channels_last=cfg.model.channels_last,
    )  # fmt: skip
    s.bytes_source = (
        "wire" if dist.get_backend() == "gloo" else "posted" if cfg.comm.topology == "ps" else "none"
    )


def restore(s: Session) -> None:
    from ..checkpoint import set_rng_state

    tag = s.tag
    if tag is None:
        return
    client, rank_state = s.ckpt.load(s.engine, tag)
    sums = rank_state["sums"]
    s.state = TrainState(
        epoch=client["epoch"],
        step_in_epoch=client["step_in_epoch"],
        global_step=client["global_step"],
        sums=torch.cat(
            [sums, torch.zeros(SUMS - len(sums), dtype=torch.float64)]
        ),  # older checkpoints: 4 sums
    )
    timers = rank_state["timers"].tolist()  # checkpoints before overlap: 3 timers, all communication exposed
    s.state.comm_seconds, comm_bytes, s.state.train_seconds = timers[:3]
    s.state.comm_exposed_seconds = timers[3] if len(timers) > 3 else timers[0]
    s.state.comm_bytes = int(comm_bytes)
    set_rng_state(rank_state["rng"])
    s.reducer.load_state_dict(rank_state.get("reducer", {}))
    # this rank's BatchNorm statistics (checkpoints before they were saved per rank hold rank 0's, which every
    # rank then had: they were averaged before each save)
    own = rank_state.get("buffers")
    if own is not None:
        with torch.no_grad():
            for k, v in s.engine.module.named_buffers():
                if k in own:
                    v.copy_(own[k])
    s.resumed_from = tag
    if s.rank == 0:
        log.info(
            "resumed from %s: epoch %d, step %d", s.ckpt.dir / tag, s.state.epoch + 1, s.state.step_in_epoch
        )


def open_outputs(s: Session) -> None:
    from ..tracking import NullTracker, Tracker, wandb_mode

    cfg = s.cfg
    s.tracker = (
        Tracker(
            cfg.run_dir,
            cfg.to_dict(),
            mode=wandb_mode(cfg.log.wandb_mode),
            project=cfg.log.project,
            group=cfg.log.group,
            entity=cfg.log.entity,
            tags=cfg.log.tags,
            name=cfg.name,
            epochs_done=s.state.epoch if s.resumed_from else None,
        )
        if s.rank == 0
        else NullTracker()
    )
    if s.rank == 0 and cfg.train.layer_stats_every:
        from ..layer_stats import LayerStats

        s.layer_stats = LayerStats(
            s.engine.module,
            cfg.train.layer_stats_every,
            RunFolder(cfg.run_dir).layer_stats_file,
            s.state.global_step,
        )
    s.eval_loader = make_eval_loader(
        s.plan.index,
        cfg.eval.split,
        rank=s.rank,
        world=s.world,
        augment=cfg.data.augment,
        image_size=s.image_size,
        batch_size=cfg.eval.batch_size,
        limit=cfg.data.eval_limit,
        workers=cfg.data.workers,
        pin_memory=s.pin,
        on_bad_sample=cfg.data.on_bad_sample,
    )
    # The monitored split decoded once before any training: a bad image there stops the run now, named, not after
    # the first epoch's training (before its checkpoint), where every resume would meet it again.
    s.eval_loader.dataset.check()
    if s.rank == 0:
        log.info(
            "world %d | global batch %d = %d micro x %d ranks x %d accum | %d steps/epoch | %s",
            s.world,
            cfg.train.global_batch_size,
            cfg.train.micro_batch_size,
            s.world,
            s.plan.grad_accum,
            s.plan.steps_per_epoch,
            cfg.run_dir,
        )


def _eta(seconds: float) -> str:
    m, sec = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def train_epoch(s: Session) -> None:
    cfg, plan, state = s.cfg, s.plan, s.state
    log_every = cfg.train.log_every or max(1, plan.steps_per_epoch // 10)
    state.sums = state.sums.to(s.engine.device)  # no-op on CPU; on CUDA, dist.all_reduce needs it there
    s.engine.train()
    t_seg = t_start = time.perf_counter()
    start_step = state.step_in_epoch
    micro = state.step_in_epoch * plan.grad_accum
    stats = s.layer_stats
    bar = None
    if s.rank == 0 and sys.stdout.isatty():  # a live bar on a terminal; plain lines (below) in a log
        from tqdm import tqdm

        bar = tqdm(total=plan.steps_per_epoch, initial=state.step_in_epoch, unit="step", ascii=True,
                   desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}", mininterval=1)  # fmt: skip
    for batch in train_batches(cfg, plan, state.epoch, state.step_in_epoch, s.rank, s.image_size, s.pin):
        if stats is not None and (micro + 1) % plan.grad_accum == 0:
            stats.before_step(state.global_step + 1, s.engine.get_lr()[0])
        train_step(s.engine, batch, cfg, state)
        micro += 1
        if micro % plan.grad_accum:
            continue
        state.step_in_epoch += 1
        state.global_step += 1
        if stats is not None:
            stats.after_step(state.global_step)
        if cfg.log.every_steps and state.global_step % cfg.log.every_steps == 0:
            log_steps(s)  # collective: every rank, at the same steps
        if s.rank == 0 and (
            bar is not None
            or state.step_in_epoch % log_every == 0
            or state.step_in_epoch == plan.steps_per_epoch
        ):
            v = state.sums.tolist()  # host sync: at log lines only
            n = max(v[1] + v[5], 1)
            loss, acc, lr = (v[0] + v[4]) / n, (v[2] + v[6]) / n, s.engine.get_lr()[0]
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", adv_acc=f"{acc:.3f}", lr=f"{lr:.4g}", refresh=False)
                bar.update(1)
            else:
                done = state.step_in_epoch - start_step
                left = (time.perf_counter() - t_start) / done * (plan.steps_per_epoch - state.step_in_epoch)
                log.info(
                    "epoch %d/%d step %d/%d | loss %.4f | adv acc %.3f | lr %.4g | epoch ends in %s",
                    state.epoch + 1, cfg.train.epochs, state.step_in_epoch, plan.steps_per_epoch, loss, acc, lr,
                    _eta(left),
                )  # fmt: skip
        every = cfg.checkpoint.every_steps
        if every and state.global_step % every == 0 and state.step_in_epoch < plan.steps_per_epoch:
            state.train_seconds += time.perf_counter() - t_seg
            s.save(f"step{state.global_step:08d}")
            t_seg = time.perf_counter()
    state.train_seconds += time.perf_counter() - t_seg
    if bar is not None:
        bar.close()
    assert micro == plan.steps_per_epoch * plan.grad_accum, "every rank runs the same number of micro-batches"


def log_steps(s: Session) -> None:
    """Collective: the scalars of the steps since the last such line (all ranks' sums), to steps.jsonl and wandb on
    rank 0 (``log.every_steps``)."""
    import torch.distributed as dist

    state = s.state
    now = time.perf_counter()
    mark = s.step_mark  # set at the epoch's start (mark_epoch_start) and at each line
    d = state.sums - mark["sums"].to(state.sums.device)
    dist.all_reduce(d)  # the steps' sums over all ranks
    v = d.tolist()
    n = max(v[1] + v[5], 1)
    steps = max(1, state.global_step - mark["step"])
    comm = s.reducer.stats.since(mark["stats"])
    if s.rank == 0:
        rec = {
            "step": state.global_step,
            "epoch": state.epoch + state.step_in_epoch / s.plan.steps_per_epoch,
            "loss": (v[0] + v[4]) / n,
            "adv_acc": (v[2] + v[6]) / n,
            "lr": s.engine.get_lr()[0],
            "images_per_s": n / max(now - mark["t"], 1e-9),
        }
        moved = 2 * comm.wire_sent if s.bytes_source == "wire" else comm.bytes_sent + comm.bytes_recv
        rec["comm_s_per_step"] = comm.seconds / steps
        rec["mb_per_step"] = moved / steps / 1e6 if s.bytes_source != "none" else None
        s.tracker.log_step(rec)
    s.step_mark = {
        "sums": state.sums.clone(),
        "stats": s.reducer.stats.snapshot(),
        "t": now,
        "step": state.global_step,
    }


def epoch_record(s: Session) -> dict:
    import torch.distributed as dist

    plan, state, engine = s.plan, s.state, s.engine
    sums = state.sums.clone()
    dist.all_reduce(sums)  # loss and adversarial accuracy over all ranks
    comm_s, comm_b, exposed_s = s.epoch_comm()
    n = (sums[1] + sums[5]).item()
    record = {
        "epoch": state.epoch + 1,
        "train_loss": (sums[0] + sums[4]).item() / n,
        "train_adv_acc": (sums[2] + sums[6]).item() / n,
        "lr": engine.get_lr()[0],
        "epoch_time_s": state.train_seconds,
        "comm_time_s": comm_s,  # total: time spent reducing gradients, hidden behind backward or not
        "comm_exposed_s": exposed_s,  # the part the steps waited for (= comm_time_s without comm.overlap)
        "images_per_s": n / max(state.train_seconds, 1e-9),
        "bad_samples_skipped": int(sums[3].item()),
        "data_mb_per_iter": comm_b / plan.steps_per_epoch / 1e6 if s.bytes_source != "none" else None,
        "data_mb_source": s.bytes_source,
        "data_mb_per_iter_theory": s.reducer.theory_bytes(
            sum(p.numel() for p in engine.module.parameters()), s.world
        )
        / 1e6,
        "steps": state.global_step,
        "world_size": s.world,
    }
    if plan.unlabeled is not None:  # per source: the labeled set and the pseudo-labelled one
        for src, at in (("labeled", 0), ("pseudo", 4)):
            record[f"train_loss_{src}"] = sums[at].item() / max(sums[at + 1].item(), 1)
            record[f"train_adv_acc_{src}"] = sums[at + 2].item() / max(sums[at + 1].item(), 1)
            record[f"train_samples_{src}"] = int(sums[at + 1].item())
    d = s.reducer.stats.since(s.reduce_mark)
    steps_here = plan.steps_per_epoch - s.resumed_steps
    record["grad_values_reduced_per_step"] = d.numel / max(steps_here, 1)
    record["reduce_calls_per_step"] = d.calls / max(steps_here, 1)
    record["replicas_identical"] = replicas_identical(engine.module)
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    if record["grad_values_reduced_per_step"] != trainable:
        raise RuntimeError(
            f"epoch {state.epoch + 1}: {record['grad_values_reduced_per_step']:.0f} gradient values were reduced per "
            f"step, the model has {trainable}: a DeepSpeed change moved the gradient seam "
            "(dat_ds/comm/engine_seam.py); every gradient must be reduced exactly once"
        )
    return record


@contextlib.contextmanager
def averaged_bn(module: torch.nn.Module, world: int):
    """Collective: the model with its BatchNorm running statistics averaged over the ranks (one model to evaluate
    and export), each rank's own restored afterwards, so that evaluating never changes the training."""
    from timm.utils import distribute_bn

    own = [b.detach().clone() for b in module.buffers()]
    distribute_bn(module, world, reduce=True)
    try:
        yield module
    finally:
        with torch.no_grad():
            for b, v in zip(module.buffers(), own, strict=True):
                b.copy_(v)


def evaluate_epoch(s: Session) -> dict:
    cfg, epoch = s.cfg, s.state.epoch
    if (epoch + 1) % cfg.eval.every_epochs and epoch + 1 != cfg.train.epochs:
        return {}
    t0 = time.perf_counter()
    e = cfg.attack.eps
    with averaged_bn(s.engine.module, s.world) as model:
        counts = evaluate(
            model,
            s.eval_loader,
            eps=e,
            steps=cfg.eval.pgd_steps,
            step_size=cfg.eval.pgd_step_size or 2.5 * e / cfg.eval.pgd_steps,
            restarts=cfg.eval.pgd_restarts,
            device=s.engine.device,
            channels_last=cfg.model.channels_last,
            seed=cfg.train.seed * 1000 + s.rank,
            start_in_box=cfg.attack.start_in_box,  # the official monitor's start, as the training attack's
        )
    clean, pgd_acc = counts.acc()
    return {
        "clean_acc": clean,
        "pgd_acc": pgd_acc,
        "eval_n": counts.n,
        "eval_time_s": time.perf_counter() - t0,
    }


def close_epoch(s: Session, record: dict) -> None:
    cfg, epoch = s.cfg, s.state.epoch
    if s.rank == 0:
        log.info(
            "epoch %d | %s",
            epoch + 1,
            " ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in record.items()
                if k != "epoch"
            ),
        )
    s.tracker.log_epoch(record)
    s.state = TrainState(epoch=epoch + 1, global_step=s.state.global_step)
    s.mark_epoch_start()
    if (epoch + 1) % cfg.checkpoint.every_epochs == 0 or epoch + 1 == cfg.train.epochs:
        s.save(f"epoch{epoch + 1:04d}")


def finish(s: Session, last: dict) -> None:
    import torch.distributed as dist

    from ..export import export_safetensors, write_model_config

    with averaged_bn(s.engine.module, s.world) as model:  # the exported model: the ranks' statistics averaged
        if s.rank == 0:
            run = RunFolder(s.cfg.run_dir)
            export_safetensors(model, s.cfg, s.plan.index, run.model_file)
            write_model_config(model, s.cfg, s.plan.index, run.model_config_file)
    if s.rank == 0:
        s.tracker.log_summary({k: v for k, v in last.items() if isinstance(v, int | float)})
    s.tracker.finish()
    dist.barrier()


def replicas_identical(model: torch.nn.Module) -> bool:
    """Collective: do all ranks hold bit-identical parameters? (one all_gather of a 64-bit digest)"""
    import hashlib

    import torch.distributed as dist

    h = hashlib.blake2b(digest_size=8)
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any layout
    mine = torch.tensor([int.from_bytes(h.digest(), "little", signed=True)], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return all(bool((o == out[0]).all()) for o in out)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stdout,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def _seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    import random

    import numpy as np

    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)  # per-rank attack noise; the model is broadcast from rank 0 by DeepSpeed
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
