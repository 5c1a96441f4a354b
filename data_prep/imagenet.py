"""An ImageNet-style tree -> webdataset shards, copying the JPEG bytes as they are (no re-encode).

    python -m data_prep.imagenet /data/imagenet /data/imagenet-shards [--shard-mb 1000] [--val-labels LABELS]

Input: ``train/<wnid>/*.JPEG`` and either ``val/<wnid>/*.JPEG`` (the common re-foldered layout) or a flat
``val/*.JPEG`` with ``--val-labels`` (lines ``<file name> <wnid>``). Sample keys are ``<wnid>/<file stem>``
(``data_prep.folders``' rule: unique across classes; a clash is refused before anything is written). Any other
class-folder set: ``python -m data_prep.folders``. Classes are the sorted wnids of ``train/``.
Training files are shuffled once (seed 0) before sharding so each shard holds a mix of classes; shards are cut at
``--shard-mb`` (about 1 GB: ~1,250 shards for train, enough for any cluster's ranks x workers). Each shard is
written to a temporary name and renamed when whole, so an interrupted conversion never leaves a torn shard;
re-running it skips shards that are already complete. ``test.files.txt`` lists the source file of every test
(val) index, so ``dat_ds.evaluate --indices`` takes a subset named by file, as RobustBench's ImageNet list
(``robustbench/helper_files/imagenet_test_image_ids.txt``, 5,000 ``val/<wnid>/<file>`` lines) names its images.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from dat_ds.cli import command, existing, number
from dat_ds.data.shards import TEST_FILES, Sample, write_index, write_tar
from dat_ds.progress import progress
from dat_ds.run_folder import atomic_write

from .folders import IMAGENET_MEAN, IMAGENET_STD, sample_key, shard_plan, unique_keys

EXTS = {".jpeg", ".jpg", ".png"}


def list_split(root: Path, split: str, classes: list[str], val_labels: Path | None) -> list[tuple[Path, int]]:
    d = root / split
    if not d.is_dir():
        raise SystemExit(f"{d} is missing: expected {root}/train/<wnid>/*.JPEG and {root}/val/")
    cls = {c: i for i, c in enumerate(classes)}
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in EXTS)
    out = []
    if val_labels is not None and split == "val":
        labels = dict(line.split()[:2] for line in val_labels.read_text().splitlines() if line.strip())
        for p in files:
            if p.name not in labels:
                raise SystemExit(f"{p.name} has no entry in {val_labels}")
            out.append((p, cls[labels[p.name]]))
        return out
    for p in files:
        wnid = p.parent.name
        if wnid not in cls:
            raise SystemExit(
                f"{p}: folder {wnid} is not a class of train/ (or pass --val-labels for a flat val/)"
            )
        out.append((p, cls[wnid]))
    return out


def convert(src: Path, out: Path, shard_mb: float, val_labels: Path | None, name: str) -> None:
    classes = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{src}/train has no class folders")
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shuffle in (("train", True), ("val", False)):
        # keys <wnid>/<file stem>: unique even where two classes hold the same file name
        files = [
            (p, label, sample_key(classes[label], Path(p.name)))
            for p, label in list_split(src, split, classes, val_labels)
        ]
        unique_keys(files)
        if shuffle:
            random.Random(0).shuffle(files)
        entries = []
        plan = list(shard_plan(files, int(shard_mb * 2**20)))
        for i, group in enumerate(progress(plan, len(plan), f"writing {split} shards", "shard")):
            fname = f"{split}-{i:06d}.tar"
            if not (out / fname).exists():
                write_tar(
                    out / fname,
                    [
                        Sample(
                            key=key,
                            image=p.read_bytes(),
                            ext="png" if p.suffix.lower() == ".png" else "jpg",
                            label=label,
                        )
                        for p, label, key in group
                    ],
                )
            entries.append({"file": fname, "count": len(group)})
        splits["test" if split == "val" else split] = entries
        if (
            split == "val"
        ):  # test index -> source file, for subsets named by file (RobustBench's 5,000 images)
            atomic_write(out / TEST_FILES, "".join(f"{p.relative_to(src).as_posix()}\n" for p, _, _ in files))
        print(f"{split}: {len(files)} images in {len(entries)} shards")
    write_index(
        out,
        name=name,
        num_classes=len(classes),
        channels=3,
        image_size=0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        splits=splits,
        extra={"classes": classes},
    )
    (out / "classes.json").write_text(json.dumps(classes))


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="the ImageNet root: SRC/train/<wnid>/*.JPEG and SRC/val/")
    p.add_argument("out", type=Path, help="the shard folder to write (index.json, *.tar)")
    p.add_argument("--shard-mb", type=float, default=1000.0, help="shard size in MB (default 1000)")
    p.add_argument(
        "--val-labels",
        type=Path,
        default=None,
        help="for a flat val/*.JPEG: a file of '<file name> <wnid>' lines (ILSVRC's validation labels)",
    )
    p.add_argument("--name", default="imagenet", help="the shard set's name (default imagenet)")
    a = p.parse_args(argv)
    existing(a.src, "the ImageNet folder", fix="it should hold train/<wnid>/*.JPEG and val/")
    number("--shard-mb", a.shard_mb, lo=0, lo_open=True)
    if a.val_labels is not None:
        existing(a.val_labels, "--val-labels", "file")
    convert(a.src, a.out, a.shard_mb, a.val_labels, a.name)


if __name__ == "__main__":
    sys.exit(main())
