"""Reduce gradient buckets while backward is still running: DDP's overlap, on dat-ds's codec and transport.

Without overlap, the engine reduces every gradient in one go after backward has finished (``engine_seam``), so
all of the communication time is added to the step. With ``comm.overlap`` (the default) every trainable
parameter gets a post-accumulate-grad hook. The parameters are cut into buckets of ``comm.overlap_bucket_mb``
in reverse registration order, which is roughly the order backward produces their gradients. When every gradient
of a bucket is final, the bucket goes to a communication thread. That thread flattens it, runs the same
``GradientReducer.reduce_`` as the plain path (same codec, same transport, same bytes per value), and writes the
mean back. Meanwhile backward goes on computing the next bucket's gradients. Gloo and NCCL move the bytes on
their own threads or streams, and the codec runs on the communication thread.

The order is kept, and nothing is reduced twice:
  * Buckets are launched in index order on every rank, never out of it. A bucket that is ready waits for the
    ones before it, so every rank issues the same collectives in the same order.
  * Hooks act only in the accumulation-boundary micro-step of ``engine.backward``. Micro-steps before it only
    accumulate, as DeepSpeed does.
  * The engine's ``allreduce_gradients`` is replaced by ``finish``. At the boundary, ``finish`` launches the
    buckets whose hooks never fired, with zeros for a gradient that is None, as DeepSpeed does. It then waits
    for all buckets, so the engine's clipping and step see reduced gradients, each reduced exactly once.
  * The time ``finish`` waits, capped at the step's communication time, is the *exposed* communication:
    ``CommStats.exposed_seconds``, never more than the total, the communication thread's time inside ``reduce_``:
    ``CommStats.seconds``.

The gradients reduced are the ones DeepSpeed itself reduces at ZeRO-0: ``param.grad``, in the parameters' dtype
(fp32, or bf16 under zero0_bf16.json's ``FP16_Optimizer``; ``reduce_`` works in fp32 either way). An optimizer
wrapper that hands the engine other buffers to reduce (``get_grads_for_reduction``: DeepSpeed's BF16_Optimizer,
used at ZeRO-0 only with pipeline parallelism) is refused.

On CUDA the thread runs on its own stream. Before a bucket is reduced, that stream waits for an event recorded
when the bucket was handed over. ``finish`` makes the compute stream wait for the communication stream.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from .transport import GradientReducer


@dataclass
class _Bucket:
    index: int
    params: list[torch.Tensor]
    numel: int
    flat: torch.Tensor | None = None
    fired: set[int] = field(default_factory=set)


class OverlappedReducer:
    """Launches bucket reductions from gradient hooks; ``finish`` completes them before the optimizer step."""

    def __init__(self, engine, reducer: GradientReducer, bucket_mb: float, group=None):
        self.engine, self.reducer, self.group = engine, reducer, group
        if hasattr(engine.optimizer, "get_grads_for_reduction"):
            raise ConfigError(
                f"comm.overlap: {type(engine.optimizer).__name__} reduces its own gradient buffers, not "
                "param.grad; set comm.overlap=false"
            )
        params = [p for p in engine.module.parameters() if p.requires_grad and p.numel() > 0]
        limit = max(1, int(bucket_mb * 2**20 / 4))
        self.buckets: list[_Bucket] = []
        cur: list[torch.Tensor] = []
        numel = 0
        for p in reversed(params):
            if cur and (numel + p.numel() > limit or (p.dtype, p.device) != (cur[0].dtype, cur[0].device)):
                self.buckets.append(_Bucket(len(self.buckets), cur, numel))
                cur, numel = [], 0
            cur.append(p)
            numel += p.numel()
        if cur:
            self.buckets.append(_Bucket(len(self.buckets), cur, numel))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]
        self._active = False  # inside a boundary backward, buckets launched or pending
        self._next = 0  # the next bucket index to launch
        self._seconds_at_begin = 0.0  # reducer.stats.seconds when this step's buckets began
        self._ready: set[int] = set()
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Semaphore(0)
        self._launched = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stream = None

    # ------------------------------------------------------------------------------------------ main thread

    def _armed(self) -> bool:
        e = self.engine
        return (
            e.is_gradient_accumulation_boundary()
            and e.enable_backward_allreduce
            and not getattr(e, "inside_no_sync_ctxt", False)
            and getattr(e, "_running_engine_backward", True)
        )

    def _hook(self, p: torch.Tensor) -> None:
        if not self._armed():
            return
        if not self._active:
            self._begin()
        b = self._bucket_of[id(p)]
        if id(p) in b.fired:  # a parameter used twice accumulates twice; its first hook is not its last
            return
        b.fired.add(id(p))
        if len(b.fired) == len(b.params):
            self._ready.add(b.index)
            self._launch_ready()

    def _begin(self) -> None:
        self._active = True
        self._seconds_at_begin = self.reducer.stats.seconds
        self._next, self._launched = 0, 0
        self._ready.clear()
        for b in self.buckets:
            b.fired.clear()
        if self._thread is None:
            if self.buckets[0].params[0].device.type == "cuda":
                self._stream = torch.cuda.Stream(device=self.buckets[0].params[0].device)
            self._thread = threading.Thread(target=self._work, name="dat-ds-grad-reduce", daemon=True)
            self._thread.start()

    def _launch_ready(self) -> None:
        while self._next in self._ready:
            event = None
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record()  # the compute stream's work so far: this bucket's gradients
            self._queue.put((self._next, event))
            self._launched += 1
            self._next += 1

    def finish(self) -> None:
        """At the accumulation boundary, after backward: launch what is left, wait for every bucket."""
        t0 = time.perf_counter()
        if not self._active:
            self._begin()
        for b in self.buckets[self._next :]:
            for p in b.params:
                if p.grad is None:  # unused this step: DeepSpeed reduces zeros for it, so every rank agrees
                    p.grad = torch.zeros_like(p)
            self._ready.add(b.index)
        self._launch_ready()
        for _ in range(self._launched):
            self._done.acquire()
        self._active = False
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        # Exposed: the part of this step's communication the step waited for; the wait may also cover the comm
        # thread's flatten and write-back, so it is capped at the step's communication time, by definition.
        waited = time.perf_counter() - t0
        self.reducer.stats.exposed_seconds += min(waited, self.reducer.stats.seconds - self._seconds_at_begin)
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"overlapped gradient reduction failed: {err}") from err

    def allreduce_gradients(self, bucket_size=None) -> None:  # the engine method this replaces
        if self.engine.is_gradient_accumulation_boundary():
            self.finish()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------------------------ comm thread

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            index, event = item
            try:
                if self._error is None:
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            self._stream.wait_event(event)
                            self._reduce(self.buckets[index])
                    else:
                        self._reduce(self.buckets[index])
            except BaseException as e:  # handed to the main thread by finish(); later buckets are skipped
                self._error = e
            finally:
                self._done.release()

    @torch.no_grad()
    def _reduce(self, b: _Bucket) -> None:
        tensors = [p.grad for p in b.params]
        if b.flat is None:
            b.flat = torch.empty(b.numel, dtype=tensors[0].dtype, device=tensors[0].device)
        torch.cat([t.reshape(-1) for t in tensors], out=b.flat)
        sizes = [t.numel() for t in tensors] if self.reducer.per_tensor else None
        self.reducer.reduce_(
            b.flat, group=self.group, key=f"overlap{b.index}:{b.numel}", exposed=False, sizes=sizes
        )
        at = 0
        for t in tensors:
            t.copy_(b.flat[at : at + t.numel()].view_as(t))
            at += t.numel()
