"""Models: any timm model by name, with input normalization as the first layer (attacks work in [0,1]).

Importing this module registers, in timm's registry, the CIFAR-style networks the paper and its peers use but
timm lacks (``preact_resnet18``, ``wrn28_10``, ``wrn34_10``) and the small CNN of the digits demo, so
``timm.create_model("wrn28_10")`` works anywhere dat_ds is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from .config import ConfigError, ModelConfig


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)``; the buffers are not saved, so ``net``'s state dict is plain timm."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


# ------------------------------------------------------------------------------------------- architectures


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = drop
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        sc = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.drop:
            o = F.dropout(o, self.drop, self.training)
        return self.conv2(o) + sc


class PreActResNet(nn.Module):
    """Pre-activation ResNet (He et al. 2016) / WideResNet (Zagoruyko & Komodakis 2016) for 32 px inputs."""

    def __init__(
        self,
        widths: Sequence[int],
        depths: Sequence[int],
        num_classes: int = 10,
        in_chans: int = 3,
        stem: int = 64,
        drop_rate: float = 0.0,
        **_: object,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False)
        layers, cin = [], stem
        for i, (w, d) in enumerate(zip(widths, depths, strict=True)):
            for j in range(d):
                layers.append(_PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1, drop_rate))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DigitsCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers for 8x8 inputs (the demo's model)."""

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, width: int = 32, drop_rate: float = 0.0, **_: object
    ):
        super().__init__()
        self.num_classes = num_classes

        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(a, b, 3, 1, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(in_chans, width), block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, 4 * width)
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _no_pretrained(pretrained: bool, name: str) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; set model.pretrained = false")


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    _no_pretrained(pretrained, "preact_resnet18")
    return PreActResNet((64, 128, 256, 512), (2, 2, 2, 2), **kwargs)


def _wrn(depth: int, k: int, pretrained: bool, name: str, **kwargs) -> PreActResNet:
    _no_pretrained(pretrained, name)
    n = (depth - 4) // 6
    return PreActResNet((16 * k, 32 * k, 64 * k), (n, n, n), stem=16, **kwargs)


@register_model
def wrn28_10(pretrained: bool = False, **kwargs) -> PreActResNet:
    return _wrn(28, 10, pretrained, "wrn28_10", **kwargs)


@register_model
def wrn34_10(pretrained: bool = False, **kwargs) -> PreActResNet:
    return _wrn(34, 10, pretrained, "wrn34_10", **kwargs)


@register_model
def dat_digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    _no_pretrained(pretrained, "dat_digits_cnn")
    return DigitsCNN(**kwargs)


# ------------------------------------------------------------------------------------------------ factory


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.name='{name}' is not a timm model{hint}; see timm.list_models()")


def build_net(cfg: ModelConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The bare timm network (what the exported safetensors hold)."""
    check_model_name(cfg.name)
    return timm.create_model(
        cfg.name,
        pretrained=cfg.pretrained,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=cfg.drop_rate,
    )


def build_model(
    cfg: ModelConfig, num_classes: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> NormalizedModel:
    return NormalizedModel(build_net(cfg, num_classes, in_chans), mean, std)
