"""The seam where dat_ds.comm enters DeepSpeed. If a DeepSpeed upgrade moves it, these fail loudly."""

import inspect
import types

import pytest
from deepspeed.runtime.engine import DeepSpeedEngine

from dat_ds.comm import engine_seam
from dat_ds.comm.transport import GradientReducer
from dat_ds.config import ConfigError


def test_installed_deepspeed_is_in_the_supported_range():
    engine_seam.check_deepspeed_version()


def test_seam_methods_exist_with_expected_signature():
    engine_seam.check_seam(DeepSpeedEngine)


@pytest.mark.parametrize(
    ("caller", "callee"),
    [
        ("backward", "self._backward_epilogue("),  # comm.overlap waits for its buckets there
        ("_backward_epilogue", "self.allreduce_gradients("),
        ("allreduce_gradients", "self.buffered_allreduce_fallback("),
        ("_reduce_non_expert_gradients", "self.allreduce_no_retain("),
        ("allreduce_no_retain", "self.allreduce_and_copy("),
        ("allreduce_and_copy", "self.allreduce_bucket("),
    ],
)
def test_dense_gradients_still_flow_through_allreduce_bucket(caller, callee):
    fn = inspect.unwrap(getattr(DeepSpeedEngine, caller))  # some are wrapped by DeepSpeed's nvtx decorator
    if "func" in (fn.__code__.co_freevars or ()):
        fn = fn.__closure__[fn.__code__.co_freevars.index("func")].cell_contents
    assert callee in inspect.getsource(fn), (
        f"DeepSpeedEngine.{caller} no longer calls {callee}: dat_ds.comm.engine_seam must move"
    )


def test_version_parsing():
    assert engine_seam._version_tuple("0.19.8") == (0, 19, 8)
    assert engine_seam._version_tuple("0.20.0+abc123") == (0, 20, 0)


def _fake_engine(stage: int):
    # Isolates install()'s checks; the real engine path is covered by the launcher tests.
    e = types.SimpleNamespace(
        zero_optimization_stage=lambda: stage,
        gradient_average=True,
        gradient_predivide_factor=lambda: 1.0,
        sequence_parallel_size=1,
    )
    return e


def test_zero_stage_above_zero_is_refused(monkeypatch):
    monkeypatch.setattr(engine_seam, "check_seam", lambda cls: None)
    with pytest.raises(ConfigError, match="ZeRO stage 1 reduces gradients inside its own optimizer"):
        engine_seam.install(_fake_engine(1), GradientReducer())
    e = _fake_engine(0)
    engine_seam.install(e, GradientReducer())
    assert callable(e.allreduce_bucket) and isinstance(e.dat_reducer, GradientReducer)
