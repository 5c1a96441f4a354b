"""One typed, frozen config tree per run.

A recipe (TOML under ``recipes/``) picks values; these dataclasses check them. An unknown key is an error that
names the key and the closest valid one; a wrong type names the expected one. The resolved tree is saved in the
run folder, in wandb and in every checkpoint (``to_dict``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A recipe value a user must fix; the message says what and how."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class DataConfig:
    shards: str = ""  # folder with index.json written by data_prep/
    augment: Literal["none", "cifar", "imagenet"] = "none"
    image_size: int = 0  # 0: native size from the index
    workers: int = 0  # DataLoader workers per rank
    eval_limit: int = 0  # evaluate on the first N test samples only (0: all)
    on_bad_sample: Literal["fail", "skip"] = (
        "fail"  # an undecodable training image stops the run, or is skipped
    )

    def __post_init__(self) -> None:
        _check(
            bool(self.shards),
            "data.shards is empty: point it at a folder made by data_prep/ (has index.json)",
        )
        _check(self.workers >= 0, f"data.workers={self.workers} must be >= 0")
        _check(
            self.image_size >= 0,
            f"data.image_size={self.image_size} must be >= 0 (0: the shard set's own size)",
        )
        _check(self.eval_limit >= 0, f"data.eval_limit={self.eval_limit} must be >= 0 (0: every test sample)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "dat_digits_cnn"  # any timm model name, or one registered by dat_ds.models
    pretrained: bool = False
    channels_last: bool = (
        False  # channels-last memory for weights and inputs (cuDNN's and oneDNN's preferred layout)
    )
    drop_rate: float = 0.0
    # The model's first layer: "data" normalizes pixels with the shard set's mean/std; "model" with the pretrained
    # network's own (timm's pretrained_cfg); "auto": "model" when model.pretrained, else "data"; "none" feeds [0,1]
    # pixels as they are (the official DAT code: ToTensor() only).
    input_norm: Literal["auto", "data", "model", "none"] = "auto"

    @property
    def norm(self) -> str:
        """input_norm with "auto" decided."""
        if self.input_norm == "auto":
            return "model" if self.pretrained else "data"
        return self.input_norm

    # timm ResNets zero-initialize the last BatchNorm weight of each residual block; false initializes it to 1, as
    # torchvision's resnet50 (the official DAT code's network). Unset: the model's own default.
    zero_init_last: bool | None = None

    def __post_init__(self) -> None:
        _check(0 <= self.drop_rate < 1, f"model.drop_rate={self.drop_rate} must be in [0, 1)")


@dataclass(frozen=True)
class AttackConfig:
    method: Literal["pgd", "fgsm", "none"] = "pgd"
    eps: float = 8 / 255  # l-inf radius in [0,1] pixel space
    step_size: float = 2 / 255  # PGD step; FGSM uses fgsm_step_ratio * eps
    steps: int = 10
    rand_init: bool = True
    fgsm_step_ratio: float = 1.25  # Fast AT (Wong et al. 2020)
    bn_mode: Literal["train", "eval"] = "eval"  # BatchNorm mode while the attack runs
    # The random start: projected into the image box [0,1] before the first gradient (true), or, as the official
    # DAT code, not (PGD takes its first gradient at x + delta0 unclamped; FGSM at clamp(x + delta0, 0, 1), its
    # delta keeping the unclamped start). Every later iterate is projected either way.
    start_in_box: bool = True

    def __post_init__(self) -> None:
        _check(
            0 <= self.eps <= 1,
            f"attack.eps={self.eps} must be in [0, 1]: pixels are in [0,1] (e.g. 8/255 = 0.0314, not 8)",
        )
        _check(self.steps >= 1, f"attack.steps={self.steps} must be >= 1")
        _check(
            0 < self.step_size <= 1,
            f"attack.step_size={self.step_size} must be in (0, 1]: pixels are in [0,1] (e.g. 2/255 = 0.0078)",
        )
        _check(self.fgsm_step_ratio > 0, f"attack.fgsm_step_ratio={self.fgsm_step_ratio} must be > 0")


@dataclass(frozen=True)
class LossConfig:
    objective: Literal["dat", "trades", "gaussian", "smoothadv"] = "dat"  # dat_ds/objectives.py
    # dat: lambda in lambda*CE(clean) + CE(adv). 0 is Madry's AT and Fast AT; the official DAT code uses 1 for
    # DAT-PGD and 0 for DAT-FGSM (its --fast branch back-propagates CE(adv) alone). See docs/fidelity.md.
    clean_weight: float = 1.0
    trades_beta: float = 6.0  # trades: CE(clean) + beta*KL(f(x) || f(x_adv))

    def __post_init__(self) -> None:
        _check(self.clean_weight >= 0, "loss.clean_weight must be >= 0")
        _check(self.trades_beta >= 0, "loss.trades_beta must be >= 0")


@dataclass(frozen=True)
class SmoothingConfig:
    """Training for randomized smoothing (loss.objective = "gaussian" or "smoothadv")."""

    sigma: float = 0.25  # std of the Gaussian noise, in [0,1] pixel units
    noise_samples: int = 1  # N noisy copies of every example per step (the DAT paper compares 2 and 20)
    # What train.global_batch_size and train.micro_batch_size count: "images" (each brings its N noisy copies, so
    # a step costs N times more with N), or "pairs" of (image, noise), as Salman et al.'s --num-noise-vec: a
    # micro-batch holds micro_batch_size / N images, and an epoch takes N times more steps of the same cost.
    batch_unit: Literal["images", "pairs"] = "images"
    attack_eps: float = 0.25  # smoothadv: l2 radius (Salman et al.'s code: --epsilon 64, divided by 256)
    attack_steps: int = 10  # smoothadv: l2 PGD steps, step 2 * eps / steps (Salman et al.'s README: 10)
    # smoothadv: the radius grows with the epoch, min(eps, (epoch + 1) * eps / warmup), as Salman et al.'s --warmup
    # (10 in their README's CIFAR-10 runs); 0: the full radius from the start
    attack_warmup_epochs: int = 10

    def __post_init__(self) -> None:
        _check(self.sigma > 0, f"smoothing.sigma={self.sigma} must be > 0")
        _check(self.noise_samples >= 1, f"smoothing.noise_samples={self.noise_samples} must be >= 1")
        _check(self.attack_eps > 0, f"smoothing.attack_eps={self.attack_eps} must be > 0")
        _check(self.attack_steps >= 1, f"smoothing.attack_steps={self.attack_steps} must be >= 1")
        _check(
            self.attack_warmup_epochs >= 0,
            f"smoothing.attack_warmup_epochs={self.attack_warmup_epochs} must be >= 0 (0: no warm-up)",
        )

    def attack_radius(self, epoch: int) -> float:
        """The SmoothAdv radius in (0-based) ``epoch``: Salman et al.'s linear warm-up by epoch."""
        if not self.attack_warmup_epochs:
            return self.attack_eps
        return min(self.attack_eps, (epoch + 1) * self.attack_eps / self.attack_warmup_epochs)


