"""RST's 500K Tiny Images file (``ti_500K_pseudo_labeled.pickle``) -> an unlabeled (or pseudo-labelled) shard set.

The file, as ``yaircarmon/semisup-adv`` distributes it, is a pickle of a dict with ``data`` (uint8, N x 32 x 32 x 3)
and ``extrapolated_targets`` (RST's pseudo-labels, N). A pickle can run code when loaded, so it is read only here,
once, with ``data_prep.trusted_pickle`` (numpy arrays only; anything else is refused before it runs) and only
because the user names the file; the shards written contain no pickle, and nothing is unpickled at training time.

    python -m data_prep.tiny_images ti_500K_pseudo_labeled.pickle data/ti500k            # unlabeled (-1)
    python -m data_prep.tiny_images ti_500K_pseudo_labeled.pickle data/ti500k_rst --rst-labels

By default the labels are dropped (``"labeled": false``) so that ``dat_ds.pseudo_label`` labels the images with
your own standard model, as RST's method does; RST's ``extrapolated_targets`` are kept in ``rst_targets.npy``.
``--rst-labels`` instead writes them as the labels, giving a pseudo-labelled set to stream directly (what the DAT
paper's Table 3 runs used). Mean/std are those of CIFAR-10, the labeled set these images accompany.
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

from .trusted_pickle import UntrustedPickle, load_arrays

CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


def read_ti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        obj = load_arrays(f, str(path))
    if not isinstance(obj, dict) or "data" not in obj or "extrapolated_targets" not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise SystemExit(f"{path}: expected a dict with 'data' and 'extrapolated_targets', found {keys}")
    data, targets = np.asarray(obj["data"]), np.asarray(obj["extrapolated_targets"]).astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3) or len(targets) != len(data):
        raise SystemExit(
            f"{path}: 'data' is {data.dtype} {data.shape} with {len(targets)} targets; expected uint8 N x 32 x 32 x 3"
        )
    return data, targets


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pickle", type=Path, help="ti_500K_pseudo_labeled.pickle (a file you trust)")
    p.add_argument("out", type=Path, help="the shard folder to write (index.json, *.tar)")
    p.add_argument("--rst-labels", action="store_true", help="keep RST's extrapolated_targets as the labels")
    p.add_argument("--per-shard", type=int, default=10000, help="samples per shard file (default 10000)")
    a = p.parse_args(argv)
    existing(a.pickle, "the Tiny Images pickle", "file")
    number("--per-shard", a.per_shard, lo=1)
    try:
        data, targets = read_ti(a.pickle)
    except UntrustedPickle as e:
        raise SystemExit(f"error: {e}") from None

    def samples():
        for i in range(len(data)):
            buf = io.BytesIO()
            Image.fromarray(data[i], mode="RGB").save(buf, format="PNG")
            label = int(targets[i]) if a.rst_labels else -1
            yield Sample(
                key=f"ti{i:07d}",
                image=buf.getvalue(),
                ext="png",
                label=label,
                extra=(("src", str(i).encode()),),
            )

    splits = {"train": write_split(samples(), a.out, "train", a.per_shard, len(data))}
    write_index(
        a.out,
        name="ti500k_rst" if a.rst_labels else "ti500k",
        num_classes=10,
        channels=3,
        image_size=32,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        splits=splits,
        extra={
            "labeled": bool(a.rst_labels),
            "source": str(a.pickle),
            "pseudo_labels": "rst" if a.rst_labels else None,
        },
    )
    np.save(a.out / "rst_targets.npy", targets, allow_pickle=False)
    print(f"{a.pickle}: {len(data)} images -> {a.out} ({'RST labels' if a.rst_labels else 'unlabeled'})")


if __name__ == "__main__":
    sys.exit(main())
