"""l-inf attacks as pure functions in [0,1] pixel space.

They differentiate with ``torch.autograd.grad(loss, delta)`` only: parameter ``.grad`` is never touched, so they
are safe between DeepSpeed micro-steps. Pass the bare module (``engine.module``), never the engine: its forward
installs backward hooks that a ``.grad`` call would trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


def _input_grad(
    model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, clamp: bool = False
) -> torch.Tensor:
    """Gradient of the batch-mean cross-entropy at ``x + delta`` (``clamp``: at ``clamp(x + delta, 0, 1)``, the
    gradient flowing through the clamp) with respect to ``delta``."""
    delta.requires_grad_(True)
    inp = (x + delta).clamp(0, 1) if clamp else x + delta
    logits = model(inp)  # fp32 pixels: the model normalizes in fp32 (models.NormalizedModel)
    loss = F.cross_entropy(logits.float(), y)
    (grad,) = torch.autograd.grad(loss, [delta])
    return grad


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
) -> torch.Tensor:
    """PGD-K (Madry et al. 2018). With restarts, keeps per example the first perturbation that fools the model.
    ``start_in_box=False``: the random start is not projected into [0,1] before the first gradient (the official
    DAT code's ``attack.py``); every later iterate is."""
    x = x.detach().float()
    best = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = torch.empty_like(x).uniform_(-eps, eps) if rand_init else torch.zeros_like(x)
        if start_in_box:
            delta = _project(x, delta, eps)
        for _ in range(steps):
            g = _input_grad(model, x, delta, y)
            delta = _project(x, delta.detach() + step_size * g.sign(), eps)
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
    g = _input_grad(model, x, delta, y, clamp=not start_in_box)
    return (x + _project(x, delta.detach() + step_size * g.sign(), eps)).detach()


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
    delta = _project(x, start, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        kl = _kl_to(F.log_softmax(model(x + delta).float(), 1), p_clean).sum()
        (g,) = torch.autograd.grad(kl, [delta])
        delta = _project(x, delta.detach() + step_size * g.sign(), eps)
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
    the steps), from delta = 0, step 2 * eps / steps along the normalized gradient, then clamped to [0,1] and
    scaled back into the l2 ball, in that order (their ``PGD_L2``: ``clamp_``, then ``renorm_``)."""
    from .smoothing import smoothed_log_prob

    x = x.detach().float()
    m = len(noise) // len(x)
    step = 2 * eps / steps
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.nll_loss(smoothed_log_prob(model, (x + delta).repeat_interleave(m, dim=0) + noise, m), y)
        (g,) = torch.autograd.grad(loss, [delta])
        g_norm = g.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        # a zero gradient moves along a random normal direction instead, as their code does
        g = torch.where(g_norm > 0, g / g_norm.clamp_min(1e-30), torch.randn_like(g))
        delta = delta.detach() + step * g
        delta = (x + delta).clamp(0, 1) - x
        d_norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        delta = delta * (eps / d_norm.clamp_min(eps))  # into the l2 ball; shrinking towards x stays in [0,1]
    return (x + delta).detach()