@dataclass(frozen=True)
class UnlabeledConfig:
    """A second, pseudo-labelled shard set streamed beside data.shards (RST, Carmon et al. 2019)."""

    shards: str = ""  # a set written by dat_ds.pseudo_label (or data_prep.tiny_images --rst-labels); "": none
    # "pool": one training set of both (the official DAT code concatenates CIFAR-10 and the 500K images and
    # samples uniformly: an epoch passes once over all of them); "fraction": a fixed share of every micro-batch
    # (RST's unsup_fraction), the labeled set defining the epoch.
    mixing: Literal["pool", "fraction"] = "fraction"
    fraction: float = 0.5  # mixing = "fraction": of every micro-batch, on every rank and step

    def __post_init__(self) -> None:
        _check(
            0 < self.fraction < 1,
            f"unlabeled.fraction={self.fraction} must be in (0, 1): the share of each micro-batch drawn from "
            "unlabeled.shards",
        )


@dataclass(frozen=True)
class FinetuneConfig:
    """Where the weights start (dat_ds/init_from.py): random, or a finished run's exported model."""

    init_from: str = ""  # a run folder (its model.safetensors) or a .safetensors file; "": random weights
    input_stats: Literal["source", "data"] = (
        "source"  # normalize inputs with the pretrained model's mean/std,
    )
    # or with data.shards'
    freeze: tuple[str, ...] = ()  # fnmatch patterns of module or parameter names, e.g. ["stem*", "layers.0*"]
    reset_head: bool = False  # start the classifier head afresh even when the class counts match
    head_lr_scale: float = 1.0  # LR multiplier of the classifier head (timm's get_classifier()) over the body
    bn_mode: Literal["train", "eval"] = "train"  # eval: every BatchNorm keeps the loaded running statistics

    def __post_init__(self) -> None:
        _check(self.head_lr_scale > 0, f"finetune.head_lr_scale={self.head_lr_scale} must be > 0")
        _check(all(p.strip() for p in self.freeze), "finetune.freeze holds an empty pattern; remove it")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "lalr"] = "sgd"
    lr: float = 0.1  # at the reference batch size; see lr_scale
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    wd_on_norm_and_bias: bool = False  # ndim <= 1 tensors get weight decay?
    # LALR (LAMB-style layer-wise adaptive learning rate)
    lalr_moments: Literal["adam", "momentum"] = "adam"
    # Adam's bias correction of the moments; the official DAT code's LAMB (cybertronai) has none
    bias_correction: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-6
    c_lower: float = 0.0
    c_upper: float = 10.0
    adapt_norm_and_bias: bool = True  # apply the trust ratio to ndim <= 1 tensors too (DAT's code does)
    # schedule, in epochs
    warmup_epochs: float = 0.0
    schedule: Literal["constant", "multistep", "cosine"] = "multistep"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    # large-batch scaling: lr * (global_batch / lr_ref_batch) ** exponent
    lr_scale: Literal["none", "linear", "sqrt"] = "none"
    lr_ref_batch: int = 256

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(
            0 <= self.c_lower <= self.c_upper and self.c_upper > 0,
            f"optim.c_lower={self.c_lower}, optim.c_upper={self.c_upper}: 0 <= c_lower <= c_upper and c_upper > 0 must "
            "hold (tau clips the weight norm to [c_l, c_u]; c_u = 0 would never move a layer)",
        )
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
        _check(0 <= self.momentum < 1, f"optim.momentum={self.momentum} must be in [0, 1)")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), f"optim.betas={list(self.betas)} must be in [0, 1)")
        _check(self.gamma > 0, f"optim.gamma={self.gamma} must be > 0")
        _check(self.adam_eps > 0, f"optim.adam_eps={self.adam_eps} must be > 0 (Adam's denominator term)")
        _check(
            all(m >= 0 for m in self.milestones),
            f"optim.milestones={list(self.milestones)} must be >= 0 (epochs)",
        )
        _check(self.lr_ref_batch >= 1, f"optim.lr_ref_batch={self.lr_ref_batch} must be >= 1")
        _check(list(self.milestones) == sorted(self.milestones), "optim.milestones must be increasing")


