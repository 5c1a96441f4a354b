"""Everything derived from the recipe and the world size, checked before any rank starts real work."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, RunConfig
from ..data.loader import batches_per_epoch
from ..data.shards import ShardIndex, load_index
from ..init_from import InitPlan, SourceMissing, plan_init, read_record
from ..models import check_model_name
from ..run_folder import RunFolder


@dataclass
class Plan:
    cfg: RunConfig
    index: ShardIndex
    world: int
    grad_accum: int
    steps_per_epoch: int
    ds_config: dict = field(repr=False)
    unlabeled: ShardIndex | None = None  # the pseudo-labelled set of [unlabeled], if any
    init: InitPlan = field(default_factory=lambda: InitPlan(source=""))  # the starting weights ([finetune])


def make_plan(cfg: RunConfig, world: int) -> Plan:
    from ..engine import build_ds_config, gradient_accumulation

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
        record = read_record(cfg.run_dir)
        if record is None or not RunFolder(cfg.run_dir).has_checkpoints():
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
