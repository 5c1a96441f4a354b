"""What one rank holds: the epoch's position and running sums (``TrainState``), and everything of the run
(``Session``), which the phases of ``dat_ds.training.phases.run`` read and advance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import RunConfig
from .plan import Plan

SUMS = 7


@dataclass
class TrainState:
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    global_step: int = 0
    # running sums of the epoch on this rank: loss, count and correct (on adversarial inputs) of the labeled samples,
    # skipped samples, then loss, count and correct of the pseudo-labelled ones. They live on the device so a step
    # never waits for the host; they are read at log lines, the epoch end and checkpoints.
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(SUMS, dtype=torch.float64))
    comm_seconds: float = 0.0  # communication time so far in this epoch
    comm_bytes: int = 0
    train_seconds: float = 0.0
    comm_exposed_seconds: float = 0.0  # the part of comm_seconds the steps waited for

    def client_state(self, cfg: RunConfig) -> dict:
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "config": cfg.to_dict(),
        }

    def rank_state(self) -> dict:
        from ..checkpoint import rng_state

        return {
            "rng": rng_state(),
            "sums": self.sums.cpu(),
            "timers": torch.tensor(
                [self.comm_seconds, float(self.comm_bytes), self.train_seconds, self.comm_exposed_seconds],
                dtype=torch.float64,
            ),
        }


@dataclass
class Session:
    """What one rank holds for the whole run; the phases of ``run`` read and advance it."""

    cfg: RunConfig
    plan: Plan
    rank: int
    world: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tag: str | None = None  # the checkpoint this process resumes from (rank 0's choice), or None
    engine: Any = None
    reducer: Any = None
    ckpt: Any = None
    tracker: Any = None
    eval_loader: Any = None
    state: TrainState = field(default_factory=TrainState)
    resumed_from: str | None = None
    # Bytes per step, measured: gloo's socket writes (x2: in both topologies each rank receives what it sends),
    # or under NCCL the sizes of the buffers the ps transport posted; an NCCL ring moves bytes nothing here sees.
    bytes_source: str = "none"
    comm_mark: Any = None  # reducer counters when this epoch (or its resumed part) began
    reduce_mark: Any = None  # the same, for the exactly-once check of this process's steps
    resumed_steps: int = 0  # steps of the current epoch done before this process started it
    layer_stats: Any = None  # rank 0's per-layer step log, when train.layer_stats_every is set
    step_mark: Any = None  # sums, reducer counters, time and step of the last per-step line (log.every_steps)

    @property
    def image_size(self) -> int:
        return self.cfg.data.image_size or self.plan.index.image_size

    @property
    def pin(self) -> bool:
        return self.engine.device.type == "cuda"

    def epoch_comm(self) -> tuple[float, int, float]:
        """Communication seconds, bytes and exposed seconds of the current epoch so far (across a resume)."""
        d = self.reducer.stats.since(self.comm_mark)
        moved = 2 * d.wire_sent if self.bytes_source == "wire" else d.bytes_sent + d.bytes_recv
        return (
            self.state.comm_seconds + d.seconds,
            self.state.comm_bytes + (moved if self.bytes_source != "none" else 0),
            self.state.comm_exposed_seconds + d.exposed_seconds,
        )

    def save(self, tag: str) -> None:
        rank_state = self.state.rank_state()
        # BatchNorm running statistics are each rank's own (the official DAT code never syncs them) and feed the
        # eval-mode attack; DeepSpeed saves only rank 0's, so every rank keeps its own in its file.
        rank_state["buffers"] = {k: v.detach().cpu().clone() for k, v in self.engine.module.named_buffers()}
        comm_s, comm_b, exposed_s = self.epoch_comm()
        rank_state["timers"][:2] = torch.tensor([comm_s, comm_b], dtype=torch.float64)
        rank_state["timers"][3] = exposed_s
        rank_state["reducer"] = self.reducer.state_dict()  # error-feedback residuals, rounding generator
        self.ckpt.save(self.engine, tag, self.state.client_state(self.cfg), rank_state)

    def mark_epoch_start(self) -> None:
        import time

        self.comm_mark = self.reducer.stats.snapshot()
        self.reduce_mark = self.reducer.stats.snapshot()
        self.resumed_steps = self.state.step_in_epoch
        self.step_mark = {
            "sums": self.state.sums.clone(),
            "stats": self.reducer.stats.snapshot(),
            "t": time.perf_counter(),
            "step": self.state.global_step,
        }
