"""Robustness evaluation: clean accuracy (TA), PGD accuracy (RA), AutoAttack accuracy (AA), over ranks.

Inside training, ``evaluate`` gives TA and RA on a rank's share of the test split each epoch.

As a command, it evaluates a finished run (its exported ``model.safetensors``) with attacks stronger than the
training one, on the whole test split or a fixed subset, split across ranks:

    deepspeed --num_gpus 2 --module dat_ds.evaluate runs/demo/digits_dat_pgd --autoattack
    python -m dat_ds.evaluate runs/demo/digits_dat_pgd --subset 200 --seed 0 --eps-sweep 0.05,0.1,0.2,0.3

The examples are cut into fixed chunks (``--chunk``); chunk ``c`` goes to rank ``c % world`` and every attack on
it is seeded with ``seed + c``, so the per-example results, and the totals, are the same for any number of
ranks. AutoAttack is its authors' code (``pyautoattack``: APGD-CE, APGD-T, FAB-T, Square, "standard" version),
run per chunk; nothing of it is rewritten here. Rank 0 writes ``eval.json`` and plots into the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .attacks import pgd

log = logging.getLogger("dat_ds")


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
                model, x, y, eps=eps, step_size=step_size, steps=steps, rand_init=True, restarts=restarts
            )
            with torch.no_grad():
                robust = model(x_adv).argmax(1) == y
            counts += torch.stack([torch.tensor(len(y), device=device), clean.sum(), robust.sum()])
    if dist.is_initialized():
        dist.all_reduce(counts)  # int64 sums: exact for any split of the examples
    model.train(was_training)
    n, c, r = counts.tolist()
    return EvalCounts(n, c, r)


# ------------------------------------------------------------------------------------ the evaluation command


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


def progress(what: str, done: int, todo: int, t0: float) -> None:
    """A progress line of a chunked stage: how many of this rank's chunks are done, the time, the time left."""
    el = time.perf_counter() - t0
    print(
        f"{what} | {done}/{todo} of its own to run | {el:.0f} s, about {el / done * (todo - done):.0f} s left",
        flush=True,
    )


def eval_file_name(split: str) -> str:
    """``eval.json`` for the test split (what reports and tables read); ``eval_<split>.json`` for another."""
    return "eval.json" if split == "test" else f"eval_{split}.json"


def result_keys(s: AttackSettings) -> list[str]:
    return (
        ["clean", "pgd", "pgd_short"]
        + (["autoattack"] if s.autoattack else [])
        + (["square"] if s.autoattack and s.square_check else [])
    )


class ChunkParts:
    """Each chunk's per-example results, saved as it finishes, so that an interrupted evaluation (hours of
    AutoAttack on ImageNet) resumes at the next chunk instead of starting over.

    ``RUN_DIR/eval_parts/<tag>/`` holds one JSON file per (radius, chunk), written atomically by the rank that ran
    it; ``tag`` hashes everything the results depend on (the model file's sha256, the attack settings at every
    radius, the examples and the chunking), so a changed model or setting never reuses a stale result. A rank
    reads back only the chunks it would run, so on hosts without a shared filesystem each host resumes its own;
    with another world size a chunk found nowhere is simply run again. The folder is removed once ``eval.json``
    is written."""

    def __init__(
        self,
        run_dir: Path,
        model_file: Path,
        settings: list[AttackSettings],
        wanted: list[int],
        chunk: int,
        split: str = "test",
    ):
        import hashlib

        h = hashlib.sha256()
        with open(model_file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        key = {
            "model_sha256": h.hexdigest(),
            "settings": [st.__dict__ for st in settings],
            "examples": hashlib.sha256(json.dumps(wanted).encode()).hexdigest(),
            "n_examples": len(wanted),
            "chunk": chunk,
            "split": split,
        }
        self.keys = {st.eps: result_keys(st) for st in settings}
        self.dir = (
            run_dir / "eval_parts" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "settings.json").is_file():
            tmp = self.dir / f"settings.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(key, indent=1))
            os.replace(tmp, self.dir / "settings.json")

    def _file(self, eps: float, c: int) -> Path:
        return self.dir / f"eps{eps:g}_chunk{c:06d}.json"

    def load(self, eps: float, c: int, n: int) -> dict[str, torch.Tensor] | None:
        f = self._file(eps, c)
        if not f.is_file():
            return None
        try:
            rec = json.loads(f.read_text())
            out = {k: torch.tensor(rec[k], dtype=torch.bool) for k in self.keys[eps]}
            if any(len(v) != n for v in out.values()):
                raise ValueError(f"{n} examples expected")
        except (ValueError, KeyError, TypeError) as e:
            log.warning("evaluate: ignoring unreadable chunk result %s (%s); running that chunk again", f, e)
            return None
        return out

    def save(self, eps: float, c: int, r: dict[str, torch.Tensor]) -> None:
        f = self._file(eps, c)
        tmp = f.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: v.int().tolist() for k, v in r.items()}))
        os.replace(tmp, f)

    def remove(self, radii: list[float], my_chunks: list[int]) -> None:
        for eps in radii:
            for c in my_chunks:
                self._file(eps, c).unlink(missing_ok=True)
        if dist.is_initialized():
            dist.barrier()
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
            try:
                self.dir.parent.rmdir()  # only when no other evaluation's results are in it
            except OSError:
                pass


