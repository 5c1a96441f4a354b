"""Evaluate a finished run: clean accuracy (TA), PGD accuracy (RA), AutoAttack accuracy (AA), over ranks.

    deepspeed --num_gpus 2 --module dat_ds.evaluate runs/demo/digits_dat_pgd
    python -m dat_ds.evaluate runs/demo/digits_dat_pgd --subset 200 --seed 0 --eps-sweep 0.05,0.1,0.2,0.3

It evaluates the run's exported ``model.safetensors`` with attacks stronger than the training one (PGD-50 with 5
restarts and AutoAttack's standard suite by default), on the whole test split or a fixed subset, split across
ranks by ``dat_ds.stage``: the examples are cut into fixed chunks (``--chunk``), chunk ``c`` goes to rank
``c % world`` and every attack on it is seeded with ``seed + c``, so the per-example results, and the totals, are the
same for any number of ranks and any ``--batch``. A killed evaluation resumes at the next chunk. AutoAttack is its
authors' code (``pyautoattack``: APGD-CE, APGD-T, FAB-T, Square), run per chunk; nothing of it is rewritten here.
Rank 0 writes ``eval.json`` (``eval_<split>.json`` for another split) with the model's sha256 and the settings,
plots into the run folder, and logs the results into the run's wandb run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from .cli import UsageError, add_examples, add_model, check_examples, command, number, parser
from .robust_eval import (
    AttackSettings,
    chunk_results,
    load_examples,
    result_keys,
    sanity_flags,
    select_indices,
)
from .run_folder import RunFolder, atomic_write_json
from .stage import Stage, file_sha256, settings_hash, stage_device


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
    batch: int = 0,
    shards: Path | None = None,
) -> dict:
    from .data.shards import load_index
    from .export import load_exported
    from .models import inference_model

    run = RunFolder(run_dir)
    device = stage_device()
    path = model_file or run.model_file
    if not path.is_file():
        raise UsageError(f"{path} is missing: evaluate a finished run (training exports it at the end)")
    model, meta = load_exported(path, device)
    # BatchNorm folded into the convolutions and channels-last memory: the same function up to rounding (logits
    # within ~1e-7 on dat_mnist_cnn), 2.4x faster forwards and 1.5x faster forward+backward on this CPU.
    model = inference_model(model)
    cfg = json.loads(meta["config"])
    data_dir = Path(shards or cfg["data"]["shards"])
    index = load_index(data_dir)
    if split not in index.splits:
        raise UsageError(
            f"--split {split}: {data_dir} has the splits {sorted(index.splits)} (a validation split comes from: "
            "python -m data_prep.holdout SRC OUT --n N, and training on OUT)"
        )
    wanted = select_indices(index.split(split).count, n, s.seed, indices_file, data_dir)
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

    model_sha = file_sha256(path)
    key = {
        "model_sha256": model_sha,
        "settings": [settings_at(e).__dict__ for e in radii],
        "examples": hashlib.sha256(json.dumps(wanted).encode()).hexdigest(),
        "n_examples": len(wanted),
        "chunk": chunk,
        "split": split,
    }
    with Stage(run.eval_parts / settings_hash(key), key, len(wanted), chunk, "evaluate") as stage:
        todo = stage.start()
        data = load_examples(
            index, wanted, {p for c in todo for p in stage.chunks[c]}, cfg["data"]["augment"],
            cfg["data"]["image_size"] or index.image_size, split,
        )  # fmt: skip
        for c in todo:
            x = torch.stack([data[p][0] for p in stage.chunks[c]]).float().div_(255)
            y = torch.tensor([data[p][1] for p in stage.chunks[c]])
            cols = {}
            for eps in radii:
                for k, v in chunk_results(model, x, y, settings_at(eps), s.seed + c, device, batch).items():
                    cols[f"{eps!r}/{k}"] = v.numpy()
            stage.save(c, cols)
        stage.barrier()
        report = None
        if stage.rank == 0:
            table = stage.gather()
            results = {
                eps: {k: torch.from_numpy(table[f"{eps!r}/{k}"]) for k in result_keys(settings_at(eps))}
                for eps in radii
            }
            acc = {k: v.float().mean().item() for k, v in results[s.eps].items()}
            report = {
                "clean_acc": acc["clean"],
                "pgd_acc": acc["pgd"],
                "autoattack_acc": acc.get("autoattack"),
                "pgd_short_acc": acc["pgd_short"],
                "square_acc": acc.get("square"),
                "n_examples": len(wanted),
                "split": split,
                "world_size": stage.world,
                "eval_time_s": stage.seconds(),  # this process's run: chunks found done are not counted
                "chunks_resumed": len(stage.mine) - len(todo),
                "attacks": {
                    "norm": "Linf",
                    "eps": s.eps,
                    "pgd_steps": s.pgd_steps,
                    "pgd_step_size": s.step,
                    "pgd_restarts": s.pgd_restarts,
                    "pgd_short_steps": max(1, s.pgd_steps // 5),
                    "autoattack": "pyautoattack standard (apgd-ce, apgd-t, fab-t, square)"
                    if s.autoattack
                    else None,
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
                    str(e): {k: v.float().mean().item() for k, v in r.items()}
                    for e, r in sorted(results.items())
                },
                "flags": sanity_flags(acc, len(wanted)),
                "model": str(path),
                "model_sha256": model_sha,
                "shards": str(data_dir),
            }
            atomic_write_json(run.eval_file(split), report)
            from .plots import plot_acc_vs_eps, plot_curves

            if split == "test":
                plot_curves(run_dir)
                if len(results) > 1:
                    plot_acc_vs_eps(run_dir, report["per_eps"])
            from .tracking import log_stage_results

            log_stage_results(run_dir, f"eval_{split}" if split != "test" else "eval", _scalars(report))
        stage.finish(remove=True)  # the results file is written: the chunk results are no longer needed
    if stage.rank == 0:
        try:
            run.eval_parts.rmdir()  # only when no other evaluation's parts are in it
        except OSError:
            pass
    return report


def _scalars(report: dict) -> dict[str, float]:
    return {k: v for k, v in report.items() if k.endswith("_acc") and isinstance(v, float)}


def main(argv: list[str] | None = None) -> int:
    """The command: exit 0, or 2 with one line for an error a user can fix."""
    return command(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("run_dir", type=Path, help="a finished run folder (its model.safetensors)")
    add_model(p)
    p.add_argument(
        "--eps", type=float, default=None, help="l-inf radius in [0,1] pixels (default: the run's attack.eps)"
    )
    p.add_argument("--pgd-steps", type=int, default=50, help="PGD steps (default 50)")
    p.add_argument(
        "--pgd-step-size", type=float, default=0.0, help="PGD step in [0,1] pixels (0: 2.5 eps / steps)"
    )
    p.add_argument("--pgd-restarts", type=int, default=5, help="PGD random restarts (default 5)")
    p.add_argument("--no-autoattack", action="store_true", help="skip AutoAttack (TA and PGD RA only)")
    p.add_argument("--no-square-check", action="store_true",
                   help="skip the Square-alone gradient-masking check (AutoAttack's standard suite still runs Square)")  # fmt: skip
    add_examples(p, "evaluate", chunk=100, batch=0)
    p.add_argument(
        "--indices",
        type=Path,
        default=None,
        help="file of test-split indices, or of file names (RobustBench's ImageNet list), to evaluate",
    )
    p.add_argument("--split", default="test",
                   help="the split to evaluate: test (eval.json), or val from data_prep.holdout (eval_val.json)")  # fmt: skip
    p.add_argument("--eps-sweep", default="", help="comma-separated extra radii for the accuracy-vs-eps plot")
    p.add_argument(
        "--sweep-autoattack", action="store_true", help="run AutoAttack at every radius of the sweep"
    )
    a = p.parse_args(argv)
    run = RunFolder(a.run_dir)
    recipe = run.read_recipe()
    if recipe is None and a.model is None:
        raise UsageError(f"{a.run_dir} is not a dat-ds run folder (no recipe.json): evaluate a finished run")
    eps = a.eps if a.eps is not None else (recipe or {}).get("attack", {}).get("eps")
    if eps is None:
        raise UsageError("--eps is needed: the model's run folder does not say its attack radius")
    number("--eps", eps, lo=0, hi=1, lo_open=True, fix="pixels are in [0,1]: 8/255 = 0.0314")
    number("--pgd-steps", a.pgd_steps, lo=1)
    number("--pgd-step-size", a.pgd_step_size, lo=0, hi=1, fix="0 takes 2.5 eps / steps")
    number("--pgd-restarts", a.pgd_restarts, lo=1)
    check_examples(a)
    try:
        sweep = [
            number("--eps-sweep", float(v), lo=0, hi=1, lo_open=True)
            for v in a.eps_sweep.split(",")
            if v.strip()
        ]
    except ValueError as e:
        raise UsageError(f"--eps-sweep {a.eps_sweep!r}: {e}") from None
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, force=True)
    s = AttackSettings(
        eps=eps,
        pgd_steps=a.pgd_steps,
        pgd_step_size=a.pgd_step_size,
        pgd_restarts=a.pgd_restarts,
        autoattack=not a.no_autoattack,
        square_check=not a.no_square_check,
        seed=a.seed,
    )
    from .engine import start_stage

    start_stage(6 * 3600)  # hours: ranks wait for the slowest one's chunks
    t0 = time.perf_counter()
    report = run_evaluation(
        a.run_dir, s, n=a.subset, indices_file=a.indices, chunk=a.chunk, eps_sweep=sweep, model_file=a.model,
        sweep_autoattack=a.sweep_autoattack, split=a.split, batch=a.batch, shards=a.shards,
    )  # fmt: skip
    if report is not None:
        aa = report["autoattack_acc"]
        print(
            f"TA {100 * report['clean_acc']:.2f}  RA (PGD-{s.pgd_steps}x{s.pgd_restarts}) "
            f"{100 * report['pgd_acc']:.2f}  AA {'-' if aa is None else f'{100 * aa:.2f}'}  "
            f"n={report['n_examples']}  ranks={report['world_size']}  {time.perf_counter() - t0:.1f}s"
        )
        for f in report["flags"]:
            print(f"WARNING: {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
