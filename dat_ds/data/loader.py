"""Deterministic shard streams: every rank gets exactly the same number of batches, for any world size.

Training, per epoch:
  1. the shard list is shuffled by (seed, epoch);
  2. it is dealt to ``world * workers`` slots (rank-major), so every slot reads its own shards;
  3. each slot streams its shards (cycling, reshuffled each cycle, if it runs short) through a sample shuffle
     buffer seeded by (seed, epoch, slot), and stops at exactly its quota of micro-batches;
  4. a resumed run skips its first ``skip`` micro-batches as raw bytes, before any decoding.
Worker ``w`` of a rank makes micro-batches ``b`` with ``b % workers == w``; the DataLoader returns them round-robin,
so the rank's stream is the same with a resume in between (see the rotation in ``TrainStream.__iter__``).

Evaluation reads each test sample exactly once across ranks (split by shard when there are enough shards, else by
sample); ranks may get different counts, and metrics are reduced as sums.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import ShardIndex, ShardInfo, read_shard
from .transforms import Augment, decode


@dataclass(frozen=True)
class StreamSpec:
    """What one rank reads in one epoch."""

    shards: tuple[ShardInfo, ...]
    channels: int
    augment: Augment
    image_size: int
    micro_batch: int
    batches: int  # micro-batches this rank yields this epoch
    rank: int
    world: int
    seed: int
    epoch: int
    skip: int = 0  # micro-batches already consumed (resume)
    shuffle_buffer: int = 1000
    workers: int = 0


def batches_per_epoch(n_samples: int, global_batch: int) -> int:
    """Optimizer steps per epoch: every full global batch the split holds (the remainder is dropped)."""
    steps = n_samples // global_batch
    if steps < 1:
        raise ValueError(
            f"the training split has {n_samples} samples, fewer than one global batch of {global_batch}; "
            "lower train.global_batch_size"
        )
    return steps


def _slot_shards(
    shards: tuple[ShardInfo, ...], slot: int, n_slots: int, rng: random.Random
) -> list[ShardInfo]:
    order = list(shards)
    rng.shuffle(order)
    mine = order[slot::n_slots]
    # Fewer shards than slots: share one (samples repeat across slots; the data_prep converters make enough
    # shards for the world sizes they are meant for).
    return mine or [order[slot % len(order)]]


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples], dtype=torch.long)


def _batched(
    pairs: Iterator[tuple[torch.Tensor, int]], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Collate (image, label) pairs into batches of ``size``; a last short batch is yielded too."""
    batch: list = []
    for pair in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield _collate(batch)
            batch = []
    if batch:
        yield _collate(batch)


class TrainStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def _raw_samples(self, slot: int, n_slots: int) -> Iterator:
        s = self.spec
        rng = random.Random(hash((s.seed, s.epoch, slot, 0x5EED)))
        shards = _slot_shards(s.shards, slot, n_slots, random.Random(hash((s.seed, s.epoch))))
        buf: list = []
        for cycle in itertools.count():
            order = list(shards)
            if cycle:
                rng.shuffle(order)
            for shard in order:
                for sample in read_shard(shard.url, shard.count):
                    if len(buf) < s.shuffle_buffer:
                        buf.append(sample)
                        continue
                    i = rng.randrange(len(buf))
                    buf[i], sample = sample, buf[i]
                    yield sample
            # End of a cycle: drain the buffer so a slot with few samples still moves on.
            rng.shuffle(buf)
            yield from buf
            buf = []

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.spec
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # The DataLoader asks workers round-robin starting at worker 0; after skipping ``skip`` batches the next
        # batch belongs to logical worker ``skip % n_workers``, so worker ids are rotated by ``skip``.
        worker = (worker + s.skip) % n_workers
        slot, n_slots = s.rank * n_workers + worker, s.world * n_workers
        mine = range(worker, s.batches, n_workers)  # this worker's micro-batch numbers
        skip = len(range(worker, min(s.skip, s.batches), n_workers))
        need = (len(mine) - skip) * s.micro_batch
        raw = itertools.islice(self._raw_samples(slot, n_slots), skip * s.micro_batch, None)
        samples = itertools.islice(raw, need)
        yield from _batched(
            (
                (self._decode(sample, random.Random(hash((s.seed, s.epoch, slot, pos)))), sample.label)
                for pos, sample in enumerate(samples, start=skip * s.micro_batch)
            ),
            s.micro_batch,
        )

    def _decode(self, sample, rng: random.Random) -> torch.Tensor:
        s = self.spec
        return decode(
            sample.image, channels=s.channels, augment=s.augment, train=True, image_size=s.image_size, rng=rng
        )


class EvalStream(IterableDataset):
    def __init__(
        self,
        index: ShardIndex,
        split: str,
        *,
        rank: int,
        world: int,
        augment: Augment,
        image_size: int,
        batch_size: int,
        limit: int = 0,
    ):
        super().__init__()
        self.shards = index.split(split).shards
        self.channels = index.channels
        self.rank, self.world = rank, world
        self.augment, self.image_size, self.batch_size, self.limit = augment, image_size, batch_size, limit

    def _mine(self) -> Iterator:
        by_shard = len(self.shards) >= self.world
        offset = 0
        for i, shard in enumerate(self.shards):
            start = offset
            offset += shard.count
            if self.limit and start >= self.limit:
                break
            if by_shard and i % self.world != self.rank:
                continue
            for j, sample in enumerate(read_shard(shard.url, shard.count)):
                g = start + j
                if self.limit and g >= self.limit:
                    break
                if by_shard or g % self.world == self.rank:
                    yield sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from _batched(
            (
                (
                    decode(
                        sample.image,
                        channels=self.channels,
                        augment=self.augment,
                        train=False,
                        image_size=self.image_size,
                        rng=None,
                    ),
                    sample.label,
                )
                for sample in self._mine()
            ),
            self.batch_size,
        )


def _own_generator() -> torch.Generator:
    # A DataLoader draws its workers' base seed from the global torch RNG unless given a generator; that draw
    # would shift the attack's noise in a resumed run. Our streams seed themselves, so a fixed one will do.
    return torch.Generator().manual_seed(0)


def make_train_loader(spec: StreamSpec, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        TrainStream(spec),
        batch_size=None,
        generator=_own_generator(),
        num_workers=spec.workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if spec.workers else None,
        persistent_workers=False,
    )


def make_eval_loader(
    index: ShardIndex,
    split: str,
    *,
    rank: int,
    world: int,
    augment: Augment,
    image_size: int,
    batch_size: int,
    limit: int = 0,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    ds = EvalStream(
        index,
        split,
        rank=rank,
        world=world,
        augment=augment,
        image_size=image_size,
        batch_size=batch_size,
        limit=limit,
    )
    # One worker: the eval stream is not split across workers (it is small next to training).
    return DataLoader(
        ds, batch_size=None, num_workers=min(workers, 1), pin_memory=pin_memory, generator=_own_generator()
    )
