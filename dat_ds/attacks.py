"""Attacks as pure functions in [0,1] pixel space: one ascent loop, two steps (l-inf and l2), four losses.

``ascend(loss_at, x, delta, steps, step)`` is the loop every attack runs: the gradient of ``loss_at(x + delta)``
with respect to ``delta`` only (``torch.autograd.grad``: parameter ``.grad`` is never touched, so attacks are safe
between DeepSpeed micro-steps), then ``delta = step(delta, grad)``. The steps:

- ``LinfStep``: delta + size * sign(g), clipped to the eps-ball, then x + delta to the image box (PGD, FGSM, TRADES);
- ``L2Step``: delta + size * g / ||g|| (a random normal direction where g = 0), x + delta clamped to the box, then
  scaled into the l2 ball (Salman et al.'s ``PGD_L2``, whose order this keeps).

The attacks (``pgd``, ``fgsm``, ``trades_attack``, ``smooth_adv_l2``) only choose a start, a loss and a step. Pass
the bare module (``engine.module``), never the engine: its forward installs backward hooks that a ``.grad`` call
would trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Run the attack with BatchNorm in ``mode`` ("train" or "eval"), then restore the model's mode."""
    was_training = model.training
    model.train(mode == "train")
    try:
        yield
    finally:
        model.train(was_training)


def _project(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    # Clamp to the eps-ball, then to the image box [0,1].
    return (x + delta.clamp(-eps, eps)).clamp(0, 1) - x


def _bshape(x: torch.Tensor) -> tuple[int, ...]:
    return (-1, *[1] * (x.dim() - 1))


@dataclass(frozen=True)
class LinfStep:
    size: float
    eps: float
    x: torch.Tensor

    def __call__(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return _project(self.x, delta + self.size * grad.sign(), self.eps)


@dataclass(frozen=True)
class L2Step:
    size: float
    eps: float
    x: torch.Tensor

    def __call__(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        g_norm = grad.flatten(1).norm(dim=1).view(_bshape(grad))
        g = torch.where(g_norm > 0, grad / g_norm.clamp_min(1e-30), torch.randn_like(grad))
        delta = (self.x + delta + self.size * g).clamp(0, 1) - self.x
        d_norm = delta.flatten(1).norm(dim=1).view(_bshape(delta))
        return delta * (
            self.eps / d_norm.clamp_min(self.eps)
        )  # into the ball; shrinking towards x stays in [0,1]


def ascend(
    loss_at: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    delta: torch.Tensor,
    steps: int,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``steps`` ascent steps on ``loss_at(x + delta)`` from ``delta``; returns the final delta (detached)."""
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_at(x + delta), [delta])
        delta = step(delta.detach(), g)
    return delta.detach()


def _ce(model: nn.Module, y: torch.Tensor, clamp: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch-mean cross-entropy at an input (``clamp``: at the input clamped to [0,1], the gradient flowing
    through the clamp). fp32 pixels: the model normalizes in fp32 (models.NormalizedModel)."""

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inp.clamp(0, 1) if clamp else inp).float(), y)

    return loss


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    rand_init: bool = True,
    restarts: int = 1,
    start_in_box: bool = True,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """PGD-K (Madry et al. 2018). With restarts, keeps per example the first perturbation that fools the model.
    ``start_in_box=False``: the random start is not projected into [0,1] before the first gradient (the official
    DAT code's ``attack.py``); every later iterate is. ``starts``: the random starts, (restarts, *x.shape), drawn by
    the caller (so that they do not depend on how a caller batches its examples); else drawn here."""
    x = x.detach().float()
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for r in range(restarts):
        if starts is not None:
            delta = starts[r].to(x.device, torch.float32)
        else:
            delta = torch.empty_like(x).uniform_(-eps, eps) if rand_init else torch.zeros_like(x)
        if start_in_box:
            delta = _project(x, delta, eps)
        delta = ascend(_ce(model, y), x, delta, steps, LinfStep(step_size, eps, x))
        x_adv = (x + delta).detach()
        if restarts == 1:
            return x_adv
        with torch.no_grad():
            wrong = model(x_adv).argmax(1) != y
        take = wrong & ~fooled
        best[take] = x_adv[take]
        best[~fooled & ~wrong] = x_adv[~fooled & ~wrong]
        fooled |= wrong
    return best


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    rand_init: bool = True,
    start_in_box: bool = True,
) -> torch.Tensor:
    """FGSM with random start ("Fast is better than free", Wong et al. 2020: step 1.25 eps). ``start_in_box=False``:
    as the official DAT code's ``--fast`` branch, the start delta0 is kept unprojected and the gradient is taken
    at ``clamp(x + delta0, 0, 1)``."""
    x = x.detach().float()
    delta = torch.empty_like(x).uniform_(-eps, eps) if rand_init else torch.zeros_like(x)
    if start_in_box:
        delta = _project(x, delta, eps)
    delta = ascend(_ce(model, y, clamp=not start_in_box), x, delta, 1, LinfStep(step_size, eps, x))
    return (x + delta).detach()


def _kl_to(log_p_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv) per example, summed over classes (TRADES' ``KLDivLoss(reduction='sum')`` per row)."""
    return (p_clean * (p_clean.clamp_min(1e-12).log() - log_p_adv)).sum(1)


def trades_attack(
    model: nn.Module,
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    init_std: float = 0.001,
    uniform_init: bool = False,
) -> torch.Tensor:
    """TRADES' inner maximization (Zhang et al. 2019): l-inf PGD on KL(f(x) || f(x+delta)), started at
    x + 0.001 N(0, I) as in the authors' code (``uniform_init``: anywhere in the ball, for a single step, since
    the KL's gradient vanishes at delta = 0); needs no labels (so it serves pseudo-labelled data alike)."""
    x = x.detach().float()
    with torch.no_grad():
        p_clean = F.softmax(model(x).float(), 1)
    start = torch.empty_like(x).uniform_(-eps, eps) if uniform_init else init_std * torch.randn_like(x)

    def kl(inp: torch.Tensor) -> torch.Tensor:
        return _kl_to(F.log_softmax(model(inp).float(), 1), p_clean).sum()

    delta = ascend(kl, x, _project(x, start, eps), steps, LinfStep(step_size, eps, x))
    return (x + delta).detach()


def smooth_adv_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Tensor,
    *,
    eps: float,
    steps: int,
) -> torch.Tensor:
    """SmoothAdv's attack (Salman et al. 2019): l2 PGD on the soft smoothed classifier, -log of the mean softmax
    over the m noisy copies ``x + noise`` (``noise``: (m * B, ...), copy j of example i at row i * m + j, fixed over
    the steps), from delta = 0, ``L2Step`` of 2 * eps / steps."""
    from .smoothing import smoothed_log_prob

    x = x.detach().float()
    m = len(noise) // len(x)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(smoothed_log_prob(model, inp.repeat_interleave(m, dim=0) + noise, m), y)

    delta = ascend(loss, x, torch.zeros_like(x), steps, L2Step(2 * eps / steps, eps, x))
    return (x + delta).detach()
