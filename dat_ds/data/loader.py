"""Deterministic sample streams: every sample once per epoch, equal batches on every rank, for any world size.

Training, per epoch (``epoch_order`` and ``micro_batch_ids`` hold all of it, without reading any data):
  1. the split's sample numbers 0..N-1 are permuted by (seed, epoch): one global order, like a
     ``DistributedSampler`` over the whole split;
  2. optimizer step ``s`` takes the global batch ``order[s*G:(s+1)*G]``; rank ``r`` takes its contiguous share of
     it, ``accum`` micro-batches of ``micro`` samples. The last ``N mod G`` samples of the order are dropped, so each
     epoch visits every sample exactly once except fewer than one global batch, and the global batch of a step
     does not depend on how it is split over ranks;
  3. samples are read by number through the split's member table (one seek and one read each), so where a sample
     sits in which shard no longer decides who reads it or when;
  4. a resumed run starts at micro-batch ``skip``: nothing before it is read.
Worker ``w`` of a rank makes micro-batches ``b`` with ``b % workers == w``; the DataLoader returns them round-robin,
so a rank's stream is identical with any number of workers, and with a resume in between (see the rotation in
``TrainStream.__iter__``). Augmentation draws from an RNG seeded by (seed, epoch, sample number): the same crop
whoever decodes the sample.

A second, pseudo-labelled stream (semi-supervised training, ``PairedLoader``) follows the same rules with
``cycle=True``: it fills a fixed share of every micro-batch, runs on epochs of its own (a permutation of its whole
split per pass, every sample once per pass) and is positioned by the global step, so it too is identical for any
number of workers and across a resume, while the labeled set defines the epoch.

Evaluation reads each test sample exactly once across ranks (split by shard when there are enough shards, else by
sample); ranks may get different counts, and metrics are reduced as sums.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import SampleReader, ShardError, ShardIndex, Split, read_shard
from .transforms import Augment, decode


@dataclass(frozen=True)
class StreamSpec:
    """What one rank reads in one epoch."""

    split: Split
    channels: int
    augment: Augment
    image_size: int
    micro_batch: int
    batches: int  # micro-batches this rank yields this epoch (steps x accumulation)
    rank: int
    world: int
    seed: int
    epoch: int
    skip: int = 0  # micro-batches already consumed (resume)
    workers: int = 0
    accum: int = 1  # micro-batches per rank per optimizer step
    on_bad_sample: str = "fail"  # or "skip": an undecodable image becomes a zero image labelled IGNORE
    # A second (unlabeled) stream runs on its own epochs: micro-batch b of this labeled epoch is global step
    # ``step_offset + b // accum`` of a stream whose epochs are ``count // (micro * world * accum)`` steps long.
    cycle: bool = False
    step_offset: int = 0
    # A pooled split (``shards.pooled_split``): sample numbers below ``pool_first`` come from the labeled set.
    # Each micro-batch then puts those first and yields (x, y, n_labeled), for per-source metrics.
    pool_first: int = 0


IGNORE = -100  # the label of a skipped sample: cross_entropy's ignore_index, so it adds nothing to a loss


def batches_per_epoch(n_samples: int, global_batch: int) -> int:
    """Optimizer steps per epoch: every full global batch the split holds (the remainder is dropped)."""
    steps = n_samples // global_batch
    if steps < 1:
        raise ValueError(
            f"the training split has {n_samples} samples, fewer than one global batch of {global_batch}; "
            "lower train.global_batch_size"
        )
    return steps


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global order of sample numbers: the same on every rank and worker."""
    return np.random.Generator(np.random.PCG64([seed, epoch, 0x5EED])).permutation(n)


def micro_batch_ids(
    order: np.ndarray, b: int, *, rank: int, world: int, micro: int, accum: int
) -> np.ndarray:
    """Sample numbers of rank ``rank``'s micro-batch ``b`` (step ``b // accum``, micro-step ``b % accum``)."""
    step, m = divmod(b, accum)
    start = (step * world + rank) * accum * micro + m * micro
    return order[start : start + micro]


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


def worker_batches(spec: StreamSpec, worker: int, n_workers: int) -> range:
    """The micro-batch numbers that DataLoader worker ``worker`` (of ``n_workers``) makes, in order.

    The DataLoader asks workers round-robin starting at worker 0; after skipping ``skip`` batches the next batch
    belongs to logical worker ``skip % n_workers``, so worker ids are rotated by ``skip``."""
    logical = (worker + spec.skip) % n_workers
    first = spec.skip + (logical - spec.skip) % n_workers
    return range(first, spec.batches, n_workers)


def cycle_position(spec: StreamSpec, b: int) -> tuple[int, int]:
    """(epoch of the cycled stream, micro-batch number within it) of this epoch's micro-batch ``b``."""
    per_epoch = spec.split.count // (spec.micro_batch * spec.world * spec.accum)  # steps in one of its epochs
    step, m = divmod(b, spec.accum)
    epoch, within = divmod(spec.step_offset + step, per_epoch)
    return epoch, within * spec.accum + m


class TrainStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        needed = spec.batches // spec.accum * spec.accum * spec.micro_batch * spec.world
        if spec.cycle:  # one step's worth is enough: the stream wraps into its next epoch
            needed = spec.accum * spec.micro_batch * spec.world
        if spec.batches % spec.accum or needed > spec.split.count:
            raise ValueError(
                f"{spec.batches} micro-batches of {spec.micro_batch} x {spec.world} ranks (accumulation "
                f"{spec.accum}) need {needed} samples; the split has {spec.split.count}"
            )
        self.spec = spec

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.spec
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        orders: dict[int, np.ndarray] = {}
        reader = SampleReader(s.split)
        try:
            for b in worker_batches(s, worker, n_workers):
                epoch, within = cycle_position(s, b) if s.cycle else (s.epoch, b)
                if epoch not in orders:
                    orders.clear()
                    orders[epoch] = epoch_order(s.split.count, s.seed, epoch)
                ids = micro_batch_ids(
                    orders[epoch], within, rank=s.rank, world=s.world, micro=s.micro_batch, accum=s.accum
                )
                yield self._batch(reader, ids, b, epoch)
        finally:
            reader.close()

    def _batch(
        self, reader: SampleReader, ids: np.ndarray, b: int, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one micro-batch. A skipped sample keeps its place (every batch has the same size on every rank)
        as a zero image with the label ``IGNORE``, which losses and accuracies leave out."""
        first = self.spec.pool_first
        if first:  # labeled samples first: the order inside a micro-batch changes nothing it computes
            ids = ids[np.argsort(ids >= first, kind="stable")]
        pairs = [self._load(reader, int(i), epoch) for i in ids]
        good = [p for p in pairs if p is not None]
        if not good:
            raise ShardError(
                f"every sample of micro-batch {b} (sample numbers {ids.tolist()}) is undecodable"
            )
        blank = torch.zeros_like(good[0][0])
        x, y = _collate([p if p is not None else (blank, IGNORE) for p in pairs])
        return (x, y, int((ids < first).sum())) if first else (x, y)

    def _load(self, reader: SampleReader, i: int, epoch: int) -> tuple[torch.Tensor, int] | None:
        s = self.spec
        sample = reader[i]
        rng = random.Random(hash((s.seed, epoch, i)))
        try:
            x = decode(
                sample.image,
                channels=s.channels,
                augment=s.augment,
                train=True,
                image_size=s.image_size,
                rng=rng,
            )
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for bytes that are no image
            if s.on_bad_sample == "skip":
                return None
            raise ShardError(
                f"sample {sample.key} (number {i}) of shard {reader.url_of(i)}: cannot decode its image "
                f'({type(e).__name__}: {e}); replace the shard, or set data.on_bad_sample = "skip" to train '
                "without such samples (counted in metrics.jsonl)"
            ) from None
        return x, sample.label


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
        on_bad_sample: str = "fail",
    ):
        super().__init__()
        self.split = split
        self.shards = index.split(split).shards
        self.channels = index.channels
        self.rank, self.world = rank, world
        self.augment, self.image_size, self.batch_size, self.limit = augment, image_size, batch_size, limit
        self.on_bad_sample = on_bad_sample

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
                    yield g, shard.url, sample

    def _decoded(self) -> Iterator[tuple[torch.Tensor, int]]:
        """The rank's samples decoded; an undecodable one stops with its name (``data.on_bad_sample = "fail"``)
        or is left out of the counts (``"skip"``), as in training."""
        for g, url, sample in self._mine():
            try:
                x = decode(sample.image, channels=self.channels, augment=self.augment, train=False,
                           image_size=self.image_size, rng=None)  # fmt: skip
            except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for bytes that are no image
                if self.on_bad_sample == "skip":
                    continue
                raise ShardError(
                    f"sample {sample.key} (number {g} of the {self.split} split) of shard {url}: cannot decode its "
                    f'image ({type(e).__name__}: {e}); replace the shard, or set data.on_bad_sample = "skip" to '
                    "leave such samples out"
                ) from None
            yield x, sample.label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from _batched(self._decoded(), self.batch_size)

    def check(self) -> int:
        """Decode this rank's share once, without a model: a bad sample is found before any training (the
        number of samples it holds is returned)."""
        return sum(1 for _ in self._decoded())


def _own_generator() -> torch.Generator:
    # A DataLoader draws its workers' base seed from the global torch RNG unless given a generator; that draw
    # would shift the attack's noise in a resumed run. Our streams seed themselves, so a fixed one will do.
    return torch.Generator().manual_seed(0)


class PairedLoader:
    """Two streams, one micro-batch: ``labeled`` samples first, then ``unlabeled`` (pseudo-labelled) ones. Yields
    (x, y, n_labeled). Both streams yield the same number of micro-batches (the labeled epoch's), so every rank
    gets the same number of steps and exactly the same split of each micro-batch."""

    def __init__(self, labeled: StreamSpec, unlabeled: StreamSpec, pin_memory: bool = False):
        assert labeled.batches == unlabeled.batches and labeled.skip == unlabeled.skip
        self.a = make_train_loader(labeled, pin_memory)
        self.b = make_train_loader(unlabeled, pin_memory)
        self.n = labeled.micro_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for (xa, ya), (xb, yb) in zip(self.a, self.b, strict=True):
            yield torch.cat([xa, xb]), torch.cat([ya, yb]), self.n


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
    on_bad_sample: str = "fail",
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
        on_bad_sample=on_bad_sample,
    )
    # One worker: the eval stream is not split across workers (it is small next to training).
    return DataLoader(
        ds, batch_size=None, num_workers=min(workers, 1), pin_memory=pin_memory, generator=_own_generator()
    )
