"""Pseudo-labelling: a trained run's model labels an unlabeled shard set (RST's first stage, Carmon et al. 2019).

    deepspeed --num_gpus 2 --module dat_ds.pseudo_label RUN UNLABELED OUT [--chunk 1000] [--batch 250]
    python -m dat_ds.pseudo_label RUN UNLABELED OUT          # one process

RUN is a finished run folder (its ``model.safetensors`` export; RST uses a standard, non-robust model trained on
the labeled set), UNLABELED a shard set from ``data_prep.unlabeled`` or ``data_prep.tiny_images``. The samples are
cut into fixed chunks dealt to ranks as ``dat_ds.evaluate`` deals test examples (chunk ``c`` to rank
``c % world``), each chunk is labelled in fixed batches in eval mode, so every label and confidence is the same
for any number of ranks. Each finished chunk is saved at once (``OUT/.parts/``): a killed run, started again,
labels only what is missing. Rank 0 then writes OUT, an ordinary labelled shard set: every image byte for byte,
its pseudo-label as ``.cls``, the softmax confidence as ``.conf`` and the source sample number as ``.src``, plus
``pseudo_labels.npy`` (label, confidence per sample) and ``pseudo_label.json`` (model, counts per class, mean
confidence, time, and, where the unlabeled set keeps the labels it hid, their accuracy). Stream OUT beside the
labeled set with a recipe's ``[unlabeled]`` section.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from .cli import UsageError, add_model, command, number, parser
from .data.shards import INDEX_NAME
from .run_folder import PSEUDO_LABEL_JSON, RunFolder, atomic_write, atomic_write_json
from .stage import Stage, file_sha256, stage_device

PARTS = ".parts"


def label_chunk(model, reader, ids: range, channels: int, image_size: int, batch: int, device) -> np.ndarray:
    """(len(ids), 2) float64: argmax label and its softmax probability, in fixed batches of ``batch``."""
    from .data.transforms import decode

    out = []
    for s in range(ids.start, ids.stop, batch):
        xs = [
            decode(
                reader[i].image,
                channels=channels,
                augment="none",
                train=False,
                image_size=image_size,
                rng=None,
            )
            for i in range(s, min(s + batch, ids.stop))
        ]
        x = torch.stack(xs).float().div_(255).to(device)
        with torch.no_grad():
            p = torch.softmax(model(x).float(), 1)
        conf, lab = p.max(1)
        out.append(torch.stack([lab.double(), conf.double()], 1).cpu().numpy())
    return np.concatenate(out)


def write_labelled_set(unl, split, table: np.ndarray, out: Path, meta: dict, per_shard: int) -> None:
    from .data.shards import Sample, SampleReader, write_index, write_split

    reader = SampleReader(split)

    def samples():
        for i in range(split.count):
            s = reader[i]
            label, conf = int(table[i, 0]), float(table[i, 1])
            extra = (("conf", f"{conf:.6f}".encode()), ("src", str(i).encode()))
            yield Sample(key=f"p{i:08d}", image=s.image, ext=s.ext, label=label, extra=extra)

    entries = write_split(samples(), out, "train", per_shard)
    write_index(
        out,
        name=f"{unl.name}_pseudo",
        num_classes=unl.num_classes,
        channels=unl.channels,
        image_size=unl.image_size,
        mean=unl.mean,
        std=unl.std,
        splits={"train": entries},
        extra={"labeled": True, "pseudo_labels": meta},
    )


def pseudo_label(
    run_dir: Path,
    unlabeled: Path,
    out: Path,
    *,
    chunk: int,
    batch: int,
    per_shard: int,
    model_file: Path | None,
) -> dict | None:
    from .data.shards import SampleReader, load_index
    from .export import load_exported

    device = stage_device()
    path = model_file or RunFolder(run_dir).model_file
    model, meta = load_exported(path, device)
    cfg = json.loads(meta["config"])
    unl = load_index(unlabeled)
    split = unl.split("train")
    if int(meta["num_classes"]) != unl.num_classes and unl.num_classes:
        raise UsageError(f"{path} has {meta['num_classes']} classes, {unlabeled} says {unl.num_classes}")
    if int(meta["in_chans"]) != unl.channels:
        raise UsageError(f"{path} takes {meta['in_chans']} channels, {unlabeled} holds {unl.channels}")
    image_size = cfg["data"]["image_size"] or unl.image_size
    model_sha = file_sha256(path)
    settings = {"model_sha256": model_sha, "unlabeled": str(unlabeled), "n": split.count, "chunk": chunk,
                "batch": batch, "image_size": image_size}  # fmt: skip
    with Stage(out / PARTS, settings, split.count, chunk, "pseudo_label") as stage:
        todo = stage.start()
        reader = SampleReader(split)
        for c in todo:
            ids = stage.chunks[c]
            table = label_chunk(
                model, reader, range(ids[0], ids[-1] + 1), unl.channels, image_size, batch, device
            )
            stage.save(c, {"label": table[:, 0].astype(np.int64), "confidence": table[:, 1]})
        reader.close()
        stage.barrier()
        summary = None
        if stage.rank == 0:
            cols = stage.gather()
            table = np.stack([cols["label"].astype(np.float64), cols["confidence"]], 1)
            labels = cols["label"]
            summary = {
                "model": str(path),
                "model_sha256": model_sha,
                "run": str(run_dir),
                "source": str(unlabeled),
                "n": int(split.count),
                "per_class": np.bincount(labels, minlength=unl.num_classes).tolist(),
                "mean_confidence": float(cols["confidence"].mean()),
                "chunk": chunk,
                "batch": batch,
                "world_size": stage.world,
                "label_time_s": stage.seconds(),
            }
            held = unlabeled / "heldout_labels.npy"
            if held.is_file():  # written by data_prep.unlabeled split: only for this report
                truth = np.load(held, allow_pickle=False)
                if len(truth) == len(labels):
                    summary["accuracy_vs_heldout_labels"] = float((truth == labels).mean())
            write_labelled_set(unl, split, table, out, summary, per_shard)
            buf = io.BytesIO()
            np.save(buf, table, allow_pickle=False)
            atomic_write(out / "pseudo_labels.npy", buf.getvalue())
            atomic_write_json(out / PSEUDO_LABEL_JSON, summary)
            from .tracking import log_stage_results

            log_stage_results(run_dir, "pseudo_label", {k: v for k, v in summary.items() if k in (
                "mean_confidence", "accuracy_vs_heldout_labels", "n")})  # fmt: skip
        stage.finish(remove=False)
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command: exit 0, or 2 with one line for an error a user can fix."""
    return command(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("run_dir", type=Path, help="a finished run folder (model.safetensors)")
    p.add_argument("unlabeled", type=Path, help="the unlabeled shard set (index.json)")
    p.add_argument("out", type=Path, help="where the pseudo-labelled shard set goes")
    add_model(p)
    p.add_argument(
        "--chunk", type=int, default=1000, help="samples per chunk: the unit of work and of resuming"
    )
    p.add_argument("--batch", type=int, default=250, help="samples per forward pass: lower it to fit memory")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per output shard")
    p.add_argument(
        "--force", action="store_true", help="relabel even if OUT is complete (keeps no old parts)"
    )
    a = p.parse_args(argv)
    for name in ("--chunk", "--batch", "--per-shard"):
        number(name, getattr(a, name[2:].replace("-", "_")), lo=1)
    model = a.model or RunFolder(a.run_dir).model_file
    if not model.is_file():
        raise UsageError(
            f"{model} is missing: pseudo-label with a finished run (training exports it at the end)"
        )
    if not (a.unlabeled / INDEX_NAME).is_file():
        raise UsageError(
            f"{a.unlabeled} has no {INDEX_NAME}: make it with python -m data_prep.unlabeled or data_prep.tiny_images"
        )
    if (a.out / INDEX_NAME).is_file() and not a.force:
        raise UsageError(
            f"{a.out} already holds a pseudo-labelled set; use it, or pass --force to label again"
        )
    if a.force and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(a.out / PARTS, ignore_errors=True)  # label everything again
    from .engine import start_stage

    start_stage(6 * 3600)  # hours: ranks wait for the slowest one's chunks
    summary = pseudo_label(a.run_dir, a.unlabeled, a.out, chunk=a.chunk, batch=a.batch, per_shard=a.per_shard,
                           model_file=a.model)  # fmt: skip
    if summary is not None:
        acc = summary.get("accuracy_vs_heldout_labels")
        print(
            f"pseudo-labelled {summary['n']} samples -> {a.out} | mean confidence {summary['mean_confidence']:.3f}"
            + (f" | accuracy vs held-out labels {100 * acc:.2f} %" if acc is not None else "")
            + f" | {summary['label_time_s']:.1f} s, {summary['world_size']} rank(s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
