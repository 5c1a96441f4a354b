"""Per-layer step sizes over training: the evidence for how an optimizer treats each layer.

With ``train.layer_stats_every = N``, rank 0 appends one line to ``RUN_DIR/layer_stats.jsonl`` every N optimizer
steps: the step, the LR, and for every trainable tensor ``[||theta||, ||delta theta||]``: its norm after the step
and the norm of the change the step made (momentum, weight decay and clipping included, whatever the optimizer).
Their ratio is the layer's relative step. LALR fixes it at ``lr * tau(||theta||) / ||theta||`` for every layer
(``lr`` itself while ``c_l <= ||theta|| <= c_u``); SGD lets it follow each layer's gradient. After a step every rank
holds the same parameters, so rank 0's record speaks for all. A resumed run first drops the lines written after
the checkpoint it resumes from, so each step appears once.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .run_folder import atomic_write


class LayerStats:
    def __init__(self, model: nn.Module, every: int, path: Path, resume_step: int = 0):
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.every, self.path = every, path
        self._before: list[torch.Tensor] | None = None
        self._lr = 0.0
        if path.is_file():  # a resumed run: keep the lines up to its checkpoint (a torn last line goes too)
            keep = [rec for rec in _records(path) if rec["step"] <= resume_step]
            atomic_write(path, "".join(json.dumps(rec) + "\n" for rec in keep))

    def before_step(self, step: int, lr: float) -> None:
        """Call before optimizer step number ``step`` (counted from 1) with the LR that step uses; keeps a copy of
        the weights when the step is due."""
        if step % self.every == 0:
            self._before = [p.detach().float().clone() for _, p in self.params]
            self._lr = lr

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self._before is None:
            return
        now = [p.detach().float() for _, p in self.params]
        w = torch.stack(torch._foreach_norm(now)).tolist()
        d = torch.stack(torch._foreach_norm(torch._foreach_sub(now, self._before))).tolist()
        self._before = None
        rec = {
            "step": step,
            "lr": self._lr,
            "layers": {n: [wi, di] for (n, _), wi, di in zip(self.params, w, d, strict=True)},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _records(path: Path) -> list[dict]:
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue  # a line torn by a kill
    return out


def read_layer_stats(path: Path) -> list[dict]:
    return _records(path)
