"""LALR against a closed-form reference, on a real non-convex problem, through a DeepSpeed checkpoint, and across
2 ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from dat_ds.optim import LALR


def reference_step(theta, grad, *, lr, wd, c_l, c_u, eps, betas=(0.9, 0.999), adapt=True):
    """theta - tau(||theta||) * lr * u / ||u|| for the first Adam step (m_hat = g, v_hat = g^2), in float64."""
    t, g = theta.double(), grad.double()
    u = g / (g.abs() + eps) + wd * t
    wn, un, gn = t.norm(), u.norm(), g.norm()
    if not adapt:
        return t - lr * u
    if gn == 0:  # guard: plain decoupled weight decay
        return t - lr * wd * t
    if wn == 0 or un == 0:  # guard: trust ratio 1
        return t - lr * u
    tau = wn.clamp(c_l, c_u)
    return t - tau * lr * u / un


def test_one_step_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    cases = {
        "ordinary": (torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)),
        "tau clipped above (||w|| > c_u)": (
            torch.randn(64, 64, generator=g) * 3,
            torch.randn(64, 64, generator=g),
        ),
        "tau clipped below (||w|| < c_l)": (torch.randn(5, generator=g) * 1e-3, torch.randn(5, generator=g)),
        "zero weight norm": (torch.zeros(6), torch.randn(6, generator=g)),
        "zero gradient (zero-init BN)": (torch.randn(7, generator=g), torch.zeros(7)),
    }
    kw = dict(lr=0.01, wd=0.05, c_l=0.1, c_u=10.0, eps=1e-6)
    params = [torch.nn.Parameter(w.clone()) for w, _ in cases.values()]
    for p, (_, gr) in zip(params, cases.values(), strict=True):
        p.grad = gr.clone()
    opt = LALR(
        params, lr=kw["lr"], weight_decay=kw["wd"], c_lower=kw["c_l"], c_upper=kw["c_u"], eps=kw["eps"]
    )
    opt.step()
    for (name, (w, gr)), p in zip(cases.items(), params, strict=True):
        ref = reference_step(w, gr, **kw)
        assert torch.allclose(p.detach().double(), ref, rtol=1e-5, atol=1e-7), name
    ratios = opt.last_trust_ratios[0]
    norms = [w.norm() for w, _ in cases.values()]
    assert norms[1] > 10 and norms[2] < 0.1, "the cases do hit both clip ends"
    assert ratios[3] == 1 and ratios[4] == 1, "guards give trust ratio 1"


def test_zero_gradient_layer_is_not_shrunk_by_one_over_wd():
    # timm zero-inits the last BN weight of each residual block; a layer with zero gradient and weight decay inside
    # u must decay like plain weight decay, not by lr per step (ratio 1/wd).
    w = torch.nn.Parameter(torch.ones(16))
    opt = LALR([w], lr=0.1, weight_decay=1e-4, c_upper=10.0)
    for _ in range(10):
        w.grad = torch.zeros(16)
        opt.step()
    assert torch.allclose(w.detach(), torch.full((16,), (1 - 0.1 * 1e-4) ** 10))


def test_groups_without_adaptation_take_plain_steps():
    w = torch.nn.Parameter(torch.randn(5))
    w0 = w.detach().clone()
    w.grad = torch.randn(5)
    LALR([{"params": [w], "adapt": False, "weight_decay": 0.0}], lr=0.1, eps=1e-6).step()
    u = w.grad / (w.grad.abs() + 1e-6)
    assert torch.allclose(w.detach(), w0 - 0.1 * u, atol=1e-6)


@pytest.mark.parametrize("moments", ["adam", "momentum"])
def test_converges_on_a_small_nonconvex_problem(moments):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = LALR(net.parameters(), lr=0.02 if moments == "adam" else 0.05, moments=moments, weight_decay=1e-4)
    first = F.cross_entropy(net(x), y).item()
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    acc = (net(x).argmax(1) == y).float().mean().item()
    assert loss.item() < 0.25 * first and acc > 0.93


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    from dat_ds.comm.transport import GradientReducer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial weights
    net = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 5))
    opt = LALR(net.parameters(), lr=0.01, weight_decay=0.01)
    reducer = GradientReducer(topology="ps", bits=8, two_sided=True)
    torch.manual_seed(100 + rank)  # different data on each rank
    ratios = []
    for _ in range(5):
        loss = F.cross_entropy(net(torch.randn(16, 20)), torch.randint(0, 5, (16,)))
        opt.zero_grad()
        loss.backward()
        flat = torch.cat([p.grad.flatten() for p in net.parameters()])
        reducer.reduce_(flat)
        torch._utils._unflatten_dense_tensors(flat, [p.grad for p in net.parameters()])
        for p, g in zip(
            net.parameters(),
            torch._utils._unflatten_dense_tensors(flat, [p.grad for p in net.parameters()]),
            strict=True,
        ):
            p.grad.copy_(g)
        opt.step()
        ratios.append(opt.last_trust_ratios[0].clone())
    mine = torch.stack(ratios)
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine)
    if rank == 0:
        torch.save({"r0": both[0], "r1": both[1]}, out)
    dist.barrier()  # gloo aborts a rank that tears down while its peer still works
    dist.destroy_process_group()


def test_trust_ratios_identical_across_two_ranks(tmp_path):
    out = tmp_path / "ratios.pt"
    mp.start_processes(_two_rank_worker, args=(_free_port(), str(out)), nprocs=2, start_method="spawn")
    r = torch.load(out, weights_only=True)
    assert torch.equal(r["r0"], r["r1"])
    assert not torch.all(r["r0"] == 1), "the ratios are real trust ratios, not the guard"


def _ckpt_worker(rank: int, port: int, ckdir: str, out: str) -> None:
    import deepspeed

    from dat_ds.engine import skip_cpu_shm_build

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    skip_cpu_shm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }

    def engine():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = LALR(net.parameters(), lr=0.01, weight_decay=0.01)
        return deepspeed.initialize(model=net, optimizer=opt, config=cfg)[0]

    def step(e, seed):
        g = torch.Generator().manual_seed(seed)
        loss = F.cross_entropy(e(torch.randn(8, 10, generator=g)), torch.randint(0, 3, (8,), generator=g))
        e.backward(loss)
        e.step()

    a = engine()
    for s in range(3):
        step(a, s)
    a.save_checkpoint(ckdir, tag="t")
    step(a, 99)
    b = engine()
    from dat_ds.checkpoint import secure_checkpoint_engine

    secure_checkpoint_engine(b)  # the LALR state loads with weights_only=True
    b.load_checkpoint(ckdir, tag="t")
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    steps = [float(v["step"]) for v in sb["state"].values()]  # read now: the state tensors update in place
    step(b, 99)
    same_params = all(
        torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters(), strict=True)
    )
    torch.save({"same_params": same_params, "steps": steps, "n_state": len(sa["state"])}, out)


def test_state_roundtrips_through_a_deepspeed_checkpoint(tmp_path):
    out = tmp_path / "res.pt"
    mp.start_processes(
        _ckpt_worker, args=(_free_port(), str(tmp_path / "ck"), str(out)), nprocs=1, start_method="spawn"
    )
    r = torch.load(out, weights_only=True)
    assert r["n_state"] == 4 and r["steps"] == [3.0] * 4
    assert r["same_params"], "the step after loading equals the step after saving, bit for bit"
