"""Robust evaluation, the library floor under training and the commands: TA, RA (PGD) and AA (AutoAttack).

- ``evaluate``: TA and RA on a rank's share of a split, summed over ranks: the per-epoch monitor of training;
- ``chunk_results``: per-example correctness under each attack for one chunk of examples (``dat_ds.evaluate`` runs
  it over ranks through ``dat_ds.stage``); PGD's random starts are drawn for the whole chunk from a generator seeded
  by the chunk, so the results do not depend on ``batch`` (how many examples go through the network at once);
  AutoAttack is its authors' code (``pyautoattack``), nothing of it rewritten here;
- ``sanity_flags``: the warnings a careful evaluator raises (AA above PGD, gradient masking);
- ``select_indices`` and ``load_examples``: which examples, and their decoded pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .attacks import pgd
from .data.shards import TEST_FILES


@dataclass
class EvalCounts:
    n: int
    clean_correct: int
    pgd_correct: int

    def acc(self) -> tuple[float, float]:
        return self.clean_correct / max(self.n, 1), self.pgd_correct / max(self.n, 1)


def to_input(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW from the loader -> float [0,1] on the device."""
    x = x.to(device, non_blocking=True).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def evaluate(
    model: nn.Module,
    loader,
    *,
    eps: float,
    steps: int,
    step_size: float,
    restarts: int,
    device: torch.device,
    channels_last: bool = False,
    seed: int = 0,
    start_in_box: bool = True,
) -> EvalCounts:
    """TA and RA on this rank's share; collective when a process group exists (one all_reduce of 3 counters).

    The attack's random starts come from a generator seeded by ``seed``, forked from the global one: evaluating
    (or changing the evaluation settings of a resumed run) never shifts the training's random stream."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for x, y in loader:
            x, y = to_input(x, device, channels_last), y.to(device, non_blocking=True)
            with torch.no_grad():
                clean = model(x).argmax(1) == y
            x_adv = pgd(
                model,
                x,
                y,
                eps=eps,
                step_size=step_size,
                steps=steps,
                rand_init=True,
                restarts=restarts,
                start_in_box=start_in_box,
            )
            with torch.no_grad():
                robust = model(x_adv).argmax(1) == y
            counts += torch.stack([torch.tensor(len(y), device=device), clean.sum(), robust.sum()])
    if dist.is_initialized():
        dist.all_reduce(counts)  # int64 sums: exact for any split of the examples
    model.train(was_training)
    n, c, r = counts.tolist()
    return EvalCounts(n, c, r)


@dataclass(frozen=True)
class AttackSettings:
    eps: float
    pgd_steps: int = 50
    pgd_step_size: float = 0.0  # 0: 2.5 * eps / steps
    pgd_restarts: int = 5
    autoattack: bool = True
    square_check: bool = True  # run Square alone as a gradient-masking check
    seed: int = 0

    @property
    def step(self) -> float:
        return self.pgd_step_size or 2.5 * self.eps / self.pgd_steps


def result_keys(s: AttackSettings) -> list[str]:
    return (
        ["clean", "pgd", "pgd_short"]
        + (["autoattack"] if s.autoattack else [])
        + (["square"] if s.autoattack and s.square_check else [])
    )


def chunk_results(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    s: AttackSettings,
    seed: int,
    device: torch.device,
    batch: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-example correctness (bool tensors) under each attack, for one chunk, on one rank, ``batch`` examples at a
    time (0: the whole chunk). PGD's random starts are drawn first, for the whole chunk, from the global generator
    seeded by ``seed``: the same draws whatever ``batch`` is."""
    x, y = x.to(device), y.to(device)
    n = len(x)
    batch = batch or n
    short = max(1, s.pgd_steps // 5)
    torch.manual_seed(seed)
    starts = torch.stack([torch.empty_like(x).uniform_(-s.eps, s.eps) for _ in range(s.pgd_restarts)])
    torch.manual_seed(seed)  # the masking check: fewer steps and one restart, from the first start
    short_starts = torch.empty_like(x).uniform_(-s.eps, s.eps)[None]
    out: dict[str, list[torch.Tensor]] = {"clean": [], "pgd": [], "pgd_short": []}
    for b in range(0, n, batch):
        xb, yb = x[b : b + batch], y[b : b + batch]
        with torch.no_grad():
            out["clean"].append(model(xb).argmax(1) == yb)
        x_adv = pgd(model, xb, yb, eps=s.eps, step_size=s.step, steps=s.pgd_steps, restarts=s.pgd_restarts,
                    starts=starts[:, b : b + batch])  # fmt: skip
        with torch.no_grad():
            out["pgd"].append(model(x_adv).argmax(1) == yb)
        # Masking check: fewer steps and one restart must not be stronger than the main attack.
        x_short = pgd(model, xb, yb, eps=s.eps, step_size=2.5 * s.eps / short, steps=short, restarts=1,
                      starts=short_starts[:, b : b + batch])  # fmt: skip
        with torch.no_grad():
            out["pgd_short"].append(model(x_short).argmax(1) == yb)
    res = {k: torch.cat(v) for k, v in out.items()}
    if s.autoattack:
        import logging

        from pyautoattack import AutoAttack

        if dist.is_initialized() and dist.get_rank() != 0:  # AutoAttack's progress lines from rank 0 only
            logging.getLogger("pyautoattack").setLevel(logging.WARNING)
        aa = AutoAttack(model, eps=s.eps, norm="Linf", version="standard", seed=seed, device=device)
        x_aa, _ = aa.run_standard_evaluation(x, y, batch_size=batch)
        with torch.no_grad():
            res["autoattack"] = (
                torch.cat([model(x_aa[b : b + batch]).argmax(1) for b in range(0, n, batch)]) == y
            )
        if s.square_check:
            sq = AutoAttack(
                model, eps=s.eps, norm="Linf", version="custom", attacks=["square"], seed=seed, device=device
            )
            sq.square.n_queries = 5000  # as in the standard suite
            x_sq, _ = sq.run_standard_evaluation(x, y, batch_size=batch)
            with torch.no_grad():
                res["square"] = (
                    torch.cat([model(x_sq[b : b + batch]).argmax(1) for b in range(0, n, batch)]) == y
                )
    return {k: v.cpu() for k, v in res.items()}


def sanity_flags(acc: dict[str, float], n: int) -> list[str]:
    """Warnings a careful evaluator raises; noise is two binomial standard errors."""
    flags = []

    def se(p: float) -> float:
        return 2 * math.sqrt(max(p * (1 - p), 1 / n) / n)

    if "autoattack" in acc and acc["autoattack"] > acc["pgd"] + se(acc["pgd"]):
        flags.append(
            f"AutoAttack accuracy {acc['autoattack']:.4f} is above PGD accuracy {acc['pgd']:.4f} beyond "
            "sampling noise: AutoAttack is the stronger attack, so the evaluation is suspect"
        )
    if acc["pgd"] > acc["pgd_short"] + se(acc["pgd_short"]):
        flags.append(
            f"PGD accuracy rose with more steps/restarts ({acc['pgd_short']:.4f} -> {acc['pgd']:.4f}): "
            "a sign of gradient masking"
        )
    if "square" in acc and acc["square"] < acc["pgd"] - se(acc["pgd"]):
        flags.append(
            f"black-box Square ({acc['square']:.4f}) beats white-box PGD ({acc['pgd']:.4f}): a sign of "
            "gradient masking"
        )
    if acc["pgd"] > acc["clean"]:
        flags.append("PGD accuracy above clean accuracy: the attack is not working")
    return flags


def select_indices(
    total: int, n: int, seed: int, indices_file: Path | None, shards: Path | None = None
) -> list[int]:
    """The test-split positions to evaluate: those of ``indices_file`` (integers, or file names as RobustBench
    lists its ImageNet subset, matched by base name against the shard set's ``test.files.txt``), else a seeded
    random subset of ``n``, else all."""
    if indices_file is not None:
        if not indices_file.is_file():
            raise SystemExit(f"--indices {indices_file} does not exist")
        tokens = indices_file.read_text().split()
        if all(t.lstrip("-").isdigit() for t in tokens):
            idx = [int(t) for t in tokens]
        else:
            idx = _indices_of_files(tokens, indices_file, shards)
        bad = [i for i in idx if not 0 <= i < total]
        if bad:
            raise SystemExit(f"{indices_file}: indices {bad[:5]} are outside the test split (0..{total - 1})")
        return sorted(set(idx))
    if n and n < total:
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(total, generator=g)[:n].tolist())
    return list(range(total))


