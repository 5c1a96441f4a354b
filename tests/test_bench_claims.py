"""The verdicts the study reports write next to each of the paper's claims (bench/runs.py)."""

from __future__ import annotations

import pytest

from bench.runs import Claim, claims_table, noise_points, verdict


def test_noise_is_twice_the_unpaired_standard_error():
    # two accuracies of 0.7 on 1,000 images: sqrt(2 * 0.21 / 1000) = 2.05 points, twice that 4.10
    assert noise_points(0.7, 0.7, 1000) == pytest.approx(4.099, abs=1e-3)
    assert noise_points(1.0, 0.0, 1000) == 0.0


@pytest.mark.parametrize(
    ("delta", "expect", "want"),
    [
        (-10, "<", "reproduced"),
        (10, ">", "reproduced"),
        (1, "≈", "reproduced"),
        (1, ">", "not reproduced"),
        (-10, "≈", "not reproduced"),
        (-10, ">", "contradicted"),
        (10, "<", "contradicted"),
    ],
)
def test_verdicts(delta, expect, want):
    assert verdict(delta, 3.0, expect) == want


def test_claims_pair_seed_by_seed_and_take_the_seed_spread_as_noise_when_larger():
    done = {
        "big_s0": {"RA": 0.60, "TA": 0.9},
        "big_s1": {"RA": 0.70, "TA": 0.8},
        "small_s0": {"RA": 0.62, "TA": 0.9},
        "small_s1": {"RA": 0.62, "TA": 0.9},
        "ref": {"RA": 0.99, "TA": 0.99},
    }
    claims = [
        Claim("seeded", "big_s{seed}", "small_s{seed}", ">"),
        Claim("against one run", "big_s{seed}", "ref", "<"),
        Claim("not run yet", "missing_s{seed}", "small_s{seed}", "≈"),
    ]
    rows = claims_table(claims, done, n=1_000_000).splitlines()[2:]
    assert len(rows) == 2, "a claim without its rows is left out"
    seeded = rows[0].split(" | ")
    # per seed: -2.0 / +8.0, mean +3.0; the binomial noise on 10^6 images is tiny, the seed spread (10) decides
    assert seeded[3:8] == ["-2.0 / +8.0", "+3.00", "10.0", "not reproduced", "-5.00 |"]
    single = rows[1].split(" | ")
    assert single[3] == "-39.0" and single[6] == "reproduced", "a run without seeds pairs with seed 0 only"
