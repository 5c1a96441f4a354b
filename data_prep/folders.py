"""Any class-folder image tree -> webdataset shards, the image bytes copied as they are (never re-encoded).

    python -m data_prep.folders ROOT OUT [--train train --test test] [--classes a,b,c] [--shard-mb 64]
    python -m data_prep.folders cifar10-jpeg data/cifar10 --classes airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck

Input: ``ROOT/<train>/<class>/<file>`` and ``ROOT/<test>/<class>/<file>`` (.jpg, .jpeg, .png, .webp; any depth
below the class folder). Classes: ``--classes`` (their order is the label order; a folder not named is refused),
else the sorted class folders of the training split. Sample keys are ``<class>/<file stem>``, so the same file name
in two classes (``cat/0001.jpg``, ``dog/0001.jpg``: most class-folder sets) gives two keys; keys that would still
collide (``a.b.jpg`` and ``a.b.png``, or names webdataset would cut at a dot) are refused before any shard is
written, naming both files. Order: the test split sorted by (class, file name), fixed whatever the file system
lists; the training split shuffled once (seed 0) so each shard holds a mix of classes.

Every image is decoded once before anything is written (a corrupt file stops the conversion, named, unless
``--skip-bad``, which leaves it out and lists it in the index), which also yields the training split's pixel
mean/std for the index (``--stats imagenet``: ImageNet's) and the image size when all images share one; ``--no-check``
skips the decoding (ImageNet's 1.28M files). Shards are written under temporary names and renamed when whole; a re-run skips finished shards.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from dat_ds.cli import command, existing, number
from dat_ds.data.shards import TEST_FILES, Sample, write_index, write_tar
from dat_ds.progress import progress
from dat_ds.run_folder import atomic_write

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTS = {".jpeg": "jpg", ".jpg": "jpg", ".png": "png", ".webp": "webp"}


def sample_key(cls: str, rel: Path) -> str:
    """``<class>/<path below the class folder, without its extension>``; dots in it (webdataset would cut the key
    at the first one) become underscores."""
    stem = rel.with_suffix("").as_posix().replace(".", "_")
    return f"{cls}/{stem}"


def unique_keys(files: list[tuple[Path, int, str]]) -> None:
    """Refuse, before anything is written, two files that would become one sample key."""
    seen: dict[str, Path] = {}
    for p, _, key in files:
        if key in seen:
            raise SystemExit(
                f"{p} and {seen[key]} would both be sample '{key}' (webdataset keys end at the first dot of a "
                "name, and the extension is not part of them): rename one; nothing was written"
            )
        seen[key] = p


def list_split(root: Path, classes: list[str], ordered: bool) -> list[tuple[Path, int, str]]:
    """(file, label, key) of every image under ``root/<class>/``; refuses unknown class folders and key clashes."""
    if not root.is_dir():
        raise SystemExit(f"{root} is missing: expected {root.parent}/<split>/<class>/<image files>")
    label_of = {c: i for i, c in enumerate(classes)}
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in label_of]
    if unknown:
        raise SystemExit(
            f"{root}: class folder(s) {unknown} are not among the classes {classes}; name them in --classes"
        )
    out = []
    for cls in classes:
        d = root / cls
        if d.is_dir():
            files = sorted(q for q in d.rglob("*") if q.is_file() and q.suffix.lower() in EXTS)
            out += [(p, label_of[cls], sample_key(cls, p.relative_to(d))) for p in files]
    if not out:
        raise SystemExit(f"{root} holds no images (.jpg, .jpeg, .png, .webp) under its class folders")
    unique_keys(out)
    if not ordered:
        random.Random(0).shuffle(out)
    return out


def _inspect(path: Path) -> tuple[str, tuple[int, int] | None, np.ndarray | None, str]:
    """Decode one file fully: (path, size, per-channel [sum, sum of squares, pixels], error)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
        stats = np.stack([rgb.sum((0, 1)), (rgb**2).sum((0, 1)), np.full(3, rgb.shape[0] * rgb.shape[1])])
        return str(path), (rgb.shape[1], rgb.shape[0]), stats, ""
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a file that is no image
        return str(path), None, None, f"{type(e).__name__}: {e}"


def inspect(
    files: list[Path], workers: int, what: str
) -> Iterator[tuple[str, tuple | None, np.ndarray | None, str]]:
    if workers <= 1:
        yield from progress(map(_inspect, files), len(files), what, "img")
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from progress(pool.map(_inspect, files, chunksize=256), len(files), what, "img")


def shard_plan(files: list, shard_bytes: int) -> Iterator[list]:
    cur, size = [], 0
    for f in files:
        n = f[0].stat().st_size + 1536  # payload + tar headers
        if cur and size + n > shard_bytes:
            yield cur
            cur, size = [], 0
        cur.append(f)
        size += n
    if cur:
        yield cur


