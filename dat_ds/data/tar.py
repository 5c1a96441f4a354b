"""The tar format of a shard: webdataset's layout, written and parsed here.

A sample is ``<key>.<png|jpg|...>`` (the encoded image bytes, never re-encoded) and ``<key>.cls`` (the label as
ASCII digits), optionally more members (``<key>.conf``...). ``tar_members`` is a minimal reader of the ustar/GNU
layout the converters write (Python's ``tarfile``, which webdataset's iterator uses, spent about a third of the
loader's time parsing headers at 64 px).
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..run_folder import atomic_path


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


def write_tar(path: Path, samples: list[Sample]) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext, payload in ((s.ext, s.image), ("cls", str(s.label).encode()), *s.extra):
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(payload)
                info.mtime = 0  # reproducible shards
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(payload))


def tar_members(stream, url: str, want=None) -> Iterator[tuple[str, bytes | None, int, int]]:
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


def sample_key(name: str) -> str | None:
    """webdataset's rule: the key is the path up to the first dot of the file name; ``__*`` files are meta."""
    folder, _, base = name.rpartition("/")
    if base.startswith("__") or "." not in base:
        return None
    stem = base.partition(".")[0]
    return f"{folder}/{stem}" if folder else stem


def make_sample(url: str, key: str, files: dict[str, bytes]) -> Sample:
    """A sample from its members. One without an image member gets empty image bytes (decoding it fails, naming
    the sample, under ``data.on_bad_sample``); one without ``.cls`` gets label -1 (refused for a labeled set)."""
    ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), "")
    try:
        label = int(files["cls"]) if "cls" in files else -1
    except ValueError:
        raise ShardError(
            f"{url}: sample {key} has a .cls that is not an integer ({files['cls'][:20]!r})"
        ) from None
    extra = tuple((k, v) for k, v in sorted(files.items()) if k not in (ext, "cls"))
    return Sample(key=key, image=files[ext] if ext else b"", ext=ext, label=label, extra=extra)


def _folder(url: str) -> str:
    return str(Path(url).parent) if "://" not in url and not url.startswith("pipe:") else "SHARD_FOLDER"


def parse_sample(blob: bytes, url: str) -> Sample:
    """One sample from the bytes of its tar members (a member-table row's ``start:end`` of a shard)."""
    files: dict[str, bytes] = {}
    key = None
    for name, payload, _, _ in tar_members(io.BytesIO(blob), url):
        stem = sample_key(name)
        if stem is None:
            continue
        if key is not None and stem != key:
            raise ShardError(
                f"{url}: a member table entry spans samples {key} and {stem}: the table does not match the shard; "
                f"rebuild it with: python -m data_prep.members {_folder(url)}"
            )
        key = stem
        files[name.rpartition("/")[2].partition(".")[2].lower()] = payload
    if key is None:
        raise ShardError(
            f"{url}: a member table entry holds no whole sample: the table does not match the shard; rebuild it "
            f"with: python -m data_prep.members {_folder(url)}"
        )
    return make_sample(url, key, files)