@dataclass(frozen=True)
class CommConfig:
    bits: Literal[32, 16, 8, 4] = 32
    # "block": dat-ds's quantizer, a scale per block of block_size values (absmax), rounding as comm.rounding.
    # "qsgd": the DAT paper's (its code's quantization.py): one l2-norm scale per gradient tensor, 2^(bits-1) - 1
    # levels and a sign, stochastic rounding (unbiased). Both need topology = "ps" below 32 bits.
    codec: Literal["block", "qsgd"] = "block"
    two_sided: bool = False  # also quantize the aggregate sent back
    topology: Literal["ps", "hpc"] = "hpc"  # sharded parameter server, or plain all-reduce
    rounding: Literal["nearest", "stochastic"] = "nearest"
    error_feedback: bool = False
    block_size: int = 512  # values per fp32 scale: 0.8 % overhead at 8 bits, 1.6 % at 4
    bucket_mb: float = 4.0  # values per owner per pipelined round of the ps transport (fp32 MB)
    overlap: bool = True  # reduce gradient buckets during backward (dat_ds/comm/overlap.py); false: after it
    overlap_bucket_mb: float = 25.0  # gradient values per overlapped bucket (MB at fp32), DDP's default size

    def __post_init__(self) -> None:
        if self.topology == "hpc":
            _check(
                self.bits in (32, 16),
                f"comm.bits={self.bits} with comm.topology='hpc': an all-reduce sums in the wire format, "
                "so it carries only 32 or 16 bits; use topology='ps' for 8 or 4 bits",
            )
            _check(not self.two_sided, "comm.two_sided needs comm.topology='ps'")
            _check(
                self.codec == "block" or self.bits == 32,
                f"comm.codec='qsgd' at comm.bits={self.bits} needs comm.topology='ps': an all-reduce cannot sum "
                "its codes",
            )
        _check(self.block_size >= 8 and self.block_size % 2 == 0, "comm.block_size must be even and >= 8")
        _check(self.bucket_mb > 0, f"comm.bucket_mb={self.bucket_mb} must be > 0")
        _check(self.overlap_bucket_mb > 0, f"comm.overlap_bucket_mb={self.overlap_bucket_mb} must be > 0")


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = 1
    pgd_steps: int = 20
    pgd_step_size: float = 0.0  # 0: 2.5 * eps / steps (Madry)
    pgd_restarts: int = 1
    batch_size: int = 256  # per rank
    split: str = "test"  # the split the per-epoch TA/RA monitor; "val" on a set made by data_prep.holdout

    def __post_init__(self) -> None:
        _check(self.split != "train", "eval.split='train': monitor a held-out split ('test', or 'val')")
        for key in ("every_epochs", "pgd_steps", "pgd_restarts", "batch_size"):
            v = getattr(self, key)
            _check(v >= 1, f"eval.{key}={v} must be >= 1")
        _check(
            0 <= self.pgd_step_size <= 1,
            f"eval.pgd_step_size={self.pgd_step_size} must be in [0, 1] (0: 2.5 * eps / steps)",
        )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    global_batch_size: int = 128  # over all ranks and accumulation steps: the batch the paper reports
    micro_batch_size: int = 64  # per rank per forward; accumulation = global / (micro * world)
    seed: int = 0
    deterministic: bool = False
    ds_config: str = "auto"  # ds_configs/*.json; auto: zero0_bf16 on CUDA, zero0_fp32 elsewhere
    gradient_clipping: float = 0.0
    log_every: int = 0  # steps between progress lines (0: about 10 per epoch)
    max_steps_per_epoch: int = 0  # cap for smoke tests (0: a full pass)
    collective_timeout_s: float = 600.0  # a rank waiting longer than this for its peers stops the job
    layer_stats_every: int = 0  # every N steps rank 0 logs each layer's norm and step (dat_ds/layer_stats.py)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1")
        _check(self.seed >= 0, f"train.seed={self.seed} must be >= 0 (numpy seeds are unsigned)")
        _check(self.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
        _check(self.global_batch_size >= 1, "train.global_batch_size must be >= 1")
        _check(
            self.max_steps_per_epoch >= 0,
            f"train.max_steps_per_epoch={self.max_steps_per_epoch} must be >= 0 (0: a full pass)",
        )
        _check(self.log_every >= 0, f"train.log_every={self.log_every} must be >= 0")
        _check(
            self.layer_stats_every >= 0,
            f"train.layer_stats_every={self.layer_stats_every} must be >= 0 (0: off)",
        )
        _check(
            self.collective_timeout_s >= 10,
            f"train.collective_timeout_s={self.collective_timeout_s} must be >= 10 (seconds)",
        )
        _check(self.gradient_clipping >= 0, f"train.gradient_clipping={self.gradient_clipping} must be >= 0")
        _check(
            self.global_batch_size % self.micro_batch_size == 0,
            f"train.global_batch_size={self.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={self.micro_batch_size}",
        )


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = 1
    every_steps: int = 0  # also save mid-epoch every N optimizer steps (0: off)
    keep: int = 2  # complete checkpoints kept (older ones are removed once a newer one is complete)

    def __post_init__(self) -> None:
        _check(self.every_epochs >= 1, f"checkpoint.every_epochs={self.every_epochs} must be >= 1")
        _check(self.every_steps >= 0, f"checkpoint.every_steps={self.every_steps} must be >= 0 (0: off)")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")


@dataclass(frozen=True)
class LogConfig:
    wandb_mode: Literal["online", "offline", "disabled", "env"] = "env"  # env: $WANDB_MODE, else offline
    project: str = "dat-ds"
    entity: str = ""  # the wandb team or user ("": the logged-in default)
    group: str = ""
    tags: tuple[str, ...] = ()
    every_steps: int = 0  # per-step scalars to steps.jsonl and wandb every N optimizer steps (0: epochs only)

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, f"log.every_steps={self.every_steps} must be >= 0 (0: off)")


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    data: DataConfig = field(default_factory=lambda: DataConfig(shards="data/digits"))
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    unlabeled: UnlabeledConfig = field(default_factory=UnlabeledConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _check(
            not (self.loss.objective == "trades" and self.attack.method == "none"),
            'loss.objective="trades" needs an attack (attack.method = "pgd" or "fgsm")',
        )
        smoothing = self.loss.objective in ("gaussian", "smoothadv")
        if self.smoothing.batch_unit == "pairs":
            n = self.smoothing.noise_samples
            _check(
                smoothing,
                'smoothing.batch_unit = "pairs" counts (image, noise) pairs: it needs loss.objective = '
                '"gaussian" or "smoothadv"',
            )
            _check(
                self.train.micro_batch_size % n == 0,
                f'smoothing.batch_unit = "pairs": train.micro_batch_size={self.train.micro_batch_size} must be a '
                f"multiple of smoothing.noise_samples={n} (each image brings {n} pairs)",
            )
        if self.unlabeled.shards and self.unlabeled.mixing == "fraction":
            m = self.images_per_micro
            u = self.unlabeled.fraction * m
            _check(
                abs(u - round(u)) < 1e-9 and 1 <= round(u) < m,
                f"unlabeled.fraction={self.unlabeled.fraction} of {m} images per micro-batch is {u:g} samples: "
                "it must be a whole number between 1 and the micro-batch's images - 1, so that every micro-batch "
                "on every rank has exactly that share",
            )

    @property
    def images_per_micro(self) -> int:
        """Images each rank reads per micro-batch: train.micro_batch_size, or, with smoothing.batch_unit = "pairs",
        micro_batch_size / N (each image with its N noise draws makes N of the micro-batch's pairs)."""
        if self.smoothing.batch_unit == "pairs" and self.loss.objective in ("gaussian", "smoothadv"):
            return self.train.micro_batch_size // self.smoothing.noise_samples
        return self.train.micro_batch_size

    @property
    def unlabeled_per_micro(self) -> int:
        """Samples of each micro-batch drawn from unlabeled.shards by a second stream (mixing = "fraction"); 0
        without one, and with mixing = "pool", where both sets form one stream."""
        if not self.unlabeled.shards or self.unlabeled.mixing == "pool":
            return 0
        return round(self.unlabeled.fraction * self.images_per_micro)

    @property
    def pooled(self) -> bool:
        """The labeled and the pseudo-labelled set are one training set (unlabeled.mixing = "pool")."""
        return bool(self.unlabeled.shards) and self.unlabeled.mixing == "pool"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}={value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"[{where}] must be a table, got {type(value).__name__}")
        return _build(tp, value, where)
    raise AssertionError(f"unsupported config type {tp} at {where}")