def convert(
    src: Path,
    out: Path,
    *,
    train: str = "train",
    test: str = "test",
    classes: list[str] | None = None,
    shard_mb: float = 64.0,
    stats: str = "compute",
    skip_bad: bool = False,
    check: bool = True,
    workers: int = 2,
    name: str | None = None,
    files_list: str = TEST_FILES,
) -> None:
    classes = classes or sorted(p.name for p in (src / train).iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{src / train} has no class folders")
    if len(set(classes)) != len(classes):
        raise SystemExit(f"--classes names a class twice: {classes}")
    splits_in = {"train": list_split(src / train, classes, ordered=False),
                 "test": list_split(src / test, classes, ordered=True)}  # fmt: skip
    bad: list[str] = []
    sizes: set[tuple[int, int]] = set()
    acc = np.zeros((3, 3))
    if check:
        for split, files in splits_in.items():
            for path, size, st, err in inspect([f[0] for f in files], workers, f"checking {split}"):
                if err:
                    if not skip_bad:
                        raise SystemExit(
                            f"{path} cannot be decoded ({err}): replace or delete it, or pass --skip-bad to leave "
                            "it out (it is then listed in the index); nothing was written"
                        )
                    bad.append(path)
                    continue
                sizes.add(size)
                if split == "train":
                    acc += st
    elif stats == "compute":
        raise SystemExit(
            "--stats compute decodes every training image: drop --no-check, or use --stats imagenet"
        )
    if bad:
        splits_in = {k: [f for f in v if str(f[0]) not in set(bad)] for k, v in splits_in.items()}
    if stats == "compute":
        n = acc[2]
        mean = acc[0] / n
        std = np.sqrt(np.maximum(acc[1] / n - mean**2, 0))
        mean_t, std_t = tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
    else:
        mean_t, std_t = IMAGENET_MEAN, IMAGENET_STD
    # one square size for every image: the index records it (CIFAR's 32); else 0, sizes vary
    side = next(iter(sizes))[0] if len(sizes) == 1 and len(set(next(iter(sizes)))) == 1 else 0
    out.mkdir(parents=True, exist_ok=True)
    entries: dict[str, list[dict]] = {}
    for split, files in splits_in.items():
        entries[split] = []
        groups = list(shard_plan(files, int(shard_mb * 2**20)))
        for i, group in enumerate(progress(groups, len(groups), f"writing {split} shards", "shard")):
            fname = f"{split}-{i:06d}.tar"
            if not (out / fname).exists():
                write_tar(
                    out / fname,
                    [Sample(key=key, image=p.read_bytes(), ext=EXTS[p.suffix.lower()], label=label)
                     for p, label, key in group],
                )  # fmt: skip
            entries[split].append({"file": fname, "count": len(group)})
        print(f"{split}: {len(files)} images in {len(entries[split])} shards", flush=True)
    # test index -> source file, for subsets named by file (dat_ds.evaluate --indices)
    atomic_write(
        out / files_list, "".join(f"{p.relative_to(src).as_posix()}\n" for p, _, _ in splits_in["test"])
    )
    write_index(
        out,
        name=name or src.name,
        num_classes=len(classes),
        channels=3,
        image_size=side,
        mean=mean_t,
        std=std_t,
        splits=entries,
        extra={"classes": classes, "source": str(src), "skipped_bad_files": bad},
    )
    (out / "classes.json").write_text(json.dumps(classes))


def main(argv: list[str] | None = None) -> int:
    """The command (exit 2 and a one-line message on a user error)."""
    return command(_main, argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "src", type=Path, help="the tree's root: SRC/<train>/<class>/<files>, SRC/<test>/<class>/<files>"
    )
    p.add_argument("out", type=Path, help="the shard folder to write (index.json, *.tar)")
    p.add_argument("--train", default="train", help="the training split's folder under SRC (default train)")
    p.add_argument(
        "--test", default="test", help="the test split's folder under SRC (default test; ImageNet: val)"
    )
    p.add_argument(
        "--classes", default="", help="comma-separated class folders in label order (default: sorted)"
    )
    p.add_argument("--shard-mb", type=float, default=64.0, help="shard size in MB (default 64)")
    p.add_argument("--stats", choices=["compute", "imagenet"], default="compute",
                   help="input mean/std for the index: computed from the training images, or ImageNet's")  # fmt: skip
    p.add_argument(
        "--skip-bad", action="store_true", help="leave undecodable files out (listed in the index)"
    )
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="do not decode the images first (needs --stats imagenet; a corrupt file then surfaces in "
                        "training, under data.on_bad_sample)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="processes that decode the images (default 2)")
    p.add_argument("--name", default=None, help="the shard set's name (default: SRC's folder name)")
    a = p.parse_args(argv)
    existing(
        a.src, "the source folder", fix=f"it should hold {a.train}/ and {a.test}/ with one folder per class"
    )
    number("--shard-mb", a.shard_mb, lo=0, lo_open=True)
    number("--workers", a.workers, lo=1)
    classes = [c.strip() for c in a.classes.split(",") if c.strip()] or None
    convert(a.src, a.out, train=a.train, test=a.test, classes=classes, shard_mb=a.shard_mb, stats=a.stats,
            skip_bad=a.skip_bad, check=a.check, workers=a.workers, name=a.name)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
