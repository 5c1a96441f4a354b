"""Optimizers and learning-rate schedules; ``build_optimizer`` and ``build_schedule`` read the recipe."""

from .factory import build_optimizer, build_schedule, param_groups, scaled_lr
from .lalr import LALR

__all__ = ["LALR", "build_optimizer", "build_schedule", "param_groups", "scaled_lr"]
