"""Building the DeepSpeed engine from a recipe.

The recipe owns batch sizes, learning rate, optimizer and schedule; ``ds_configs/*.json`` owns engine concerns
(ZeRO stage, precision, monitors). A ds_config that sets what the recipe owns is refused, so no value lives in two
places.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE_OWNED = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "optimizer",
    "scheduler",
    "gradient_clipping",
)


def resolve_ds_config_path(cfg: RunConfig) -> Path:
    name = cfg.train.ds_config
    if name == "auto":
        name = "zero0_bf16.json" if torch.cuda.is_available() else "zero0_fp32.json"
    path = Path(name)
    if not path.is_file() and not path.is_absolute():
        path = REPO_ROOT / "ds_configs" / Path(name).name
    if not path.is_file():
        raise ConfigError(f"train.ds_config='{cfg.train.ds_config}' not found; pick a file in ds_configs/")
    return path


def gradient_accumulation(cfg: RunConfig, world: int) -> int:
    per_step = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by micro_batch_size x "
            f"world size = {cfg.train.micro_batch_size} x {world}; pick a global batch that is a multiple of "
            f"{per_step}, or another micro_batch_size"
        )
    return cfg.train.global_batch_size // per_step


def build_ds_config(cfg: RunConfig, world: int) -> dict[str, Any]:
    path = resolve_ds_config_path(cfg)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    clash = [k for k in RECIPE_OWNED if k in ds]
    if clash:
        raise ConfigError(
            f"{path} sets {', '.join(clash)}; these belong to the recipe (train.global_batch_size, "
            "train.micro_batch_size, optim.*, train.gradient_clipping). Remove them from the ds_config."
        )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage != 0 and (cfg.comm.bits != 32 or cfg.comm.topology != "hpc"):
        raise ConfigError(
            f"{path}: ZeRO stage {stage} cannot carry compressed communication (comm.bits="
            f"{cfg.comm.bits}, topology={cfg.comm.topology}); use ds_configs/zero0_*.json"
        )
    if stage != 0 and cfg.optim.name == "lalr":
        raise ConfigError(
            f"{path}: ZeRO stage {stage} hands the optimizer flat partitions, so LALR's layer-wise "
            "norms would be wrong; use ds_configs/zero0_*.json"
        )
    if ds.get("bf16", {}).get("enabled") and not torch.cuda.is_available():
        raise ConfigError(f"{path} enables bf16 but no CUDA device is present; use train.ds_config='auto'")
    ds["train_batch_size"] = cfg.train.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = gradient_accumulation(cfg, world)
    if cfg.train.gradient_clipping > 0:
        ds["gradient_clipping"] = cfg.train.gradient_clipping
    return ds


def skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory comm op (~60 s) that training never uses.

    Replace its builder with the "op unavailable" answer it already handles; GPU backends never build it.
    """
    import importlib

    # Not ``import deepspeed.comm.torch``: the package re-exports the name ``torch``, which shadows the submodule.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    if not torch.cuda.is_available():
        ds_torch.build_shm_op = lambda: None


def set_cpu_threads() -> None:
    """One share of the cores per local rank on CPU, unless OMP_NUM_THREADS says otherwise: two ranks with
    all-core thread pools each on the same cores ran AutoAttack 3x slower here."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = next((int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if k in os.environ), None)
    if local is None:  # launched without a local size: assume every rank is on this machine
        local = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def init_distributed(timeout_s: float = 600) -> None:
    """The process group, with a collective timeout: a rank that waits longer for its peers (one died, a link went
    down) raises instead of hanging, and the launcher then stops the others."""
    from datetime import timedelta

    import deepspeed

    skip_cpu_shm_build()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def _my_address() -> str:
    """The address this process reaches the rendezvous from (what its peers see)."""
    import socket

    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))  # UDP: nothing is sent
            return s.getsockname()[0]
    except OSError:
        return "0.0.0.0"


def rank_addresses(device: torch.device) -> list[str]:
    """Collective: every rank's IPv4 address, by rank (to name a lost peer when a collective fails)."""
    import torch.distributed as dist

    mine = torch.tensor([int(p) for p in _my_address().split(".")], dtype=torch.int64, device=device)
    out = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [".".join(str(int(v)) for v in t.tolist()) for t in out]


def describe_collective_failure(err: BaseException, addresses: list[str], timeout_s: float) -> str:
    """One message for a collective that failed: which ranks were lost, if the error says, and what to do."""
    import re

    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    peers = set(re.findall(r"\[(\d+\.\d+\.\d+\.\d+)\]", str(err)))
    lost = [r for r, a in enumerate(addresses) if a in peers]
    if lost and len(set(addresses)) > 1:
        who = f"lost contact with rank(s) {lost} at {', '.join(sorted(peers))}"
    elif "imed out" in text or "timeout" in text.lower():
        who = f"a collective waited longer than train.collective_timeout_s = {timeout_s:g} s for its peers"
    else:
        who = "a collective failed"
    return (
        f"{who} ({text[:200]}): another rank stopped, its host went down or the network was cut; see that rank's "
        "log. The newest complete checkpoint is intact: continue with --resume auto."
    )


def start_stage(timeout_s: float) -> None:
    """Start-up of a chunked stage (evaluation, pseudo-labelling, certification): under a launcher, watch it and
    join the process group with a long collective timeout (ranks wait for the slowest one's chunks at the end);
    then one share of the CPU cores per rank."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        from .launch_guard import guard

        guard()  # stop when the deepspeed/torchrun command the user started is gone
        init_distributed(timeout_s=timeout_s)
    set_cpu_threads()
