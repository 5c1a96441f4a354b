"""A validation split held out of a shard set's training split, for tuning without touching the test split.

    python -m data_prep.holdout data/mnist data/mnist_val --n 5000 --seed 0

writes a new shard set with three splits: ``train`` (the source's training samples less the held-out ones, in the
source's order), ``val`` (``--n`` training samples drawn at random with a generator seeded by ``--seed``, never
trained on) and ``test`` (the source's, unchanged). Train on the new set and compare settings on ``val``::

    deepspeed ... --module dat_ds.train RECIPE --set data.shards='"data/mnist_val"'
    deepspeed ... --module dat_ds.evaluate runs/NAME --split val

The new index keeps the source's pixel mean/std (so a model trained on either set normalises alike) and records
the source and the held-out sample numbers (``extra.val_ids``). The source is only read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dat_ds.cli import command, existing, number
from dat_ds.data.shards import (
    INDEX_NAME,
    Sample,
    SampleReader,
    load_index,
    read_shard,
    write_index,
    write_split,
)


def holdout_ids(count: int, n: int, seed: int) -> np.ndarray:
    """Sorted numbers of the ``n`` training samples to hold out, from a generator seeded with ``seed``."""
    if not 0 < n < count:
        raise SystemExit(f"--n {n}: hold out between 1 and {count - 1} of the {count} training samples")
    g = np.random.Generator(np.random.PCG64([seed, 0x7A1]))
    return np.sort(g.choice(count, size=n, replace=False))


def make_holdout(src: Path, out: Path, n: int, seed: int, per_shard: int) -> None:
    index = load_index(src)
    if "test" not in index.splits:
        raise SystemExit(f"{src} has no test split to carry over")
    if (out / INDEX_NAME).exists():
        raise SystemExit(f"{out} already holds a shard set; remove it or choose another folder")
    train = index.split("train")
    val = holdout_ids(train.count, n, seed)
    rest = np.setdiff1d(np.arange(train.count), val)
    reader = SampleReader(train)

    def take(ids: np.ndarray) -> Iterator[Sample]:
        for i in ids.tolist():
            s = reader[i]
            yield Sample(key=f"s{i:08d}", image=s.image, ext=s.ext, label=s.label, extra=s.extra)

    test = index.split("test")
    write_index(
        out,
        name=f"{index.name}_val{n}",
        num_classes=index.num_classes,
        channels=index.channels,
        image_size=index.image_size,
        mean=index.mean,
        std=index.std,
        splits={
            "train": write_split(take(rest), out, "train", per_shard, len(rest)),
            "val": write_split(take(val), out, "val", per_shard, len(val)),
            "test": write_split(
                (s for sh in test.shards for s in read_shard(sh.url, sh.count)),
                out,
                "test",
                per_shard,
                test.count,
            ),
        },
        extra={"source": str(src), "seed": seed, "val_ids": val.tolist()},
    )
    print(f"{src}: {len(rest)} train + {len(val)} val (held out, seed {seed}) + {test.count} test -> {out}")


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="shard set with train and test splits")
    p.add_argument("out", type=Path, help="new shard folder")
    p.add_argument("--n", type=int, required=True, help="training samples to hold out as the val split")
    p.add_argument("--seed", type=int, default=0, help="which samples are held out (default 0)")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per shard file (default 5000)")
    a = p.parse_args(argv)
    existing(a.src, "the source shard set")
    number("--n", a.n, lo=1)
    number("--per-shard", a.per_shard, lo=1)
    make_holdout(a.src, a.out, a.n, a.seed, a.per_shard)


if __name__ == "__main__":
    sys.exit(main())
