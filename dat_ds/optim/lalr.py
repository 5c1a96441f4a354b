"""LALR: the layer-wise adaptive learning rate of DAT (LAMB-style).

For every parameter tensor (a "layer")::

    u      = Adam direction m_hat / (sqrt(v_hat) + eps)      (moments="adam", LAMB; with bias_correction=False,
                                                              m / (sqrt(v) + eps), as the official DAT code's
                                                              LAMB, cybertronai's, which has none)
           | momentum buffer  b <- mu * b + g                (moments="momentum", LARS-like)
    u      = u + wd * theta                                  (decoupled weight decay, inside the update)
    theta <- theta - tau(||theta||) * lr * u / ||u||,        tau(z) = min(max(z, c_l), c_u)

Guards (where the formula blows up or stalls):
  * ``||theta|| == 0``: tau would be ``c_l`` (often 0) and the layer would never move; the step is ``lr * u``
    (trust ratio 1, as LAMB does).
  * ``||u|| == 0``: nothing to do; the step is zero.
  * gradient exactly zero (timm zero-initialises the last BN weight of each residual block): with weight decay
    inside ``u`` the ratio would be ``||theta|| / (wd * ||theta||) = 1/wd`` and shrink the layer by ``lr`` each step;
    such a layer gets plain decoupled weight decay ``theta <- theta - lr * wd * theta`` instead.
Groups with ``adapt=False`` (by default none; see ``optim.adapt_norm_and_bias``) take ``theta <- theta - lr * u``.

All per-tensor work runs as ``torch._foreach_*`` ops over the group; the trust ratios are computed on the device
with no host sync. ``last_trust_ratios`` keeps the latest ratios (one per tensor) for logging and tests.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim import Optimizer


class LALR(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        *,
        moments: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        c_lower: float = 0.0,
        c_upper: float = 10.0,
        adapt: bool = True,
        bias_correction: bool = True,
    ):
        if moments not in ("adam", "momentum"):
            raise ValueError(f"moments={moments!r}: choose 'adam' or 'momentum'")
        if not 0 <= c_lower <= c_upper:
            raise ValueError(f"need 0 <= c_lower <= c_upper, got {c_lower}, {c_upper}")
        defaults = dict(
            lr=lr,
            moments=moments,
            betas=betas,
            eps=eps,
            momentum=momentum,
            weight_decay=weight_decay,
            c_lower=c_lower,
            c_upper=c_upper,
            adapt=adapt,
            bias_correction=bias_correction,
        )
        super().__init__(params, defaults)
        self.last_trust_ratios: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_trust_ratios = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad.float() if p.grad.dtype != torch.float32 else p.grad for p in params]
            updates = self._direction(group, params, grads)
            wd = group["weight_decay"]
            lr = group["lr"]
            if group["adapt"]:
                g_norm = torch.stack(torch._foreach_norm(grads))
                if wd:
                    torch._foreach_add_(updates, params, alpha=wd)
                w_norm = torch.stack(torch._foreach_norm(params)).float()
                u_norm = torch.stack(torch._foreach_norm(updates)).float()
                tau = w_norm.clamp(min=group["c_lower"], max=group["c_upper"])
                ratio = torch.where(
                    (w_norm > 0) & (u_norm > 0), tau / u_norm.clamp(min=1e-30), torch.ones_like(w_norm)
                )
                # Zero gradient: plain decoupled weight decay (u == wd * theta, ratio 1).
                ratio = torch.where(g_norm > 0, ratio, torch.ones_like(ratio))
                self.last_trust_ratios.append(ratio)
                torch._foreach_mul_(updates, list(ratio.unbind()))
            elif wd:
                torch._foreach_add_(updates, params, alpha=wd)
            if params[0].dtype == torch.float32:
                torch._foreach_add_(params, updates, alpha=-lr)
            else:
                for p, u in zip(params, updates, strict=True):
                    p.add_(u.to(p.dtype), alpha=-lr)
        return loss

    def _direction(
        self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        if group["moments"] == "momentum":
            bufs = []
            for p, g in zip(params, grads, strict=True):
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(g)
                bufs.append(st["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            return torch._foreach_mul(bufs, 1.0)

        beta1, beta2 = group["betas"]
        ms, vs = [], []
        for p, g in zip(params, grads, strict=True):
            st = self.state[p]
            if "exp_avg" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(g)
                st["exp_avg_sq"] = torch.zeros_like(g)
            st["step"] += 1
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
        step = float(self.state[params[0]]["step"])  # CPU scalar: no device sync
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        bc1, bc2 = (1 - beta1**step, 1 - beta2**step) if group.get("bias_correction", True) else (1.0, 1.0)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2**0.5)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(ms, denom)
        torch._foreach_div_(updates, bc1)
        return updates
