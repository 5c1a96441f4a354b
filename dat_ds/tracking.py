"""Metrics: rank 0 writes them to the run folder and to wandb; the other ranks get a tracker that does nothing.

- every epoch: one JSON object appended to ``metrics.jsonl`` and logged to wandb at the run's global step;
- every ``log.every_steps`` optimizer steps (0: off): the step's scalars (loss, adversarial accuracy, LR, images/s,
  communication seconds and MB per step since the last line) to ``steps.jsonl`` and wandb;
- after training, each stage run on the folder (evaluation, AutoAttack, certification, pseudo-labelling) logs its
  results into the same wandb run (``log_stage_results``: the id in ``wandb_id.txt``, resumed), so one run page
  holds a model's training and its robustness.

wandb is imported lazily and never touches the network unless the recipe (or ``$WANDB_MODE``) says ``online``;
an offline run ends with the one command that uploads it. ``read_wandb_records`` reads an offline run's records back
(the files wandb writes) without wandb's servers: what the tests check, and a way to see what was logged.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from .run_folder import WANDB_CACHE, WANDB_DIR, RunFolder, atomic_write


class NullTracker:
    def log_step(self, record: dict[str, Any]) -> None:
        pass

    def log_epoch(self, record: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(setting: str) -> str:
    return os.environ.get("WANDB_MODE", "offline") if setting == "env" else setting


def _wandb_env(run: RunFolder) -> None:
    os.environ.setdefault("WANDB_DIR", str(run.path))
    os.environ.setdefault("WANDB_CACHE_DIR", str(run.path / WANDB_CACHE))


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
        entity: str = "",
        tags: tuple[str, ...] = (),
    ):
        self.folder = RunFolder(run_dir)
        self.folder.keep_metrics(epochs_done)
        if epochs_done is None:
            self.folder.steps_file.unlink(missing_ok=True)
        self.run = None
        self.mode = mode
        if mode != "disabled":
            import wandb

            _wandb_env(self.folder)
            id_file = self.folder.wandb_id_file
            run_id = id_file.read_text().strip() if (epochs_done is not None and id_file.exists()) else None
            self.run = wandb.init(
                project=project,
                entity=entity or None,
                group=group or None,
                tags=list(tags) or None,
                name=name,
                id=run_id,
                resume="allow",
                config=config,
                dir=str(self.folder.path),
                mode=mode,
            )
            atomic_write(id_file, self.run.id)

    def log_step(self, record: dict[str, Any]) -> None:
        from .run_folder import append_line

        append_line(self.folder.steps_file, json.dumps(record))
        if self.run is not None:
            self.run.log({f"step/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_epoch(self, record: dict[str, Any]) -> None:
        self.folder.append_metrics(record)
        if self.run is not None:
            self.run.log(record, step=record.get("steps", record["epoch"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(summary)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            if self.mode == "offline":
                print(
                    f"wandb: the run is stored offline in {self.folder.path / WANDB_DIR}; upload it with: "
                    f"wandb sync {self.folder.path / WANDB_DIR}/offline-run-*",
                    flush=True,
                )


def log_stage_results(run_dir: Path, prefix: str, scalars: dict[str, float]) -> None:
    """Add a stage's results (``prefix/name``) to the run's wandb run, resuming it by the id training wrote. Does
    nothing for a run without wandb (no id, or log.wandb_mode "disabled")."""
    folder = RunFolder(run_dir)
    recipe = folder.read_recipe() or {}
    mode = wandb_mode(recipe.get("log", {}).get("wandb_mode", "env"))
    if mode == "disabled" or not folder.wandb_id_file.is_file() or not scalars:
        return
    import wandb

    _wandb_env(folder)
    log = recipe.get("log", {})
    run = wandb.init(
        project=log.get("project", "dat-ds"),
        entity=log.get("entity") or None,
        id=folder.wandb_id_file.read_text().strip(),
        resume="allow",
        dir=str(folder.path),
        mode=mode,
    )
    values = {f"{prefix}/{k}": v for k, v in scalars.items() if v is not None}
    run.summary.update(values)
    run.finish()


# ------------------------------------------------------------------------------------- reading a run back


def read_wandb_records(run_dir: Path) -> list[dict]:
    """Every run record (id, project, entity, group, tags), history row and summary update of the run's offline
    wandb files, oldest first, as ``{"kind": "run" | "history" | "summary", "values": {key: value}}``: wandb's record log (a LevelDB-style log of
    protobuf ``Record`` messages, 32 KiB blocks after a 7-byte file header), read with wandb's own message types."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: list[dict] = []
    for f in sorted((Path(run_dir) / WANDB_DIR).glob("offline-run-*/run-*.wandb")):
        for payload in _log_records(f.read_bytes()):
            rec = pb.Record.FromString(payload)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                r = rec.run
                run_values = {"id": r.run_id, "project": r.project, "entity": r.entity, "group": r.run_group,
                              "tags": list(r.tags)}  # fmt: skip
                out.append({"kind": "run", "values": run_values, "file": str(f)})
                continue
            if kind == "history":
                items = rec.history.item
            elif kind == "summary":
                items = rec.summary.update
            else:
                continue
            values = {}
            for it in items:
                key = it.key or "/".join(it.nested_key)
                try:
                    values[key] = json.loads(it.value_json)
                except json.JSONDecodeError:
                    values[key] = it.value_json
            out.append({"kind": kind, "values": values, "file": str(f)})
    return out


def _log_records(data: bytes, block: int = 32768, header: int = 7) -> list[bytes]:
    recs, buf, pos = [], b"", header
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a record header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # a whole record
            recs.append(payload)
        elif kind == 2:  # first fragment
            buf = payload
        elif kind == 3:  # middle
            buf += payload
        elif kind == 4:  # last
            recs.append(buf + payload)
            buf = b""
    return recs
