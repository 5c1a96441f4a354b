"""Final weights as safetensors that ``timm.create_model(name, num_classes=..., in_chans=...)`` loads.

The file holds the bare timm network's state dict (normalization is not a parameter); the metadata carries the
model name, class count, channels, input mean/std and the resolved config, so ``load_exported`` rebuilds the
normalized model without the recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig, RunConfig
from .data.shards import ShardIndex
from .models import NormalizedModel, build_model
from .run_folder import atomic_path


def export_safetensors(model: NormalizedModel, cfg: RunConfig, index: ShardIndex, path: Path) -> Path:
    tensors = {
        k: v.detach().float().contiguous().cpu()
        for k, v in model.net.state_dict().items()
        if v.is_floating_point()
    }
    tensors.update(
        {k: v.detach().cpu() for k, v in model.net.state_dict().items() if not v.is_floating_point()}
    )
    meta = {
        "model": cfg.model.name,
        "num_classes": str(index.num_classes),
        "in_chans": str(index.channels),
        "mean": json.dumps(
            model.mean.flatten().tolist()
        ),  # the model's own (finetune.input_stats may pick the
        "std": json.dumps(model.std.flatten().tolist()),  # pretrained model's), not necessarily data.shards'
        "config": json.dumps(cfg.to_dict()),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, str]]:
    """Rebuild the normalized model from an exported file (no pickle involved)."""
    from safetensors import SafetensorError, safe_open

    fix = "export it again from its run's newest checkpoint, or copy it again"
    if not Path(path).is_file():
        raise SystemExit(
            f"{path} does not exist: evaluate a finished run (it writes model.safetensors) or pass --model"
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        missing = [k for k in ("model", "num_classes", "in_chans", "mean", "std") if k not in meta]
        if missing:
            raise SystemExit(f"{path} is not a dat-ds export (its metadata lacks {missing}); {fix}")
        model = build_model(
            ModelConfig(name=meta["model"]),
            int(meta["num_classes"]),
            int(meta["in_chans"]),
            json.loads(meta["mean"]),
            json.loads(meta["std"]),
        )
        model.net.load_state_dict(load_file(str(path), device=str(device)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated, overwritten, wrong tensors
        raise SystemExit(
            f"{path} cannot be loaded ({type(e).__name__}: {str(e)[:200]}): it is damaged; {fix}"
        ) from None
    return model.to(device).eval(), meta


def write_model_config(model: NormalizedModel, cfg: RunConfig, index: ShardIndex, path: Path) -> Path:
    """The timm / Hugging Face ``config.json`` beside the weights: architecture, classes, and the input the network
    expects (size, and the mean/std to normalize [0,1] pixels with, which the safetensors' timm network does not
    apply itself). ``timm.create_model(cfg["architecture"], num_classes=..., in_chans=...,
    pretrained_cfg_overlay=dict(file="model.safetensors"))`` then loads the run as a pretrained timm model."""
    from .run_folder import RECIPE, atomic_write_json

    net = model.net
    size = cfg.data.image_size or index.image_size
    head = ""
    get = getattr(net, "get_classifier", None)
    if callable(get):
        head = next((n for n, m in net.named_modules() if m is get() and n), "")
    atomic_write_json(
        path,
        {
            "architecture": cfg.model.name,
            "num_classes": index.num_classes,
            "num_features": getattr(net, "num_features", None),
            "pretrained_cfg": {
                "tag": f"dat-ds.{cfg.name}",
                "input_size": [index.channels, size, size] if size else None,
                "mean": model.mean.flatten().tolist(),
                "std": model.std.flatten().tolist(),
                "interpolation": "bilinear",
                "crop_pct": 0.875 if cfg.data.augment == "imagenet" else 1.0,
                "num_classes": index.num_classes,
                "classifier": head,
                "license": "same as the training data",
            },
            "model_args": {"in_chans": index.channels, "num_classes": index.num_classes},
            "dat_ds": {"recipe": RECIPE, "attack": cfg.attack.method, "eps": cfg.attack.eps},
        },
    )
    return path
