"""Recipe -> optimizer and LR schedule. Parameter groups are decided by shape: ``ndim <= 1`` is a norm or bias."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig
from .lalr import LALR


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The large-batch scaling rule: ``lr * (global_batch / lr_ref_batch) ** {1, 0.5}``."""
    k = global_batch / cfg.lr_ref_batch
    return cfg.lr * {"none": 1.0, "linear": k, "sqrt": math.sqrt(k)}[cfg.lr_scale]


def param_groups(
    model: nn.Module, cfg: OptimConfig, head: str = "", head_lr_scale: float = 1.0
) -> list[dict]:
    """Weights, then norms and biases, of the body, then of the head (parameters under module ``head``, whose LR
    is ``head_lr_scale`` times the body's). Frozen parameters (``requires_grad = False``) are in no group."""
    bins: dict[tuple[bool, bool], list] = {(h, nb): [] for h in (False, True) for nb in (False, True)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            in_head = bool(head) and (name == head or name.startswith(head + "."))
            bins[(in_head and head_lr_scale != 1.0, p.ndim <= 1)].append(p)
    groups = []
    for in_head in (False, True):
        extra = {"lr_scale": head_lr_scale} if in_head else {}
        if bins[(in_head, False)]:
            groups.append(
                {"params": bins[(in_head, False)], "weight_decay": cfg.weight_decay, "adapt": True, **extra}
            )
        if bins[(in_head, True)]:
            groups.append(
                {
                    "params": bins[(in_head, True)],
                    "weight_decay": cfg.weight_decay if cfg.wd_on_norm_and_bias else 0.0,
                    "adapt": cfg.adapt_norm_and_bias,
                    **extra,
                }
            )
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, global_batch: int, head: str = "", head_lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    lr = scaled_lr(cfg, global_batch)
    groups = param_groups(model, cfg, head, head_lr_scale)
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)  # LambdaLR scales each group's own base LR
    if cfg.name == "sgd":
        for g in groups:
            g.pop("adapt")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return LALR(
        groups,
        lr=lr,
        moments=cfg.lalr_moments,
        betas=cfg.betas,
        eps=cfg.adam_eps,
        momentum=cfg.momentum,
        c_lower=cfg.c_lower,
        c_upper=cfg.c_upper,
        bias_correction=cfg.bias_correction,
    )


def lr_factor(step: int, *, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base LR before optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
    epoch = step / steps_per_epoch
    warm = cfg.warmup_epochs
    if warm > 0 and epoch < warm:
        return (step + 1) / (warm * steps_per_epoch)
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        t = (epoch - warm) / max(epochs - warm, 1e-8)
        return 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))
    return 1.0


def build_schedule(
    opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        return lr_factor(step, cfg=cfg, steps_per_epoch=steps_per_epoch, epochs=epochs)

    return torch.optim.lr_scheduler.LambdaLR(opt, f)
