"""Every recipe under recipes/, one after another, in one set of ranks started by the deepspeed launcher.

    deepspeed --num_gpus 2 --module tests.recipe_smoke PLAN.json

PLAN.json: ``{"runs": [[recipe path, [override, ...]], ...], "out": results.json}``. Each run goes through
``dat_ds.train.main`` as a user's command would (recipe checks, run-folder lock, engine, training, checkpoint, export);
the ranks share one launcher start, which is what makes 40 recipes affordable in the test suite. Rank 0 writes, after
each run, what it found in the run folder; a run that fails stops the ranks (the launcher then stops all), and
the results file names the recipe that was running.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from dat_ds.train import main as train

    plan = json.loads(Path(argv[0]).read_text())
    out = Path(plan["out"])
    rank = int(os.environ.get("RANK", "0"))
    results: dict[str, dict] = {}
    for recipe, overrides in plan["runs"]:
        name = Path(recipe).stem
        if rank == 0:
            results[name] = {"status": "running"}
            out.write_text(json.dumps(results, indent=1))
        t0 = time.time()
        rc = train([recipe, *[x for o in overrides for x in ("--set", o)]])
        if rc != 0:
            raise SystemExit(f"{name}: dat_ds.train exited with {rc}")
        if rank == 0:
            run = (
                Path(next(o.split("=", 1)[1].strip('"') for o in overrides if o.startswith("out_dir=")))
                / name
            )
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
            ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").is_file())
            results[name] = {
                "status": "ok",
                "steps": metrics[-1]["steps"],
                "epochs": len(metrics),
                "checkpoints": ckpts,
                "exported": (run / "model.safetensors").is_file(),
                "replicas_identical": metrics[-1]["replicas_identical"],
                "clean_acc": metrics[-1].get("clean_acc"),
                "seconds": round(time.time() - t0, 1),
            }
            out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(args))
