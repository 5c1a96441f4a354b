"""Unlabeled and labeled/unlabeled shard sets for semi-supervised training.

    # k labels per class from a labeled set's train split (seeded); the rest becomes an unlabeled set
    python -m data_prep.unlabeled split data/mnist data/mnist_l100 data/mnist_u --per-class 100 --seed 0
    # an image folder without labels (any depth; jpg/png kept byte for byte, other formats stored as PNG)
    python -m data_prep.unlabeled folder /data/unlabeled_jpgs data/my_unlabeled --channels 3

An unlabeled set is an ordinary shard set whose index says ``"labeled": false`` and whose samples carry label -1;
``dat_ds.pseudo_label`` turns it into a pseudo-labelled set that training can stream. ``split`` keeps the labels it
hides in ``heldout_labels.npy`` beside the unlabeled index (never read by training or pseudo-labelling), so a study
can report how accurate the pseudo-labels are. The labeled set gets the source's test split, unchanged.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from dat_ds.cli import command, existing, number
from dat_ds.data.shards import (
    Sample,
    SampleReader,
    ShardError,
    load_index,
    read_shard,
    write_index,
    write_split,
)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def choose_labeled(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Sorted sample numbers of ``per_class`` samples of each class, chosen by a generator seeded with ``seed``."""
    g = np.random.Generator(np.random.PCG64([seed, 0x1ABE1]))
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise SystemExit(
                f"class {c} has {len(pool)} training samples, fewer than --per-class {per_class}"
            )
        chosen.append(g.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def pixel_stats(images: Iterable[bytes], channels: int, limit: int = 5000) -> tuple[list[float], list[float]]:
    acc = []
    for i, b in enumerate(images):
        if i >= limit:
            break
        img = Image.open(io.BytesIO(b)).convert("L" if channels == 1 else "RGB")
        acc.append(np.asarray(img, dtype=np.float64).reshape(-1, channels) / 255.0)
    pix = np.concatenate(acc)
    return pix.mean(0).tolist(), pix.std(0).tolist()


def split_labels(
    src: Path, out_labeled: Path, out_unlabeled: Path, per_class: int, seed: int, per_shard: int
) -> None:
    index = load_index(src)
    train = index.split("train")
    labels = np.asarray(train.members[:, 3])
    chosen = choose_labeled(labels, per_class, index.num_classes, seed)
    rest = np.setdiff1d(np.arange(train.count), chosen)
    reader = SampleReader(train)

    def take(ids: np.ndarray, keep_label: bool) -> Iterator[Sample]:
        for i in ids.tolist():
            s = reader[i]
            yield Sample(key=f"s{i:08d}", image=s.image, ext=s.ext, label=s.label if keep_label else -1)

    common = dict(channels=index.channels, image_size=index.image_size, mean=index.mean, std=index.std)
    kept = {  # the source's other splits (test, and a held-out val if it has one), unchanged
        name: write_split(
            (s for sh in split.shards for s in read_shard(sh.url, sh.count)),
            out_labeled,
            name,
            per_shard,
            split.count,
        )
        for name, split in index.splits.items()
        if name != "train"
    }
    write_index(
        out_labeled,
        name=f"{index.name}_l{per_class}",
        num_classes=index.num_classes,
        splits={
            "train": write_split(take(chosen, True), out_labeled, "train", per_shard, len(chosen)),
            **kept,
        },
        extra={
            "source": str(src),
            "labeled_per_class": per_class,
            "seed": seed,
            "source_ids": chosen.tolist(),
        },
        **common,
    )
    write_index(
        out_unlabeled,
        name=f"{index.name}_unlabeled",
        num_classes=index.num_classes,
        splits={"train": write_split(take(rest, False), out_unlabeled, "train", per_shard, len(rest))},
        extra={"labeled": False, "source": str(src), "complement_of": str(out_labeled), "seed": seed},
        **common,
    )
    np.save(out_unlabeled / "heldout_labels.npy", labels[rest], allow_pickle=False)
    print(f"{src}: {len(chosen)} labeled -> {out_labeled}, {len(rest)} unlabeled -> {out_unlabeled}")


def folder_samples(folder: Path, channels: int) -> Iterator[Sample]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise SystemExit(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    for i, p in enumerate(files):
        raw = p.read_bytes()
        try:
            img = Image.open(io.BytesIO(raw))
            img.load()
        except Exception as e:  # noqa: BLE001 - any decoder error names the file
            raise SystemExit(f"{p} is not a readable image ({e}); remove it or fix it") from None
        ext = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png"}.get(p.suffix.lower())
        if ext is None:  # stored losslessly in a format every loader reads
            buf = io.BytesIO()
            img.convert("L" if channels == 1 else "RGB").save(buf, format="PNG")
            raw, ext = buf.getvalue(), "png"
        yield Sample(
            key=f"u{i:08d}",
            image=raw,
            ext=ext,
            label=-1,
            extra=(("src", str(p.relative_to(folder)).encode()),),
        )


def folder_set(
    folder: Path, out: Path, channels: int, image_size: int, num_classes: int, per_shard: int
) -> None:
    entries = write_split(folder_samples(folder, channels), out, "train", per_shard)
    reader_index = [s.image for e in entries[:1] for s in read_shard(str(out / e["file"]))]
    mean, std = pixel_stats(reader_index, channels)
    write_index(
        out,
        name=folder.name,
        num_classes=num_classes,
        channels=channels,
        image_size=image_size,
        mean=mean,
        std=std,
        splits={"train": entries},
        extra={"labeled": False, "source": str(folder)},
    )
    print(f"{folder}: {sum(e['count'] for e in entries)} unlabeled images -> {out}")


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(
        dest="cmd", required=True, help="split: a labeled set into labeled + unlabeled; folder: images"
    )
    s = sub.add_parser("split", help="k labels per class from a labeled set; the rest unlabeled")
    s.add_argument("src", type=Path, help="a labeled shard set (data_prep output)")
    s.add_argument(
        "out_labeled", type=Path, help="the shard folder for the labeled part (and src's other splits)"
    )
    s.add_argument("out_unlabeled", type=Path, help="the shard folder for the rest, labels removed")
    s.add_argument("--per-class", type=int, required=True, help="labeled training samples kept per class")
    s.add_argument("--seed", type=int, default=0, help="which samples keep their labels (default 0)")
    s.add_argument("--per-shard", type=int, default=5000, help="samples per shard file (default 5000)")
    f = sub.add_parser("folder", help="an image folder without labels")
    f.add_argument(
        "folder", type=Path, help="images at any depth (jpg/png kept byte for byte, others as PNG)"
    )
    f.add_argument("out", type=Path, help="the shard folder to write (index.json, *.tar)")
    f.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1 (grey) or 3 (RGB, default)")
    f.add_argument("--image-size", type=int, default=0, help="native side length (0: varies)")
    f.add_argument("--num-classes", type=int, default=0, help="classes of the labeled task (informative)")
    f.add_argument("--per-shard", type=int, default=5000, help="samples per shard file (default 5000)")
    a = p.parse_args(argv)
    number("--per-shard", a.per_shard, lo=1)
    if a.cmd == "split":
        existing(a.src, "the labeled shard set")
        number("--per-class", a.per_class, lo=1)
    else:
        existing(a.folder, "the image folder")
        number("--image-size", a.image_size, lo=0)
    try:
        if a.cmd == "split":
            split_labels(a.src, a.out_labeled, a.out_unlabeled, a.per_class, a.seed, a.per_shard)
        else:
            folder_set(a.folder, a.out, a.channels, a.image_size, a.num_classes, a.per_shard)
    except ShardError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
