"""The GPU paths, for the first machine with a CUDA device (``make gpu-check`` runs these and prints PASS/FAIL per
check; elsewhere they skip with the reason). None of them has run yet: this project has had no GPU.

What each asserts, with its tolerance:
- bf16: the input layer and norms stay fp32 on CUDA, and an eps = 2/255 perturbation reaches the input layer
  within 1 % (as tests/test_models.py on the CPU);
- codec: torch.compile'd kernels on CUDA give the eager kernels' bytes and values, every path;
- transports: hpc and ps at 32/16/8/4 bits on 2 ranks over NCCL (2+ GPUs) or gloo on CUDA tensors (1 GPU: NCCL
  refuses two ranks on one device): the exact mean at 32 bits, within the quantizer's bound below, replicas
  bit-identical;
- overlap: gradient buckets reduced on a side CUDA stream during backward give weights bit-identical to the plain
  path at fp32, in the real DeepSpeed engine;
- evaluation and certification on CUDA match the CPU, paired per example: clean predictions differ on at most 1 %
  of the images, PGD outcomes on at most 3 %, certified predictions on at most 2 % (float order differs);
- a 2-epoch digits run through the deepspeed launcher on the GPUs with ``ds_config = "auto"`` (bf16) finishes, its
  replicas identical, its clean accuracy above 90 %.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import REPO, run_launcher

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check on a GPU machine)"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_and_device(rank: int) -> tuple[str, torch.device]:
    n = torch.cuda.device_count()
    device = torch.device(f"cuda:{rank % n}")
    torch.cuda.set_device(device)
    return ("nccl" if n >= 2 else "gloo"), device


@pytest.fixture(scope="module")
def digits_model(digits_dir):
    """A small digits model trained full-batch on the CPU (as tests/test_evaluate.py's), and the test split."""
    from dat_ds.config import load_config
    from dat_ds.data.loader import make_eval_loader
    from dat_ds.data.shards import load_index
    from dat_ds.models import build_model

    cfg = load_config(REPO / "recipes/digits_dat_pgd.toml", [f'data.shards="{digits_dir}"'])
    index = load_index(digits_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1, index.mean, index.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ((x, y),) = list(
        make_eval_loader(index, "train", rank=0, world=1, augment="none", image_size=8, batch_size=1437)
    )
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x.float() / 255), y).backward()
        opt.step()
    ((xt, yt),) = list(
        make_eval_loader(index, "test", rank=0, world=1, augment="none", image_size=8, batch_size=360)
    )
    return model.eval(), xt.float() / 255, yt


def test_bf16_input_layer_stays_fp32_and_delta_arrives_on_cuda():
    from dat_ds.config import ModelConfig
    from dat_ds.models import build_model, to_low_precision
    from tests.test_models import _delta_seen_error

    torch.manual_seed(0)
    m = build_model(ModelConfig(name="resnet18"), 10, 3, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).cuda()
    to_low_precision(m.eval(), torch.bfloat16)
    assert m.net.conv1.weight.dtype == torch.float32 and m.net.fc.weight.dtype == torch.bfloat16
    assert m.net.bn1.weight.dtype == torch.float32
    x = torch.rand(4, 3, 32, 32, device="cuda")
    delta = torch.empty_like(x).uniform_(-2 / 255, 2 / 255)
    delta = (x + delta).clamp(0, 1) - x
    assert _delta_seen_error(m, x, delta, cast_pixels=False) < 0.01
    assert m(x).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_compiled_codec_on_cuda_equals_eager(monkeypatch, bits):
    import dat_ds.comm.codec as cm
    from dat_ds.comm.codec import Codec

    n = cm.COMPILE_MIN_NUMEL
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, n, generator=g, device="cuda") * torch.rand(2, n, generator=g, device="cuda") ** 2
    base = torch.randn(n, generator=g, device="cuda")

    def run():
        out = []
        for rounding in ("nearest", "stochastic"):
            c = Codec(bits=bits, rounding=rounding)
            gen = torch.Generator(device="cuda").manual_seed(7)
            enc = torch.stack([c.encode(x[0], generator=gen), c.encode(x[1], generator=gen)])
            out += [enc, c.decode(enc[0], n), c.decode(enc[1], n, out=base.clone(), accumulate=True),
                    c.decode_mean(enc, n, torch.empty(n, device="cuda"))]  # fmt: skip
        return out

    monkeypatch.setenv("DAT_DS_COMPILE_CODEC", "0")
    eager = run()
    monkeypatch.setenv("DAT_DS_COMPILE_CODEC", "1")
    monkeypatch.setattr(cm, "_compile_failed", False)
    compiled = run()
    assert not cm._compile_failed, "torch.compile failed on CUDA"
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


TRANSPORTS = [
    dict(topology="hpc", bits=32),
    dict(topology="hpc", bits=16),
    dict(topology="ps", bits=32),
    dict(topology="ps", bits=8),
    dict(topology="ps", bits=8, two_sided=True),
    dict(topology="ps", bits=4, two_sided=True),
    dict(topology="ps", bits=8, codec="qsgd"),
]


