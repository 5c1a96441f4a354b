"""Quantization of flat fp32 tensors to b in {32, 16, 8, 4} bits. Pure torch, no collectives.

Two codecs share the wire layout of their codes: ``Codec`` (dat-ds's, described here: a scale per block of
``block`` values) and ``QSGDCodec`` at the end (the DAT paper's: an l2-norm scale per gradient tensor, stochastic
rounding, as its code's ``quantization.py``); ``make_codec`` picks one from ``comm.codec``.

A chunk of ``n`` values (``n`` a multiple of the block size) encodes to one uint8 buffer:
``[nb fp32 scales][n * b / 8 bytes of codes]`` with ``nb = n / block``. Codes are signed integers in
``[-qmax, qmax]``, ``qmax = 2**(b-1) - 1``; a block's scale is ``absmax / qmax``, so the rounding error of a value is
at most ``scale / 2`` (nearest) or below ``scale`` (stochastic, which is unbiased). 4-bit codes are stored offset
by 8 and packed two per byte. ``bits=32`` is the identity (raw fp32 bytes).

Speed: the per-block arithmetic is written as small pure functions. On tensors of at least ``COMPILE_MIN_NUMEL``
values they run through ``torch.compile`` (one fused loop instead of six passes over memory: encoding 25.5M values
on one CPU thread took 172 ms eager and 17 ms compiled here); smaller ones, and any platform where compiling
fails, run them eagerly with the same results. ``DAT_DS_COMPILE_CODEC=0`` turns compiling off. 4-bit codes are
packed and unpacked within each block by one broadcast shift, which fuses; stacking nibbles did not. That took the
codec work of a 4-bit 2-sided exchange of ResNet-50's gradient on one rank from 345 to 180 ms of CPU time (8-bit:
102 ms).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

Rounding = Literal["nearest", "stochastic"]
COMPILE_MIN_NUMEL = 1 << 20
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ kernels (pure functions)


def _quantize(
    blocks: torch.Tensor, noise: torch.Tensor | None, qmax: float
) -> tuple[torch.Tensor, torch.Tensor]:
    amax = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # an all-zero block encodes to zeros
    q = blocks / scale
    q = torch.floor(q + noise) if noise is not None else torch.round(q)
    return torch.clamp(q, -qmax, qmax), scale


def _enc8(blocks, noise, qmax: float):
    q, scale = _quantize(blocks, noise, qmax)
    return q.to(torch.int8), scale


def _enc16(blocks, noise, qmax: float):
    q, scale = _quantize(blocks, noise, qmax)
    return q.to(torch.int16), scale


def _enc4(blocks, noise, qmax: float):
    q, scale = _quantize(blocks, noise, qmax)
    # pairs within each block: the compiler fuses this into one pass (1.6x faster than pairing the flat tensor)
    u = (q + 8).to(torch.uint8).reshape(blocks.shape[0], -1, 2)
    return (u[..., 0] | (u[..., 1] << 4)).reshape(-1), scale


def _dec(q, scale, out, accumulate: bool):
    vals = (q.to(torch.float32).reshape(scale.shape[0], -1) * scale).reshape(-1)
    if accumulate:
        out.add_(vals)
    else:
        out.copy_(vals)


def _unpack4(packed, shifts):
    """(..., n) packed bytes -> (..., n, 2) codes in [-8, 7]: one broadcast shift, which the compiler fuses into
    the consumer (stacking the low and high nibbles instead ran at half the speed)."""
    return ((packed.unsqueeze(-1) >> shifts) & 0x0F).to(torch.float32) - 8


def _dec4(packed, scale, shifts, out, accumulate: bool):
    p = packed.reshape(scale.shape[0], -1)
    vals = (_unpack4(p, shifts) * scale.unsqueeze(2)).reshape(-1)
    if accumulate:
        out.add_(vals)
    else:
        out.copy_(vals)


def _mean(codes, scales, out):
    """Mean over the first axis of W decoded chunks, in one pass: (W, nb, block) codes, (W, nb, 1) scales."""
    out.copy_((codes.to(torch.float32) * scales).sum(0).reshape(-1) / codes.shape[0])


def _mean4(packed, scales, shifts, out):
    vals = _unpack4(packed, shifts) * scales.unsqueeze(-1)  # (W, nb, block/2, 2)
    out.copy_(vals.sum(0).reshape(-1) / packed.shape[0])


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    if device not in _SHIFTS:
        _SHIFTS[device] = torch.tensor([0, 4], dtype=torch.uint8, device=device)
    return _SHIFTS[device]


_EAGER = {
    "enc8": _enc8,
    "enc16": _enc16,
    "enc4": _enc4,
    "dec": _dec,
    "dec4": _dec4,
    "mean": _mean,
    "mean4": _mean4,
}
_COMPILED: dict[str, object] = {}
_compile_failed = False


def _kernel(name: str, numel: int):
    global _compile_failed
    if _compile_failed or numel < COMPILE_MIN_NUMEL or os.environ.get("DAT_DS_COMPILE_CODEC", "1") == "0":
        return _EAGER[name]
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_EAGER[name], dynamic=False)  # dynamic shapes ran decode 6x slower
    return _COMPILED[name]


def _run(name: str, numel: int, *args):
    global _compile_failed
    fn = _kernel(name, numel)
    if fn is _EAGER[name]:
        return fn(*args)
    try:
        return fn(*args)
    except (torch.OutOfMemoryError, MemoryError):
        raise  # out of memory is the run's problem, not the compiler's: eager kernels would hide it
    except Exception as e:  # a platform without a working compiler: same math, eagerly
        msg = (
            f"dat-ds codec: torch.compile failed ({type(e).__name__}: {e}); the codec runs eager kernels from "
            "now on (same results, slower); set DAT_DS_COMPILE_CODEC=0 to skip compiling"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        _compile_failed = True
        return _EAGER[name](*args)


# ---------------------------------------------------------------------------------------------------- codec


@dataclass(frozen=True)
class Codec:
    bits: int = 8
    block: int = 512
    rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        if self.bits not in (32, 16, 8, 4):
            raise ValueError(f"bits={self.bits}: choose 32, 16, 8 or 4")
        if self.block % 2:
            raise ValueError("block must be even (4-bit codes pack in pairs)")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encoded_nbytes(self, n: int, segments: object = None) -> int:
        """Bytes on the wire for a chunk of ``n`` values (``n`` a multiple of ``block`` unless bits == 32).
        ``segments`` (here and below) is for ``QSGDCodec``'s interface; blocks need none."""
        if self.bits == 32:
            return 4 * n
        return 4 * (n // self.block) + n * self.bits // 8

    def encode(
        self,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        segments: object = None,
    ) -> torch.Tensor:
        """Flat fp32 ``x`` -> uint8 buffer. For bits < 32, ``x.numel()`` must be a multiple of ``block``."""
        n = x.numel()
        if out is None:
            out = torch.empty(self.encoded_nbytes(n), dtype=torch.uint8, device=x.device)
        if self.bits == 32:
            out.copy_(x.reshape(-1).view(torch.uint8))
            return out
        assert n % self.block == 0, "pad to a multiple of the block size"
        nb = n // self.block
        blocks = x.reshape(nb, self.block)
        noise = None
        if self.rounding == "stochastic":
            noise = torch.rand(blocks.shape, device=x.device, dtype=torch.float32, generator=generator)
        codes, scale = _run(f"enc{self.bits}", n, blocks, noise, float(self.qmax))
        out[: 4 * nb].copy_(scale.reshape(-1).view(torch.uint8))
        out[4 * nb :].copy_(codes.reshape(-1).view(torch.uint8))
        return out

    def decode(
        self,
        buf: torch.Tensor,
        n: int,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
        segments: object = None,
    ) -> torch.Tensor:
        """uint8 buffer -> ``n`` fp32 values, written to (or, with ``accumulate``, added into) ``out``."""
        if out is None:
            out = torch.zeros(n, dtype=torch.float32, device=buf.device)
        if self.bits == 32:
            vals = buf.view(torch.float32)
            return out.add_(vals) if accumulate else out.copy_(vals)
        nb = n // self.block
        scale = buf[: 4 * nb].view(torch.float32).reshape(nb, 1)
        codes = buf[4 * nb :]
        if self.bits == 4:
            _run("dec4", n, codes, scale, _shifts(buf.device), out, accumulate)
        else:
            _run("dec", n, codes.view(torch.int16 if self.bits == 16 else torch.int8), scale, out, accumulate)
        return out

    def decode_mean(
        self, bufs: torch.Tensor, n: int, out: torch.Tensor, segments: object = None
    ) -> torch.Tensor:
        """Mean of the W chunks encoded in the rows of ``bufs`` (W, encoded_nbytes(n)), summed in fp32 in row
        order, written to ``out``."""
        world = bufs.shape[0]
        if self.bits == 32:
            return torch.sum(bufs.view(torch.float32), dim=0, out=out).div_(world)
        nb = n // self.block
        scales = bufs[:, : 4 * nb].view(torch.float32).reshape(world, nb, 1)
        codes = bufs[:, 4 * nb :]
        if self.bits == 4:
            _run("mean4", n, codes.reshape(world, nb, -1), scales, _shifts(bufs.device), out)
        else:
            _run(
                "mean",
                n,
                codes.view(torch.int16 if self.bits == 16 else torch.int8).reshape(world, nb, -1),
                scales,
                out,
            )
        return out

    def roundtrip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, generator=generator), x.numel())


