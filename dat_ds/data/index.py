"""The index of a shard set (``index.json``) and each split's member table.

A sample is ``<key>.<png|jpg>`` (the encoded image bytes, never re-encoded) and ``<key>.cls`` (the label as
ASCII digits). No pickle anywhere. The index records the sample count and byte size of every shard, so a
truncated or replaced tar is refused when the index is loaded, before any training.

Each split also has a member table, ``<split>.members.npy`` beside ``index.json`` (int64, one row per sample:
shard number, byte offset of the sample's first tar header, byte offset where its last member ends, label). With
it the training loader reads any sample by one seek and one read (as webdataset's ``wids`` does), which is what
lets every epoch visit every sample exactly once in a global random order for any number of ranks and workers.
``write_index`` builds the table by scanning the tar headers; ``python -m data_prep.members DIR`` adds it to a
shard set written before it existed. ``np.load`` reads it with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import progress
from ..run_folder import atomic_path, atomic_write
from .tar import Sample, ShardError, sample_key, tar_members, write_tar

INDEX_NAME = "index.json"
TEST_FILES = "test.files.txt"  # a shard set's test index -> source file (subsets named by file)
FORMAT = "dat-ds-shards/1"
MEMBERS_SUFFIX = ".members.npy"
# Columns of a split's member table.
M_SHARD, M_START, M_END, M_LABEL = range(4)


@dataclass(frozen=True)
class ShardInfo:
    url: str  # local path, URL or pipe: command, as webdataset's gopen accepts
    count: int
    nbytes: int = -1  # file size recorded by data_prep (-1: not recorded)

    @property
    def is_local(self) -> bool:
        return "://" not in self.url and not self.url.startswith("pipe:")


@dataclass(frozen=True)
class Split:
    shards: tuple[ShardInfo, ...]
    # (count, 4) int64 member table (see the module docstring); None for a shard set written before it existed
    members: np.ndarray | None = field(default=None, compare=False, repr=False)
    members_file: str = ""

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)


@dataclass(frozen=True)
class ShardIndex:
    root: str
    name: str
    num_classes: int
    channels: int
    image_size: int  # native side length (0: varies, e.g. ImageNet)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    splits: dict[str, Split]
    labeled: bool = True  # False: an unlabeled set (labels -1), for pseudo-labelling, not for training

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ShardError(f"{self.root}/{INDEX_NAME} has no '{name}' split (has: {sorted(self.splits)})")
        return self.splits[name]


def has_index(folder: str | Path) -> bool:
    """Whether ``folder`` holds a shard set (its ``index.json``)."""
    return (Path(folder) / INDEX_NAME).is_file()


def pooled_split(first: Split, second: Split) -> Split:
    """One split of two: sample numbers 0 .. first.count-1 are ``first``'s, the rest ``second``'s (the official
    DAT code's CIFAR-10 + 500K pseudo-labelled images as one training set)."""
    if first.members is None or second.members is None:
        raise ShardError(
            "pooling two shard sets needs both member tables; add them with python -m data_prep.members"
        )
    extra = np.array(second.members, dtype=np.int64)
    extra[:, M_SHARD] += len(first.shards)
    members = np.concatenate([np.asarray(first.members, dtype=np.int64), extra])
    return Split(first.shards + second.shards, members, f"{first.members_file}+{second.members_file}")


def write_split(
    samples: Iterable[Sample], out_dir: Path, split: str, per_shard: int, total: int | None = None
) -> list[dict[str, Any]]:
    """Write ``split-000000.tar``... with at most ``per_shard`` samples each; every file appears whole or not at all.
    Reports progress (``dat_ds.progress``) against ``total`` samples when given."""
    if per_shard < 1:
        raise ValueError("per_shard must be >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    buf: list[Sample] = []

    def flush() -> None:
        name = f"{split}-{len(entries):06d}.tar"
        write_tar(out_dir / name, buf)
        entries.append({"file": name, "count": len(buf), "bytes": (out_dir / name).stat().st_size})
        buf.clear()

    for s in progress(samples, total, f"{out_dir.name}/{split}", "img"):
        buf.append(s)
        if len(buf) == per_shard:
            flush()
    if buf:
        flush()
    return entries


def write_index(
    out_dir: Path,
    *,
    name: str,
    num_classes: int,
    channels: int,
    image_size: int,
    mean: Iterable[float],
    std: Iterable[float],
    splits: dict[str, list[dict[str, Any]]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``index.json`` and each split's member table (scanned from the shards' tar headers)."""
    for split, entries in splits.items():
        urls = [e.get("url") or str(out_dir / e["file"]) for e in entries]
        for e, url in zip(entries, urls, strict=True):
            if "url" not in e:
                e.setdefault("bytes", os.path.getsize(url))
        table = build_members(urls)
        counts = np.bincount(table[:, M_SHARD], minlength=len(entries)) if len(table) else [0] * len(entries)
        for e, url, n in zip(entries, urls, counts, strict=True):
            if int(n) != e["count"]:
                raise ShardError(f"{url} holds {int(n)} samples, not the {e['count']} its entry says")
        _atomic_save_npy(out_dir / f"{split}{MEMBERS_SUFFIX}", table)
    index = {
        "format": FORMAT,
        "name": name,
        "num_classes": num_classes,
        "channels": channels,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "splits": {
            k: {"count": sum(e["count"] for e in v), "members": f"{k}{MEMBERS_SUFFIX}", "shards": v}
            for k, v in splits.items()
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    path = out_dir / INDEX_NAME
    atomic_write(path, json.dumps(index, indent=1))
    return path


ALLOW_PIPE = "DAT_DS_ALLOW_PIPE"  # 1: shard entries may be pipe: commands (they run a shell command)
ALLOW_OUTSIDE = "DAT_DS_ALLOW_OUTSIDE"  # 1: shard entries may be local files outside the shard folder


def _check_where(url: str, root: Path, index_path: Path) -> None:
    """A shard set is data, not code: a ``pipe:`` entry (webdataset runs it in a shell) and a file outside the
    shard folder need the user's explicit opt-in, refused otherwise before anything is read."""
    if url.startswith("pipe:") and os.environ.get(ALLOW_PIPE) != "1":
        raise ShardError(
            f"{index_path} lists a shard as a shell command ({url[:80]!r}): a shard set from someone else would run "
            f"it on every rank. Read the index; if you trust it, set {ALLOW_PIPE}=1 (and forward it to every node)"
        )
    if "://" in url or url.startswith("pipe:"):
        return
    try:
        Path(url).resolve().relative_to(root.resolve())
    except ValueError:
        if os.environ.get(ALLOW_OUTSIDE) != "1":
            raise ShardError(
                f"{index_path} lists {url}, outside its folder {root}: a shard set should hold its shards. Move them "
                f"into it, or set {ALLOW_OUTSIDE}=1 to read them where they are"
            ) from None


def load_index(root: str | Path, *, check_files: bool = True) -> ShardIndex:
    """Read and check ``root/index.json``. ``root`` may also name the index file itself."""
    root = Path(root)
    path = root if root.name == INDEX_NAME else root / INDEX_NAME
    root = path.parent
    if not root.is_dir():
        raise ShardError(
            f"shard folder {root} does not exist; make it with data_prep/ (e.g. python -m data_prep.digits {root})"
        )
    if not path.is_file():
        raise ShardError(
            f"{path} is missing: {root} was not written by data_prep/ or its conversion did not finish"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path} is not valid JSON ({e}); re-run the data_prep converter") from None
    if raw.get("format") != FORMAT:
        raise ShardError(f"{path} has format {raw.get('format')!r}, expected {FORMAT!r}; re-run data_prep/")
    splits = {}
    for split_name, split in raw["splits"].items():
        infos = []
        for e in split["shards"]:
            url = e.get("url") or str(root / e["file"])
            _check_where(url, root, path)
            info = ShardInfo(url=url, count=int(e["count"]), nbytes=int(e.get("bytes", -1)))
            if info.count < 1:
                raise ShardError(
                    f"shard {url} listed in {path} has {info.count} samples; remove its entry from "
                    f"{INDEX_NAME} or re-run the data_prep converter"
                )
            if check_files and info.is_local:
                if not Path(url).is_file():
                    raise ShardError(
                        f"shard {url} listed in {path} is missing; re-run the data_prep converter"
                    )
                size = os.path.getsize(url)
                if info.nbytes >= 0 and size != info.nbytes:
                    raise ShardError(
                        f"shard {url} has {size} bytes but {path} says {info.nbytes}: the file is truncated or "
                        "was replaced; re-run the data_prep converter for it"
                    )
            infos.append(info)
        if not infos:
            raise ShardError(f"{path}: split '{split_name}' has no shards")
        members, mfile = None, split.get("members", "")
        if mfile and check_files:
            members = _load_members(root / mfile, infos, path)
            _check_labels(
                members, infos, split_name, int(raw["num_classes"]), bool(raw.get("labeled", True)), path
            )
        splits[split_name] = Split(tuple(infos), members, mfile)
    return ShardIndex(
        root=str(root),
        name=raw["name"],
        num_classes=int(raw["num_classes"]),
        channels=int(raw["channels"]),
        image_size=int(raw["image_size"]),
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        splits=splits,
        labeled=bool(raw.get("labeled", True)),
    )


def _check_labels(
    members: np.ndarray, shards: list[ShardInfo], split: str, num_classes: int, labeled: bool, path: Path
) -> None:
    """Every label of a labeled split in 0 .. num_classes - 1 (an unlabeled set's are -1), from the member table,
    before anything trains on them."""
    labels = np.asarray(members[:, M_LABEL])
    bad = (labels < 0) | (labels >= num_classes) if labeled else labels != -1
    if not bad.any():
        return
    first = int(np.argmax(bad))
    url = shards[int(members[first, M_SHARD])].url
    want = f"0..{num_classes - 1} (num_classes = {num_classes})" if labeled else "-1 (an unlabeled set)"
    raise ShardError(
        f"{path}: split '{split}' has {int(bad.sum())} sample(s) with a label outside {want}, the first sample "
        f"number {first} (label {int(labels[first])}, in {url}); fix the labels (.cls) or num_classes and re-run "
        "the data_prep converter"
    )


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _load_members(path: Path, shards: list[ShardInfo], index_path: Path) -> np.ndarray:
    fix = f"rebuild it with: python -m data_prep.members {index_path.parent}"
    if not path.is_file():
        raise ShardError(f"{path}, named in {index_path}, is missing; {fix}")
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ShardError(f"{path} is not a member table ({e}); {fix}") from None
    n = sum(s.count for s in shards)
    if table.dtype != np.int64 or table.shape != (n, 4):
        raise ShardError(f"{path} has shape {table.shape} {table.dtype}, expected ({n}, 4) int64; {fix}")
    counts = np.bincount(np.asarray(table[:, M_SHARD]), minlength=len(shards))
    if len(counts) != len(shards) or any(int(c) != s.count for c, s in zip(counts, shards, strict=True)):
        raise ShardError(f"{path} does not match the shard counts in {index_path}; {fix}")
    for i, s in enumerate(shards):
        if s.nbytes >= 0:
            ends = table[table[:, M_SHARD] == i, M_END]
            if len(ends) and int(ends.max()) > s.nbytes:
                raise ShardError(f"{path} points past the end of {s.url}; {fix}")
    return table


def scan_members(url: str) -> list[tuple[int, int, int]]:
    """(start, end, label) of every sample of one shard, from its tar headers (payloads other than ``.cls``
    are skipped without reading where the file can seek)."""
    from webdataset.gopen import gopen

    rows: list[tuple[int, int, int]] = []
    key, start, last_end, label = None, 0, 0, -1
    with gopen(url, "rb", bufsize=1 << 16) as stream:
        for name, payload, hdr_at, end in tar_members(stream, url, want=lambda n: n.endswith(".cls")):
            stem = sample_key(name)
            if stem is None:
                continue
            if stem != key:
                if key is not None:
                    rows.append((start, last_end, label))
                key, start, label = stem, hdr_at, -1
            if name.endswith(".cls"):
                label = int(payload)
            last_end = end
        if key is not None:
            rows.append((start, last_end, label))
    return rows


def build_members(urls: list[str]) -> np.ndarray:
    """The member table of a split whose shards are ``urls``, in order."""
    rows = [(i, *r) for i, url in enumerate(urls) for r in scan_members(url)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)
