"""CIFAR-10/100 "python version" batches -> webdataset shards (lossless PNG).

    python -m data_prep.cifar /data/cifar-10-batches-py /data/cifar10-shards
    python -m data_prep.cifar /data/cifar-100-python /data/cifar100-shards

The batches are pickles, so they are read with ``data_prep.trusted_pickle`` (numpy arrays, numbers, strings,
lists and dicts only): a tampered file is refused before it can run code.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dat_ds.cli import command, existing, number
from dat_ds.data.shards import Sample, write_index, write_split

from .trusted_pickle import load_arrays

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def load_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        d = load_arrays(f, str(path))
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def to_samples(batch: dict, split: str, offset: int) -> list[Sample]:
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = batch.get("labels", batch.get("fine_labels"))
    out = []
    for i, (img, y) in enumerate(zip(data, labels, strict=True)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(Sample(key=f"{split}{offset + i:06d}", image=buf.getvalue(), ext="png", label=int(y)))
    return out


def convert(src: Path, out: Path, per_shard: int) -> None:
    if (src / "data_batch_1").exists():
        name, classes, mean, std = "cifar10", 10, CIFAR10_MEAN, CIFAR10_STD
        train_files = sorted(src.glob("data_batch_*"))
        test_files = [src / "test_batch"]
    elif (src / "train").exists():
        name, classes, mean, std = "cifar100", 100, CIFAR100_MEAN, CIFAR100_STD
        train_files, test_files = [src / "train"], [src / "test"]
    else:
        raise SystemExit(f"{src} holds neither CIFAR-10 (data_batch_*) nor CIFAR-100 (train, test) batches")
    splits = {}
    for split, files in (("train", train_files), ("test", test_files)):
        samples: list[Sample] = []
        for f in files:
            samples += to_samples(load_batch(f), split, len(samples))
        splits[split] = write_split(samples, out, split, per_shard, total=len(samples))
        print(f"{name} {split}: {len(samples)} images in {len(splits[split])} shards")
    write_index(
        out, name=name, num_classes=classes, channels=3, image_size=32, mean=mean, std=std, splits=splits
    )


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="cifar-10-batches-py/ or cifar-100-python/ (the python batches)")
    p.add_argument("out", type=Path, help="the shard folder to write (index.json, *.tar)")
    p.add_argument(
        "--per-shard", type=int, default=1000, help="images per shard (default 1000: 50 train shards)"
    )
    a = p.parse_args(argv)
    existing(a.src, "the CIFAR folder", fix="cifar-10-batches-py/ or cifar-100-python/, unpacked")
    number("--per-shard", a.per_shard, lo=1)
    convert(a.src, a.out, a.per_shard)


if __name__ == "__main__":
    sys.exit(main())
