"""Where compressed aggregation enters the DeepSpeed engine.

DeepSpeed 0.19 has no communication-hook API. At ZeRO stage 0 every dense gradient passes through
``DeepSpeedEngine.allreduce_bucket(bucket, dp_group, dp_world_size)`` exactly once per optimizer step, at the
gradient-accumulation boundary (``_backward_epilogue -> allreduce_gradients -> buffered_allreduce_fallback ->
allreduce_no_retain -> allreduce_and_copy -> allreduce_bucket``), and the engine's gradient clipping runs after
it, on the reduced gradient. We replace that one method on the engine instance. The alternative, DeepSpeed's own
1-bit idiom (``enable_backward_allreduce = False`` and reduce in the optimizer), would make the engine clip the
*local* gradients. ZeRO >= 1 reduces inside ``DeepSpeedZeroOptimizer`` and never reaches this seam, so it is
refused. ``tests/test_ds_seam.py`` fails if a DeepSpeed upgrade moves the seam.

With overlap (``comm.overlap``, the default; ``overlap.py``) the reduction starts from gradient hooks during
backward instead, and the engine's ``allreduce_gradients`` (the top of the chain above, called once by
``_backward_epilogue`` after backward) becomes the point where the step waits for it. ``allreduce_bucket`` is
still replaced, so a DeepSpeed path that reached it anyway would be counted and caught by the exactly-once check.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

from ..config import ConfigError
from .transport import GradientReducer

SUPPORTED_DEEPSPEED = ((0, 19, 8), (0, 20, 0))  # [low, high)
SEAM_CALL_CHAIN = (
    "allreduce_gradients",
    "buffered_allreduce_fallback",
    "allreduce_no_retain",
    "allreduce_and_copy",
    "allreduce_bucket",
)


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def check_deepspeed_version() -> None:
    import deepspeed

    v = _version_tuple(deepspeed.__version__)
    lo, hi = SUPPORTED_DEEPSPEED
    if not (lo <= v < hi):
        raise RuntimeError(
            f"deepspeed {deepspeed.__version__} is outside the range dat-ds hooks into "
            f"({'.'.join(map(str, lo))} <= v < {'.'.join(map(str, hi))}); install deepspeed==0.19.8 or run "
            "tests/test_ds_seam.py against the new version and widen SUPPORTED_DEEPSPEED in dat_ds/comm/engine_seam.py"
        )


def check_seam(engine_cls: type) -> None:
    """The engine methods the seam relies on exist with the expected signatures."""
    for name in SEAM_CALL_CHAIN:
        if not callable(getattr(engine_cls, name, None)):
            raise RuntimeError(
                f"DeepSpeedEngine.{name} is gone: the gradient seam moved; see dat_ds/comm/engine_seam.py"
            )
    params = list(inspect.signature(engine_cls.allreduce_bucket).parameters)
    if params[:3] != ["self", "bucket", "dp_group"]:
        raise RuntimeError(f"DeepSpeedEngine.allreduce_bucket{params} changed signature; see engine_seam.py")


def install(engine, reducer: GradientReducer, overlap_bucket_mb: float | None = None) -> None:
    """Route the engine's dense-gradient reduction through ``reducer``; with ``overlap_bucket_mb``, in buckets of
    that size launched during backward."""
    check_deepspeed_version()
    check_seam(type(engine))
    if engine.zero_optimization_stage() != 0:
        raise ConfigError(
            f"ZeRO stage {engine.zero_optimization_stage()} reduces gradients inside its own optimizer, where "
            "dat-ds's compressed aggregation cannot reach; use a ds_config with zero_optimization.stage 0"
        )
    if not engine.gradient_average or engine.gradient_predivide_factor() != 1.0:
        raise ConfigError(
            "ds_config: dat-ds averages gradients itself; drop gradient_predivide_factor / "
            "gradient_average=false"
        )
    if getattr(engine, "sequence_parallel_size", 1) != 1:
        raise ConfigError("sequence parallelism is not supported with dat-ds's gradient reducer")

    flat_buffers: dict[tuple, torch.Tensor] = {}

    def allreduce_bucket(bucket, dp_group, dp_world_size=None):
        # DeepSpeed's own flatten allocates a fresh buffer every step (on CPU, 100 MB of page faults for
        # ResNet-50: 67 ms); a persistent one per bucket shape does the same copy. DeepSpeed copies the result
        # back into the gradients before the next call.
        n = sum(t.numel() for t in bucket)
        key_ = (bucket[0].dtype, bucket[0].device, n)
        if key_ not in flat_buffers:
            flat_buffers[key_] = torch.empty(n, dtype=bucket[0].dtype, device=bucket[0].device)
        tensor = flat_buffers[key_]
        torch.cat([t.reshape(-1) for t in bucket], out=tensor)
        # DeepSpeed's data-parallel group is a new_group with the default timeout; when it spans the world (ZeRO-0,
        # no model parallelism) reduce on the default group, created with the recipe's collective timeout.
        group = None if dist.get_world_size(dp_group) == dist.get_world_size() else dp_group
        with torch.no_grad():
            sizes = [t.numel() for t in bucket] if reducer.per_tensor else None
            reducer.reduce_(tensor, group=group, key=f"{tensor.dtype}:{tensor.numel()}", sizes=sizes)
        return tensor

    engine.allreduce_bucket = allreduce_bucket
    engine.dat_reducer = reducer
    engine.dat_overlap = None
    if overlap_bucket_mb is not None:
        from .overlap import OverlappedReducer

        if not callable(getattr(engine, "is_gradient_accumulation_boundary", None)):
            raise RuntimeError(
                "DeepSpeedEngine.is_gradient_accumulation_boundary is gone; see engine_seam.py"
            )
        dp = engine.seq_data_parallel_group  # the group DeepSpeed reduces over (allreduce_bucket's dp_group)
        group = None if dist.get_world_size(dp) == dist.get_world_size() else dp
        engine.dat_overlap = OverlappedReducer(engine, reducer, overlap_bucket_mb, group)
        engine.allreduce_gradients = engine.dat_overlap.allreduce_gradients