def _indices_of_files(names: list[str], indices_file: Path, shards: Path | None) -> list[int]:
    listing = shards / TEST_FILES if shards is not None else None
    if listing is None or not listing.is_file():
        raise SystemExit(
            f"--indices {indices_file} names files, but the shard set has no {TEST_FILES} to find them in; "
            "re-run data_prep.imagenet on the tree (it skips complete shards), or pass integer indices"
        )
    where = {Path(line).name: i for i, line in enumerate(listing.read_text().split())}
    missing = [nm for nm in names if Path(nm).name not in where]
    if missing:
        raise SystemExit(
            f"--indices {indices_file}: {len(missing)} of {len(names)} files are not in the test split, e.g. "
            f"{missing[:3]}"
        )
    return [where[Path(nm).name] for nm in names]


def load_examples(
    index, wanted: list[int], mine: set[int], augment: str, image_size: int, split: str = "test"
):
    """Decode the examples of ``split`` at positions ``mine`` of ``wanted``; returns {position: (x uint8, y)}."""
    from .data.shards import ShardError, read_shard
    from .data.transforms import decode

    need = {wanted[p]: p for p in mine}  # test-split index -> position
    out = {}
    start = 0
    for shard in index.split(split).shards:
        if any(g in need for g in range(start, start + shard.count)):
            for g, s in enumerate(read_shard(shard.url, shard.count), start=start):
                if g in need:
                    try:
                        x = decode(s.image, channels=index.channels, augment=augment, train=False,
                                   image_size=image_size, rng=None)  # fmt: skip
                    except (
                        OSError,
                        ValueError,
                        SyntaxError,
                    ) as e:  # PIL's errors for bytes that are no image
                        raise ShardError(
                            f"sample {s.key} (number {g} of the {split} split) of shard {shard.url}: cannot decode "
                            f"its image ({type(e).__name__}: {e}); replace the shard, or leave the example out "
                            "with --indices"
                        ) from None
                    out[need[g]] = (x, s.label)
        start += shard.count
    return out
