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

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

PARTS = ".parts"


def chunk_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


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


def _save_part(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    path = model_file or run_dir / "model.safetensors"
    model, meta = load_exported(path, device)
    cfg = json.loads(meta["config"])
    unl = load_index(unlabeled)
    split = unl.split("train")
    if int(meta["num_classes"]) != unl.num_classes and unl.num_classes:
        raise SystemExit(f"{path} has {meta['num_classes']} classes, {unlabeled} says {unl.num_classes}")
    if int(meta["in_chans"]) != unl.channels:
        raise SystemExit(f"{path} takes {meta['in_chans']} channels, {unlabeled} holds {unl.channels}")
    image_size = cfg["data"]["image_size"] or unl.image_size
    parts = out / PARTS
    if rank == 0:
        parts.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    chunks = chunk_ranges(split.count, chunk)
    reader = SampleReader(split)
    t0 = time.perf_counter()
    done_here = 0
    for c in range(rank, len(chunks), world):
        part = parts / f"chunk{c:07d}.npy"
        if part.is_file():
            continue  # labelled by an earlier, interrupted run
        _save_part(
            part, label_chunk(model, reader, range(*chunks[c]), unl.channels, image_size, batch, device)
        )
        done_here += 1
        if rank == 0 and done_here % 10 == 0:
            print(f"rank 0: {done_here} chunks labelled, {time.perf_counter() - t0:.0f} s", flush=True)
    reader.close()
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    table = np.concatenate(
        [np.load(parts / f"chunk{c:07d}.npy", allow_pickle=False) for c in range(len(chunks))]
    )
    labels = table[:, 0].astype(np.int64)
    summary = {
        "model": str(path),
        "run": str(run_dir),
        "source": str(unlabeled),
        "n": int(split.count),
        "per_class": np.bincount(labels, minlength=unl.num_classes).tolist(),
        "mean_confidence": float(table[:, 1].mean()),
        "chunk": chunk,
        "batch": batch,
        "world_size": world,
        "label_time_s": time.perf_counter() - t0,
    }
    held = unlabeled / "heldout_labels.npy"
    if held.is_file():  # written by data_prep.unlabeled split: only for this report
        truth = np.load(held, allow_pickle=False)
        if len(truth) == len(labels):
            summary["accuracy_vs_heldout_labels"] = float((truth == labels).mean())
    write_labelled_set(unl, split, table, out, summary, per_shard)
    _save_part(out / "pseudo_labels.npy", table)
    (out / "pseudo_label.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a finished run folder (model.safetensors)")
    p.add_argument("unlabeled", type=Path, help="the unlabeled shard set (index.json)")
    p.add_argument("out", type=Path, help="where the pseudo-labelled shard set goes")
    p.add_argument(
        "--model", type=Path, default=None, help="a safetensors export (default: RUN/model.safetensors)"
    )
    p.add_argument(
        "--chunk", type=int, default=1000, help="samples per chunk (the unit of work and of resuming)"
    )
    p.add_argument("--batch", type=int, default=250, help="samples per forward pass")
    p.add_argument("--per-shard", type=int, default=5000, help="samples per output shard")
    p.add_argument(
        "--force", action="store_true", help="relabel even if OUT is complete (keeps no old parts)"
    )
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    problem = None
    model = a.model or a.run_dir / "model.safetensors"
    if not model.is_file():
        problem = f"{model} is missing: pseudo-label with a finished run (training exports it at the end)"
    elif not (a.unlabeled / "index.json").is_file():
        problem = f"{a.unlabeled} has no index.json: make it with python -m data_prep.unlabeled or data_prep.tiny_images"
    elif a.chunk < 1 or a.batch < 1:
        problem = "--chunk and --batch must be >= 1"
    elif (a.out / "index.json").is_file() and not a.force:
        problem = f"{a.out} already holds a pseudo-labelled set; use it, or pass --force to label again"
    if problem:
        if rank == 0:
            print(f"dat-ds: error: {problem}", file=sys.stderr)
        return 2
    if a.force and rank == 0 and (a.out / PARTS).is_dir():
        for f in (a.out / PARTS).iterdir():
            f.unlink()
    from .engine import start_stage

    start_stage(6 * 3600)  # hours: ranks wait for the slowest one's chunks
    summary = pseudo_label(
        a.run_dir, a.unlabeled, a.out, chunk=a.chunk, batch=a.batch, per_shard=a.per_shard, model_file=a.model
    )
    if summary is not None:
        acc = summary.get("accuracy_vs_heldout_labels")
        print(
            f"pseudo-labelled {summary['n']} samples -> {a.out} | mean confidence {summary['mean_confidence']:.3f}"
            + (f" | accuracy vs held-out labels {100 * acc:.2f} %" if acc is not None else "")
            + f" | {summary['label_time_s']:.1f} s, {summary['world_size']} rank(s)"
        )
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
