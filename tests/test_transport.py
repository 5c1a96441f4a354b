"""The transport across 2 real processes over gloo: exact means, bounds, identical replicas, measured bytes."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dat_ds.comm.codec import Codec
from dat_ds.comm.transport import GradientReducer

SETTINGS = [
    dict(topology="hpc", bits=32),
    dict(topology="hpc", bits=16),
    dict(topology="ps", bits=32),
    dict(topology="ps", bits=16),
    dict(topology="ps", bits=8),
    dict(topology="ps", bits=8, two_sided=True),
    dict(topology="ps", bits=4, two_sided=True),
    dict(topology="ps", bits=8, two_sided=True, error_feedback=True, rounding="stochastic"),
    dict(topology="ps", bits=8, codec="qsgd"),
    dict(topology="ps", bits=4, two_sided=True, codec="qsgd"),
]
N = 300_001  # not a multiple of anything: padding paths run
SIZES = [1000, 150_000, 7, N - 151_007]  # the "tensors" the qsgd codec scales one by one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, generator=g) * torch.rand(N, generator=g) ** 3
    everyone = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everyone, x)
    exact = torch.stack(everyone).double().mean(0).float()
    plain = x.clone()
    dist.all_reduce(plain)
    plain /= world
    results = {}
    for i, s in enumerate(SETTINGS):
        r = GradientReducer(bucket_mb=0.5, **s)  # 0.5 MB rounds: 300k values take 2 rounds on 2 ranks
        y = x.clone()
        r.reduce_(y, sizes=SIZES if s.get("codec") == "qsgd" else None)
        replicas = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(replicas, y)
        results[i] = dict(
            y=y,
            identical=all(torch.equal(replicas[0], t) for t in replicas),
            sent=r.stats.bytes_sent,
            recv=r.stats.bytes_recv,
            wire=r.stats.wire_sent,
            wire_calls=r.stats.wire_calls,
        )
    # Gradients far below fp16's normal range (1e-9 .. 1e-6): the 16-bit all-reduce must not flush them.
    tiny = x * 1e-6
    r = GradientReducer(topology="hpc", bits=16)
    t = tiny.clone()
    r.reduce_(t)
    results["tiny"] = dict(y=t, exact=exact * 1e-6)
    if rank == 0:
        torch.save(
            dict(results=results, exact=exact, plain=plain, inputs=torch.stack(everyone)),
            os.path.join(out_dir, "out.pt"),
        )
    dist.barrier()  # gloo aborts a rank that tears down while its peer still works
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("transport")
    mp.start_processes(_worker, args=(2, _free_port(), str(d)), nprocs=2, start_method="spawn")
    return torch.load(d / "out.pt", weights_only=True)


@pytest.mark.parametrize("i", range(len(SETTINGS)), ids=[str(s) for s in SETTINGS])
def test_aggregate(two_rank_results, i):
    s = SETTINGS[i]
    res = two_rank_results["results"][i]
    exact, plain, inputs = two_rank_results["exact"], two_rank_results["plain"], two_rank_results["inputs"]
    y = res["y"]
    assert res["identical"], "all ranks end bit-identical"
    if s["bits"] == 32:
        assert torch.equal(y, plain), "32 bits is a plain all-reduce, exactly"
    else:
        # Per value: each upload errs by at most its block's scale (scale/2 for nearest), so the mean errs by the
        # mean of those; a 2-sided download adds the aggregate's own block scale; fp16 (hpc 16) errs by its ulps.
        if s["topology"] == "hpc":
            bound = (inputs.abs().max(0).values + exact.abs()) * 2**-10
        elif s.get("codec") == "qsgd":
            # Stochastic rounding to levels of norm/s, s = 2^(b-1) - 1, the norm of the value's whole tensor: each
            # upload errs by less than its tensor's level; a 2-sided download by less than the aggregate's (the
            # transport may scale a piece of a tensor, whose norm is smaller).
            s_levels = 2 ** (s["bits"] - 1) - 1

            def levels(v):
                return torch.cat([p.norm().expand(len(p)) for p in v.split(SIZES)]) / s_levels

            bound = torch.stack([levels(v) for v in inputs]).mean(0)
            if s.get("two_sided"):
                bound = bound + levels(exact.abs() + bound) * 1.01
        else:
            c = Codec(bits=s["bits"], block=512)
            k = 1.0 if s.get("rounding") == "stochastic" else 0.5

            def scales(v):
                pad = torch.zeros(-(-len(v) // 1024) * 1024)
                pad[: len(v)] = v.abs()
                return (pad.reshape(-1, 512).amax(1) / c.qmax).repeat_interleave(512)[: len(v)]

            bound = k * torch.stack([scales(v) for v in inputs]).mean(0)
            if s.get("two_sided"):
                bound = bound + k * scales(exact) * 1.01 + k * scales(bound)
        # blocks never straddle the owners' chunks, so the padded layout above matches the transport's
        assert ((y - exact).abs() <= bound + 1e-7).all()
        assert not torch.equal(y, exact)


def sent_per_rank(s: dict, n: int, world: int) -> float:
    """Bytes a rank sends for one exchange of ``n`` values, by the paper's count written out here (b/8 bytes a
    value, nothing for scales or padding): a ring all-reduce sends 2 (W-1)/W of the buffer; the parameter server
    sends (W-1)/W of the values up at b bits and (W-1)/W of its mean down, at b bits (2-sided) or 32 (1-sided)."""
    if s["topology"] == "hpc":
        return 2 * (world - 1) / world * n * s["bits"] / 8
    down = s["bits"] if s.get("two_sided") else 32
    return (world - 1) / world * n * (s["bits"] + down) / 8


@pytest.mark.parametrize("i", range(len(SETTINGS)), ids=[str(s) for s in SETTINGS])
def test_wire_bytes_measured_within_3_percent_of_theory(two_rank_results, i):
    """The bytes gloo wrote to its sockets during the exchange (``/proc/self/io``), against the paper's count
    (b/8 bytes a value; each rank receives what it sends)."""
    res = two_rank_results["results"][i]
    assert res["wire_calls"] == 1
    theory_sent = sent_per_rank(SETTINGS[i], N, 2)
    assert abs(res["wire"] - theory_sent) / theory_sent < 0.03, (res["wire"], theory_sent)
    if SETTINGS[i]["topology"] == "ps":
        assert res["sent"] == res["recv"]
        assert abs(res["wire"] - res["sent"]) / res["sent"] < 0.01, "posted buffers = what reached the wire"


def test_fp16_all_reduce_keeps_tiny_gradients(two_rank_results):
    res = two_rank_results["results"]["tiny"]
    y, exact = res["y"], res["exact"]
    assert exact.abs().max() < 6e-5, "all below fp16's normal range"
    assert ((y - exact).abs() <= exact.abs().max() * 2**-9).all()
