"""Add (or rebuild) the member tables of a shard set written before dat-ds used them.

    python -m data_prep.members data/imagenet-shards

Scans each split's tar headers (image payloads are seeked over, not read) and rewrites ``index.json`` with the
tables and every local shard's byte size. Shards named by URL or ``pipe:`` command are streamed once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dat_ds.cli import command, existing
from dat_ds.data.shards import INDEX_NAME, write_index


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="shard folder (has index.json)")
    a = p.parse_args(argv)
    existing(
        a.root / INDEX_NAME, "the shard set's index", "file", fix="point it at a folder written by data_prep"
    )
    raw = json.loads((a.root / INDEX_NAME).read_text())
    known = {"format", "name", "num_classes", "channels", "image_size", "mean", "std", "splits", "created"}
    splits = {}
    for name, split in raw["splits"].items():
        # "bytes" is re-measured: the tables are built from the files as they are now
        splits[name] = [{k: v for k, v in e.items() if k != "bytes"} for e in split["shards"]]
    write_index(
        a.root,
        name=raw["name"],
        num_classes=raw["num_classes"],
        channels=raw["channels"],
        image_size=raw["image_size"],
        mean=raw["mean"],
        std=raw["std"],
        splits=splits,
        extra={k: v for k, v in raw.items() if k not in known},
    )
    print(f"{a.root}: member tables for {', '.join(splits)}")


if __name__ == "__main__":
    sys.exit(main())
