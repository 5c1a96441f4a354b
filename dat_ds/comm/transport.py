"""The transport: the only code in dat-ds that moves gradients between ranks.

``ps``  a sharded parameter server. The flat gradient is cut into ``world`` chunks (block-aligned); rank ``j``
        owns chunk ``j``. Every rank encodes each chunk and sends it to its owner (all-to-all, receives posted
        before sends: gloo runs its own all_to_all at half line rate because it posts sends first); the owner
        decodes and sums the ``world`` copies in fp32, divides by ``world``, and sends the mean back to everyone:
        as fp32 ("1-sided": only uploads are compressed) or re-encoded ("2-sided"). Each rank also decodes its own
        re-encoded chunk, so all ranks end bit-identical.
``hpc`` a plain ring all-reduce, in fp32 (bits 32) or fp16 (bits 16).

The ``ps`` exchange runs in rounds of ``bucket_mb`` of fp32 values per owner, pipelined: while one round's bytes
travel, the next is encoded and the previous one decoded, so the codec's work hides behind the link. Payloads are uint8 (gloo has no
int16 collectives). Bytes are counted where they are posted: ``bytes_sent``/``bytes_recv`` are what this rank
handed to and took from the network (for ``hpc``, the ring algorithm's 2(W-1)/W of the buffer each way).
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .codec import Codec, ErrorFeedback, QSGDCodec, Segments, make_codec


@dataclass
class CommStats:
    calls: int = 0
    numel: int = 0  # gradient values reduced
    bytes_sent: int = 0  # sizes of the buffers posted (ps) or the ring algorithm's share (hpc, a formula)
    bytes_recv: int = 0
    wire_sent: int = 0  # measured: the process's socket writes during the exchange (gloo); 0 where unseen
    wire_calls: int = 0  # exchanges whose wire bytes could be measured
    seconds: float = 0.0  # total: wall time inside reduce_ (on the communication thread, with overlap)
    exposed_seconds: float = 0.0  # the part the training step waited for (all of it without overlap)

    def snapshot(self) -> CommStats:
        return CommStats(**vars(self))

    def since(self, earlier: CommStats) -> CommStats:
        return CommStats(**{k: getattr(self, k) - getattr(earlier, k) for k in vars(self)})


def _written_bytes() -> int | None:
    """Bytes this process has written so far (``/proc/self/io`` ``wchar``): gloo's socket writes show up here,
    NCCL's GPU transfers do not. None where the file is missing."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _sync(device: torch.device) -> None:
    # Host-stream sync so wall time covers the kernels and transfers (CUDA is asynchronous). The current stream
    # only: on the overlap thread's stream this must not wait for the backward kernels queued meanwhile.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class GradientReducer:
    """Averages a flat gradient across the group, in place, with the configured codec and topology."""

    def __init__(
        self,
        *,
        bits: int = 32,
        two_sided: bool = False,
        topology: str = "hpc",
        codec: str = "block",
        rounding: str = "nearest",
        error_feedback: bool = False,
        block_size: int = 512,
        bucket_mb: float = 4.0,
        seed: int = 0,
    ):
        if topology == "hpc" and bits not in (32, 16):
            raise ValueError("topology 'hpc' carries 32 or 16 bits; use 'ps' for fewer")
        if topology == "hpc" and codec == "qsgd" and bits < 32:
            raise ValueError("the qsgd codec needs topology 'ps': an all-reduce cannot sum its codes")
        self.topology = topology
        self.two_sided = two_sided
        self.codec = make_codec(codec, bits, block_size, rounding)
        # The aggregate goes back at the upload's precision (2-sided) or in fp32 (1-sided).
        self.down_codec = self.codec if two_sided else Codec(bits=32, block=block_size)
        self.error_feedback = error_feedback
        self.worker_ef = ErrorFeedback()
        self.server_ef = ErrorFeedback()
        self.bucket_numel = max(block_size, int(bucket_mb * 2**20 / 4) // block_size * block_size)
        self.stats = CommStats()
        # set to {} to add up the wall time of the ps exchange's phases in it (benchmarks)
        self.profile: dict[str, float] | None = None
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None  # restored from a checkpoint, applied on first use
        self._segments: dict[
            tuple, list[Segments]
        ] = {}  # qsgd: each owner chunk's segments, per key and round

    def state_dict(self) -> dict[str, object]:
        """This rank's reducer state, tensors only (a checkpoint's ``dat_rank{r}.pt``): the error-feedback
        residuals and the stochastic-rounding generator. Without them a resumed run compresses differently."""
        gen = self._generator.get_state() if self._generator is not None else self._generator_state
        out: dict[str, object] = {
            "worker_ef": {k: v.cpu() for k, v in self.worker_ef.residuals.items()},
            "server_ef": {k: v.cpu() for k, v in self.server_ef.residuals.items()},
        }
        if gen is not None:
            out["generator"] = gen
        return out

    def load_state_dict(self, state: dict) -> None:
        self.worker_ef.residuals = dict(state.get("worker_ef", {}))
        self.server_ef.residuals = dict(state.get("server_ef", {}))
        self._generator, self._generator_state = None, state.get("generator")

    @property
    def per_tensor(self) -> bool:
        """The codec scales each gradient tensor on its own (qsgd): reduce_ needs the tensors' sizes."""
        return isinstance(self.codec, QSGDCodec)

    def _owner_segments(
        self, sizes: list[int] | None, key: str, r: int, start: int, stop: int, chunk: int, world: int, n: int
    ) -> list[Segments | None]:
        """Segments of each owner's chunk of round ``r`` (values ``start:stop`` of the flat gradient): the pieces
        of the tensors that fall inside it, then the zero padding, all padded to one slot count."""
        if not self.per_tensor:
            return [None] * world
        cache_key = (key, r, start, stop, chunk, tuple(sizes) if sizes else None)
        if cache_key not in self._segments:
            if sizes is not None and sum(sizes) != n:
                raise ValueError(f"tensor sizes add up to {sum(sizes)}, the flat gradient has {n} values")
            bounds = [0]
            for v in sizes or [n]:  # no sizes: the whole flat gradient is one tensor
                bounds.append(bounds[-1] + v)
            lengths = []
            for j in range(world):
                lo, hi = start + j * chunk, start + (j + 1) * chunk
                pieces = [min(b1, hi, stop) - max(b0, lo) for b0, b1 in zip(bounds, bounds[1:], strict=False)]
                pieces = [v for v in pieces if v > 0]
                pieces.append(chunk - sum(pieces))  # padding past the end (0 where there is none)
                lengths.append(pieces)
            slots = max(sum(v > 0 for v in p) for p in lengths)
            self._segments[cache_key] = [Segments(p, slots) for p in lengths]
        return self._segments[cache_key]

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self.codec.rounding != "stochastic":
            return None
        if self._generator is None or self._generator.device != device:
            # Per-rank stream, separate from the training RNG so compression never shifts the attack's noise.
            rank = dist.get_rank() if dist.is_initialized() else 0
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed * 1000 + 17 + rank)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    # ------------------------------------------------------------------------------------------------ entry

    def reduce_(
        self,
        flat: torch.Tensor,
        group=None,
        key: str = "0",
        exposed: bool = True,
        sizes: list[int] | None = None,
    ) -> torch.Tensor:
        """Replace ``flat`` (any float dtype, 1-D) with its mean over the group. ``exposed``: the caller waits for
        it (the plain path); the overlap thread passes False and accounts for the waiting itself. ``sizes``: the
        numels of the gradient tensors ``flat`` concatenates, in order (the qsgd codec scales each on its own)."""
        world = dist.get_world_size(group)
        _sync(flat.device)
        t0 = time.perf_counter()
        work = flat if flat.dtype == torch.float32 else flat.float()
        # gloo writes to sockets from this process; NCCL moves GPU memory that /proc never sees
        measure = world > 1 and dist.get_backend(group) == "gloo"
        w0 = _written_bytes() if measure else None
        if world > 1:
            if self.topology == "hpc":
                self._hpc(work, world, group)
            else:
                self._ps(work, world, group, key, sizes)
        if work is not flat:
            flat.copy_(work)
        _sync(flat.device)
        w1 = _written_bytes() if w0 is not None else None
        if w1 is not None:
            self.stats.wire_sent += w1 - w0
            self.stats.wire_calls += 1
        dt = time.perf_counter() - t0
        self.stats.seconds += dt
        if exposed:
            self.stats.exposed_seconds += dt
        self.stats.calls += 1
        self.stats.numel += flat.numel()
        return flat

    # ---------------------------------------------------------------------------------------------- topologies

    def _hpc(self, x: torch.Tensor, world: int, group) -> None:
        if self.codec.bits == 16:
            # Scale into fp16's range before the cast, by a power of two all ranks agree on: the largest value
            # lands near 2^15/world, so the sum cannot overflow and small gradients keep their bits instead of
            # flushing to zero (fp16's smallest normal is 6e-5). One 4-byte all_reduce for the agreement.
            amax = x.abs().max().reshape(1)
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
            a = float(amax.item())  # host sync: the exponent is needed on the host
            exp = math.floor(math.log2(2**15 / (world * a))) if a > 0 and math.isfinite(a) else 0
            wire = x.mul(2.0**exp).to(torch.float16)
            dist.all_reduce(wire, group=group)
            x.copy_(wire).mul_(2.0**-exp / world)
        else:
            x.div_(world)
            dist.all_reduce(x, group=group)
            wire = x
        ring = 2 * (world - 1) * wire.numel() * wire.element_size() // world
        self.stats.bytes_sent += ring
        self.stats.bytes_recv += ring

    def _post(
        self, send: list[torch.Tensor | None], recv: list[torch.Tensor | None], group, tag: int
    ) -> list:
        """Point-to-point with every peer, receives posted before sends; returns the requests to wait on."""

        def peer_rank(j: int) -> int:
            return dist.get_global_rank(group, j) if group is not None else j

        ops = [
            dist.P2POp(dist.irecv, b, peer_rank(j), group, tag) for j, b in enumerate(recv) if b is not None
        ]
        ops += [
            dist.P2POp(dist.isend, b, peer_rank(j), group, tag) for j, b in enumerate(send) if b is not None
        ]
        self.stats.bytes_sent += sum(b.numel() for b in send if b is not None)
        self.stats.bytes_recv += sum(b.numel() for b in recv if b is not None)
        return dist.batch_isend_irecv(ops) if ops else []

    def _ps(self, x: torch.Tensor, world: int, group, key: str, sizes: list[int] | None = None) -> None:
        """Sharded parameter server over rounds of ``bucket_numel`` values per owner, pipelined: while round r's
        bytes travel, round r+1 is encoded and round r-1 decoded (gloo and NCCL move the bytes on their own
        threads/streams)."""
        ex = _PSExchange(self, x, world, group, key, sizes)
        uploading: deque[_Round] = deque()
        downloading: deque[_Round] = deque()
        for r, start in enumerate(range(0, x.numel(), self.bucket_numel * world)):
            uploading.append(ex.start_upload(r, start))
            if len(uploading) > 1:
                rd = uploading.popleft()
                ex.finish_upload(rd)
                downloading.append(rd)
            if len(downloading) > 1:
                ex.finish_download(downloading.popleft())
        while uploading:
            rd = uploading.popleft()
            ex.finish_upload(rd)
            downloading.append(rd)
        while downloading:
            ex.finish_download(downloading.popleft())

    # ------------------------------------------------------------------------------------------------ theory

    def theory_bytes(self, numel: int, world: int) -> float:
        """Bytes per rank (sent + received) by the paper's count: b/8 bytes a value, no scales, no padding."""
        if world == 1:
            return 0.0
        if self.topology == "hpc":
            return 2 * 2 * (world - 1) / world * numel * self.codec.bits / 8
        # Each rank uploads (W-1)/W of the values and downloads (W-1)/W of the mean, and receives as much.
        return 2 * (world - 1) / world * numel * (self.codec.bits + self.down_codec.bits) / 8


