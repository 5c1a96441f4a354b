"""The shard format: webdataset tars plus one ``index.json`` per shard set.

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

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INDEX_NAME = "index.json"
FORMAT = "dat-ds-shards/1"
MEMBERS_SUFFIX = ".members.npy"
# Columns of a split's member table.
M_SHARD, M_START, M_END, M_LABEL = range(4)


class ShardError(ValueError):
    """A shard set that cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str  # "png" | "jpg"
    label: int  # -1 in an unlabeled set
    extra: tuple[
        tuple[str, bytes], ...
    ] = ()  # other members, e.g. ("conf", b"0.98") in a pseudo-labelled set


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


def write_tar(path: Path, samples: list[Sample]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, payload in ((s.ext, s.image), ("cls", str(s.label).encode()), *s.extra):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(payload)
                info.mtime = 0  # reproducible shards
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)


def write_split(samples: Iterable[Sample], out_dir: Path, split: str, per_shard: int) -> list[dict[str, Any]]:
    """Write ``split-000000.tar``... with at most ``per_shard`` samples each; every file appears whole or not at all."""
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

    for s in samples:
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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)
    return path


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


def _tar_members(stream, url: str, want=None) -> Iterator[tuple[str, bytes | None, int, int]]:
    """(name, payload, offset of the member's first header, offset after its padding) of each regular file.

    A minimal reader of the ustar/GNU layout the converters write: Python's ``tarfile`` (which webdataset's
    iterator uses) spent about a third of the loader's time parsing headers at 64 px. Pax and GNU long-name
    records are honoured; other member types are skipped. With ``want`` (a predicate on the name), other
    payloads are skipped (seeked over where the stream can) and yielded as ``None``.
    """
    seekable = want is not None and hasattr(stream, "seekable") and stream.seekable()  # only skips seek
    file_size = None
    if seekable:
        here = stream.tell()
        file_size = stream.seek(0, os.SEEK_END)
        stream.seek(here)
    pos = 0
    long_name = None
    first_header = None  # where the current member's headers began (long-name records come first)

    def skip(n: int) -> bool:
        if seekable:
            stream.seek(n, os.SEEK_CUR)
            return file_size is None or pos + n <= file_size
        while n:
            got = len(stream.read(min(n, 1 << 20)))
            if not got:
                return False
            n -= got
        return True

    while True:
        header = stream.read(512)
        if len(header) < 512 or header.count(0) == 512:
            if 0 < len(header) < 512:
                raise ShardError(f"shard {url} ends inside a tar header: the file is truncated")
            return
        if first_header is None:
            first_header = pos
        pos += 512
        size_field = header[124:136].strip(b"\0 ")
        try:
            size = int(size_field or b"0", 8)
        except ValueError:
            raise ShardError(
                f"shard {url} has a corrupt tar header; re-run the data_prep converter"
            ) from None
        kind = header[156:157]
        padded = size + (-size % 512)
        special = kind in (b"L", b"x", b"g")
        if long_name is not None:
            name = long_name
        else:
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            if prefix:
                name = f"{prefix}/{name}"
        regular = kind in (b"0", b"\0", b"7")
        if special or not regular or want is None or want(name):
            payload = stream.read(size)
            if len(payload) < size:
                raise ShardError(f"shard {url} ends inside a member: the file is truncated")
            pad = padded - size
            if pad and len(stream.read(pad)) < pad:
                raise ShardError(f"shard {url} ends inside a member: the file is truncated")
        else:
            payload = None
            if not skip(padded):
                raise ShardError(f"shard {url} ends inside a member: the file is truncated")
        pos += padded
        if kind == b"L":  # GNU long name for the next member
            long_name = payload.rstrip(b"\0").decode()
            continue
        if kind in (b"x", b"g"):  # pax header: take its path, if any
            for rec in payload.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        start, first_header, long_name = first_header, None, None
        if regular:
            yield name, payload, start, pos


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


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
        for name, payload, hdr_at, end in _tar_members(stream, url, want=lambda n: n.endswith(".cls")):
            stem = _sample_key(name)
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


def _sample_key(name: str) -> str | None:
    """webdataset's rule: the key is the path up to the first dot of the file name; ``__*`` files are meta."""
    folder, _, base = name.rpartition("/")
    if base.startswith("__") or "." not in base:
        return None
    stem = base.partition(".")[0]
    return f"{folder}/{stem}" if folder else stem


