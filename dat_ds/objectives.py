"""Training objectives: pure functions of (model, batch, config) -> loss.

Each takes ``forward`` (the DeepSpeed engine: its forward installs the hooks its backward needs), ``module`` (the
bare model, ``engine.module``, which the attack differentiates through for input gradients only, never touching
parameter ``.grad``), a batch ``x`` (fp32 pixels in [0,1]) and ``y`` (labels; ``IGNORE`` marks a skipped sample, it
adds nothing), the run's config and the (0-based) epoch, for objectives whose settings follow a schedule. It
returns the scalar to back-propagate, the per-example loss (for per-source metrics) and the logits whose accuracy
the run reports (on the adversarial inputs). A recipe picks one with ``loss.objective``; a new objective is a new
function in ``OBJECTIVES``.

- ``dat``:    lambda * CE(f(x), y) + CE(f(x_adv), y), x_adv from PGD or FGSM on CE (the DAT paper; lambda =
              ``loss.clean_weight``: the official code uses 1 for DAT-PGD and 0 for DAT-FGSM, whose gradient is
              that of CE(f(x_adv), y) alone, as Fast AT's; 0 is also Madry's AT; ``attack.method = "none"`` is
              standard training). The attack runs with BatchNorm in ``attack.bn_mode``; the losses in train mode.
- ``trades``: CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv maximizing that KL (Zhang et al. 2019; RST uses it
              on labeled and pseudo-labelled samples alike, beta = ``loss.trades_beta``, 6 in both papers).
- ``gaussian``: mean over N noisy copies x + sigma * e of CE(f(x + sigma * e), y) (Cohen et al. 2019's training for
              randomized smoothing; N = ``smoothing.noise_samples``: the DAT paper's Table 2 compares N = 2 and 20).
- ``smoothadv``: the same on x_adv, an l2 attack on the soft smoothed classifier estimated with the same N copies
              (Salman et al. 2019), radius ``smoothing.attack_eps`` warmed up over
              ``smoothing.attack_warmup_epochs`` epochs, ``smoothing.attack_steps`` steps.
Noise is added to [0,1] pixels, before the model's normalization layer, and not clipped (as Cohen's code).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import _kl_to, bn_mode, fgsm, pgd, smooth_adv_l2, trades_attack
from .config import RunConfig
from .smoothing import noisy_copies


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar, mean over the valid examples of the micro-batch
    per_example: torch.Tensor  # (B,), detached; 0 where the label is IGNORE
    logits: torch.Tensor  # (B, classes), detached: the reported (adversarial) accuracy is taken from these


def _mean(per_example: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (per_example * valid).sum() / valid.sum().clamp_min(1)


def ce_attack(module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig) -> torch.Tensor:
    """The inner maximization of ``dat``: PGD-K or FGSM with random start on the cross-entropy."""
    a = cfg.attack
    with bn_mode(module, a.bn_mode):
        if a.method == "pgd":
            return pgd(
                module,
                x,
                y,
                eps=a.eps,
                step_size=a.step_size,
                steps=a.steps,
                rand_init=a.rand_init,
                start_in_box=a.start_in_box,
            )
        return fgsm(
            module,
            x,
            y,
            eps=a.eps,
            step_size=a.fgsm_step_ratio * a.eps,
            rand_init=a.rand_init,
            start_in_box=a.start_in_box,
        )


def dat(
    forward: Callable, module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, epoch: int = 0
) -> LossOut:
    valid = (y >= 0).float()
    if cfg.attack.method == "none":
        logits = forward(x).float()
        loss = F.cross_entropy(
            logits, y
        )  # the mean over valid labels (IGNORE is cross_entropy's ignore_index)
        per = F.cross_entropy(logits.detach(), y, reduction="none")
        return LossOut(loss, per * valid, logits.detach())
    x_adv = ce_attack(module, x, y, cfg)
    logits = forward(x_adv).float()
    loss = F.cross_entropy(logits, y)
    per = F.cross_entropy(logits.detach(), y, reduction="none")
    if cfg.loss.clean_weight > 0:
        clean = forward(x).float()
        loss = loss + cfg.loss.clean_weight * F.cross_entropy(clean, y)
        per = per + cfg.loss.clean_weight * F.cross_entropy(clean.detach(), y, reduction="none")
    return LossOut(loss, per * valid, logits.detach())


def trades(
    forward: Callable, module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, epoch: int = 0
) -> LossOut:
    a = cfg.attack
    valid = (y >= 0).float()
    with bn_mode(module, a.bn_mode):
        if a.method == "fgsm":  # one KL step from a uniform start, the Fast-AT analogue
            step = a.fgsm_step_ratio * a.eps
            x_adv = trades_attack(module, x, eps=a.eps, step_size=step, steps=1, uniform_init=True)
        else:
            x_adv = trades_attack(module, x, eps=a.eps, step_size=a.step_size, steps=a.steps)
    logits_clean = forward(x).float()
    logits_adv = forward(x_adv).float()
    kl = _kl_to(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1))
    per = F.cross_entropy(logits_clean, y, reduction="none") + cfg.loss.trades_beta * kl
    return LossOut(_mean(per, valid), per.detach() * valid, logits_adv.detach())


def _noisy_ce(
    forward: Callable, x_rep: torch.Tensor, y: torch.Tensor, n: int, valid: torch.Tensor
) -> LossOut:
    """Mean CE over the n noisy copies of each example (rows i * n .. i * n + n - 1 belong to example i)."""
    logits = forward(x_rep).float()
    per = F.cross_entropy(logits, y.repeat_interleave(n), reduction="none").view(-1, n).mean(1)
    # reported accuracy: the majority vote of the copies, a one-draw estimate of the smoothed classifier
    votes = F.one_hot(logits.argmax(1).clamp_min(0), logits.shape[1]).view(len(y), n, -1).sum(1).float()
    return LossOut(_mean(per, valid), per.detach() * valid, votes.detach())


def gaussian(
    forward: Callable, module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, epoch: int = 0
) -> LossOut:
    s = cfg.smoothing
    valid = (y >= 0).float()
    return _noisy_ce(forward, noisy_copies(x, s.sigma, s.noise_samples), y, s.noise_samples, valid)


def smoothadv(
    forward: Callable, module: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RunConfig, epoch: int = 0
) -> LossOut:
    s = cfg.smoothing
    valid = (y >= 0).float()
    n = s.noise_samples
    noise = s.sigma * torch.randn_like(x.repeat_interleave(n, dim=0))
    with bn_mode(module, cfg.attack.bn_mode):
        x_adv = smooth_adv_l2(
            module, x, y.clamp_min(0), noise, eps=s.attack_radius(epoch), steps=s.attack_steps
        )
    return _noisy_ce(forward, x_adv.repeat_interleave(n, dim=0) + noise, y, n, valid)


OBJECTIVES: dict[str, Callable[..., LossOut]] = {
    "dat": dat,
    "trades": trades,
    "gaussian": gaussian,
    "smoothadv": smoothadv,
}
