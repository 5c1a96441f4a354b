"""scikit-learn's handwritten digits (1,797 real 8x8 scans, bundled with the package) -> train/test shards.

The split is fixed (stratified, seed 0, 20 % test = 360 images) so every run and test sees the same examples.
Pixels (0..16) are scaled to 0..255 and stored as lossless 8-bit grayscale PNG.

    python -m data_prep.digits data/digits
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dat_ds.cli import command, number
from dat_ds.data.shards import Sample, write_index, write_split


def digits_samples(seed: int = 0, test_fraction: float = 0.2) -> tuple[list[Sample], list[Sample]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    idx = np.arange(len(images))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)

    def to_samples(ids: np.ndarray, split: str) -> list[Sample]:
        out = []
        for i in sorted(ids.tolist()):
            buf = io.BytesIO()
            Image.fromarray(images[i], mode="L").save(buf, format="PNG")
            out.append(Sample(key=f"{split}{i:05d}", image=buf.getvalue(), ext="png", label=int(d.target[i])))
        return out

    return to_samples(tr, "train"), to_samples(te, "test")


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--train-shards", type=int, default=8, help="number of training shards (default 8)")
    a = p.parse_args(argv)
    number("--train-shards", a.train_shards, lo=1)
    train, test = digits_samples()
    per = -(-len(train) // a.train_shards)
    splits = {
        "train": write_split(train, a.out, "train", per),
        "test": write_split(test, a.out, "test", -(-len(test) // 2)),
    }
    pix = np.concatenate([np.asarray(Image.open(io.BytesIO(s.image))).ravel() for s in train]) / 255.0
    write_index(
        a.out,
        name="digits",
        num_classes=10,
        channels=1,
        image_size=8,
        mean=[float(pix.mean())],
        std=[float(pix.std())],
        splits=splits,
    )
    print(f"digits: {len(train)} train in {len(splits['train'])} shards, {len(test)} test -> {a.out}")


if __name__ == "__main__":
    sys.exit(main())
