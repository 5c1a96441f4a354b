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
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import ConfigError, RunConfig, load_config
from .data.loader import PairedLoader, StreamSpec, batches_per_epoch, make_eval_loader, make_train_loader
from .data.shards import ShardError, ShardIndex, load_index, pooled_split
from .evaluate import evaluate, to_input
from .init_from import InitPlan, SourceMissing, apply_init, plan_init, read_record, write_record
from .models import build_model, check_model_name, input_stats, keep_fp32_layers
from .objectives import OBJECTIVES

log = logging.getLogger("dat_ds")
PEERS: list[str] = []  # every rank's address, by rank (names a lost peer when a collective fails)


@dataclass
class Plan:
    """Everything derived from the recipe and the world size, checked before any rank starts real work."""

    cfg: RunConfig
    index: ShardIndex
    world: int
    grad_accum: int
    steps_per_epoch: int
    ds_config: dict = field(repr=False)
    unlabeled: ShardIndex | None = None  # the pseudo-labelled set of [unlabeled], if any
    init: InitPlan = field(default_factory=lambda: InitPlan(source=""))  # the starting weights ([finetune])


def make_plan(cfg: RunConfig, world: int) -> Plan:
    from .engine import build_ds_config, gradient_accumulation

    index = load_index(cfg.data.shards)
    if not index.labeled:
        raise ConfigError(
            f"data.shards={cfg.data.shards} is an unlabeled set; train on a labeled one, and stream this one as "
            "[unlabeled] after labelling it with dat_ds.pseudo_label"
        )
    check_model_name(cfg.model.name)
    accum = gradient_accumulation(cfg, world)
    unlabeled = None
    u = cfg.unlabeled_per_micro
    micro_steps = (
        cfg.train.global_batch_size // cfg.train.micro_batch_size
    )  # micro-batches per step, all ranks
    labeled_batch = micro_steps * (cfg.images_per_micro - u)  # images per step from data.shards
    if cfg.eval.split not in index.splits:
        raise ConfigError(
            f"eval.split={cfg.eval.split!r}: {cfg.data.shards} has the splits {sorted(index.splits)}; make a "
            "validation split with: python -m data_prep.holdout SRC OUT --n N"
        )
    try:
        if cfg.unlabeled.shards:
            unlabeled = load_index(cfg.unlabeled.shards)
            check_unlabeled(cfg, index, unlabeled)
        train_count = index.split("train").count + (unlabeled.split("train").count if cfg.pooled else 0)
        steps = batches_per_epoch(train_count, labeled_batch)
        if u:
            batches_per_epoch(unlabeled.split("train").count, micro_steps * u)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    return Plan(
        cfg, index, world, accum, steps, build_ds_config(cfg, world), unlabeled, plan_start(cfg, index)
    )


def plan_start(cfg: RunConfig, index: ShardIndex) -> InitPlan:
    """The starting weights, planned from shapes before any rank starts (dat_ds/init_from.py). A finetune whose
    source has gone may still resume from its own checkpoints: it then follows the plan its run folder recorded."""
    try:
        return plan_init(cfg, index.num_classes, index.channels)
    except SourceMissing:
        ckpts = cfg.run_dir / "checkpoints"
        record = read_record(cfg.run_dir)
        if record is None or not (ckpts.is_dir() and any(ckpts.iterdir())):
            raise
        return record


def check_unlabeled(cfg: RunConfig, index: ShardIndex, unlabeled: ShardIndex) -> None:
    where = f"unlabeled.shards={cfg.unlabeled.shards}"
    if not unlabeled.labeled:
        raise ConfigError(
            f"{where} has no labels yet; label it first: deepspeed --module dat_ds.pseudo_label RUN "
            f"{cfg.unlabeled.shards} OUT (RUN: a model trained on {cfg.data.shards}), then point unlabeled.shards at OUT"
        )
    if unlabeled.channels != index.channels or unlabeled.num_classes != index.num_classes:
        raise ConfigError(
            f"{where} has {unlabeled.channels} channels and {unlabeled.num_classes} classes, data.shards has "
            f"{index.channels} and {index.num_classes}: they must match"
        )


