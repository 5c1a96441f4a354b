"""Randomized smoothing: the statistics against closed forms, the training objectives, and certification over
ranks."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

from dat_ds.config import load_config
from dat_ds.smoothing import (
    ABSTAIN,
    certify_counts,
    lower_confidence_bound,
    max_certifiable_radius,
    predict_counts,
    sample_counts,
)
from tests.conftest import REPO, VENV_BIN, launch_env


class Linear2(torch.nn.Module):
    """Two classes split by the hyperplane w.x + b = 0: logits (0, w.x + b)."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def test_clopper_pearson_against_closed_forms():
    # k = n: the bound solves p^n = alpha; k = 0: 0
    for n in (10, 100, 5000):
        assert lower_confidence_bound(n, n, 0.001) == pytest.approx(0.001 ** (1 / n), rel=1e-9)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    # the bound is below the estimate and tightens with n
    lows = [lower_confidence_bound(int(0.8 * n), n, 0.001) for n in (100, 1000, 100_000)]
    assert lows[0] < lows[1] < lows[2] < 0.8 and lows[2] > 0.795


def test_no_certified_radius_exceeds_the_ceiling_and_unanimous_votes_reach_it():
    """CERTIFY's largest radius is the one of n unanimous votes; the ceiling (computed without scipy) must equal it,
    bound every other vote count, and grow with n (Cohen's n = 100,000 reaches about 0.46 at sigma = 0.12, 10,000
    about 0.38)."""
    for sigma, n in ((0.12, 10_000), (0.25, 10_000), (0.5, 1_000), (0.12, 100_000)):
        ceiling = max_certifiable_radius(sigma, n, 0.001)
        votes = np.zeros(10, dtype=np.int64)
        votes[3] = n
        assert certify_counts(votes, votes, n, sigma, 0.001) == (3, pytest.approx(ceiling, rel=1e-6))
        votes[3], votes[5] = n - 1, 1
        c, r = certify_counts(votes, votes, n, sigma, 0.001)
        assert c == 3 and 0 < r < ceiling
    assert max_certifiable_radius(0.12, 10_000, 0.001) == pytest.approx(0.383, abs=1e-3)
    assert max_certifiable_radius(0.12, 100_000, 0.001) == pytest.approx(0.457, abs=1e-3)


def test_certified_radius_matches_the_linear_closed_form():
    """For a linear f, p_A(x) = Phi((w.x + b) / (sigma |w|)) and the smoothed classifier's exact robust radius is
    the distance to the hyperplane, |w.x + b| / |w| = sigma * Phi^-1(p_A). CERTIFY must return at most that, close
    to it for a large n, and abstain where p_A is near 1/2."""
    torch.manual_seed(0)
    d, sigma, n = 16, 0.25, 20_000
    w = torch.randn(d, dtype=torch.float64)
    b = 0.1
    f = Linear2(w, b)
    # points at chosen signed distances from the hyperplane
    dist = torch.tensor([0.5, 0.2, 0.05, 0.001, -0.3, -0.08], dtype=torch.float64)
    base = torch.rand(len(dist), d, dtype=torch.float64)
    x = base - ((base @ w + b) / w.norm() ** 2)[:, None] * w + dist[:, None] * (w / w.norm())
    g = torch.Generator().manual_seed(1)
    counts0 = sample_counts(f, x, sigma, 100, 2, g, batch=4096).numpy()
    counts = sample_counts(f, x, sigma, n, 2, g, batch=4096).numpy()
    p_true = norm.cdf(dist.numpy() / sigma)
    for i, dd in enumerate(dist.tolist()):
        # the estimated probability of class 1 agrees with the closed form within 5 standard errors
        se = math.sqrt(p_true[i] * (1 - p_true[i]) / n)
        assert abs(counts[i, 1] / n - p_true[i]) < 5 * se + 1e-9
        c, r = certify_counts(counts0[i], counts[i], n, sigma, 0.001)
        if abs(dd) < 0.01:
            assert c == ABSTAIN and r == 0.0  # p_A too close to 1/2 to certify anything
            continue
        assert c == (1 if dd > 0 else 0)
        exact = abs(dd)  # = sigma * Phi^-1(p_A)
        assert sigma * norm.ppf(max(p_true[i], 1 - p_true[i])) == pytest.approx(exact, rel=1e-9)
        assert r <= exact + 1e-9  # never more than the truth (with probability 1 - alpha)
        assert r > exact - 0.03  # and close to it at n = 20,000
    # PREDICT abstains near the boundary and answers far from it
    assert predict_counts(counts[3], 0.001) == ABSTAIN
    assert predict_counts(counts[0], 0.001) == 1 and predict_counts(counts[4], 0.001) == 0


