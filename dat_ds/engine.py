"""Building the DeepSpeed engine from a recipe.

The recipe owns batch sizes, learning rate, optimizer and schedule; ``ds_configs/*.json`` owns engine concerns
(ZeRO stage, precision, monitors). A ds_config that sets what the recipe owns is refused, so no value lives in two
places.
"""

from __future__ import annotations

import json
import os
import sys
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
        path = REPO_ROOT / "ds_configs" / Path(name).name  # the checkout
        if not path.is_file():
            path = Path(__file__).resolve().parent / "ds_configs" / Path(name).name  # an installed package
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
    if torch.cuda.is_available():
        return
    if "OMP_NUM_THREADS" in os.environ:  # also when share_environment adopted it after start-up
        try:
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        except ValueError:
            pass
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


def make_reducer(comm, seed: int):
    """The gradient reducer a recipe's ``[comm]`` describes."""
    from .comm.transport import GradientReducer

    return GradientReducer(
        bits=comm.bits,
        two_sided=comm.two_sided,
        topology=comm.topology,
        codec=comm.codec,
        rounding=comm.rounding,
        error_feedback=comm.error_feedback,
        block_size=comm.block_size,
        bucket_mb=comm.bucket_mb,
        seed=seed,
    )


def make_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule,
    ds_config: dict,
    *,
    comm,
    seed: int,
    channels_last: bool = False,
):
    """The DeepSpeed engine around ``model`` with dat-ds's gradient aggregation in its seam: what training runs,
    and what the benchmarks measure (they build the same thing through here). Returns (engine, reducer)."""
    import deepspeed

    from .checkpoint import secure_checkpoint_engine
    from .comm import engine_seam
    from .models import keep_fp32_layers

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
    )
    secure_checkpoint_engine(engine)  # DeepSpeed's own loader would unpickle with weights_only=False
    if channels_last:
        # After the engine's initial broadcast, which over gloo cannot send a channels-last tensor ("stride(-1)
        # must be 1 to view Float as Byte"). In place (param.data), so the optimizer keeps its references.
        engine.module.to(memory_format=torch.channels_last)
    if (engine.bfloat16_enabled() or engine.fp16_enabled()) and hasattr(engine.module, "input_layer"):
        keep_fp32_layers(engine.module)  # the attack's delta reaches the network intact; norms match
    reducer = make_reducer(comm, seed)
    engine_seam.install(engine, reducer, comm.overlap_bucket_mb if comm.overlap else None)
    return engine, reducer


def check_cuda() -> None:
    """GPUs on the machine that torch cannot use (a driver older than the torch build, a CPU-only build) would
    silently train on the CPU over gloo: refuse, naming the mismatch, unless DAT_DS_ALLOW_CPU=1 says to go on."""
    import shutil

    if torch.cuda.is_available() or os.environ.get("DAT_DS_ALLOW_CPU") == "1":
        return
    gpus = os.path.exists("/dev/nvidiactl") or bool(shutil.which("nvidia-smi"))
    if not gpus:
        return
    try:
        torch.cuda.init()
        why = "torch.cuda.is_available() is False"
    except Exception as e:  # noqa: BLE001 - the driver or runtime's own words are the useful part
        why = str(e).strip().splitlines()[0][:300]
    build = (
        f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
        if torch.version.cuda
        else (f"torch {torch.__version__} is a CPU-only build")
    )
    from .config import ConfigError

    raise ConfigError(
        f"this machine has NVIDIA GPUs but {build} cannot use them ({why}): install a torch build that matches the "
        "driver (nvidia-smi shows the CUDA version it supports), e.g. make setup TORCH_INDEX_URL="
        "https://download.pytorch.org/whl/cu124, or set DAT_DS_ALLOW_CPU=1 to train on the CPU on purpose"
    )


SHARED_ENV = ("DAT_DS_", "OMP_NUM_THREADS")  # variables every rank must see as the launching host set them


def share_environment(device: torch.device) -> list[str]:
    """Collective: rank 0's values of the variables dat-ds reads on every rank (``DAT_DS_*``, ``OMP_NUM_THREADS``)
    reach the ranks that lack them. DeepSpeed's multi-node launch forwards only NCCL*, PYTHON*, MV2*, UCX*, MLFLOW*
    and what ``.deepspeed_env`` lists; this closes the gap for dat-ds's own. Returns, on each rank, the names it
    adopted; a rank whose own value differs keeps it and says so."""
    import torch.distributed as dist

    mine = {k: v for k, v in os.environ.items() if k.startswith(SHARED_ENV)} if dist.get_rank() == 0 else None
    theirs = broadcast_json(mine, device)
    adopted = []
    for k, v in (theirs or {}).items():
        if not isinstance(k, str) or not isinstance(v, str) or not k.startswith(SHARED_ENV):
            continue
        if k not in os.environ:
            os.environ[k] = v
            adopted.append(k)
        elif os.environ[k] != v and dist.get_rank() != 0:
            print(
                f"dat-ds: rank {dist.get_rank()}: {k}={os.environ[k]!r} here, {v!r} on rank 0; keeping this host's",
                file=sys.stderr,
                flush=True,
            )
    return adopted


def broadcast_json(obj, device: torch.device):
    """Collective: rank 0's ``obj`` (JSON-serializable) on every rank, sent as JSON bytes (never pickle)."""
    import torch.distributed as dist

    raw = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    n = torch.tensor([len(raw)], dtype=torch.int64, device=device)
    dist.broadcast(n, 0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == 0:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return json.loads(bytes(buf.cpu().tolist()).decode())
