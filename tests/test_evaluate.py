"""The evaluation command: distributed equals single-process, the JSON and table formats, the sanity guards."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dat_ds.config import load_config
from dat_ds.data.loader import make_eval_loader
from dat_ds.data.shards import load_index
from dat_ds.export import export_safetensors
from dat_ds.models import build_model
from dat_ds.report import summarize, table
from dat_ds.robust_eval import sanity_flags, select_indices
from tests.conftest import REPO, VENV_BIN, launch_env


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits_dir):
    """A small model trained in-process on the digits train split, exported like a finished run."""
    run = tmp_path_factory.mktemp("evalrun")
    cfg = load_config("recipes/digits_dat_pgd.toml", [f'data.shards="{digits_dir}"'])
    index = load_index(digits_dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 1, index.mean, index.std)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = next(
        iter(make_eval_loader(index, "train", rank=0, world=1, augment="none", image_size=8, batch_size=1437))
    )
    x = x.float() / 255
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "metrics.jsonl").write_text(
        json.dumps(
            {
                "epoch": 1,
                "train_loss": 0.1,
                "clean_acc": 0.9,
                "pgd_acc": 0.1,
                "comm_time_s": 0.1,
                "epoch_time_s": 1.0,
                "world_size": 2,
                "data_mb_per_iter": 0.75,
            }
        )
        + "\n"
    )
    export_safetensors(model, cfg, index, run / "model.safetensors")
    return run


ARGS = [
    "--subset",
    "16",  # AutoAttack twice (1 process, 2 ranks) dominates the suite's time: 2 chunks of 8, one per rank
    "--seed",
    "3",
    "--chunk",
    "8",
    "--pgd-steps",
    "5",
    "--pgd-restarts",
    "2",
    "--no-square-check",
    "--eps",
    "0.1",
    "--eps-sweep",
    "0.05,0.1",
]


@pytest.mark.launcher
def test_two_ranks_equal_one_process(trained_run, tmp_path):
    env = launch_env(tmp_path)
    one = subprocess.run(
        [sys.executable, "-m", "dat_ds.evaluate", str(trained_run), *ARGS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads((trained_run / "eval.json").read_text())
    two = subprocess.run(
        [
            str(VENV_BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            "29661",
            "--module",
            "dat_ds.evaluate",
            str(trained_run),
            *ARGS,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    dist = json.loads((trained_run / "eval.json").read_text())
    assert (single["world_size"], dist["world_size"]) == (1, 2)
    assert single["n_examples"] == dist["n_examples"] == 16
    assert single["per_eps"] == dist["per_eps"], "per-example results do not depend on the number of ranks"
    a = dist["per_eps"]["0.1"]
    assert a["autoattack"] <= a["pgd"] <= a["clean"]
    assert dist["autoattack_acc"] == a["autoattack"] and dist["attacks"]["pgd_steps"] == 5
    assert (trained_run / "curves.png").is_file() and (trained_run / "acc_vs_eps.png").is_file()
    assert not (trained_run / "eval_parts").exists(), "chunk results are removed once eval.json is written"


def test_interrupted_evaluation_resumes_at_the_next_chunk(trained_run, tmp_path, monkeypatch, caplog):
    """An evaluation stopped mid-way (a crash in chunk 5 of 6) keeps the chunks it finished; the re-run computes
    only the rest and reports exactly what an uninterrupted run reports. A changed setting or model never reuses
    them, and a damaged chunk file is run again rather than trusted."""
    import shutil

    from dat_ds import evaluate as ev

    run = tmp_path / "run"
    run.mkdir()
    for f in ("config.json", "metrics.jsonl", "model.safetensors"):
        shutil.copy(trained_run / f, run / f)
    real = ev.chunk_results
    calls = []

    def counted(*a, fail_at=None, **k):
        calls.append(a[4])  # the chunk's seed
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("killed")
        return real(*a, **k)

    settings = ev.AttackSettings(eps=0.1, pgd_steps=3, pgd_restarts=1, autoattack=False, seed=0)
    kw = dict(n=24, indices_file=None, chunk=8, eps_sweep=[0.05], model_file=None)  # 3 chunks x 2 radii

    # a crash in chunk 2's first radius (the 5th call: two radii a chunk): chunks 0 and 1 are saved, whole
    monkeypatch.setattr(ev, "chunk_results", lambda *a, **k: counted(*a, fail_at=5, **k))
    with pytest.raises(RuntimeError, match="killed"):
        ev.run_evaluation(run, settings, **kw)
    (parts,) = (run / "eval_parts").iterdir()
    assert len(list(parts.glob("chunk*.npz"))) == 2 and not (run / "eval.json").exists()

    # another setting: nothing reused, its own folder
    calls.clear()
    monkeypatch.setattr(ev, "chunk_results", lambda *a, **k: counted(*a, fail_at=1, **k))
    with pytest.raises(RuntimeError):
        ev.run_evaluation(run, ev.AttackSettings(**{**settings.__dict__, "pgd_steps": 4}), **kw)
    assert len(list((run / "eval_parts").iterdir())) == 2

    part = parts / "chunk0000001.npz"
    part.write_bytes(part.read_bytes()[:-20])  # damaged: cut short
    calls.clear()
    monkeypatch.setattr(ev, "chunk_results", counted)
    with caplog.at_level("WARNING", logger="dat_ds"):
        resumed = ev.run_evaluation(run, settings, **kw)
    assert len(calls) == 4, "chunk 1 again (damaged), then the one the crash left, two radii each"
    assert "is damaged" in caplog.text
    assert resumed["chunks_resumed"] == 1
    assert not parts.exists(), "removed once eval.json is written"

    calls.clear()
    fresh = ev.run_evaluation(run, settings, **kw)
    assert len(calls) == 6 and fresh["chunks_resumed"] == 0
    assert fresh["per_eps"] == resumed["per_eps"]
    assert 0 < fresh["per_eps"]["0.1"]["pgd"] < fresh["per_eps"]["0.1"]["clean"]


def test_sanity_flags():
    ok = {"clean": 0.95, "pgd": 0.50, "pgd_short": 0.55, "autoattack": 0.45, "square": 0.60}
    assert sanity_flags(ok, 1000) == []
    aa_high = dict(ok, autoattack=0.60)
    assert any("AutoAttack accuracy" in f for f in sanity_flags(aa_high, 1000))
    assert sanity_flags(dict(ok, autoattack=0.51), 1000) == [], "within sampling noise"
    assert any("rose with more steps" in f for f in sanity_flags(dict(ok, pgd_short=0.40), 1000))
    assert any("Square" in f for f in sanity_flags(dict(ok, square=0.30), 1000))


def test_subsets_are_fixed_and_checked(tmp_path):
    a = select_indices(360, 50, 7, None)
    assert a == select_indices(360, 50, 7, None) and len(set(a)) == 50 and a == sorted(a)
    assert a != select_indices(360, 50, 8, None)
    assert select_indices(360, 0, 0, None) == list(range(360))
    f = tmp_path / "idx.txt"
    f.write_text("5 3 3 400")
    with pytest.raises(SystemExit, match="outside the test split"):
        select_indices(360, 0, 0, f)


def test_table_gathers_runs(trained_run):
    (trained_run / "eval.json").write_text(
        json.dumps({"clean_acc": 0.9, "pgd_acc": 0.5, "autoattack_acc": 0.45})
    )
    text = table([summarize(trained_run)])
    head, sep, row = text.splitlines()
    assert head.split("|")[1:-1] == [
        " run ",
        " method ",
        " p×q ",
        " batch ",
        " TA % ",
        " RA % ",
        " AA % ",
        " C (s/epoch) ",
        " T (s/epoch) ",
        " MB/iter ",
        " epochs ",
    ]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1:7] == ["DAT-PGD-7", "1x2", "128", "90.00", "50.00", "45.00"]


def test_robust_accuracy_agrees_in_bf16_and_fp32(trained_run, digits_dir):
    """The same model, cast the way training under the bf16 engine casts it, attacked with the same random starts:
    paired per example, the clean predictions agree on all but a handful of the 360 test images and so do the
    PGD outcomes (a bf16 input layer would move the 0.05 perturbation by ~22 % and flip many)."""
    import copy

    from dat_ds.export import load_exported
    from dat_ds.models import to_low_precision
    from dat_ds.robust_eval import AttackSettings, chunk_results

    model, _ = load_exported(trained_run / "model.safetensors", torch.device("cpu"))
    low = to_low_precision(copy.deepcopy(model), torch.bfloat16)
    index = load_index(digits_dir)
    ((x, y),) = list(
        make_eval_loader(index, "test", rank=0, world=1, augment="none", image_size=8, batch_size=360)
    )
    s = AttackSettings(eps=0.05, pgd_steps=10, pgd_step_size=0.0125, pgd_restarts=1, autoattack=False)
    r32, r16 = (
        chunk_results(m, x.float() / 255, y, s, seed=0, device=torch.device("cpu")) for m in (model, low)
    )
    assert 0.2 < r32["pgd"].float().mean() < r32["clean"].float().mean(), (
        "a model with some robustness to compare"
    )
    assert (r32["clean"] != r16["clean"]).sum() <= 3, "clean predictions: paired, nearly all identical"
    assert (r32["pgd"] != r16["pgd"]).sum() <= 7, "PGD outcomes: at most 2 % of the pairs differ"


def test_a_held_out_validation_split_is_trained_beside_and_evaluated_alone(trained_run, digits_dir, tmp_path):
    """data_prep.holdout moves N seeded training samples into a val split (disjoint, nothing lost, test unchanged);
    training checks eval.split names a split it has, and the evaluation command scores val into its own file."""
    from dat_ds.config import ConfigError
    from dat_ds.data.shards import SampleReader
    from dat_ds.evaluate import run_evaluation
    from dat_ds.export import load_exported
    from dat_ds.robust_eval import AttackSettings
    from dat_ds.training.plan import make_plan
    from data_prep.holdout import make_holdout

    src = load_index(digits_dir)
    out = tmp_path / "digits_val"
    make_holdout(digits_dir, out, 60, seed=1, per_shard=500)
    held = load_index(out)
    tr, va = held.split("train"), held.split("val")
    assert (tr.count, va.count, held.split("test").count) == (src.split("train").count - 60, 60, 360)
    keys = {
        sp: [SampleReader(held.split(sp))[i].key for i in range(held.split(sp).count)]
        for sp in ("train", "val")
    }
    ids = {sp: {int(k[1:]) for k in ks} for sp, ks in keys.items()}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"] | ids["val"] == set(
        range(src.split("train").count)
    )
    assert sorted(ids["val"]) == json.loads((out / "index.json").read_text())["val_ids"]
    assert held.mean == src.mean
    with pytest.raises(SystemExit, match="already holds"):
        make_holdout(digits_dir, out, 60, seed=1, per_shard=500)

    with pytest.raises(ConfigError, match="data_prep.holdout"):
        make_plan(
            load_config("recipes/digits_dat_pgd.toml", [f'data.shards="{digits_dir}"', 'eval.split="val"']), 2
        )
    make_plan(load_config("recipes/digits_dat_pgd.toml", [f'data.shards="{out}"', 'eval.split="val"']), 2)

    run = tmp_path / "run"
    run.mkdir()
    model, _ = load_exported(trained_run / "model.safetensors", torch.device("cpu"))
    cfg = load_config("recipes/digits_dat_pgd.toml", [f'data.shards="{out}"'])
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    export_safetensors(model, cfg, held, run / "model.safetensors")
    s = AttackSettings(eps=0.1, pgd_steps=2, pgd_restarts=1, autoattack=False)
    kw = dict(n=0, indices_file=None, chunk=32, eps_sweep=[], model_file=None)
    rep = run_evaluation(run, s, split="val", **kw)
    assert rep["n_examples"] == 60 and rep["split"] == "val"
    assert (run / "eval_val.json").is_file() and not (run / "eval.json").exists()
    from dat_ds.cli import UsageError

    with pytest.raises(UsageError, match="data_prep.holdout"):
        run_evaluation(run, s, split="valid", **kw)
