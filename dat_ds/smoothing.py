"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): the primitives training and certification share.

The smoothed classifier is g(x) = argmax_c P(f(x + sigma * e) = c), e ~ N(0, I), with the noise added to pixels in
[0, 1] before the model's own normalization (``models.NormalizedModel``), not clipped, as in Cohen's code.

- ``noisy_copies``: n noisy copies of each input, drawn from a caller-owned generator (seeded per chunk by the
  certification, so results do not depend on the number of ranks);
- ``sample_counts``: class counts of f over n noise draws per example, noise batched across examples and draws;
- ``certify_counts`` / ``predict_counts``: Cohen's CERTIFY and PREDICT on counts, with the one-sided Clopper-Pearson
  bound and the binomial test from scipy;
- ``smoothed_log_prob``: log of the soft smoothed classifier (the mean softmax over noise draws), which SmoothAdv
  (Salman et al. 2019) attacks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ABSTAIN = -1


def noisy_copies(
    x: torch.Tensor, sigma: float, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n * B, ...) with copy j of example i at row i * n + j: x_i + sigma * e_ij. Noise from ``generator`` (a CPU
    generator, so that results do not depend on the device) or, without one, the device's default generator."""
    rep = x.repeat_interleave(n, dim=0)
    if generator is None:
        return rep + sigma * torch.randn_like(rep)
    return rep + sigma * torch.randn(rep.shape, generator=generator, dtype=torch.float32).to(rep.device)


@torch.inference_mode()
def sample_counts(
    model: nn.Module,
    x: torch.Tensor,
    sigma: float,
    n: int,
    num_classes: int,
    generator: torch.Generator,
    batch: int = 1000,
) -> torch.Tensor:
    """(B, num_classes) int64: how often f(x_i + sigma * e) was each class over n draws per example. The draws of
    all examples are cut into batches of ``batch`` rows, so small n still fills a batch."""
    counts = torch.zeros(len(x), num_classes, dtype=torch.int64)
    total = len(x) * n
    owner = torch.arange(len(x)).repeat_interleave(n)
    for s in range(0, total, batch):
        rows = owner[s : s + batch]
        xb = x[rows]
        noise = torch.randn(xb.shape, generator=generator, dtype=torch.float32).to(xb.device)
        xn = xb + sigma * noise
        if xn.dim() == 4:
            xn = xn.contiguous(memory_format=torch.channels_last)
        pred = model(xn).argmax(1).cpu()
        counts.index_put_((rows, pred), torch.ones_like(pred), accumulate=True)
    return counts


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (0 when k = 0)."""
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def max_certifiable_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n estimation draws at level alpha: the one it returns when all n
    draws vote for the top class, whose Clopper-Pearson lower bound is alpha ** (1 / n). Radii beyond it certify
    nothing, whatever the model; only a larger n reaches them."""
    from statistics import NormalDist

    return sigma * NormalDist().inv_cdf(alpha ** (1 / n))


def certify_counts(
    counts0: np.ndarray, counts: np.ndarray, n: int, sigma: float, alpha: float
) -> tuple[int, float]:
    """Cohen's CERTIFY from the selection counts (n0 draws) and the estimation counts (n draws):
    (class, l2 radius) or (ABSTAIN, 0.0)."""
    from scipy.stats import norm

    c = int(np.argmax(counts0))
    p_lower = lower_confidence_bound(int(counts[c]), n, alpha)
    if p_lower < 0.5:
        return ABSTAIN, 0.0
    return c, float(sigma * norm.ppf(p_lower))


def predict_counts(counts: np.ndarray, alpha: float) -> int:
    """Cohen's PREDICT: the top class if a two-sided binomial test of its count against the runner-up's rejects
    equality at level alpha, else ABSTAIN."""
    from scipy.stats import binomtest

    top2 = np.argsort(counts)[::-1][:2]
    na, nb = int(counts[top2[0]]), int(counts[top2[1]])
    if binomtest(na, na + nb, 0.5).pvalue <= alpha:
        return int(top2[0])
    return ABSTAIN


def smoothed_log_prob(model: nn.Module, x_noisy: torch.Tensor, m: int) -> torch.Tensor:
    """(B, classes): log of the mean softmax over the m noisy copies of each example (rows i * m .. i * m + m - 1)."""
    p = F.softmax(model(x_noisy).float(), 1)
    return p.view(-1, m, p.shape[1]).mean(1).clamp_min(1e-12).log()
