"""Metrics: rank 0 appends one JSON object per epoch to ``metrics.jsonl`` and logs the same to wandb; the other
ranks get a tracker that does nothing. wandb is imported lazily and never touches the network unless the recipe
(or ``$WANDB_MODE``) says ``online``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class NullTracker:
    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(setting: str) -> str:
    return os.environ.get("WANDB_MODE", "offline") if setting == "env" else setting


class Tracker(NullTracker):
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        *,
        mode: str,
        project: str,
        group: str,
        name: str,
        epochs_done: int | None,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        if epochs_done is not None and self.path.exists():
            # Drop records of epochs the resumed run will redo (a kill between the metrics line and the checkpoint).
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln and json.loads(ln)["epoch"] <= epochs_done
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, self.path)
        elif epochs_done is None and self.path.exists():
            self.path.unlink()
        self.run = None
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            os.environ.setdefault("WANDB_CACHE_DIR", str(Path(run_dir) / ".wandb_cache"))
            id_file = Path(run_dir) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if (epochs_done is not None and id_file.exists()) else None
            self.run = wandb.init(
                project=project,
                group=group or None,
                name=name,
                id=run_id,
                resume="allow",
                config=config,
                dir=str(run_dir),
                mode=mode,
            )
            id_file.write_text(self.run.id)

    def log_epoch(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.run is not None:
            self.run.log(record, step=record["epoch"])

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(summary)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
