"""Real ranks through the stock deepspeed launcher (CPU accelerator, gloo)."""

import json
import os
import subprocess
import time

import pytest
import timm
import torch
from safetensors.torch import load_file

import dat_ds.models  # noqa: F401  (registers dat_digits_cnn with timm)
from dat_ds.layer_stats import read_layer_stats
from tests.conftest import (
    REPO,
    VENV_BIN,
    deepspeed_cmd,
    kill_tree,
    launch_env,
    proc_pids,
    read_metrics,
    run_launcher,
    start,
    wait_for,
)

pytestmark = pytest.mark.launcher

DIGITS_CNN_PARAMS = 94186


def base(tmp_path, digits_dir, name, *extra):
    return [f'data.shards="{digits_dir}"', f'out_dir="{tmp_path}"', f'name="{name}"', *extra]


def test_two_ranks_train_evaluate_track_checkpoint_export(tmp_path, digits_dir):
    ov = base(tmp_path, digits_dir, "two", "train.epochs=2", "train.micro_batch_size=32", "attack.steps=3",
              "log.every_steps=2", 'log.group="g1"', 'log.tags=["smoke", "two-ranks"]', 'log.wandb_mode="offline"')  # fmt: skip
    proc = run_launcher(tmp_path, "digits_dat_pgd.toml", ov, port=29621)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "two"
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        for k in ("train_loss", "lr", "clean_acc", "pgd_acc", "epoch_time_s", "comm_time_s", "images_per_s"):
            assert isinstance(r[k], float), k
        assert r["world_size"] == 2 and r["eval_n"] == 360
        # Every gradient value reduced exactly once per optimizer step (accumulation 2: micro-steps reduce nothing).
        assert r["grad_values_reduced_per_step"] == DIGITS_CNN_PARAMS
        assert r["reduce_calls_per_step"] == 1
        assert r["replicas_identical"] is True
        assert 0 < r["comm_exposed_s"] <= r["comm_time_s"] < r["epoch_time_s"]
        # measured on the wire (gloo's socket writes), against the ring all-reduce's count written out here: each
        # rank sends and receives 2 (W-1)/W of the fp32 gradient a step
        ring = 2 * 2 * (2 - 1) / 2 * DIGITS_CNN_PARAMS * 4 / 1e6
        assert r["data_mb_source"] == "wire"
        assert abs(r["data_mb_per_iter"] / ring - 1) < 0.03
    assert recs[1]["clean_acc"] > 0.5
    assert json.loads((run / "recipe.json").read_text())["train"]["micro_batch_size"] == 32
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run written by rank 0"
    # per-step lines every 2 optimizer steps, in steps.jsonl and in the wandb run, read back from wandb's own files
    steps = [json.loads(ln) for ln in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(2, recs[-1]["steps"] + 1, 2))
    for r in steps:
        assert r["loss"] > 0 and 0 <= r["adv_acc"] <= 1 and r["lr"] >= 0 and r["images_per_s"] > 0
        assert r["comm_s_per_step"] > 0 and r["mb_per_step"] > 0
    assert len({r["lr"] for r in steps}) > 2, "the schedule moves the LR between lines"
    from dat_ds.tracking import read_wandb_records

    def wandb_rows():
        return read_wandb_records(run)

    rows = wandb_rows()
    per_step = [r["values"] for r in rows if r["kind"] == "history" and "step/loss" in r["values"]]
    assert [h["_step"] for h in per_step] == [r["step"] for r in steps]
    assert [h["step/loss"] for h in per_step] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    per_epoch = [r["values"] for r in rows if r["kind"] == "history" and "train_loss" in r["values"]]
    assert [h["clean_acc"] for h in per_epoch] == pytest.approx([r["clean_acc"] for r in recs], rel=1e-9)
    (info,) = [r["values"] for r in rows if r["kind"] == "run"]
    assert (
        info["group"] == "g1"
        and sorted(info["tags"]) == ["smoke", "two-ranks"]
        and info["project"] == "dat-ds"
    )
    assert (run / "wandb_id.txt").read_text().strip() == info["id"]
    assert "wandb sync" in proc.stdout + proc.stderr, "an offline run says how to upload it"
    # an evaluation's results land in the same wandb run (same id), as a summary under eval/
    ev = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "dat_ds.evaluate", str(run), "--subset", "8", "--chunk", "8",
         "--pgd-steps", "2", "--pgd-restarts", "1", "--no-autoattack"],
        env=launch_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((run / "eval.json").read_text())
    rows = wandb_rows()
    runs = {r["values"]["id"] for r in rows if r["kind"] == "run"}
    assert runs == {info["id"]}, "the evaluation resumed training's wandb run"
    summary = {k: v for r in rows if r["kind"] == "summary" for k, v in r["values"].items()}
    assert summary["eval/clean_acc"] == pytest.approx(report["clean_acc"])
    assert summary["eval/pgd_acc"] == pytest.approx(report["pgd_acc"])
    assert proc.stdout.count("epoch 2 |") == 1, "rank 0 alone logs"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["epoch0001", "epoch0002"]
    # The export loads into a plain timm model and reproduces the run's clean accuracy on the test split.
    net = timm.create_model("dat_digits_cnn", num_classes=10, in_chans=1)
    net.load_state_dict(load_file(run / "model.safetensors"))
    from dat_ds.data.loader import make_eval_loader
    from dat_ds.data.shards import load_index

    index = load_index(digits_dir)
    net.eval()
    correct = 0
    for x, y in make_eval_loader(
        index, "test", rank=0, world=1, augment="none", image_size=8, batch_size=360
    ):
        with torch.no_grad():
            correct += (net((x.float() / 255 - index.mean[0]) / index.std[0]).argmax(1) == y).sum().item()
    assert correct / 360 == pytest.approx(recs[-1]["clean_acc"], abs=1e-9)

    # Starting again without --resume refuses to touch the existing run.
    again = run_launcher(tmp_path, "digits_dat_pgd.toml", ov, port=29622)
    assert again.returncode != 0 and "already holds checkpoints" in again.stderr + again.stdout