def _make_sample(url: str, key: str, files: dict[str, bytes]) -> Sample:
    ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
    if ext is None or "cls" not in files:
        raise ShardError(f"{url}: sample {key} has no image or no .cls ({sorted(files)})")
    extra = tuple((k, v) for k, v in sorted(files.items()) if k not in (ext, "cls"))
    return Sample(key=key, image=files[ext], ext=ext, label=int(files["cls"]), extra=extra)


def parse_sample(blob: bytes, url: str) -> Sample:
    """One sample from the bytes of its tar members (a member-table row's ``start:end`` of a shard)."""
    files: dict[str, bytes] = {}
    key = None
    for name, payload, _, _ in _tar_members(io.BytesIO(blob), url):
        stem = _sample_key(name)
        if stem is None:
            continue
        if key is not None and stem != key:
            raise ShardError(f"{url}: member table entry spans samples {key} and {stem}; rebuild it")
        key = stem
        files[name.rpartition("/")[2].partition(".")[2].lower()] = payload
    if key is None:
        raise ShardError(f"{url}: member table entry holds no sample; rebuild it")
    return _make_sample(url, key, files)


def _cache_path(url: str) -> Path:
    root = Path(os.environ.get("DAT_DS_SHARD_CACHE") or Path.home() / ".cache" / "dat_ds" / "shards")
    return root / (hashlib.sha1(url.encode()).hexdigest()[:20] + ".tar")


def local_copy(info: ShardInfo) -> str:
    """A path that can seek: the shard itself, or (URL and ``pipe:`` shards) a copy in ``$DAT_DS_SHARD_CACHE``
    (default ``~/.cache/dat_ds/shards``), fetched once with webdataset's ``gopen`` and written atomically."""
    if info.is_local:
        return info.url
    from webdataset.gopen import gopen

    path = _cache_path(info.url)
    if path.is_file() and (info.nbytes < 0 or path.stat().st_size == info.nbytes):
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with gopen(info.url, "rb", bufsize=1 << 20) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    size = tmp.stat().st_size
    if info.nbytes >= 0 and size != info.nbytes:
        tmp.unlink()
        raise ShardError(f"shard {info.url} arrived with {size} bytes, its index says {info.nbytes}")
    os.replace(tmp, path)
    return str(path)


class SampleReader:
    """Random access to a split's samples by number (0 .. count-1) through its member table; keeps files open.
    One per process (DataLoader workers each make their own)."""

    def __init__(self, split: Split, max_open: int = 64):
        self._files: dict[int, Any] = {}
        if split.members is None:
            raise ShardError(
                "this shard set has no member table (written before dat-ds used one); add it with: "
                "python -m data_prep.members SHARD_FOLDER"
            )
        self.split, self.max_open = split, max_open

    def __getitem__(self, i: int) -> Sample:
        shard, start, end, _ = self.split.members[i].tolist()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files))).close()
            f = self._files[shard] = open(local_copy(self.split.shards[shard]), "rb")  # noqa: SIM115
        f.seek(start)
        blob = f.read(end - start)
        url = self.split.shards[shard].url
        if len(blob) != end - start:
            raise ShardError(f"shard {url} ends before sample {i}'s bytes: the file is truncated")
        return parse_sample(blob, url)

    def url_of(self, i: int) -> str:
        return self.split.shards[int(self.split.members[i][M_SHARD])].url

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __del__(self) -> None:
        self.close()


def read_shard(url: str, expected: int | None = None) -> Iterator[Sample]:
    """Stream the samples of one shard (a path, URL or ``pipe:`` command, opened by webdataset's ``gopen``);
    check the sample count against the index when given."""
    from webdataset.gopen import gopen

    n = 0
    current: dict[str, bytes] = {}
    key = None
    with gopen(url, "rb", bufsize=1 << 20) as stream:
        for name, payload, _, _ in _tar_members(stream, url):
            stem = _sample_key(name)
            if stem is None:
                continue
            if stem != key and current:
                yield _make_sample(url, key, current)
                n += 1
                current = {}
            key = stem
            current[name.rpartition("/")[2].partition(".")[2].lower()] = payload
        if current:
            yield _make_sample(url, key, current)
            n += 1
    if expected is not None and n != expected:
        raise ShardError(
            f"shard {url} holds {n} samples but its index says {expected}: the file is truncated or was "
            "replaced; re-run the data_prep converter for it"
        )
