"""The shard format's front door: webdataset tars plus one ``index.json`` per shard set.

It re-exports the three modules that implement it, each one idea: ``tar`` (the tar layout of a sample, written and
parsed), ``index`` (the index, the member tables, writing and loading a shard set), ``reader`` (reading samples by
number or a whole shard, and the cache for shards given by URL). Code outside ``dat_ds/data`` imports from here.
"""

from __future__ import annotations

from .index import (
    FORMAT,
    INDEX_NAME,
    M_END,
    M_LABEL,
    M_SHARD,
    M_START,
    MEMBERS_SUFFIX,
    TEST_FILES,
    ShardIndex,
    ShardInfo,
    Split,
    build_members,
    has_index,
    load_index,
    pooled_split,
    scan_members,
    write_index,
    write_split,
)
from .reader import SampleReader, local_copy, read_shard
from .tar import Sample, ShardError, parse_sample, write_tar

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "M_END",
    "M_LABEL",
    "M_SHARD",
    "M_START",
    "MEMBERS_SUFFIX",
    "TEST_FILES",
    "Sample",
    "SampleReader",
    "ShardError",
    "ShardIndex",
    "ShardInfo",
    "Split",
    "build_members",
    "has_index",
    "load_index",
    "local_copy",
    "parse_sample",
    "pooled_split",
    "read_shard",
    "scan_members",
    "write_index",
    "write_split",
    "write_tar",
]