@dataclass
class _Round:
    """One round of the ps exchange: values ``start:stop`` of the flat gradient, ``chunk`` per owner."""

    r: int
    start: int
    stop: int
    chunk: int
    segs: list  # each owner chunk's Segments (qsgd) or None
    reqs: list = field(default_factory=list)  # point-to-point requests in flight
    enc: torch.Tensor | None = None  # this rank's encoded chunks, one row per owner (upload)
    inbox: torch.Tensor | None = None  # every rank's encoding of the chunk this rank owns
    mine: torch.Tensor | None = None  # this rank's encoded mean of its chunk (download)
    outbox: torch.Tensor | None = None  # every owner's encoded mean


class _PSExchange:
    """The three phases of the ps transport for one flat gradient ``x``: upload (encode each owner's chunk, send
    it to its owner), aggregate (the owner decodes the world's copies, averages, re-encodes, sends the mean to
    everyone) and download (decode every owner's mean into ``x``)."""

    def __init__(self, reducer: GradientReducer, x: torch.Tensor, world: int, group, key: str, sizes):
        self.red, self.x, self.world, self.group, self.key, self.sizes = reducer, x, world, group, key, sizes
        self.me = dist.get_rank(group)
        self.up, self.down = reducer.codec, reducer.down_codec
        self.gen = reducer._gen(x.device)
        self.ef = reducer.error_feedback

    def _phase(self, name: str):
        prof = self.red.profile
        return _Timer(prof, name)

    def start_upload(self, r: int, start: int) -> _Round:
        red, x, world, me, up = self.red, self.x, self.world, self.me, self.up
        n, block = x.numel(), up.block
        stop = min(n, start + red.bucket_numel * world)
        m = stop - start
        chunk = -(-m // (world * block)) * block  # values per owner, block-aligned
        if chunk * world == m:
            src = x[start:stop]
        else:
            src = torch.zeros(chunk * world, dtype=torch.float32, device=x.device)
            src[:m] = x[start:stop]
        if self.ef:
            src = red.worker_ef.add_residual(f"{self.key}/{r}", src)
        segs = red._owner_segments(self.sizes, self.key, r, start, stop, chunk, world, n)
        enc = torch.empty(world, up.encoded_nbytes(chunk, segs[0]), dtype=torch.uint8, device=x.device)
        with self._phase("encode"):
            for j in range(world):
                up.encode(src[j * chunk : (j + 1) * chunk], out=enc[j], generator=self.gen, segments=segs[j])
        if self.ef:
            sent = torch.empty_like(src)
            for j in range(world):
                up.decode(enc[j], chunk, out=sent[j * chunk : (j + 1) * chunk], segments=segs[j])
            red.worker_ef.store(f"{self.key}/{r}", src, sent)
        inbox = torch.empty_like(enc)
        inbox[me].copy_(enc[me])
        rd = _Round(r, start, stop, chunk, segs, enc=enc, inbox=inbox)
        rd.reqs = red._post(
            [enc[j] if j != me else None for j in range(world)],
            [inbox[j] if j != me else None for j in range(world)],
            self.group,
            tag=2 * r,
        )
        return rd

    def finish_upload(self, rd: _Round) -> None:
        red, x, world, me = self.red, self.x, self.world, self.me
        with self._phase("wait upload"):
            for q in rd.reqs:
                q.wait()
        chunk, seg = rd.chunk, rd.segs[me]
        # Owner: fp32 sum of the decoded copies in rank order (the same on every run), then the mean.
        with self._phase("owner decode+mean"):
            agg = self.up.decode_mean(
                rd.inbox, chunk, torch.empty(chunk, dtype=torch.float32, device=x.device), segments=seg
            )
        if red.two_sided and self.ef:
            agg = red.server_ef.add_residual(f"{self.key}/{rd.r}", agg)
        with self._phase("owner re-encode"):
            mine = self.down.encode(agg, generator=self.gen, segments=seg)
        if red.two_sided and self.ef:
            red.server_ef.store(f"{self.key}/{rd.r}", agg, self.down.decode(mine, chunk, segments=seg))
        outbox = torch.empty(world, mine.numel(), dtype=torch.uint8, device=x.device)
        rd.mine, rd.outbox, rd.enc, rd.inbox = mine, outbox, None, None
        rd.reqs = red._post(
            [mine if j != me else None for j in range(world)],
            [outbox[j] if j != me else None for j in range(world)],
            self.group,
            tag=2 * rd.r + 1,
        )

    def finish_download(self, rd: _Round) -> None:
        x, world, me = self.x, self.world, self.me
        with self._phase("wait download"):
            for q in rd.reqs:
                q.wait()
        chunk, start, stop = rd.chunk, rd.start, rd.stop
        full = chunk * world == stop - start
        dst = x[start:stop] if full else torch.empty(chunk * world, dtype=torch.float32, device=x.device)
        with self._phase("decode"):
            for j in range(world):
                # Every rank, the owner included, decodes the same bytes: replicas end bit-identical.
                self.down.decode(
                    rd.mine if j == me else rd.outbox[j],
                    chunk,
                    out=dst[j * chunk : (j + 1) * chunk],
                    segments=rd.segs[j],
                )
        if not full:
            x[start:stop].copy_(dst[: stop - start])


class _Timer:
    """Wall time of a phase of the exchange, added to ``profile`` when the reducer profiles (benchmarks)."""

    def __init__(self, profile: dict[str, float] | None, name: str):
        self.profile, self.name = profile, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter() if self.profile is not None else 0.0

    def __exit__(self, *exc) -> None:
        if self.profile is not None:
            self.profile[self.name] = self.profile.get(self.name, 0.0) + time.perf_counter() - self.t0
