"""Clean and PGD accuracy on a rank's share of a test split; counts are summed across ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .attacks import pgd


@dataclass
class EvalCounts:
    n: int
    clean_correct: int
    pgd_correct: int

    def acc(self) -> tuple[float, float]:
        return self.clean_correct / max(self.n, 1), self.pgd_correct / max(self.n, 1)


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW from the loader -> float [0,1] on the device."""
    x = x.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def evaluate(model: nn.Module, loader, *, eps: float, steps: int, step_size: float, restarts: int,
             device: torch.device, channels_last: bool = False) -> EvalCounts:
    """Collective when a process group exists (one all_reduce of three counters)."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    for x, y in loader:
        x, y = to_input(x, device, channels_last), y.to(device, non_blocking=True)
        with torch.no_grad():
            clean = model(x.to(dtype)).argmax(1) == y
        x_adv = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, rand_init=True, restarts=restarts)
        with torch.no_grad():
            robust = model(x_adv.to(dtype)).argmax(1) == y
        counts += torch.stack([torch.tensor(len(y), device=device), clean.sum(), robust.sum()])
    if dist.is_initialized():
        dist.all_reduce(counts)  # int64 sums: exact for any split of the examples
    model.train(was_training)
    n, c, r = counts.tolist()
    return EvalCounts(n, c, r)