def chunk_results(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: AttackSettings, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Per-example correctness (bool tensors) under each attack, for one chunk, on one rank."""
    x, y = x.to(device), y.to(device)
    out = {}
    with torch.no_grad():
        out["clean"] = model(x).argmax(1) == y
    torch.manual_seed(seed)
    x_adv = pgd(model, x, y, eps=s.eps, step_size=s.step, steps=s.pgd_steps, restarts=s.pgd_restarts)
    with torch.no_grad():
        out["pgd"] = model(x_adv).argmax(1) == y
    # Masking check: fewer steps and one restart must not be stronger than the main attack.
    torch.manual_seed(seed)
    short = max(1, s.pgd_steps // 5)
    x_short = pgd(model, x, y, eps=s.eps, step_size=2.5 * s.eps / short, steps=short, restarts=1)
    with torch.no_grad():
        out["pgd_short"] = model(x_short).argmax(1) == y
    if s.autoattack:
        from pyautoattack import AutoAttack

        aa = AutoAttack(model, eps=s.eps, norm="Linf", version="standard", seed=seed, device=device)
        x_aa, _ = aa.run_standard_evaluation(x, y, batch_size=len(x))
        with torch.no_grad():
            out["autoattack"] = model(x_aa).argmax(1) == y
        if s.square_check:
            sq = AutoAttack(
                model, eps=s.eps, norm="Linf", version="custom", attacks=["square"], seed=seed, device=device
            )
            sq.square.n_queries = 5000  # as in the standard suite
            x_sq, _ = sq.run_standard_evaluation(x, y, batch_size=len(x))
            with torch.no_grad():
                out["square"] = model(x_sq).argmax(1) == y
    return {k: v.cpu() for k, v in out.items()}


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
    listing = shards / "test.files.txt" if shards is not None else None
    if listing is None or not listing.is_file():
        raise SystemExit(
            f"--indices {indices_file} names files, but the shard set has no test.files.txt to find them in; "
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
    from .data.shards import read_shard
    from .data.transforms import decode

    need = {wanted[p]: p for p in mine}  # test-split index -> position
    out = {}
    start = 0
    for shard in index.split(split).shards:
        if any(g in need for g in range(start, start + shard.count)):
            for g, s in enumerate(read_shard(shard.url, shard.count), start=start):
                if g in need:
                    out[need[g]] = (
                        decode(
                            s.image,
                            channels=index.channels,
                            augment=augment,
                            train=False,
                            image_size=image_size,
                            rng=None,
                        ),
                        s.label,
                    )
        start += shard.count
    return out


def run_evaluation(
    run_dir: Path,
    s: AttackSettings,
    *,
    n: int,
    indices_file: Path | None,
    chunk: int,
    eps_sweep: list[float],
    model_file: Path | None,
    sweep_autoattack: bool = False,
    split: str = "test",
) -> dict:
    from .data.shards import load_index
    from .export import load_exported
    from .models import inference_model

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    path = model_file or run_dir / "model.safetensors"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: evaluate a finished run (training exports it at the end)")
    model, meta = load_exported(path, device)
    # BatchNorm folded into the convolutions and channels-last memory: the same function up to rounding (logits
    # within ~1e-7 on dat_mnist_cnn), 2.4x faster forwards and 1.5x faster forward+backward on this CPU.
    model = inference_model(model)
    cfg = json.loads(meta["config"])
    index = load_index(cfg["data"]["shards"])
    if split not in index.splits:
        raise SystemExit(
            f"--split {split}: {cfg['data']['shards']} has the splits {sorted(index.splits)} (a validation split "
            "comes from: python -m data_prep.holdout SRC OUT --n N, and training on OUT)"
        )
    total = index.split(split).count
    wanted = select_indices(total, n, s.seed, indices_file, Path(cfg["data"]["shards"]))
    chunks = [list(range(i, min(i + chunk, len(wanted)))) for i in range(0, len(wanted), chunk)]
    my_chunks = [c for c in range(len(chunks)) if c % world == rank]
    radii = [s.eps, *[e for e in eps_sweep if e != s.eps]]

    def settings_at(eps: float) -> AttackSettings:
        # The sweep's other radii get clean and PGD only, unless --sweep-autoattack asks for AutoAttack too.
        full = eps == s.eps or sweep_autoattack
        return AttackSettings(
            **{
                **s.__dict__,
                "eps": eps,
                "autoattack": s.autoattack and full,
                "square_check": s.square_check and eps == s.eps,
            }
        )

    parts = ChunkParts(run_dir, path, [settings_at(e) for e in radii], wanted, chunk, split)
    todo = {(e, c) for e in radii for c in my_chunks if parts.load(e, c, len(chunks[c])) is None}
    data = load_examples(
        index,
        wanted,
        {p for _, c in todo for p in chunks[c]},
        cfg["data"]["augment"],
        cfg["data"]["image_size"] or index.image_size,
        split,
    )
    if rank == 0 and len(todo) < len(radii) * len(my_chunks):
        print(
            f"evaluate: resuming, {len(radii) * len(my_chunks) - len(todo)} of rank 0's "
            f"{len(radii) * len(my_chunks)} chunk results found in {parts.dir}",
            flush=True,
        )

    results: dict[float, dict[str, torch.Tensor]] = {}
    t0 = time.perf_counter()
    done = 0
    for eps in radii:
        se = settings_at(eps)
        flags = {}
        for c in my_chunks:
            r = parts.load(eps, c, len(chunks[c]))
            if r is None:
                x = torch.stack([data[p][0] for p in chunks[c]]).float().div_(255)
                y = torch.tensor([data[p][1] for p in chunks[c]])
                r = chunk_results(model, x, y, se, s.seed + c, device)
                parts.save(eps, c, r)
                done += 1
                if rank == 0:
                    progress(f"evaluate: rank 0 eps {eps:g} chunk {c}", done, len(todo), t0)
            for k, v in r.items():
                flags.setdefault(k, torch.zeros(len(wanted), dtype=torch.int64))[chunks[c]] = v.long()
        # Every rank fills its own chunks; a sum over ranks assembles the per-example table.
        keys = result_keys(se)
        table = torch.stack([flags.get(k, torch.zeros(len(wanted), dtype=torch.int64)) for k in keys])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                table = table.cuda()
            dist.all_reduce(table)
        results[eps] = {k: table[i].cpu().bool() for i, k in enumerate(keys)}
    seconds = time.perf_counter() - t0
    resumed = torch.tensor([len(radii) * len(my_chunks) - len(todo)])
    if dist.is_initialized():
        resumed = resumed.cuda() if dist.get_backend() == "nccl" else resumed
        dist.all_reduce(resumed)

    main_res = results[s.eps]
    acc = {k: v.float().mean().item() for k, v in main_res.items()}
    report = {
        "clean_acc": acc["clean"],
        "pgd_acc": acc["pgd"],
        "autoattack_acc": acc.get("autoattack"),
        "pgd_short_acc": acc["pgd_short"],
        "square_acc": acc.get("square"),
        "n_examples": len(wanted),
        "split": split,
        "world_size": world,
        "eval_time_s": seconds,  # this process's run: chunks found done are not counted
        "chunks_resumed": int(resumed.item()),
        "attacks": {
            "norm": "Linf",
            "eps": s.eps,
            "pgd_steps": s.pgd_steps,
            "pgd_step_size": s.step,
            "pgd_restarts": s.pgd_restarts,
            "pgd_short_steps": max(1, s.pgd_steps // 5),
            "autoattack": "pyautoattack standard (apgd-ce, apgd-t, fab-t, square)" if s.autoattack else None,
            "seed": s.seed,
            "chunk": chunk,
        },
        "subset": {
            "n": n,
            "seed": s.seed,
            "indices_file": str(indices_file) if indices_file else None,
            "indices": wanted if indices_file else None,
        },
        "per_eps": {
            str(e): {k: v.float().mean().item() for k, v in r.items()} for e, r in sorted(results.items())
        },
        "flags": sanity_flags(acc, len(wanted)),
        "model": str(path),
    }
    if rank == 0:
        name = eval_file_name(split)
        tmp = run_dir / f"{name}.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, run_dir / name)
        from .plots import plot_acc_vs_eps, plot_curves

        if split == "test":
            plot_curves(run_dir)
            if len(results) > 1:
                plot_acc_vs_eps(run_dir, report["per_eps"])
    if dist.is_initialized():
        dist.barrier()  # eval.json is written: the chunk results are no longer needed
    parts.remove(radii, my_chunks)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--model", type=Path, default=None, help="a safetensors export (default: RUN_DIR/model.safetensors)"
    )
    p.add_argument("--eps", type=float, default=None, help="l-inf radius (default: the run's attack.eps)")
    p.add_argument("--pgd-steps", type=int, default=50)
    p.add_argument("--pgd-step-size", type=float, default=0.0)
    p.add_argument("--pgd-restarts", type=int, default=5)
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--no-square-check", action="store_true")
    # Not "--n": the deepspeed launcher reads abbreviations of its own options (--num_gpus...) among the script's.
    p.add_argument(
        "--subset", type=int, default=0, help="evaluate a random subset of N test examples (0: all)"
    )
    p.add_argument(
        "--indices",
        type=Path,
        default=None,
        help="file of test-split indices, or of file names (RobustBench's ImageNet list), to evaluate",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--split",
        default="test",
        help="the split to evaluate: test (eval.json), or val from data_prep.holdout (eval_val.json)",
    )
    p.add_argument("--chunk", type=int, default=100, help="examples per chunk (the unit of work and seeding)")
    p.add_argument("--eps-sweep", default="", help="comma-separated extra radii for the accuracy-vs-eps plot")
    p.add_argument(
        "--sweep-autoattack", action="store_true", help="run AutoAttack at every radius of the sweep"
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not (a.run_dir / "config.json").is_file():
        print(f"dat-ds: error: {a.run_dir} is not a dat-ds run folder (no config.json)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True)
    eps = a.eps if a.eps is not None else json.loads((a.run_dir / "config.json").read_text())["attack"]["eps"]
    s = AttackSettings(
        eps=eps,
        pgd_steps=a.pgd_steps,
        pgd_step_size=a.pgd_step_size,
        pgd_restarts=a.pgd_restarts,
        autoattack=not a.no_autoattack,
        square_check=not a.no_square_check,
        seed=a.seed,
    )
    sweep = [float(v) for v in a.eps_sweep.split(",") if v.strip()]
    from .engine import start_stage

    start_stage(6 * 3600)  # hours: ranks wait for the slowest one's chunks
    report = run_evaluation(
        a.run_dir,
        s,
        n=a.subset,
        indices_file=a.indices,
        chunk=a.chunk,
        eps_sweep=sweep,
        model_file=a.model,
        sweep_autoattack=a.sweep_autoattack,
        split=a.split,
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        aa = report["autoattack_acc"]
        print(
            f"TA {100 * report['clean_acc']:.2f}  RA (PGD-{s.pgd_steps}x{s.pgd_restarts}) "
            f"{100 * report['pgd_acc']:.2f}  AA {'-' if aa is None else f'{100 * aa:.2f}'}  "
            f"n={report['n_examples']}  ranks={report['world_size']}  {report['eval_time_s']:.1f}s"
        )
        for f in report["flags"]:
            print(f"WARNING: {f}")
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