def _build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown recipe key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.epochs=3)")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return key.strip().split("."), value


def load_config(recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML recipe, apply ``section.key=value`` overrides, check everything."""
    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist; pick one under recipes/")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    if "data" in values and isinstance(values["data"], dict) and "shards" not in values["data"]:
        raise ConfigError("data.shards is missing: point it at a folder made by data_prep/ (has index.json)")
    return _build(RunConfig, values)


# What a resumed run may change. None of it alters the weights' math or the training data stream
# (tests/test_launch.py resumes with every entry changed and ends bit-identical), except train.epochs, which
# changes the run's length on purpose: with a schedule over the epochs (cosine, milestones) the LR from the resumed
# step on follows the new length.
RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.log_every",
    "train.layer_stats_every",
    "train.collective_timeout_s",
    "data.workers",
    "data.eval_limit",
    "eval.",
    "checkpoint.",
    "log.",
)


# Keys added with a default that differs from what runs did before the key existed: a checkpoint without the key
# was trained with this value.
LEGACY = {"smoothing.attack_warmup_epochs": 0, "model.input_norm": "data"}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def resume_differences(saved: dict[str, Any], new: RunConfig) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's resolved recipe and the one resuming it, each as
    ``key: old -> new``."""
    a, b = _flatten(saved), _flatten(new.to_dict())
    for d in (a, b):  # "auto" compares as what it decides
        if d.get("model.input_norm", "auto") == "auto" and "model.input_norm" in d:
            d["model.input_norm"] = "model" if d.get("model.pretrained") else "data"
    defaults = _flatten(dataclasses.asdict(RunConfig()))
    refused, allowed = [], []
    for key in sorted(a.keys() | b.keys()):
        old, cur = a.get(key, LEGACY.get(key, "<absent>")), b.get(key, "<absent>")
        if old == cur:
            continue
        if key not in a and key in defaults and cur == LEGACY.get(key, defaults[key]):
            continue  # a key added after the checkpoint was written, at what it was then: the same run
        line = f"{key}: {old!r} -> {cur!r}"
        (allowed if key.startswith(RESUME_MAY_CHANGE) else refused).append(line)
    return refused, allowed
