"""Final weights as safetensors that ``timm.create_model(name, num_classes=..., in_chans=...)`` loads.

The file holds the bare timm network's state dict (normalization is not a parameter); the metadata carries the
model name, class count, channels, input mean/std and the resolved config, so ``load_exported`` rebuilds the
normalized model without the recipe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig, RunConfig
from .data.shards import ShardIndex
from .models import NormalizedModel, build_model


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
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, str]]:
    """Rebuild the normalized model from an exported file (no pickle involved)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = build_model(
        ModelConfig(name=meta["model"]),
        int(meta["num_classes"]),
        int(meta["in_chans"]),
        json.loads(meta["mean"]),
        json.loads(meta["std"]),
    )
    model.net.load_state_dict(load_file(str(path), device=str(device)))
    return model.to(device).eval(), meta
