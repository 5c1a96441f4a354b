"""One micro-batch of training, and the micro-batches of an epoch, in data-flow order."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..data.loader import PairedLoader, StreamSpec, make_train_loader
from ..data.shards import pooled_split
from ..objectives import OBJECTIVES
from ..robust_eval import to_input
from .plan import Plan
from .state import TrainState


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
