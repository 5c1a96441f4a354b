"""Progress of long loops, one convention for every command: a live bar with rate and ETA on a terminal (tqdm,
installed with DeepSpeed), a plain line every ``DAT_DS_PROGRESS_EVERY`` seconds (default 60) and a last one when the
output is a log file (CI, a cluster scheduler). Only rank 0 reports; other ranks get a silent counter.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


def _fmt_secs(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """``update(n)`` as work is done; ``close()`` at the end (or use it as a context manager). ``total`` may be
    ``None`` (no ETA)."""

    def __init__(
        self,
        total: int | None,
        what: str,
        unit: str = "it",
        *,
        initial: int = 0,
        rank: int | None = None,
        stream: TextIO | None = None,
        every_s: float | None = None,
    ):
        self.total, self.what, self.unit, self.n = total, what, unit, initial
        self._start_n = initial
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.stream = stream if stream is not None else sys.stderr
        self.silent = rank != 0
        self.every_s = float(os.environ.get("DAT_DS_PROGRESS_EVERY", "60")) if every_s is None else every_s
        self._bar: Any = None
        self._t0 = self._last = time.monotonic()
        if not self.silent and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=what, unit=unit, file=self.stream, ascii=True,
                             mininterval=1, dynamic_ncols=True)  # fmt: skip

    def line(self) -> str:
        """The plain line: done/total, rate, elapsed and ETA."""
        el = time.monotonic() - self._t0
        rate = (self.n - self._start_n) / el if el > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        eta = (self.total - self.n) / rate if self.total is not None and rate > 0 else float("nan")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return (
            f"{self.what}: {done} {self.unit}{pct}, {rate:.3g} {self.unit}/s, elapsed {_fmt_secs(el)}, "
            f"ETA {_fmt_secs(eta) if self.total is not None else '?'}"
        )

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.silent:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.silent:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.n != self._start_n:
            print(self.line(), file=self.stream, flush=True)
        self.silent = True  # closed: nothing more

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[T], total: int | None, what: str, unit: str = "it", **kw: Any) -> Iterator[T]:
    """Iterate ``iterable``, reporting as ``Progress``."""
    with Progress(total, what, unit, **kw) as p:
        for item in iterable:
            yield item
            p.update(1)