class ErrorFeedback:
    """Residual memory: compress ``g + e`` and keep ``e <- (g + e) - decode(encode(g + e))`` (Seide et al. 2014;
    Karimireddy et al. 2019). One residual per key (a bucket or an owned chunk); ``reset`` clears them (checkpoint
    load, skipped steps)."""

    def __init__(self) -> None:
        self.residuals: dict[str, torch.Tensor] = {}

    def add_residual(self, key: str, x: torch.Tensor) -> torch.Tensor:
        r = self.residuals.get(key)
        if r is None or r.shape != x.shape:
            return x
        return x + r.to(x.device)

    def store(self, key: str, target: torch.Tensor, sent: torch.Tensor) -> None:
        self.residuals[key] = target - sent

    def reset(self) -> None:
        self.residuals.clear()


# ------------------------------------------------------------------------------------ the paper's quantizer


class Segments:
    """Lengths of the consecutive pieces of a flat chunk that each get their own scale (the ``qsgd`` codec: one
    per gradient tensor, or per piece of one where a chunk boundary cuts it), and ``slots``, the number of scale
    slots on the wire (at least ``len(lengths)``; the transport pads every owner's chunk of a round to the same
    count, so that all encoded chunks have one size)."""

    def __init__(self, lengths: list[int] | tuple[int, ...], slots: int | None = None):
        self.lengths = tuple(int(v) for v in lengths if v > 0)
        self.slots = max(len(self.lengths), slots or 0, 1)
        self.numel = sum(self.lengths)
        self._ids: dict[torch.device, torch.Tensor] = {}

    def ids(self, device: torch.device) -> torch.Tensor:
        """The segment number of every value (cached per device)."""
        if device not in self._ids:
            lengths = torch.tensor(self.lengths, dtype=torch.int64)
            ids = torch.repeat_interleave(torch.arange(len(self.lengths), dtype=torch.int32), lengths)
            self._ids[device] = ids.to(device)  # int32: half the memory of the default int64
        return self._ids[device]