COMPRESSED_4BIT = [
    'comm.topology="ps"',
    "comm.bits=4",
    "comm.two_sided=true",
    "comm.error_feedback=true",
    'comm.rounding="stochastic"',
    "comm.overlap_bucket_mb=0.1",  # 4 overlapped buckets, each with its own error-feedback residuals
    # and the randomized-smoothing objective with its own noise stream: SmoothAdv, 2 noise draws, warm-up
    'loss.objective="smoothadv"',
    "smoothing.noise_samples=2",
    "smoothing.attack_steps=2",
    "smoothing.attack_warmup_epochs=2",
]


# What a resume may change (config.RESUME_MAY_CHANGE) without changing the training: the fp32 case resumes with
# every entry changed at once (train.epochs aside: it changes the run's length, and with it a schedule over epochs).
MAY_CHANGE = ["train.log_every=3", "train.collective_timeout_s=300", "data.workers=2", "data.eval_limit=100",
              "eval.pgd_steps=3", "eval.batch_size=50", "eval.every_epochs=2", "checkpoint.keep=3",
              "checkpoint.every_steps=5", "checkpoint.every_epochs=2", 'log.project="elsewhere"',
              "log.every_steps=2"]  # fmt: skip


@pytest.mark.parametrize("mode", [[], COMPRESSED_4BIT], ids=["fp32", "4bit-2sided-ef-stochastic-smoothadv"])
def test_kill9_mid_epoch_then_resume_matches_uninterrupted(tmp_path, digits_dir, mode):
    """A run killed mid-epoch and resumed ends bit-identical to one never interrupted. In fp32 the uninterrupted
    run saves no mid-epoch checkpoints (saving must not change the math) and the resume changes every setting a
    resume may change."""
    common = [
        "train.epochs=3",
        "train.deterministic=true",
        "attack.steps=3",
        "train.layer_stats_every=2",
        *mode,
    ]
    saves = ["checkpoint.every_steps=4"]
    ref = run_launcher(
        tmp_path, "digits_dat_pgd.toml", base(tmp_path, digits_dir, "ref", *common, *(saves if mode else [])),
        port=29631,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-3000:]

    ov = base(tmp_path, digits_dir, "killed", *common, *saves)
    proc = start(deepspeed_cmd("digits_dat_pgd.toml", ov, port=29632), tmp_path)
    # 11 steps an epoch: step 16 is mid-epoch 2; kill right after its checkpoint completes.
    wait_for(tmp_path / "killed" / "checkpoints" / "step00000016" / "COMPLETE", proc)
    time.sleep(0.3)
    kill_tree(proc)
    assert not (tmp_path / "killed" / "model.safetensors").exists()

    changed = [] if mode else MAY_CHANGE
    res = run_launcher(
        tmp_path, "digits_dat_pgd.toml", [*ov, *changed], port=29633, extra=["--resume", "auto"]
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    if changed:
        assert "resuming with changed settings" in res.stderr
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "killed")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        monitor = (
            ("clean_acc", "pgd_acc") if not changed or rb["epoch"] == 1 else ()
        )  # eval.* changed after 1
        for k in ("train_loss", "train_adv_acc", "lr", "steps", *monitor):
            assert ra[k] == rb[k], (ra["epoch"], k, ra[k], rb[k])
        assert rb["grad_values_reduced_per_step"] == DIGITS_CNN_PARAMS and rb["replicas_identical"] is True
        if mode:  # overlapped in several buckets, each launched once per step
            assert rb["reduce_calls_per_step"] > 1 and rb["comm_exposed_s"] > 0
    wa = load_file(tmp_path / "ref" / "model.safetensors")
    wb = load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the per-layer log: every second step once, the lines written after step 16 by the killed process dropped
    sa, sb = (read_layer_stats(tmp_path / r / "layer_stats.jsonl") for r in ("ref", "killed"))
    assert [r["step"] for r in sb] == list(range(2, 34, 2)) and sa == sb


