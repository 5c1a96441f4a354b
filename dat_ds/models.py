"""Models: any timm model by name, with input normalization as the first layer (attacks work in [0,1]).

Importing this module registers, in timm's registry, the CIFAR-style networks the paper and its peers use but
timm lacks (``preact_resnet18``, the official DAT code's ``dat_preact_resnet18``, ``preact_resnet18_w16`` for CPU
studies, ``wrn28_10``, ``wrn34_10``) and the small CNNs of the digits and MNIST studies, so
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


def input_layer_name(net: nn.Module) -> str:
    """The first convolution or linear layer of ``net``: the layer that reads the (normalized) pixels."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            return name
    raise ConfigError(f"{type(net).__name__} has no Conv2d or Linear layer to take the input")


class NormalizedModel(nn.Module):
    """``net((x - mean) / std)``, with the pixels, the perturbation and the normalization kept in fp32.

    Under bf16 (spacing 1/256 near 1.0) an input cast before normalization moves a 2/255 perturbation by ~22 %
    on average, and a normalized input cast before the first convolution still does, in pixel terms. So the
    normalization and the input layer run in fp32 and low precision starts at the input layer's output
    (``keep_fp32_layers`` undoes DeepSpeed's bf16/fp16 cast for that layer; DeepSpeed's own
    ``keep_in_fp32_modules`` covers buffers only). The mean/std buffers are not saved, so ``net``'s state dict is
    plain timm.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        first = self.input_layer = input_layer_name(net)
        # A parameter of the body (held outside the module tree, so it is not registered twice) says which
        # dtype the input layer's output must enter.
        self._body = [p for n, p in net.named_parameters() if not n.startswith(f"{first}.")][-1:]
        net.get_submodule(first).register_forward_hook(self._to_body_dtype)

    bn_eval = (
        False  # finetune.bn_mode = "eval": every BatchNorm stays in eval mode, even when the model trains
    )

    def train(self, mode: bool = True) -> NormalizedModel:
        super().train(mode)
        if self.bn_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _to_body_dtype(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.to(self._body[0].dtype) if self._body else output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: pixels in [0,1], any float dtype (computed in fp32)."""
        z = (x.float() - self.mean.float()) / self.std.float()
        return self.net(z)


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def keep_fp32_layers(model: NormalizedModel) -> None:
    """After an engine cast the parameters to bf16/fp16: put the input layer's parameters back in fp32 (the
    perturbation arrives intact) and the normalization layers' too, so they match their fp32 running statistics,
    which DeepSpeed leaves in fp32 (apex's ``keep_batchnorm_fp32``; cuDNN and the CPU kernels take a low-precision
    input with fp32 parameters). In place (``p.data``), so the optimizer's references stay valid; DeepSpeed's bf16
    optimizer keeps fp32 masters of every parameter and copies them back into whatever dtype each one has."""
    keep = [model.net.get_submodule(model.input_layer)]
    keep += [m for m in model.net.modules() if isinstance(m, NORM_LAYERS)]
    for m in keep:
        for p in m.parameters(recurse=False):
            p.data = p.data.float()


