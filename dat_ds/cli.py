"""What every command shares: one error convention, checked numbers, the flags that mean the same everywhere.

User errors exit with status 2 and one line ``dat-ds: error: <what is wrong and what to do>`` on stderr (from rank
0 under a launcher), before any expensive work; a command's ``main`` runs inside ``command`` to get that for every
error type a user can cause. Flags that mean the same thing have the same name and help in every command:
``--subset`` (how many examples), ``--seed``, ``--chunk`` (the unit of work, seeding and resuming), ``--batch``
(examples per forward pass: memory, never results), ``--shards`` (another copy of the data), ``--model``.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .data.shards import INDEX_NAME
from .run_folder import MODEL


class UsageError(ValueError):
    """A flag or input a user must fix; the message names it, the allowed values and the fix."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def fail(message: str) -> int:
    if rank() == 0:
        print(f"dat-ds: error: {message}", file=sys.stderr, flush=True)
    return 2


def command(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's ``main``: user errors become exit 2 with their one-line message."""
    from .config import ConfigError
    from .data.shards import ShardError

    try:
        return main(argv) or 0
    except (UsageError, ConfigError, ShardError) as e:
        return fail(str(e))
    except SystemExit as e:  # a message raised as SystemExit("...") by a lower floor
        if isinstance(e.code, str):
            msg = e.code.removeprefix("dat-ds: error: ")
            return fail(msg)
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return fail(
            f"no space left writing {e.filename or 'a result file'} ({os.strerror(e.errno)}): free space or point "
            "the output elsewhere, then run the same command again; what was finished and verified is kept and "
            "not computed again"
        )


def number(
    name: str,
    value: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    fix: str = "",
) -> float:
    """``value`` if finite and within [lo, hi] (open ends where asked), else UsageError naming the flag."""
    ok = isinstance(value, int | float) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
        raise UsageError(f"{name} {value!r} must be a finite number in {span}" + (f": {fix}" if fix else ""))
    return value


def existing(path: Path, what: str, kind: str = "folder", fix: str = "") -> Path:
    """``path`` if it is an existing folder (or file, ``kind="file"``), else a UsageError naming it."""
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        state = "does not exist" if not path.exists() else f"is not a {kind}"
        raise UsageError(f"{what} {path} {state}" + (f": {fix}" if fix else ""))
    return path


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    return p


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help=f"a safetensors export (default: RUN/{MODEL})")


def add_examples(p: argparse.ArgumentParser, what: str, chunk: int, batch: int, batch_help: str = "") -> None:
    """--subset/--seed/--chunk/--batch/--shards, the same in every stage. Not "--n": the deepspeed launcher reads
    abbreviations of its own options (--num_gpus, --num_nodes) among the script's."""
    p.add_argument(
        "--subset", type=int, default=0, help=f"{what} a random subset of N test examples (0: all)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the subset and of every attack's random draws"
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=chunk,
        help=f"examples per chunk: the unit of work dealt to ranks, of seeding and of resuming (default {chunk}); "
        "changing it changes the random draws",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=batch,
        help=batch_help
        or f"examples per forward pass (default {batch or 'the whole chunk'}): lower it to fit memory; the results "
        "do not depend on it",
    )
    p.add_argument(
        "--shards",
        type=Path,
        default=None,
        help="the shard set to read the examples from (default: the run's data.shards), e.g. another copy of it",
    )


def check_examples(a: argparse.Namespace) -> None:
    number("--subset", a.subset, lo=0, fix="0 takes every example")
    number("--chunk", a.chunk, lo=1)
    number("--batch", a.batch, lo=0, fix="0 takes a whole chunk at once")
    if a.shards is not None and not (a.shards / INDEX_NAME).is_file():
        raise UsageError(
            f"--shards {a.shards} has no {INDEX_NAME}: point it at a folder written by data_prep/"
        )