def test_noise_is_seeded_and_batched_the_same_way_for_any_batch():
    torch.manual_seed(0)
    f = Linear2(torch.randn(8, dtype=torch.float64), 0.0)
    x = torch.rand(5, 8, dtype=torch.float64)
    a = sample_counts(f, x, 0.5, 300, 2, torch.Generator().manual_seed(3), batch=1500)
    b = sample_counts(f, x, 0.5, 300, 2, torch.Generator().manual_seed(3), batch=1500)
    c = sample_counts(f, x, 0.5, 300, 2, torch.Generator().manual_seed(4), batch=1500)
    assert torch.equal(a, b) and not torch.equal(a, c) and (a.sum(1) == 300).all()


def test_gaussian_objective_is_the_mean_ce_over_n_noisy_copies():
    from dat_ds.objectives import gaussian

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    cfg = load_config(
        REPO / "recipes/digits_standard.toml",
        ['loss.objective="gaussian"', "smoothing.noise_samples=3", "smoothing.sigma=0.25"],
    )
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, -100])
    torch.manual_seed(5)
    out = gaussian(net, net, x, y, cfg)
    torch.manual_seed(5)
    e = torch.randn(12, 1, 8, 8)
    want = [
        np.mean([F.cross_entropy(net(x[i : i + 1] + 0.25 * e[3 * i + j : 3 * i + j + 1]), y[i : i + 1]).item() for j in range(3)])
        for i in range(3)
    ]  # fmt: skip
    assert out.loss.item() == pytest.approx(np.mean(want), rel=1e-5)
    assert out.per_example[3].item() == 0


