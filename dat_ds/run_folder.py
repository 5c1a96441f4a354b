"""The run folder: the one module that knows its layout. Every command reads and writes a run through here.

    runs/<name>/
      recipe.json            the resolved recipe (older runs: config.json, still read)
      config.json            the model's timm-style config (architecture, classes, input size and statistics)
      model.safetensors      the exported weights (timm's state dict; metadata: model, classes, mean/std, recipe)
      metrics.jsonl          one JSON object per epoch (and the per-step log, steps.jsonl, when asked for)
      checkpoints/<tag>/     DeepSpeed's files, dat_rank<r>.pt per rank, recipe.json, COMPLETE when whole
      checkpoints/latest     the newest complete tag (written last; --resume auto reads the COMPLETE markers)
      init.json              what a finetune loaded from where ([finetune])
      layer_stats.jsonl      per-layer norms and steps (train.layer_stats_every)
      eval.json, eval_<split>.json   dat_ds.evaluate's results; eval_parts/ while it runs
      certify/<settings>/    dat_ds.certify's results (certify.tsv, certify.json, a plot); parts/ while it runs
      curves.png, acc_vs_eps.png     plots
      wandb_id.txt, wandb/   the wandb run (one per run folder; resumed, evaluated and certified into the same run)
      .lock                  held by the training process using the folder; stages lock their own parts folder

One atomic write (``atomic_write``: a temporary file, fsync, rename, fsync of the folder) is used for every file a
crash must never leave torn.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RECIPE = "recipe.json"
LEGACY_RECIPE = "config.json"  # the recipe's name in run folders written before recipe.json
MODEL_CONFIG = "config.json"  # timm / Hugging Face convention: the model's config beside its weights
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MARKER = "COMPLETE"
RANK_FILE = "dat_rank{}.pt"
INIT = "init.json"
LAYER_STATS = "layer_stats.jsonl"
EVAL_PARTS = "eval_parts"
CERTIFY = "certify"
WANDB_ID = "wandb_id.txt"
WANDB_DIR = "wandb"
WANDB_CACHE = ".wandb_cache"
LOCK = ".lock"
CURVES = "curves.png"
ACC_VS_EPS = "acc_vs_eps.png"
# stage outputs
SETTINGS = "settings.json"
PARTS = "parts"
CERTIFY_TSV = "certify.tsv"
CERTIFY_JSON = "certify.json"
CERTIFY_PLOT = "certified_accuracy.png"
PSEUDO_LABEL_JSON = "pseudo_label.json"


# ------------------------------------------------------------------------------------------ atomic writes


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder (a file written by a library, e.g. DeepSpeed's checkpoint files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one atomic write. Yields a temporary path beside ``path`` for the caller (or a library: ``torch.save``,
    safetensors, ``np.save``) to write; on a clean exit the file is fsynced, renamed over ``path`` and the folder
    fsynced, so a crash leaves the old file or the new one, never a torn one. On an exception the temporary file
    goes and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text or bytes) to ``path`` through ``atomic_path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent))


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync (a log whose last line a crash may lose, never corrupt the ones before)."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a crash mid-append) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the line a crash cut short
            raise ValueError(f"{path}: line {i + 1} is not JSON: {ln[:80]!r}") from None
    return out


# ------------------------------------------------------------------------------------------------ the folder


class RunFolder:
    """Paths and typed readers of one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ---- files
    @property
    def recipe_file(self) -> Path:
        return self.path / RECIPE

    @property
    def model_file(self) -> Path:
        return self.path / MODEL

    @property
    def model_config_file(self) -> Path:
        return self.path / MODEL_CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def steps_file(self) -> Path:
        return self.path / STEPS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def init_file(self) -> Path:
        return self.path / INIT

    @property
    def layer_stats_file(self) -> Path:
        return self.path / LAYER_STATS

    @property
    def wandb_id_file(self) -> Path:
        return self.path / WANDB_ID

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK

    @property
    def eval_parts(self) -> Path:
        return self.path / EVAL_PARTS

    def eval_file(self, split: str = "test") -> Path:
        """``eval.json`` for the test split (what reports and tables read); ``eval_<split>.json`` for another."""
        return self.path / ("eval.json" if split == "test" else f"eval_{split}.json")

    def certify_dir(self, tag: str = "") -> Path:
        return self.path / CERTIFY / tag if tag else self.path / CERTIFY

    def certify_tables(self) -> list[Path]:
        """Every certification's ``certify.tsv``, one per settings folder, sorted."""
        return sorted(self.certify_dir().glob(f"*/{CERTIFY_TSV}"))

    def plot(self, name: str) -> Path:
        return self.path / name

    # ---- readers
    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir() and any(self.checkpoints.iterdir())

    def read_recipe(self) -> dict[str, Any] | None:
        """The resolved recipe the run was trained under (recipe.json; config.json in older run folders, where it
        held the recipe), or None."""
        for name in (RECIPE, LEGACY_RECIPE):
            f = self.path / name
            if f.is_file():
                d = json.loads(f.read_text())
                if "train" in d and "data" in d:
                    return d
        return None

    def write_recipe(self, recipe: dict[str, Any]) -> None:
        atomic_write_json(self.recipe_file, recipe)

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def append_metrics(self, record: dict) -> None:
        append_line(self.metrics_file, json.dumps(record))

    def keep_metrics(self, epochs_done: int | None) -> None:
        """Before a run writes metrics: a fresh run starts the file empty; a resumed one keeps the records of the
        epochs it will not redo (a kill between a metrics line and its checkpoint leaves one more)."""
        if epochs_done is None:
            self.metrics_file.unlink(missing_ok=True)
            return
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epochs_done]
        atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    def read_eval(self, split: str = "test") -> dict | None:
        f = self.eval_file(split)
        return json.loads(f.read_text()) if f.is_file() else None


def checkpoint_recipe(tag_dir: Path) -> Path:
    """Where a checkpoint keeps the recipe it was written under."""
    return tag_dir / RECIPE


def read_checkpoint_recipe(tag_dir: Path) -> dict | None:
    for name in (RECIPE, LEGACY_RECIPE):
        f = tag_dir / name
        if f.is_file():
            return json.loads(f.read_text())
    return None