def test_three_ranks(tmp_path, digits_dir):
    """3 ranks (a world size no power of two), the reduction after backward, and a corrupt training image under
    data.on_bad_sample = "skip": the run goes on, counts it, and every rank still takes the same steps."""
    from dat_ds.data.loader import epoch_order
    from tests.test_faults import _corrupt_one_image

    first = int(epoch_order(1437, 0, 0)[0])  # in epoch 1's first global batch, whatever the world size
    _corrupt_one_image(digits_dir, tmp_path / "d", first)
    ov = base(
        tmp_path,
        tmp_path / "d",
        "three",
        'data.on_bad_sample="skip"',
        "train.epochs=1",
        "train.global_batch_size=96",
        "train.micro_batch_size=32",
        "attack.steps=2",
        "comm.overlap=false",  # the reduction after backward, through DeepSpeed's own path
    )
    proc = run_launcher(tmp_path, "digits_dat_pgd.toml", ov, nproc=3, port=29641)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = read_metrics(tmp_path / "three")
    assert r["world_size"] == 3 and r["steps"] == 1437 // 96 and r["eval_n"] == 360
    assert r["replicas_identical"] is True and r["grad_values_reduced_per_step"] == DIGITS_CNN_PARAMS
    assert r["comm_exposed_s"] == r["comm_time_s"], "without overlap all communication is exposed"
    assert r["bad_samples_skipped"] == 1


