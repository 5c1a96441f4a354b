"""Two simulated hosts (network namespaces, their own addresses) launched through the deepspeed launcher's
multi-node path with a hostfile (``--no_ssh``, one launcher per host, as a scheduler would start them).

Skipped with the reason where namespaces cannot be made (not root, no ``ip netns``).
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

pytestmark = [pytest.mark.launcher, pytest.mark.skipif(available() is not None, reason=str(available()))]

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


def start_hosts(c, tmp_path, ov, port, extra=()):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"h{i} slots=1\n" for i in range(c.n)))
    logs = [open(tmp_path / f"host{i}.log", "w") for i in range(c.n)]  # noqa: SIM115
    procs = [
        c.popen(
            i, host_cmd(c, i, hostfile, port, ov, extra), launch_env(tmp_path), cwd=REPO, stdout=f, stderr=f
        )
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


def test_two_hosts_match_one_host(tmp_path, digits_dir, monkeypatch):
    # Same per-rank compute on both layouts: one thread a rank (1 host x 2 ranks would get 1 thread each, 2 hosts x 1
    # rank 2 each, and a different summation order in the kernels).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ref = run_launcher(tmp_path, "digits_dat_pgd.toml", overrides(tmp_path, digits_dir, "one"), port=29711)
    assert ref.returncode == 0, ref.stderr[-3000:]
    with SimCluster(2) as c:
        procs, logs = start_hosts(c, tmp_path, overrides(tmp_path, digits_dir, "two"), 29712)
        codes, _ = finish(procs, logs, 300)
    assert codes == [0, 0], (tmp_path / "host0.log").read_text()[-3000:] + (
        tmp_path / "host1.log"
    ).read_text()[-2000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for ra, rb in zip(a, b, strict=True):
        for k in ("train_loss", "train_adv_acc", "clean_acc", "pgd_acc", "lr", "steps", "world_size"):
            assert ra[k] == rb[k], (k, ra[k], rb[k])
    wa, wb = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


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
