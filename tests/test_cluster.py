"""Two hosts launched through the deepspeed launcher's multi-node path with a hostfile (``--no_ssh``, one launcher
per host, as a scheduler would start them): on loopback (every runner), and as simulated hosts in network
namespaces with their own addresses (root only: a lost host, a cut link). The namespace tests skip with the reason
elsewhere, and ``make test``'s summary prints a ``NOT RUN:`` line for each (tests/conftest.py).
"""

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, VENV_BIN, launch_env, read_metrics, run_launcher, wait_for
from tests.sim_cluster import SimCluster, available

NETNS = available()
needs_netns = pytest.mark.skipif(
    NETNS is not None, reason=f"NOT RUN: needs root and network namespaces ({NETNS})"
)
pytestmark = [pytest.mark.launcher]


class Loopback:
    """Two "hosts" that are two launchers on this machine's loopback address: the multi-node launch path (hostfile,
    --node_rank, a master address) without namespaces, so without root."""

    n = 2
    addr = ["127.0.0.1", "127.0.0.1"]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def popen(self, host, cmd, env, **kw):
        return subprocess.Popen(cmd, env=env, start_new_session=True, **kw)


COMMON = [
    "train.epochs=2",
    "train.max_steps_per_epoch=6",
    "train.deterministic=true",
    "train.micro_batch_size=64",
    "attack.steps=2",
    "checkpoint.every_steps=2",
    "train.collective_timeout_s=20",
    "eval.pgd_steps=2",
]


def overrides(tmp_path, digits_dir, name):
    return [f'data.shards="{digits_dir}"', f'out_dir="{tmp_path}"', f'name="{name}"', *COMMON]


def host_cmd(c, host, hostfile, port, ov, extra=()):
    cmd = [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(host)]
    cmd += ["--master_addr", c.addr[0], "--master_port", str(port), "--module", "dat_ds.train"]
    cmd += [str(REPO / "recipes" / "digits_dat_pgd.toml")]
    for o in ov:
        cmd += ["--set", o]
    return cmd + list(extra)


def start_hosts(c, tmp_path, ov, port, extra=(), host0_env=None):
    """One launcher per host; ``host0_env``: variables set on the launching host (host 0) alone."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"h{i} slots=1\n" for i in range(c.n)))
    logs = [open(tmp_path / f"host{i}.log", "w") for i in range(c.n)]  # noqa: SIM115
    envs = [
        {**launch_env(tmp_path), **(host0_env or {})} if i == 0 else launch_env(tmp_path) for i in range(c.n)
    ]
    procs = [
        c.popen(i, host_cmd(c, i, hostfile, port, ov, extra), envs[i], cwd=REPO, stdout=f, stderr=f)
        for i, f in enumerate(logs)
    ]
    return procs, logs


def finish(procs, logs, timeout):
    t0 = time.time()
    codes = [p.wait(timeout=max(1, timeout - (time.time() - t0))) for p in procs]
    for f in logs:
        f.close()
    return codes, time.time() - t0


def ranks_in(ns):
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in out:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"dat_ds.train" in cmd and b"--local_rank" in cmd:
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def one_host(tmp_path_factory, digits_dir):
    """The reference: both ranks on one host (one thread a rank, as each host below gets)."""
    tmp = tmp_path_factory.mktemp("one_host")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ref = run_launcher(tmp, "digits_dat_pgd.toml", overrides(tmp, digits_dir, "one"), port=29711)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    assert ref.returncode == 0, ref.stderr[-3000:]
    return tmp / "one"


@pytest.mark.parametrize("hosts", ["loopback", pytest.param("netns", marks=needs_netns)])
def test_two_hosts_match_one_host(hosts, one_host, tmp_path, digits_dir, monkeypatch):
    # Same per-rank compute on both layouts: one thread a rank (1 host x 2 ranks would get 1 thread each, 2 hosts x 1
    # rank 2 each, and a different summation order in the kernels).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with Loopback() if hosts == "loopback" else SimCluster(2) as c:
        # set on the launching host only, as a user exports it in the shell that runs deepspeed: the rank on host 1
        # (whose launcher did not get it, as DeepSpeed's pdsh/ssh launch would not forward it) takes rank 0's value
        probe = {"DAT_DS_SHARD_CACHE_GB": "7", "DAT_DS_PROGRESS_EVERY": "30"}
        port = 29712 if hosts == "netns" else 29713
        procs, logs = start_hosts(c, tmp_path, overrides(tmp_path, digits_dir, "two"), port, host0_env=probe)
        codes, _ = finish(procs, logs, 300)
    host1 = (tmp_path / "host1.log").read_text()
    assert codes == [0, 0], (tmp_path / "host0.log").read_text()[-3000:] + host1[-2000:]
    assert "rank 1: DAT_DS_PROGRESS_EVERY, DAT_DS_SHARD_CACHE_GB taken from rank 0" in host1, host1[-3000:]
    a, b = read_metrics(one_host), read_metrics(tmp_path / "two")
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "train_adv_acc", "clean_acc", "pgd_acc", "lr", "steps", "world_size"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
    wa, wb = load_file(one_host / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_netns
@pytest.mark.parametrize("fault", ["kill9_rank_on_host1", "cut_link_of_host1"])
def test_a_lost_host_stops_every_rank_then_resume_finishes(tmp_path, digits_dir, fault):
    ov = overrides(tmp_path, digits_dir, "f")
    with SimCluster(2) as c:
        procs, logs = start_hosts(c, tmp_path, ov, 29721)
        wait_for(tmp_path / "f" / "checkpoints" / "step00000002" / "COMPLETE", procs[0])
        if fault.startswith("kill9"):
            (pid,) = ranks_in(c.ns[1])
            os.kill(pid, signal.SIGKILL)
        else:
            c.cut(1)
        codes, took = finish(procs, logs, 90)
        assert all(codes), codes
        assert took < 60, f"took {took:.0f} s to stop every rank"
        assert not ranks_in(c.ns[0]) and not ranks_in(c.ns[1])
        log0 = (tmp_path / "host0.log").read_text()
        if fault.startswith("kill9"):
            assert "lost contact with rank(s) [1] at 10.78.0.2" in log0, log0[-3000:]
        else:
            assert "collective" in log0 and "--resume auto" in log0, log0[-3000:]
        assert not (tmp_path / "f" / "model.safetensors").exists()
    with SimCluster(2) as c:
        procs, logs = start_hosts(c, tmp_path, ov, 29722, extra=["--resume", "auto"])
        codes, _ = finish(procs, logs, 300)
    assert codes == [0, 0], (tmp_path / "host0.log").read_text()[-3000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "f")] == [1, 2]
    assert "resumed from" in (tmp_path / "host0.log").read_text()