def test_lalr_with_8bit_two_sided_compression_and_accumulation(tmp_path, digits_dir):
    ov = base(
        tmp_path,
        digits_dir,
        "lalr8",
        "train.epochs=2",
        "train.micro_batch_size=32",
        "attack.steps=2",
        'optim.name="lalr"',
        "optim.lr=0.01",
        "train.layer_stats_every=1",
        'comm.topology="ps"',
        "comm.bits=8",
        "comm.two_sided=true",
        "comm.error_feedback=true",
        'comm.rounding="stochastic"',
    )
    proc = run_launcher(tmp_path, "digits_dat_pgd.toml", ov, port=29651)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # LALR's rule, seen in the weights the run produced: each adapted tensor moved by lr * tau(||theta||) (c_u = 10
    # here; ||theta|| before the step is within lr of ||theta|| after it), whatever its gradient's size.
    stats = read_layer_stats(tmp_path / "lalr8" / "layer_stats.jsonl")
    assert [r["step"] for r in stats] == list(range(1, 23))
    checked = 0
    for r in stats:
        for name, (w, d) in r["layers"].items():
            if r["lr"] > 0 and w > 0.05:  # too small a tensor: the 1e-6 Adam epsilon and rounding dominate
                assert abs(d / (r["lr"] * min(w, 10.0)) - 1) < 0.03, (r["step"], name, w, d, r["lr"])
                checked += 1
    assert checked > 100
    for r in read_metrics(tmp_path / "lalr8"):
        assert r["replicas_identical"] is True
        assert r["grad_values_reduced_per_step"] == DIGITS_CNN_PARAMS and r["reduce_calls_per_step"] == 1
        # the parameter server, 8 bits both ways: (W-1)/W of the values up and of the mean down, sent and received
        ps8 = 2 * (2 - 1) / 2 * DIGITS_CNN_PARAMS * (8 + 8) / 8 / 1e6
        assert abs(r["data_mb_per_iter"] / ps8 - 1) < 0.03
    assert r["clean_acc"] > 0.5


def _rank_pids(marker: str) -> list[int]:
    return proc_pids(lambda cmd: "dat_ds.train" in cmd and "--local_rank" in cmd and marker in cmd)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_the_deepspeed_command_stops_every_rank(tmp_path, digits_dir, sig):
    """kill -9 (or SIGTERM) of the `deepspeed` command alone, not its process group: launch.py and both ranks end
    within 30 s (DeepSpeed's runner forwards no signal on one host; the ranks watch their launchers)."""
    import signal

    name = f"orphan_{sig.lower()}"
    ov = base(tmp_path, digits_dir, name, "train.epochs=50")
    proc = subprocess.Popen(
        deepspeed_cmd("digits_dat_pgd.toml", ov, port=29661 if sig == "SIGKILL" else 29662),
        cwd=REPO,
        env=launch_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(tmp_path / name / "metrics.jsonl", proc)
        assert len(_rank_pids(name)) == 2
        os.kill(proc.pid, getattr(signal, sig))
        proc.wait(timeout=30)
        t0 = time.time()
        while _rank_pids(name) and time.time() - t0 < 30:
            time.sleep(0.5)
        assert not _rank_pids(name), f"ranks still running {time.time() - t0:.0f} s after the command died"
    finally:
        for pid in _rank_pids(name):
            os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_torchrun_still_works(tmp_path, digits_dir):
    ov = base(
        tmp_path, digits_dir, "tr", "train.epochs=1", "train.max_steps_per_epoch=3", "eval.every_epochs=1"
    )
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        "29671",
        "-m",
        "dat_ds.train",
    ]
    cmd += [str(REPO / "recipes" / "digits_dat_pgd.toml")]
    for o in ov:
        cmd += ["--set", o]
    proc = subprocess.run(
        cmd, cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = read_metrics(tmp_path / "tr")
    assert r["steps"] == 3 and r["replicas_identical"] is True


def test_supervisor_rewrites_the_command_for_a_restart():
    from dat_ds.supervise import restart_command

    ds = ["deepspeed", "--num_gpus", "2", "--master_port", "29500", "--module", "dat_ds.train", "r.toml"]
    assert restart_command(ds, 41000) == [
        "deepspeed", "--num_gpus", "2", "--master_port", "41000", "--module", "dat_ds.train", "r.toml",
        "--resume", "auto",
    ]  # fmt: skip
    tr = [
        "torchrun",
        "--nproc_per_node=2",
        "--master-port=1",
        "-m",
        "dat_ds.train",
        "r.toml",
        "--resume=none",
    ]
    assert restart_command(tr, 7) == [
        "torchrun", "--nproc_per_node=2", "--master-port=7", "-m", "dat_ds.train", "r.toml", "--resume", "auto",
    ]  # fmt: skip
    bare = ["deepspeed", "--module", "dat_ds.train", "r.toml", "--resume", "epoch0001", "--set", "a.b=1"]
    assert restart_command(bare, 9) == [
        "deepspeed", "--master_port=9", "--module", "dat_ds.train", "r.toml", "--set", "a.b=1", "--resume", "auto",
    ]  # fmt: skip


def test_supervisor_restarts_after_a_killed_rank_and_finishes(tmp_path, digits_dir):
    """Recovery without a human: a rank dies by kill -9 mid-epoch, dat_ds.supervise starts the launcher again with
    --resume auto, and the run finishes from its newest checkpoint with every epoch logged once."""
    ov = base(tmp_path, digits_dir, "sup", "train.epochs=2", "checkpoint.every_steps=4", "attack.steps=3")
    cmd = [
        str(VENV_BIN / "python"), "-m", "dat_ds.supervise", "--max-restarts", "1", "--delay", "0", "--",
        *deepspeed_cmd("digits_dat_pgd.toml", ov, port=29641),
    ]  # fmt: skip
    proc = start(cmd, tmp_path)
    try:
        wait_for(tmp_path / "sup" / "checkpoints" / "step00000004" / "COMPLETE", proc)
        ranks = proc_pids(lambda c: "dat_ds.train" in c and "--local_rank=1" in c and str(tmp_path) in c)
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], 9)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "restart 1/1" in out and "--resume auto" in out and "resumed from" in out
    assert "finished after 1 restart(s)" in out
    recs = read_metrics(tmp_path / "sup")
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[-1]["steps"] == 2 * 11 and recs[-1]["replicas_identical"] is True
    assert (tmp_path / "sup" / "model.safetensors").exists()
    assert not proc_pids(lambda c: "dat_ds.train" in c and str(tmp_path) in c)


