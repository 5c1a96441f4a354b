"""Where a run's weights start: random, or a finished run's exported model (robust pretraining, then finetuning).

``finetune.init_from`` names a run folder (its ``model.safetensors``, written when that run finished) or a
``.safetensors`` file. Only safetensors are read: nothing is unpickled. The network is built from the recipe
(``model.name``, the class count and channels of ``data.shards``), and each of its tensors is

- **loaded** when the source has it with the same shape;
- **adapted** when it is the input layer's weight and only the channel count differs (``adapt_channels``:
  summed to one channel, or repeated to more, as timm's ``adapt_input_conv`` does from RGB);
- **new** when it belongs to the classifier head (timm's ``get_classifier()``) and the source's differs or is
  absent, or ``finetune.reset_head`` is set: it keeps its seeded random initialisation.

Source tensors of the head the target cannot take are **dropped**. Any other difference is an error that names the
tensors and their shapes: a different architecture is not a finetune. The input size may change freely where the
network pools globally (every convnet here: 28 px MNIST features run on 8 px digits, 224 px ImageNet features on
32 px CIFAR); a ViT's position embeddings are not resampled, so they are refused by name.

The plan is made before any rank starts (``--check`` runs it, from the file's header only), applied to the
freshly built network before the DeepSpeed engine wraps it, printed on rank 0 and written to the run folder as
``init.json`` with the source's sha256. A run resumed from its own checkpoint never reads the source again: the
checkpoint holds the finetune's weights, and the pretrained file may have moved on.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .run_folder import CHECKPOINTS, MODEL, RunFolder, atomic_write_json

EXPORT_NAME = MODEL


class SourceMissing(ConfigError):
    """finetune.init_from names nothing that exists (a resumed finetune may not need it)."""


@dataclass
class InitPlan:
    source: str  # the safetensors file, "" for random weights
    source_meta: dict = field(default_factory=dict)  # model, num_classes, in_chans, mean, std of the source
    head: str = ""  # module name of the classifier head
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)  # parameter names with requires_grad = False
    mean: tuple[float, ...] | None = None  # input normalization chosen by finetune.input_stats (None: data's)
    std: tuple[float, ...] | None = None
    from_record: bool = False  # read back from the run folder's init.json: the source is not read again

    def summary(self) -> str:
        if not self.source:
            what = "random weights"
        else:
            parts = [f"{len(self.loaded)} tensors loaded"] + [
                f"{len(v)} {k}" + (f" {sorted(v)}" if v else "")
                for k, v in (("adapted", self.adapted), ("new", self.new), ("dropped", self.dropped))
            ]
            what = f"{self.source}: {', '.join(parts)}"
        frozen = f"; {len(self.frozen)} parameters frozen" if self.frozen else ""
        return f"init: {what}{frozen}"


def resolve_source(init_from: str) -> Path:
    """The safetensors file ``init_from`` names, checked readable; a ConfigError saying what to do otherwise."""
    p = Path(init_from)
    if p.is_dir():
        f = p / EXPORT_NAME
        if not f.is_file():
            ckpts = p / CHECKPOINTS
            why = (
                "it has checkpoints but has not finished (a run exports model.safetensors at its end); finish it "
                "with --resume auto"
                if ckpts.is_dir() and any(ckpts.iterdir())
                else "it is not a finished dat-ds run folder"
            )
            raise SourceMissing(f"finetune.init_from={init_from}: {f} is missing: {why}")
        p = f
    elif not p.is_file():
        raise SourceMissing(
            f"finetune.init_from={init_from} does not exist: name a finished run folder (runs/<name>) or a "
            ".safetensors file"
        )
    if p.suffix != ".safetensors":
        raise ConfigError(
            f"finetune.init_from={init_from} is not a .safetensors file; dat-ds never unpickles weights. Convert "
            "a trusted .pt/.pth with safetensors.torch.save_file(torch.load(f, weights_only=True), out)"
        )
    return p


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a torn or foreign file
        raise ConfigError(f"finetune.init_from: {path} is not a readable safetensors file ({e})") from None
    return shapes, meta


def head_name(net: nn.Module) -> str:
    """Module name of ``net``'s classifier head: timm's ``get_classifier()``, else its pretrained_cfg entry."""
    get = getattr(net, "get_classifier", None)
    if callable(get):
        head = get()
        for name, m in net.named_modules():
            if m is head and name:
                return name
    name = (getattr(net, "pretrained_cfg", None) or {}).get("classifier", "")
    if isinstance(name, str) and name:
        return name
    raise ConfigError(
        f"{type(net).__name__} does not say which module is its classifier head (get_classifier)"
    )


def _under(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")


def _list(keys: list[str], shapes: dict[str, tuple[int, ...]] | None = None, n: int = 8) -> str:
    items = [f"{k} {list(shapes[k])}" if shapes and k in shapes else k for k in keys[:n]]
    return ", ".join(items) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def plan_init(cfg: RunConfig, num_classes: int, in_chans: int, *, read_source: bool = True) -> InitPlan:
    """Decide, from shapes only, what the run starts from. Raises ConfigError naming any tensor that does not fit.
    ``read_source=False`` (a run resuming from its own checkpoint) plans the freezing and head only."""
    from .models import build_net, input_layer_name

    with torch.device("meta"):
        net = build_net(dataclasses.replace(cfg.model, pretrained=False), num_classes, in_chans)
    target = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    plan = InitPlan(source="", head=head_name(net))
    plan.frozen = freeze(net, cfg.finetune.freeze)
    if not cfg.finetune.init_from or not read_source:
        return plan
    src = resolve_source(cfg.finetune.init_from)
    shapes, meta = _read_header(src)
    plan.source = str(src)
    plan.source_meta = {k: v for k, v in meta.items() if k != "config"}
    first = f"{input_layer_name(net)}.weight"
    mismatched, missing = [], []
    reset = cfg.finetune.reset_head
    for k, shape in target.items():
        if k in shapes and shapes[k] == shape and not (reset and _under(k, plan.head)):
            plan.loaded.append(k)
        elif _under(k, plan.head):
            plan.new.append(k)
        elif (
            k == first
            and k in shapes
            and len(shapes[k]) == len(shape)
            and _same_but_channels(shapes[k], shape)
        ):
            plan.adapted.append(k)
        elif k in shapes:
            mismatched.append(k)
        else:
            missing.append(k)
    unexpected = []
    for k in shapes:
        if k in plan.loaded or k in plan.adapted:
            continue
        if _under(k, plan.head):
            plan.dropped.append(k)
        elif k not in target:
            unexpected.append(k)
    if mismatched or missing or unexpected:
        lines = []
        if mismatched:
            lines.append(
                f"shapes differ (source -> {cfg.model.name}): "
                + ", ".join(f"{k} {list(shapes[k])} -> {list(target[k])}" for k in mismatched[:8])
                + (f" and {len(mismatched) - 8} more" if len(mismatched) > 8 else "")
            )
        if missing:
            lines.append(f"not in the source: {_list(missing, target)}")
        if unexpected:
            lines.append(f"not in {cfg.model.name}: {_list(unexpected, shapes)}")
        raise ConfigError(
            f"finetune.init_from={cfg.finetune.init_from} ({meta.get('model', 'unknown model')}) does not fit "
            f"model.name={cfg.model.name} beyond its classifier head '{plan.head}':\n  "
            + "\n  ".join(lines)
            + "\nUse the pretraining run's model.name (only the head and the input channels may differ)"
        )
    if cfg.finetune.input_stats == "source":
        if "mean" not in meta or "std" not in meta:
            raise ConfigError(
                f"finetune.init_from: {src} carries no input mean/std (not exported by dat-ds); set "
                'finetune.input_stats = "data" to normalize with data.shards\' statistics'
            )
        mean, std = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
        if len(mean) != in_chans:
            raise ConfigError(
                f'finetune.input_stats = "source": the source normalizes {len(mean)} channels, data.shards has '
                f'{in_chans}; set finetune.input_stats = "data"'
            )
        plan.mean, plan.std = mean, std
    return plan


def _same_but_channels(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) >= 2 and a[0] == b[0] and a[2:] == b[2:] and a[1] != b[1]


def adapt_channels(w: torch.Tensor, n: int) -> torch.Tensor:
    """An input layer's weight ``w`` (out, c, ...) for ``n`` input channels: summed to one channel, or repeated and
    scaled by c/n, so an image whose channels are all equal gets the same response (timm's ``adapt_input_conv``
    does this from RGB only)."""
    c = w.shape[1]
    w = w.float()
    if n == 1:
        return w.sum(1, keepdim=True)
    reps = -(-n // c)
    return w.repeat(1, reps, *([1] * (w.ndim - 2)))[:, :n] * (c / n)


def freeze(net: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Set ``requires_grad = False`` on every parameter whose name, or the name of a module holding it, matches
    one of ``patterns`` (fnmatch). Returns the frozen parameter names; a pattern matching nothing is an error."""
    if not patterns:
        return []
    hits: dict[str, int] = {p: 0 for p in patterns}
    frozen = []
    for name, p in net.named_parameters():
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        matched = [pat for pat in patterns if any(fnmatch.fnmatchcase(q, pat) for q in prefixes)]
        for pat in matched:
            hits[pat] += 1
        if matched:
            p.requires_grad_(False)
            frozen.append(name)
    unmatched = [p for p, n in hits.items() if not n]
    if unmatched:
        top = sorted({n.split(".")[0] for n, _ in net.named_children()})
        raise ConfigError(
            f"finetune.freeze patterns {unmatched} match no module or parameter; the network's top-level modules "
            f"are {top} (patterns are fnmatch, e.g. 'layers.0*' or '*.bn*')"
        )
    if len(frozen) == len(list(net.parameters())):
        raise ConfigError("finetune.freeze freezes every parameter: nothing would train")
    return frozen


