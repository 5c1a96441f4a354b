"""The shard format: webdataset tars plus one ``index.json`` per shard set.

A sample is ``<key>.<png|jpg>`` (the encoded image bytes, never re-encoded) and ``<key>.cls`` (the label as
ASCII digits). No pickle anywhere. The index records the sample count of every shard so the loader can refuse a
truncated tar instead of silently training on less data.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDEX_NAME = "index.json"
FORMAT = "dat-ds-shards/1"


class ShardError(ValueError):
    """A shard set that cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes
    ext: str  # "png" | "jpg"
    label: int


@dataclass(frozen=True)
class ShardInfo:
    url: str  # local path, URL or pipe: command, as webdataset's gopen accepts
    count: int


@dataclass(frozen=True)
class Split:
    shards: tuple[ShardInfo, ...]

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

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise ShardError(f"{self.root}/{INDEX_NAME} has no '{name}' split (has: {sorted(self.splits)})")
        return self.splits[name]


def write_tar(path: Path, samples: list[Sample]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, payload in ((s.ext, s.image), ("cls", str(s.label).encode())):
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
        entries.append({"file": name, "count": len(buf)})
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
    index = {
        "format": FORMAT,
        "name": name,
        "num_classes": num_classes,
        "channels": channels,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "splits": {k: {"count": sum(e["count"] for e in v), "shards": v} for k, v in splits.items()},
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
            if check_files and "url" not in e and not Path(url).is_file():
                raise ShardError(f"shard {url} listed in {path} is missing; re-run the data_prep converter")
            infos.append(ShardInfo(url=url, count=int(e["count"])))
        if not infos:
            raise ShardError(f"{path}: split '{split_name}' has no shards")
        splits[split_name] = Split(tuple(infos))
    return ShardIndex(
        root=str(root),
        name=raw["name"],
        num_classes=int(raw["num_classes"]),
        channels=int(raw["channels"]),
        image_size=int(raw["image_size"]),
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        splits=splits,
    )


def _tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of each regular file in a tar stream.

    A minimal reader of the ustar/GNU layout the converters write: Python's ``tarfile`` (which webdataset's
    iterator uses) spent about a third of the loader's time parsing headers at 64 px. Pax and GNU long-name
    records are honoured; other member types are skipped.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header.count(0) == 512:
            if 0 < len(header) < 512:
                raise ShardError(f"shard {url} ends inside a tar header: the file is truncated")
            return
        size_field = header[124:136].strip(b"\0 ")
        try:
            size = int(size_field or b"0", 8)
        except ValueError:
            raise ShardError(
                f"shard {url} has a corrupt tar header; re-run the data_prep converter"
            ) from None
        kind = header[156:157]
        payload = stream.read(size)
        if len(payload) < size:
            raise ShardError(f"shard {url} ends inside a member: the file is truncated")
        pad = -size % 512
        if pad and len(stream.read(pad)) < pad:
            raise ShardError(f"shard {url} ends inside a member: the file is truncated")
        if kind == b"L":  # GNU long name for the next member
            long_name = payload.rstrip(b"\0").decode()
            continue
        if kind in (b"x", b"g"):  # pax header: take its path, if any
            for rec in payload.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            if prefix:
                name = f"{prefix}/{name}"
        yield name, payload


def read_shard(url: str, expected: int | None = None) -> Iterator[Sample]:
    """Stream the samples of one shard (a path, URL or ``pipe:`` command, opened by webdataset's ``gopen``);
    check the sample count against the index when given."""
    from webdataset.gopen import gopen

    n = 0
    current: dict[str, bytes] = {}
    key = None

    def emit(k: str, files: dict[str, bytes]) -> Sample:
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        if ext is None or "cls" not in files:
            raise ShardError(f"{url}: sample {k} has no image or no .cls ({sorted(files)})")
        return Sample(key=k, image=files[ext], ext=ext, label=int(files["cls"]))

    with gopen(url, "rb", bufsize=1 << 20) as stream:
        for name, payload in _tar_members(stream, url):
            folder, _, base = name.rpartition("/")
            if base.startswith("__") or "." not in base:
                continue
            stem, _, ext = base.partition(".")  # webdataset's rule: the key ends at the first dot
            stem = f"{folder}/{stem}" if folder else stem
            if stem != key and current:
                yield emit(key, current)
                n += 1
                current = {}
            key = stem
            current[ext.lower()] = payload
        if current:
            yield emit(key, current)
            n += 1
    if expected is not None and n != expected:
        raise ShardError(
            f"shard {url} holds {n} samples but its index says {expected}: the file is truncated or was "
            "replaced; re-run the data_prep converter for it"
        )
