"""Shard loader vs torchvision ImageFolder on the same real JPEGs.

    python -m bench.loader --out bench/results/loader.md

2,000 JPEGs are cut from scikit-learn's two sample photographs (real photos; random crops, saved at quality 90)
at 64 and at 224 px, written once as an ImageFolder tree and as dat-ds shards (the JPEG bytes copied). Both
pipelines do the same work per image: decode, RandomResizedCrop to the file's size, horizontal flip, uint8 CHW
tensor, batches of 64. Reported: images/s over two full passes after one warm-up pass, 0 and 2 workers.
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from dat_ds.data.loader import StreamSpec, make_train_loader
from dat_ds.data.shards import has_index, load_index
from data_prep.imagenet import convert

N = 2000


def make_jpegs(root: Path, size: int) -> Path:
    tree = root / f"jpeg{size}"
    if (tree / "done").exists():
        return tree
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = random.Random(size)
    for split in ("train", "val"):
        for c in range(10):
            (tree / split / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(N):
        p = photos[i % 2]
        side = rng.randint(160, 420)
        y, x = rng.randint(0, p.shape[0] - side), rng.randint(0, p.shape[1] - side)
        img = Image.fromarray(p[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
        img.save(tree / "train" / f"n{i % 10:08d}" / f"{i}.JPEG", quality=90)
    img.save(tree / "val" / "n00000000" / "0.JPEG", quality=90)
    (tree / "done").touch()
    return tree


def rate(loader_fn, passes: int = 2) -> float:
    for _ in loader_fn():  # warm-up pass: page cache, worker start-up paths
        pass
    t0 = time.perf_counter()
    n = 0
    for _ in range(passes):
        for x, _ in loader_fn():
            n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=Path("bench/results/loader.md"))
    p.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for size in (64, 224):
        tree = make_jpegs(a.cache, size)
        shards = a.cache / f"shards{size}"
        if not has_index(shards):
            convert(tree, shards, shard_mb=8 if size == 224 else 1, val_labels=None, name=f"bench{size}")
        index = load_index(shards)
        tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(size, antialias=True),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ]
        )
        folder = datasets.ImageFolder(str(tree / "train"), transform=tf)
        for workers in (0, 2):

            def imagefolder(workers=workers, folder=folder):
                return DataLoader(folder, batch_size=64, shuffle=True, num_workers=workers, drop_last=True)

            def shardloader(workers=workers, index=index, size=size):
                spec = StreamSpec(
                    split=index.split("train"),
                    channels=3,
                    augment="imagenet",
                    image_size=size,
                    micro_batch=64,
                    batches=N // 64,
                    rank=0,
                    world=1,
                    seed=0,
                    epoch=0,
                    workers=workers,
                )
                return make_train_loader(spec)

            r_folder, r_shard = rate(imagefolder), rate(shardloader)
            rows.append((size, workers, r_folder, r_shard))
            print(
                f"{size} px, {workers} workers: ImageFolder {r_folder:.0f} img/s, shards {r_shard:.0f} img/s "
                f"({r_shard / r_folder:.2f}x)",
                flush=True,
            )
    lines = [
        "# Shard loader vs ImageFolder (same 2,000 real JPEGs, RandomResizedCrop + flip, batch 64)",
        "",
        f"Command: `python -m bench.loader --out {a.out}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s) per "
        f"process, torch {torch.__version__}, numpy {np.__version__}",
        "",
        "| JPEG size | workers | ImageFolder img/s | dat-ds shards img/s | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s} px | {w} | {f:.0f} | {sh:.0f} | {sh / f:.2f}x |" for s, w, f, sh in rows]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