SUMS = 7


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    global_step: int = 0
    # running sums of the epoch on this rank: loss, count and correct (on adversarial inputs) of the labeled samples,
    # skipped samples, then loss, count and correct of the pseudo-labelled ones. They live on the device so a step
    # never waits for the host; they are read at log lines, the epoch end and checkpoints.
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(SUMS, dtype=torch.float64))
    comm_seconds: float = 0.0  # communication time so far in this epoch
    comm_bytes: int = 0
    train_seconds: float = 0.0
    comm_exposed_seconds: float = 0.0  # the part of comm_seconds the steps waited for

    def client_state(self, cfg: RunConfig) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "config": cfg.to_dict(),
        }

    def rank_state(self) -> dict:
        from .checkpoint import rng_state

        return {
            "rng": rng_state(),
            "sums": self.sums.cpu(),
            "timers": torch.tensor(
                [self.comm_seconds, float(self.comm_bytes), self.train_seconds, self.comm_exposed_seconds],
                dtype=torch.float64,
            ),
        }


def train_step(engine, batch: tuple, cfg: RunConfig, state: TrainState) -> None:
    """One micro-batch. ``engine.step()`` is called every time; the engine decides where the boundary is."""
    x, y, n_labeled = batch if len(batch) == 3 else (*batch, len(batch[1]))
    x = to_input(x, engine.device, cfg.model.channels_last)
    y = y.to(engine.device, non_blocking=True)
    # Pixels stay fp32 into the model, whatever the engine's precision (see models.NormalizedModel).
    out = OBJECTIVES[cfg.loss.objective](engine, engine.module, x, y, cfg, epoch=state.epoch)
    engine.backward(out.loss)
    engine.step()  # at the boundary: gradient reduction (dat_ds.comm), clipping, optimizer, LR schedule
    with torch.no_grad():
        valid = y >= 0  # skipped samples (data.on_bad_sample = "skip") carry the label IGNORE
        right = (out.logits.argmax(1) == y) & valid
        for part, at in ((slice(0, n_labeled), 0), (slice(n_labeled, None), 4)):  # labeled, pseudo-labelled
            state.sums[at] += out.per_example[part].double().sum()
            state.sums[at + 1] += valid[part].sum()
            state.sums[at + 2] += right[part].sum()
        state.sums[3] += (~valid).sum()


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


