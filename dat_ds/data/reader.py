"""Reading samples: by number through a split's member table (one seek and one read, as webdataset's ``wids``),
or a whole shard as a stream; shards given by URL or ``pipe:`` command are copied once into a cache on each node."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..run_folder import atomic_path
from .index import M_SHARD, ShardInfo, Split
from .tar import Sample, ShardError, make_sample, parse_sample, sample_key, tar_members

DEFAULT_CACHE_GB = 256.0


def cache_root() -> Path:
    """``$DAT_DS_SHARD_CACHE`` (default ``~/.cache/dat_ds/shards``): one per node, on a disk local to it."""
    return Path(os.environ.get("DAT_DS_SHARD_CACHE") or Path.home() / ".cache" / "dat_ds" / "shards")


def cache_cap_bytes() -> int:
    """``$DAT_DS_SHARD_CACHE_GB`` (default 256): the cache's size cap; least recently used shards go first."""
    return int(float(os.environ.get("DAT_DS_SHARD_CACHE_GB", DEFAULT_CACHE_GB)) * 1e9)


def _cache_path(url: str) -> Path:
    return cache_root() / (hashlib.sha1(url.encode()).hexdigest()[:20] + ".tar")


def _evict(root: Path, keep: Path, need: int) -> None:
    """Delete least-recently-used cached shards until ``need`` more bytes fit under the cap. A shard another
    process is fetching (its lock held) is never taken; one being read may be: a reader keeps its open file."""
    cap = cache_cap_bytes()
    files = sorted((f for f in root.glob("*.tar") if f != keep), key=lambda f: f.stat().st_mtime)
    total = sum(f.stat().st_size for f in files)
    for f in files:
        if total + need <= cap:
            return
        lock = f.with_suffix(".fetching")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            size = f.stat().st_size
            f.unlink(missing_ok=True)
            total -= size
        finally:
            os.close(fd)


def local_copy(info: ShardInfo) -> str:
    """A path that can seek: the shard itself, or (URL and ``pipe:`` shards) a copy in the node's cache
    (``cache_root``), fetched once per node: the processes of a node that want the same shard take its lock in
    turn, the first fetches it with webdataset's ``gopen`` and writes it atomically, the others find it there. The
    cache keeps under ``cache_cap_bytes``, evicting the least recently used shards."""
    if info.is_local:
        return info.url
    from webdataset.gopen import gopen

    path = _cache_path(info.url)

    def whole() -> bool:
        return path.is_file() and (info.nbytes < 0 or path.stat().st_size == info.nbytes)

    if whole():
        os.utime(path)  # recently used
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".fetching"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process of this node may be fetching it: wait for it
        if whole():
            os.utime(path)
            return str(path)
        _evict(path.parent, path, max(info.nbytes, 0))
        with atomic_path(path) as tmp:
            with gopen(info.url, "rb", bufsize=1 << 20) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            size = tmp.stat().st_size
            if (
                info.nbytes >= 0 and size != info.nbytes
            ):  # the temporary file goes, the cache keeps no torn shard
                raise ShardError(f"shard {info.url} arrived with {size} bytes, its index says {info.nbytes}")
    finally:
        os.close(fd)
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
        try:
            return parse_sample(blob, url)
        except ShardError as e:
            raise ShardError(f"sample number {i}: {e}") from None

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
        for name, payload, _, _ in tar_members(stream, url):
            stem = sample_key(name)
            if stem is None:
                continue
            if stem != key and current:
                yield make_sample(url, key, current)
                n += 1
                current = {}
            key = stem
            current[name.rpartition("/")[2].partition(".")[2].lower()] = payload
        if current:
            yield make_sample(url, key, current)
            n += 1
    if expected is not None and n != expected:
        raise ShardError(
            f"shard {url} holds {n} samples but its index says {expected}: the file is truncated or was "
            "replaced; re-run the data_prep converter for it"
        )
