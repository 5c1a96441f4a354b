"""Block-wise symmetric quantization of flat fp32 tensors to b in {32, 16, 8, 4} bits. Pure torch, no collectives.

A chunk of ``n`` values (``n`` a multiple of the block size) encodes to one uint8 buffer:
``[nb fp32 scales][n * b / 8 bytes of codes]`` with ``nb = n / block``. Codes are signed integers in
``[-qmax, qmax]``, ``qmax = 2**(b-1) - 1``; a block's scale is ``absmax / qmax``, so the rounding error of a value is
at most ``scale / 2`` (nearest) or below ``scale`` (stochastic, which is unbiased). 4-bit codes are stored offset
by 8 and packed two per byte. ``bits=32`` is the identity (raw fp32 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Rounding = Literal["nearest", "stochastic"]


@dataclass(frozen=True)
class Codec:
    bits: int = 8
    block: int = 256
    rounding: Rounding = "nearest"

    def __post_init__(self) -> None:
        if self.bits not in (32, 16, 8, 4):
            raise ValueError(f"bits={self.bits}: choose 32, 16, 8 or 4")
        if self.block % 2:
            raise ValueError("block must be even (4-bit codes pack in pairs)")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def encoded_nbytes(self, n: int) -> int:
        """Bytes on the wire for a chunk of ``n`` values (``n`` a multiple of ``block`` unless bits == 32)."""
        if self.bits == 32:
            return 4 * n
        return 4 * (n // self.block) + n * self.bits // 8

    def encode(self, x: torch.Tensor, out: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Flat fp32 ``x`` -> uint8 buffer. For bits < 32, ``x.numel()`` must be a multiple of ``block``."""
        n = x.numel()
        nbytes = self.encoded_nbytes(n)
        if out is None:
            out = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
        if self.bits == 32:
            out.copy_(x.reshape(-1).view(torch.uint8))
            return out
        assert n % self.block == 0, "pad to a multiple of the block size"
        nb = n // self.block
        blocks = x.reshape(nb, self.block)
        scale = blocks.abs().amax(dim=1, keepdim=True).div_(self.qmax)
        scale.masked_fill_(scale == 0, 1.0)  # an all-zero block encodes to zeros with any scale
        q = blocks / scale
        if self.rounding == "stochastic":
            noise = torch.rand(q.shape, device=q.device, dtype=q.dtype, generator=generator)
            q.add_(noise).floor_()
        else:
            q.round_()
        q.clamp_(-self.qmax, self.qmax)
        out[: 4 * nb].copy_(scale.reshape(-1).view(torch.uint8))
        codes = out[4 * nb :]
        if self.bits == 16:
            codes.copy_(q.to(torch.int16).reshape(-1).view(torch.uint8))
        elif self.bits == 8:
            codes.copy_(q.to(torch.int8).reshape(-1).view(torch.uint8))
        else:  # 4 bits: offset to [1, 15], two per byte
            u = (q + 8).to(torch.uint8).reshape(-1, 2)
            torch.bitwise_or(u[:, 0], u[:, 1] << 4, out=codes)
        return out

    def decode(self, buf: torch.Tensor, n: int, out: torch.Tensor | None = None,
               accumulate: bool = False) -> torch.Tensor:
        """uint8 buffer -> ``n`` fp32 values, written to (or, with ``accumulate``, added into) ``out``."""
        if out is None:
            out = torch.zeros(n, dtype=torch.float32, device=buf.device) if accumulate else torch.empty(
                n, dtype=torch.float32, device=buf.device)
        if self.bits == 32:
            vals = buf.view(torch.float32)
            return out.add_(vals) if accumulate else out.copy_(vals)
        nb = n // self.block
        scale = buf[: 4 * nb].view(torch.float32).reshape(nb, 1)
        codes = buf[4 * nb :]
        if self.bits == 16:
            q = codes.view(torch.int16)
        elif self.bits == 8:
            q = codes.view(torch.int8)
        else:
            q = torch.stack((codes & 0x0F, codes >> 4), dim=1).reshape(-1).to(torch.int8) - 8
        vals = q.reshape(nb, self.block).float().mul_(scale).reshape(-1)
        return out.add_(vals) if accumulate else out.copy_(vals)

    def roundtrip(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, generator=generator), x.numel())


class ErrorFeedback:
    """Residual memory: compress ``g + e`` and keep ``e <- (g + e) - decode(encode(g + e))`` (Seide et al. 2014;
    Karimireddy et al. 2019). One residual per key (a bucket or an owned chunk); ``reset`` clears them (checkpoint
    load, skipped steps)."""

    def __init__(self) -> None:
        self.residuals: dict[object, torch.Tensor] = {}

    def add_residual(self, key: object, x: torch.Tensor) -> torch.Tensor:
        r = self.residuals.get(key)
        if r is None or r.shape != x.shape:
            return x
        return x + r

    def store(self, key: object, target: torch.Tensor, sent: torch.Tensor) -> None:
        self.residuals[key] = target - sent

    def reset(self) -> None:
        self.residuals.clear()