@dataclass
class Session:
    """What one rank holds for the whole run; the phases of ``run`` read and advance it."""

    cfg: RunConfig
    plan: Plan
    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tag: str | None = None  # the checkpoint this process resumes from (rank 0's choice), or None
    engine: Any = None
    reducer: Any = None
    ckpt: Any = None
    tracker: Any = None
    eval_loader: Any = None
    state: TrainState = field(default_factory=TrainState)
    resumed_from: str | None = None
    # Bytes per step, measured: gloo's socket writes (x2: in both topologies each rank receives what it sends),
    # or under NCCL the sizes of the buffers the ps transport posted; an NCCL ring moves bytes nothing here sees.
    bytes_source: str = "none"
    comm_mark: Any = None  # reducer counters when this epoch (or its resumed part) began
    reduce_mark: Any = None  # the same, for the exactly-once check of this process's steps
    resumed_steps: int = 0  # steps of the current epoch done before this process started it
    layer_stats: Any = None  # rank 0's per-layer step log, when train.layer_stats_every is set

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size or self.plan.index.image_size

    @property
    def pin(self) -> bool:
        return self.engine.device.type == "cuda"

    def epoch_comm(self) -> tuple[float, int, float]:
        """Communication seconds, bytes and exposed seconds of the current epoch so far (across a resume)."""
        d = self.reducer.stats.since(self.comm_mark)
        moved = 2 * d.wire_sent if self.bytes_source == "wire" else d.bytes_sent + d.bytes_recv
        return (
            self.state.comm_seconds + d.seconds,
            self.state.comm_bytes + (moved if self.bytes_source != "none" else 0),
            self.state.comm_exposed_seconds + d.exposed_seconds,
        )

    def save(self, tag: str) -> None:
        rank_state = self.state.rank_state()
        # BatchNorm running statistics are each rank's own (the official DAT code never syncs them) and feed the
        # eval-mode attack; DeepSpeed saves only rank 0's, so every rank keeps its own in its file.
        rank_state["buffers"] = {k: v.detach().cpu().clone() for k, v in self.engine.module.named_buffers()}
        comm_s, comm_b, exposed_s = self.epoch_comm()
        rank_state["timers"][:2] = torch.tensor([comm_s, comm_b], dtype=torch.float64)
        rank_state["timers"][3] = exposed_s
        rank_state["reducer"] = self.reducer.state_dict()  # error-feedback residuals, rounding generator
        self.ckpt.save(self.engine, tag, self.state.client_state(self.cfg), rank_state)

    def mark_epoch_start(self) -> None:
        self.comm_mark = self.reducer.stats.snapshot()
        self.reduce_mark = self.reducer.stats.snapshot()
        self.resumed_steps = self.state.step_in_epoch


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

    from .engine import init_distributed, rank_addresses, set_cpu_threads
    from .launch_guard import guard

    guard()  # stop when the deepspeed/torchrun command the user started is gone
    init_distributed(cfg.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = (
        torch.device(f"cuda:{torch.cuda.current_device()}")
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    PEERS[:] = rank_addresses(device)
    assert world == plan.world
    _setup_logging(rank)
    _seed_everything(cfg.train.seed, rank, cfg.train.deterministic)
    set_cpu_threads()
    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    return Session(cfg, plan, rank, world, device)


def choose_start(s: Session, resume: str) -> None:
    from .checkpoint import Checkpointer

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
    import deepspeed
    import torch.distributed as dist

    from .checkpoint import secure_checkpoint_engine
    from .comm import engine_seam
    from .comm.transport import GradientReducer
    from .optim import build_optimizer, build_schedule

    cfg = s.cfg
    model = build_model_for_run(s)
    optimizer = build_optimizer(
        model, cfg.optim, cfg.train.global_batch_size, f"net.{s.plan.init.head}", cfg.finetune.head_lr_scale
    )
    schedule = build_schedule(optimizer, cfg.optim, s.plan.steps_per_epoch, cfg.train.epochs)
    s.engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=s.plan.ds_config
    )
    secure_checkpoint_engine(s.engine)  # DeepSpeed's own loader would unpickle with weights_only=False
    if cfg.model.channels_last:
        # After the engine's initial broadcast, which over gloo cannot send a channels-last tensor ("stride(-1)
        # must be 1 to view Float as Byte"). In place (param.data), so the optimizer keeps its references.
        s.engine.module.to(memory_format=torch.channels_last)
    if s.engine.bfloat16_enabled() or s.engine.fp16_enabled():
        keep_fp32_layers(s.engine.module)  # the attack's delta reaches the network intact; norms match
    c = cfg.comm
    s.reducer = GradientReducer(
        bits=c.bits,
        two_sided=c.two_sided,
        topology=c.topology,
        codec=c.codec,
        rounding=c.rounding,
        error_feedback=c.error_feedback,
        block_size=c.block_size,
        bucket_mb=c.bucket_mb,
        seed=cfg.train.seed,
    )
    engine_seam.install(s.engine, s.reducer, c.overlap_bucket_mb if c.overlap else None)
    s.bytes_source = "wire" if dist.get_backend() == "gloo" else "posted" if c.topology == "ps" else "none"


def restore(s: Session) -> None:
    from .checkpoint import set_rng_state

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
    from .tracking import NullTracker, Tracker, wandb_mode

    cfg = s.cfg
    s.tracker = (
        Tracker(
            cfg.run_dir,
            cfg.to_dict(),
            mode=wandb_mode(cfg.log.wandb_mode),
            project=cfg.log.project,
            group=cfg.log.group,
            name=cfg.name,
            epochs_done=s.state.epoch if s.resumed_from else None,
        )
        if s.rank == 0
        else NullTracker()
    )
    if s.rank == 0 and cfg.train.layer_stats_every:
        from .layer_stats import LayerStats

        s.layer_stats = LayerStats(
            s.engine.module,
            cfg.train.layer_stats_every,
            cfg.run_dir / "layer_stats.jsonl",
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
    )
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


def train_epoch(s: Session) -> None:
    cfg, plan, state = s.cfg, s.plan, s.state
    log_every = cfg.train.log_every or max(1, plan.steps_per_epoch // 10)
    state.sums = state.sums.to(s.engine.device)  # no-op on CPU; on CUDA, dist.all_reduce needs it there
    s.engine.train()
    t_seg = time.perf_counter()
    micro = state.step_in_epoch * plan.grad_accum
    stats = s.layer_stats
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
        if s.rank == 0 and (
            state.step_in_epoch % log_every == 0 or state.step_in_epoch == plan.steps_per_epoch
        ):
            v = state.sums.tolist()
            n = max(v[1] + v[5], 1)
            log.info(
                "epoch %d/%d step %d/%d | loss %.4f | adv acc %.3f | lr %.4g",
                state.epoch + 1,
                cfg.train.epochs,
                state.step_in_epoch,
                plan.steps_per_epoch,
                (v[0] + v[4]) / n,
                (v[2] + v[6]) / n,
                s.engine.get_lr()[0],
            )
        every = cfg.checkpoint.every_steps
        if every and state.global_step % every == 0 and state.step_in_epoch < plan.steps_per_epoch:
            state.train_seconds += time.perf_counter() - t_seg
            s.save(f"step{state.global_step:08d}")
            t_seg = time.perf_counter()
    state.train_seconds += time.perf_counter() - t_seg
    assert micro == plan.steps_per_epoch * plan.grad_accum, "every rank runs the same number of micro-batches"


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

    from .export import export_safetensors

    with averaged_bn(s.engine.module, s.world) as model:  # the exported model: the ranks' statistics averaged
        if s.rank == 0:
            export_safetensors(model, s.cfg, s.plan.index, s.cfg.run_dir / "model.safetensors")
    if s.rank == 0:
        s.tracker.log_summary({k: v for k, v in last.items() if isinstance(v, int | float)})
    s.tracker.finish()
    dist.barrier()


def train_batches(
    cfg: RunConfig, plan: Plan, epoch: int, done_steps: int, rank: int, image_size: int, pin: bool
):
    """This rank's micro-batches of ``epoch`` from step ``done_steps`` on: (x, y), or with [unlabeled]
    (x, y, n_labeled) where the first n_labeled samples come from data.shards and the rest from unlabeled.shards."""
    u = cfg.unlabeled_per_micro
    ipm = cfg.images_per_micro
    common = dict(
        augment=cfg.data.augment,
        image_size=image_size,
        batches=plan.steps_per_epoch * plan.grad_accum,
        rank=rank,
        world=plan.world,
        seed=cfg.train.seed,
        epoch=epoch,
        skip=done_steps * plan.grad_accum,
        workers=cfg.data.workers,
        accum=plan.grad_accum,
        on_bad_sample=cfg.data.on_bad_sample,
    )
    if cfg.pooled:  # one stream over both sets, labeled samples first in each micro-batch
        train = plan.index.split("train")
        pooled = StreamSpec(
            split=pooled_split(train, plan.unlabeled.split("train")),
            channels=plan.index.channels,
            micro_batch=ipm,
            pool_first=train.count,
            **common,
        )
        return make_train_loader(pooled, pin_memory=pin)
    labeled = StreamSpec(
        split=plan.index.split("train"),
        channels=plan.index.channels,
        micro_batch=ipm - u,
        **common,
    )
    if not u:
        return make_train_loader(labeled, pin_memory=pin)
    pseudo = StreamSpec(
        split=plan.unlabeled.split("train"),
        channels=plan.unlabeled.channels,
        micro_batch=u,
        cycle=True,
        step_offset=epoch * plan.steps_per_epoch,
        **common,
    )
    return PairedLoader(labeled, pseudo, pin_memory=pin)


def resume_tag(ckpt, resume: str, rank: int, device: torch.device) -> str | None:
    """Collective: the checkpoint rank 0 chose (``auto``: its newest complete one), checked visible to every rank."""
    import torch.distributed as dist

    chosen = ""
    if rank == 0:
        chosen = (ckpt.latest() or "") if resume == "auto" else ("" if resume in ("none", "") else resume)
    buf = torch.zeros(256, dtype=torch.uint8, device=device)
    raw = chosen.encode()[:256]
    buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    dist.broadcast(buf, 0)
    tag = bytes(buf.cpu().tolist()).rstrip(b"\0").decode()
    if not tag:
        return None
    from .checkpoint import MARKER, RANK_FILE

    sees = (ckpt.dir / tag / MARKER).is_file() and (ckpt.dir / tag / RANK_FILE.format(rank)).is_file()
    blind = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=device)
    blind[rank] = int(not sees)
    dist.all_reduce(blind)
    if blind.any():
        ranks = blind.nonzero().flatten().tolist()
        raise SystemExit(
            f"dat-ds: error: rank(s) {ranks} cannot see checkpoint {ckpt.dir / tag} that rank 0 chose: the run "
            "folder (out_dir) must be on a filesystem every host shares, at the same path"
        )
    return tag


def check_resume(cfg: RunConfig, resume: str, world: int) -> str | None:
    """Before anything in the run folder is touched: refuse to resume under a recipe that changes the math or the
    data stream. Returns the message, or None."""
    from .checkpoint import Checkpointer
    from .config import resume_differences

    ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint.keep, 0, world)
    tag = ckpt.latest() if resume == "auto" else resume
    if tag is None:
        return None
    saved = ckpt.saved_config(tag)
    if saved is None and (cfg.run_dir / "config.json").is_file():
        saved = json.loads((cfg.run_dir / "config.json").read_text())
    if saved is None:
        return None
    refused, allowed = resume_differences(saved, cfg)
    if refused:
        return (
            f"checkpoint {ckpt.dir / tag} was trained under a different recipe; resuming would silently change "
            "the run:\n  "
            + "\n  ".join(refused)
            + "\nResume with the recipe it was written under (its resolved "
            f"copy is {ckpt.dir / tag / 'config.json'}), or start a new run with --set name=<new name> "
            "(nothing was changed)"
        )
    if allowed:
        print("dat-ds: resuming with changed settings:\n  " + "\n  ".join(allowed), file=sys.stderr)
    return None


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
        if rank == 0:
            print(f"dat-ds: error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(
            f"ok: {args.recipe} | world {world} | accumulation {plan.grad_accum} | "
            f"{plan.steps_per_epoch} steps/epoch | {plan.index.split('train').count} train samples"
        )
        if cfg.finetune.init_from or cfg.finetune.freeze:
            print(plan.init.summary())
        return 0
    # Rank 0 alone decides about the run folder (a shared filesystem on a cluster); if it refuses, it exits and
    # the launcher stops the other ranks.
    lock = None
    if rank == 0:
        from .run_lock import RunFolderBusy, RunLock

        try:
            lock = RunLock(cfg.run_dir).acquire()
        except RunFolderBusy as e:
            print(f"dat-ds: error: {e}", file=sys.stderr)
            return 2
        ckpts = cfg.run_dir / "checkpoints"
        if args.resume in ("none", "") and ckpts.is_dir() and any(ckpts.iterdir()):
            print(
                f"dat-ds: error: {cfg.run_dir} already holds checkpoints of an earlier run; continue it with "
                f"--resume auto, or start a new one with --set name=<new name> (nothing was overwritten)",
                file=sys.stderr,
            )
            return 2
        if args.resume not in ("none", ""):
            problem = check_resume(cfg, args.resume, world)
            if problem:
                print(f"dat-ds: error: {problem}", file=sys.stderr)
                return 2
    try:
        run(cfg, plan, args.resume)
    except ConfigError as e:
        if rank == 0:
            print(f"dat-ds: error: {e}", file=sys.stderr)
        return 2
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