def test_smoothadv_attack_stays_in_the_l2_ball_and_raises_the_smoothed_loss():
    from dat_ds.attacks import smooth_adv_l2
    from dat_ds.smoothing import smoothed_log_prob

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    m = 4
    noise = 0.25 * torch.randn(16 * m, 1, 8, 8)
    x_adv = smooth_adv_l2(net, x, y, noise, eps=0.5, steps=5)
    assert ((x_adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1

    def loss(z):
        return F.nll_loss(smoothed_log_prob(net, z.repeat_interleave(m, 0) + noise, m), y, reduction="none")

    assert (loss(x_adv) > loss(x)).float().mean() > 0.9
    assert all(p.grad is None for p in net.parameters())


def test_smoothing_recipe_values_are_checked():
    from dat_ds.config import ConfigError

    for bad, msg in [
        ("smoothing.sigma=0", "smoothing.sigma=0.0 must be > 0"),
        ("smoothing.noise_samples=0", "smoothing.noise_samples=0 must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(REPO / "recipes/digits_standard.toml", [bad])


@pytest.mark.launcher
def test_certification_is_the_same_on_one_and_two_ranks_and_resumes(tmp_path, labeller_run, capsys):
    from dat_ds.certify import main

    args = ["--sigma", "0.25", "--N0", "20", "--N", "200", "--subset", "40", "--chunk", "6", "--batch", "256"]
    assert main([str(labeller_run), *args]) == 0
    tag = "sigma0.25_n020_n200_alpha0.001_subset40_seed0"
    one = labeller_run / "certify" / tag
    tsv1 = (one / "certify.tsv").read_text()
    two_run = tmp_path / "copy"
    two_run.mkdir()
    for f in ("config.json", "model.safetensors"):
        (two_run / f).write_bytes((labeller_run / f).read_bytes())
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29681", "--module", "dat_ds.certify",
           str(two_run), *args]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env=launch_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tsv2 = (two_run / "certify" / tag / "certify.tsv").read_text()

    def strip_time(t):
        return [ln.split("\t")[:5] for ln in t.splitlines()]

    rows = strip_time(tsv1)
    assert rows[0] == ["idx", "label", "predict", "radius", "correct"] and len(rows) == 41
    assert rows == strip_time(tsv2)  # identical for 1 and 2 ranks
    assert any(float(x[3]) > 0 for x in rows[1:]) and all(x[2] == "-1" or float(x[3]) > 0 for x in rows[1:])
    rep = json.loads((one / "certify.json").read_text())
    radius = np.array([float(x[3]) for x in rows[1:]])
    correct = np.array([int(x[4]) for x in rows[1:]])
    assert rep["certified_accuracy"]["0.00"] == pytest.approx(((radius >= 0) & (correct == 1)).mean())
    assert rep["certified_accuracy"]["0.25"] == pytest.approx(((radius >= 0.25) & (correct == 1)).mean())
    # n = 200 at sigma = 0.25 cannot certify past about 0.46: the report says so and no radius exceeds it
    assert (
        0.44 < rep["max_certifiable_radius"] < 0.47 and radius.max() <= rep["max_certifiable_radius"] + 1e-9
    )
    assert (one / "certified_accuracy.png").stat().st_size > 1000
    from dat_ds.report import certified_rows, certified_table

    t2 = certified_table(certified_rows(labeller_run))
    assert (
        "| r=0.05 |" in t2
        and f"| {rep['certified_accuracy']['0.25']:.3f} |" in t2
        and "| 0.25 | 200 | 40 |" in t2
    )
    # killed half way: the chunks on disk are kept and only the missing ones are computed
    parts = one / "parts"
    for c in (1, 4):
        (parts / f"chunk{c:07d}.npz").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in parts.glob("chunk*.npz")}
    assert main([str(labeller_run), *args]) == 0
    assert all((parts / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert strip_time((one / "certify.tsv").read_text()) == rows
    # other settings into the same folder are refused
    (one / "settings.json").write_text("{}")
    capsys.readouterr()
    assert main([str(labeller_run), *args]) == 2
    err = capsys.readouterr().err
    assert "dat-ds: error:" in err and "other settings" in err


@pytest.mark.launcher
def test_smoothadv_trains_under_dat_with_4bit_and_lalr(tmp_path, digits_dir):
    """Like any objective: 2 ranks, 4-bit 2-sided aggregation with error feedback, LALR; every gradient reduced
    once per step and the replicas identical. (SmoothAdv runs the Gaussian objective's loss on attacked inputs, so
    it covers both paths through the engine.)"""
    objective = "smoothadv"
    from tests.conftest import read_metrics, run_launcher

    ov = [
        f'data.shards="{digits_dir}"', f'out_dir="{tmp_path}"', f'name="{objective}"', f'loss.objective="{objective}"',
        "smoothing.noise_samples=4", "smoothing.attack_steps=2", "train.epochs=2", 'optim.name="lalr"',
        "optim.lr=0.01", "eval.pgd_steps=2", 'comm.topology="ps"', "comm.bits=4", "comm.two_sided=true", "comm.error_feedback=true",
    ]  # fmt: skip
    r = run_launcher(tmp_path, "digits_standard.toml", ov, port=29691)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    recs = read_metrics(tmp_path / objective)
    assert [x["epoch"] for x in recs] == [1, 2]
    assert all(x["replicas_identical"] and x["reduce_calls_per_step"] == 1 for x in recs)
    assert recs[1]["train_loss"] < recs[0]["train_loss"] and recs[1]["clean_acc"] > 0.2  # chance is 0.1