def _transport_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from dat_ds.comm.transport import GradientReducer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend, device = _backend_and_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(100 + rank)
    n = 300_001
    x = (torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3).to(device)
    everyone = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everyone, x)
    exact = torch.stack(everyone).double().mean(0).float()
    out = {"backend": backend}
    for i, s in enumerate(TRANSPORTS):
        r = GradientReducer(bucket_mb=0.5, **s)
        y = x.clone()
        r.reduce_(y, sizes=[1000, 150_000, 7, n - 151_007] if s.get("codec") == "qsgd" else None)
        replicas = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(replicas, y)
        out[i] = dict(
            identical=all(torch.equal(replicas[0], t) for t in replicas),
            err=((y - exact).abs().max() / exact.abs().max()).item(),
        )
    if rank == 0:
        (open(os.path.join(out_dir, "out.json"), "w")).write(json.dumps(out))
    dist.destroy_process_group()


def test_transports_on_cuda_two_ranks(tmp_path):
    mp.start_processes(
        _transport_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    out = json.loads((tmp_path / "out.json").read_text())
    bound = {
        32: 1e-6,
        16: 2e-3,
        8: 2e-2,
        4: 0.3,
    }  # of the largest value: fp16, block 8- and 4-bit, qsgd 8-bit
    for i, s in enumerate(TRANSPORTS):
        r = out[str(i)]
        assert r["identical"], (out["backend"], s)
        limit = 0.05 if s.get("codec") == "qsgd" else bound[s["bits"]]
        assert r["err"] <= limit, (out["backend"], s, r["err"])


def _overlap_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import deepspeed

    from dat_ds.comm import engine_seam
    from dat_ds.comm.transport import GradientReducer
    from tests.test_overlap import Net

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    backend, device = _backend_and_device(rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    params = {}
    for overlap in (False, True):
        torch.manual_seed(0)
        model = Net().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cfg = {"train_batch_size": 16 * world, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
               "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}}  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        engine_seam.install(engine, GradientReducer(topology="hpc", bits=32), 0.01 if overlap else None)
        g = torch.Generator().manual_seed(1000 + rank)
        for _ in range(3 * 2):
            x, y = (
                torch.randn(8, 1, 8, 8, generator=g).to(device),
                torch.randint(0, 10, (8,), generator=g).to(device),
            )
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
        params[overlap] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
        if engine.dat_overlap is not None:
            engine.dat_overlap.close()
    if rank == 0:
        open(os.path.join(out_dir, "out.json"), "w").write(
            json.dumps({"equal": torch.equal(params[False], params[True]), "backend": backend})
        )
    dist.destroy_process_group()


def test_overlap_on_a_side_stream_is_bit_identical_at_fp32(tmp_path):
    mp.start_processes(_overlap_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["equal"], out


def test_evaluation_on_cuda_matches_the_cpu(digits_model):
    from dat_ds.robust_eval import AttackSettings, chunk_results

    model, x, y = digits_model
    s = AttackSettings(eps=0.05, pgd_steps=10, pgd_step_size=0.0125, pgd_restarts=1, autoattack=False)
    cpu = chunk_results(model, x, y, s, seed=0, device=torch.device("cpu"))
    gpu = chunk_results(model.cuda(), x, y, s, seed=0, device=torch.device("cuda"))
    model.cpu()
    assert (cpu["clean"] != gpu["clean"]).float().mean() <= 0.01
    assert (cpu["pgd"] != gpu["pgd"]).float().mean() <= 0.03


def test_certification_on_cuda_matches_the_cpu(digits_model):
    from dat_ds.smoothing import sample_counts

    model, x, _ = digits_model
    counts = {}
    for dev in ("cpu", "cuda"):
        g = torch.Generator().manual_seed(5)
        counts[dev] = sample_counts(model.to(dev), x[:100].to(dev), 0.25, 200, 10, g, batch=1000)
    model.cpu()
    agree = (counts["cpu"].argmax(1) == counts["cuda"].argmax(1)).float().mean()
    assert agree >= 0.98, agree


def test_digits_two_epochs_through_the_launcher_on_gpus(tmp_path, digits_dir):
    n = min(2, torch.cuda.device_count())
    ov = [f'data.shards="{digits_dir}"', f'out_dir="{tmp_path}"', 'name="gpu"', "train.epochs=2",
          'train.ds_config="auto"', f"train.global_batch_size={64 * n}", "train.micro_batch_size=64"]  # fmt: skip
    proc = run_launcher(tmp_path, "digits_dat_pgd.toml", ov, nproc=n, port=29901)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(ln) for ln in (tmp_path / "gpu/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1, 2]
    assert all(r["replicas_identical"] for r in recs)
    assert recs[-1]["clean_acc"] > 0.9