def apply_init(net: nn.Module, plan: InitPlan) -> None:
    """Load ``plan``'s tensors into the freshly built bare network ``net`` (in place) and freeze its parameters."""
    from safetensors.torch import load_file

    names = set(plan.frozen)
    for name, p in net.named_parameters():
        if name in names:
            p.requires_grad_(False)
    if not plan.source:
        return
    tensors = load_file(plan.source)
    own = net.state_dict()
    state = {k: tensors[k] for k in plan.loaded}
    for k in plan.adapted:
        state[k] = adapt_channels(tensors[k], own[k].shape[1]).to(own[k].dtype)
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and sorted(missing) == sorted(plan.new), (missing, unexpected, plan.new)


def write_record(plan: InitPlan, run_dir: Path) -> None:
    """``init.json`` in the run folder: what was loaded, adapted, newly initialised, dropped and frozen."""
    rec = asdict(plan)
    if plan.source:
        h = hashlib.sha256()
        with open(plan.source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        rec["source_sha256"] = h.hexdigest()
    atomic_write_json(RunFolder(run_dir).init_file, rec)


def read_record(run_dir: Path) -> InitPlan | None:
    """The plan a run recorded when it started (``init.json``), or None."""
    f = RunFolder(run_dir).init_file
    if not f.is_file():
        return None
    rec = json.loads(f.read_text())
    rec.pop("source_sha256", None)
    rec["from_record"] = True
    plan = InitPlan(**rec)
    plan.mean = tuple(plan.mean) if plan.mean is not None else None
    plan.std = tuple(plan.std) if plan.std is not None else None
    return plan