@dataclass(frozen=True)
class QSGDCodec:
    """The DAT paper's quantizer (its code's ``quantization.py``, ``RandomQuantizer``; QSGD, Alistarh et al. 2017):
    every segment (a gradient tensor) is scaled by its l2 norm and each value is rounded stochastically to one of
    ``s = 2**(bits-1) - 1`` levels of ``norm / s``, with its sign: ``q = sign(g) * (floor(|g| s / norm) + xi)``,
    ``xi ~ Bernoulli(frac(|g| s / norm))``, decoded as ``q * norm / s``. Unbiased; its variance per segment is
    ``sum_i (norm/s)^2 p_i (1 - p_i) <= min(d / s^2, sqrt(d) / s) * norm^2`` for ``d`` values (QSGD's Lemma 3.1).
    At 8 bits ``s = 127``, the official code's 7 magnitude bits and one sign bit in a byte.

    A chunk encodes to ``[slots fp32 norms][codes]``, codes as ``Codec``'s (int8, int16, or 4-bit offset by 8 and
    packed two per byte, so 4-bit chunks must have an even length). Needs ``segments`` (``Segments``) on encode and
    decode; without them the whole chunk is one segment. ``bits=32`` is not a quantizer: use ``Codec(bits=32)``."""

    bits: int = 8
    block: int = 512  # unused by the math; the transport aligns chunks to it as for Codec
    rounding: Rounding = "stochastic"

    def __post_init__(self) -> None:
        if self.bits not in (16, 8, 4):
            raise ValueError(f"qsgd bits={self.bits}: choose 16, 8 or 4")
        if self.rounding != "stochastic":
            raise ValueError("the qsgd codec rounds stochastically (that is what makes it unbiased)")

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @staticmethod
    def _segments(n: int, segments: Segments | None) -> Segments:
        seg = segments if segments is not None else Segments([n])
        if seg.numel != n:
            raise ValueError(f"segments cover {seg.numel} values, the chunk has {n}")
        return seg

    def encoded_nbytes(self, n: int, segments: Segments | None = None) -> int:
        return 4 * self._segments(n, segments).slots + n * self.bits // 8

    def encode(
        self,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        segments: Segments | None = None,
    ) -> torch.Tensor:
        n = x.numel()
        seg = self._segments(n, segments)
        if out is None:
            out = torch.empty(self.encoded_nbytes(n, seg), dtype=torch.uint8, device=x.device)
        flat = x.reshape(-1).float()
        ids = seg.ids(x.device)
        sq = torch.zeros(len(seg.lengths), dtype=torch.float32, device=x.device).index_add_(
            0, ids, flat * flat
        )
        norms = torch.zeros(seg.slots, dtype=torch.float32, device=x.device)
        norms[: len(seg.lengths)] = sq.sqrt()
        s = float(self.levels)
        scale = torch.where(norms > 0, norms / s, torch.ones_like(norms))  # a zero segment encodes to zeros
        noise = torch.rand(n, device=x.device, dtype=torch.float32, generator=generator)
        q = torch.floor(flat / scale[ids] + noise).clamp_(-s, s)  # |g| <= norm, so only rounding can reach s
        out[: 4 * seg.slots].copy_(norms.view(torch.uint8))
        out[4 * seg.slots :].copy_(_pack(q, self.bits))
        return out

    def decode(
        self,
        buf: torch.Tensor,
        n: int,
        out: torch.Tensor | None = None,
        accumulate: bool = False,
        segments: Segments | None = None,
    ) -> torch.Tensor:
        seg = self._segments(n, segments)
        if out is None:
            out = torch.zeros(n, dtype=torch.float32, device=buf.device)
        norms = buf[: 4 * seg.slots].view(torch.float32)
        q = _unpack(buf[4 * seg.slots :], self.bits, n)
        vals = q * (norms / self.levels)[seg.ids(buf.device)]
        return out.add_(vals) if accumulate else out.copy_(vals)

    def decode_mean(
        self, bufs: torch.Tensor, n: int, out: torch.Tensor, segments: Segments | None = None
    ) -> torch.Tensor:
        """Mean of the W chunks in the rows of ``bufs``, summed in fp32 in row order."""
        out.zero_()
        for row in bufs:
            self.decode(row, n, out=out, accumulate=True, segments=segments)
        return out.div_(bufs.shape[0])

    def roundtrip(
        self, x: torch.Tensor, generator: torch.Generator | None = None, segments: Segments | None = None
    ) -> torch.Tensor:
        return self.decode(
            self.encode(x, generator=generator, segments=segments), x.numel(), segments=segments
        )


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes (float) -> the wire bytes of ``Codec``'s layout."""
    if bits == 8:
        return q.to(torch.int8).view(torch.uint8)
    if bits == 16:
        return q.to(torch.int16).view(torch.uint8)
    u = (q + 8).to(torch.uint8).reshape(-1, 2)
    return u[:, 0] | (u[:, 1] << 4)


def _unpack(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits == 8:
        return codes.view(torch.int8).float()
    if bits == 16:
        return codes.view(torch.int16).float()
    return _unpack4(codes, _shifts(codes.device)).reshape(-1)[:n]


def make_codec(kind: str, bits: int, block: int, rounding: Rounding) -> Codec | QSGDCodec:
    """``comm.codec``: dat-ds's block codec, or the paper's quantizer (identity at 32 bits either way)."""
    if kind == "qsgd" and bits < 32:
        return QSGDCodec(bits=bits, block=block)
    return Codec(bits=bits, block=block, rounding=rounding)