def to_low_precision(model: NormalizedModel, dtype: torch.dtype) -> NormalizedModel:
    """``model`` cast as training under DeepSpeed's bf16/fp16 engine casts it (evaluation, tests): parameters in
    ``dtype``, buffers as they are, then ``keep_fp32_layers``."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    keep_fp32_layers(model)
    return model


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
        final_bn: bool = True,
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
        # The last block's output through BatchNorm and ReLU before pooling (fast_adversarial's, RST's and TRADES'
        # networks); the official DAT code's PreActResNet18 pools the last block's output directly.
        self.bn = nn.BatchNorm2d(cin) if final_bn else None
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU layers (width, 2x, 4x) with 2x2 max-pooling after the layers in ``pool_after``,
    global average pooling and a linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        width: int = 32,
        drop_rate: float = 0.0,
        pool_after: tuple[int, ...] = (1,),
        **_: object,
    ):
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        widths = (in_chans, width, 2 * width, 4 * width)
        for i in range(3):
            layers += [
                nn.Conv2d(widths[i], widths[i + 1], 3, 1, 1, bias=False),
                nn.BatchNorm2d(widths[i + 1]),
            ]
            layers[-2:] = [nn.Sequential(*layers[-2:], nn.ReLU(inplace=True))]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _no_pretrained(pretrained: bool, name: str) -> None:
    if pretrained:
        raise ValueError(f"{name} has no pretrained weights; set model.pretrained = false")


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    _no_pretrained(pretrained, "preact_resnet18")
    return PreActResNet((64, 128, 256, 512), (2, 2, 2, 2), **kwargs)


@register_model
def dat_preact_resnet18(pretrained: bool = False, **kwargs) -> PreActResNet:
    """The official DAT code's PreActResNet18 (its ``models.py``): as ``preact_resnet18`` without the BatchNorm
    and ReLU after the last block."""
    _no_pretrained(pretrained, "dat_preact_resnet18")
    return PreActResNet((64, 128, 256, 512), (2, 2, 2, 2), final_bn=False, **kwargs)


@register_model
def preact_resnet18_w16(pretrained: bool = False, **kwargs) -> PreActResNet:
    """PreAct ResNet-18's layout (4 stages of 2 blocks, BatchNorm everywhere) at a quarter of its widths (16, 32,
    64, 128; 0.70M parameters): the CIFAR-10 network of the studies on 2 CPU cores (docs/cifar10_tables.md), about
    15x faster than the full width there (450 against 29 images/s per core, forward + backward, channels-last)."""
    _no_pretrained(pretrained, "preact_resnet18_w16")
    return PreActResNet((16, 32, 64, 128), (2, 2, 2, 2), stem=16, **kwargs)


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
def dat_digits_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """For 8x8 inputs (the demo's model): one pooling, after the second layer."""
    _no_pretrained(pretrained, "dat_digits_cnn")
    return SmallCNN(pool_after=(1,), **kwargs)


@register_model
def dat_mnist_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """For 28x28 inputs (the MNIST studies): pooling after the first two layers, about 7.4 M multiply-adds per
    image at width 32, a quarter of what dat_digits_cnn's layout would cost at that size."""
    _no_pretrained(pretrained, "dat_mnist_cnn")
    return SmallCNN(pool_after=(0, 1), **kwargs)


# ------------------------------------------------------------------------------------------------ factory


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.name='{name}' is not a timm model{hint}; see timm.list_models()")


def build_net(cfg: ModelConfig, num_classes: int, in_chans: int) -> nn.Module:
    """The bare timm network (what the exported safetensors hold)."""
    check_model_name(cfg.name)
    extra = {} if cfg.zero_init_last is None else {"zero_init_last": cfg.zero_init_last}
    try:
        return timm.create_model(
            cfg.name,
            pretrained=cfg.pretrained,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=cfg.drop_rate,
            **extra,
        )
    except TypeError as e:
        if extra and "zero_init_last" in str(e):
            raise ConfigError(
                f"model.zero_init_last: {cfg.name} has no such option (timm ResNets have); remove it"
            ) from None
        raise


def input_stats(
    cfg: ModelConfig, channels: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std of the model's normalization layer (``model.input_norm``): the given ones (the data's, or a
    finetune source's), the pretrained network's own (timm's ``pretrained_cfg``), or identity ("none")."""
    norm = cfg.norm
    if norm == "none":
        return (0.0,) * channels, (1.0,) * channels
    if norm == "model":
        pc = timm.get_pretrained_cfg(cfg.name)
        m, s = (getattr(pc, "mean", None), getattr(pc, "std", None)) if pc is not None else (None, None)
        if m is None or s is None:
            raise ConfigError(
                f'model.input_norm = "model": timm has no pretrained statistics for {cfg.name}; use "data"'
            )
        if len(m) != channels:
            m, s = (sum(m) / len(m),) * channels, (sum(s) / len(s),) * channels
        return tuple(m), tuple(s)
    return tuple(mean), tuple(std)


def build_model(
    cfg: ModelConfig, num_classes: int, in_chans: int, mean: Sequence[float], std: Sequence[float]
) -> NormalizedModel:
    return NormalizedModel(build_net(cfg, num_classes, in_chans), mean, std)


def inference_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for counting predictions only: eval mode, each BatchNorm folded into the convolution
    before it (``torch.fx``'s ``fuse``, the same function up to rounding), and channels-last memory, which
    oneDNN's CPU convolutions and cuDNN's tensor cores both prefer. Falls back to the plain copy where the network
    does not trace."""
    import copy

    from torch.fx.experimental.optimization import fuse

    m = copy.deepcopy(model).eval()
    net = getattr(m, "net", None)
    if net is not None:
        try:
            m.net = fuse(net)
        except Exception:  # noqa: BLE001 - a network torch.fx cannot trace keeps its BatchNorms
            pass
    return m.to(memory_format=torch.channels_last)