def test_kill9_two_streams_trades_resume_matches_uninterrupted(tmp_path, semisup_digits):
    """Semi-supervised TRADES: half of every micro-batch from a pseudo-labelled set, killed mid-epoch and resumed:
    per-source metrics and final weights bit-identical to an uninterrupted run."""

    def ov(name):
        return [
            f'data.shards="{semisup_digits["labeled"]}"',
            f'unlabeled.shards="{semisup_digits["pseudo"]}"',
            'loss.objective="trades"',
            f'out_dir="{tmp_path}"',
            f'name="{name}"',
            "train.epochs=4",  # 300 labels / 64 labeled per step = 4 steps an epoch
            "train.deterministic=true",
            "checkpoint.every_steps=5",
            "attack.steps=3",
        ]

    ref = run_launcher(tmp_path, "digits_dat_pgd.toml", ov("ref"), port=29651)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = start(deepspeed_cmd("digits_dat_pgd.toml", ov("killed"), port=29652), tmp_path)
    wait_for(tmp_path / "killed" / "checkpoints" / "step00000010" / "COMPLETE", proc)  # epoch 3, step 2
    time.sleep(0.3)
    kill_tree(proc)
    res = run_launcher(tmp_path, "digits_dat_pgd.toml", ov("killed"), port=29653, extra=["--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "killed")
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_samples_labeled"] == ra["train_samples_pseudo"] == 4 * 64
        for k in (
            "train_loss",
            "train_loss_labeled",
            "train_loss_pseudo",
            "train_adv_acc_pseudo",
            "clean_acc",
            "pgd_acc",
        ):
            assert ra[k] == rb[k], (ra["epoch"], k, ra[k], rb[k])
    wa = load_file(tmp_path / "ref" / "model.safetensors")
    wb = load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
