"""The verdicts the study reports write next to each of the paper's claims (bench/runs.py)."""

from __future__ import annotations

import pytest

from bench.runs import Claim, certified_claim, claims_table, noise_points, verdict


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
        "big_s0": {"RA": 0.60, "TA": 0.9, "AA": 0.55},
        "big_s1": {"RA": 0.70, "TA": 0.8, "AA": 0.66},
        "small_s0": {"RA": 0.62, "TA": 0.9, "AA": 0.58},
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
    assert seeded[3:9] == ["-2.0 / +8.0", "+3.00", "10.0", "not reproduced", "-5.00", "-3.0 |"], (
        "AA: seed 0's"
    )
    single = rows[1].split(" | ")
    assert single[3] == "-39.0" and single[6] == "reproduced", "a run without seeds pairs with seed 0 only"
    assert single[8] == "– |", "no AutoAttack on the reference: no ΔAA"


def _cert(accs: list[float], n: int = 500) -> dict:
    return {"n_examples": n, "certified_accuracy": {f"{0.05 * (i + 1):.2f}": p for i, p in enumerate(accs)}}


def test_certified_claim_counts_the_radii_beyond_noise_each_way():
    # 500 images: at 0.5 vs 0.5 the noise is 200 * sqrt(0.5 / 500) = 6.3 points
    same = _cert([0.5, 0.4, 0.3])
    row = certified_claim("N = 20 > N = 2", _cert([0.6, 0.42, 0.2]), same, ">").split(" | ")
    assert row[2:5] == ["+10.0 / +2.0 / -10.0", "6.3", "1 / 1 / 1"]
    assert row[5] == "not reproduced |", "mixed signs beyond noise are not a reproduction"
    assert certified_claim("c", _cert([0.6, 0.5, 0.4]), same, ">").endswith("| reproduced |")
    assert certified_claim("c", _cert([0.4, 0.3, 0.3]), same, ">").endswith("| contradicted |")
    assert certified_claim("c", _cert([0.52, 0.38, 0.3]), same, ">").endswith("| not reproduced |")
    assert certified_claim("c", _cert([0.52, 0.38, 0.3]), same, "≈").endswith("| reproduced |")
    assert certified_claim("c", _cert([0.4, 0.3, 0.3]), same, "≈").endswith("| not reproduced |")


def test_certified_claim_waits_for_both_certifications_and_reads_the_smaller_count():
    assert certified_claim("c", _cert([0.5]), None, ">") is None
    # on 50 images the same +10 points lies within noise (200 * sqrt(0.5 / 50) = 20)
    assert certified_claim("c", _cert([0.6], n=50), _cert([0.5]), ">").endswith(
        "| 0 / 1 / 0 | not reproduced |"
    )


def test_certified_claim_judges_only_the_radii_it_is_given():
    # the mixed-sign pair above, judged at 0.05 and 0.10 only: the -10 at 0.15 no longer counts
    row = certified_claim("c", _cert([0.6, 0.42, 0.2]), _cert([0.5, 0.4, 0.3]), ">", ["0.05", "0.10"])
    assert row.split(" | ")[2:5] == ["+10.0 / +2.0", "6.3", "1 / 1 / 0"]
    assert row.endswith("| reproduced |")


def test_the_cifar10_study_runs_every_phase_it_names_and_refuses_unknown_ones_first(monkeypatch, tmp_path):
    """--tables dispatches each phase to its stage (``aa``'s argument 0 once fell through to int("aa")); a typo stops
    before any stage runs."""
    import bench.cifar10_tables as study

    calls = []
    fake = {k: ((lambda a, s, t, k=k: calls.append((k, t))), t) for k, (_, t) in study.PHASES.items()}
    monkeypatch.setattr(study, "PHASES", fake)
    monkeypatch.setattr(study, "has_index", lambda path: True)
    monkeypatch.setattr(study, "write_report", lambda a, times: None)
    study.main(["--out", str(tmp_path), "--tables", "aa, seeds,1"])
    assert calls == [("aa", 0), ("seeds", 1), ("1", 1)]
    calls.clear()
    study.main(["--out", str(tmp_path)])  # the default runs every phase, in the order the help gives
    assert [k for k, _ in calls] == ["1", "2", "3", "4", "aa", "seeds"]
    calls.clear()
    with pytest.raises(SystemExit):
        study.main(["--out", str(tmp_path), "--tables", "1,a"])
    assert calls == []


def test_a_cifar10_second_seed_changes_only_the_seed_and_every_claim_names_runs_the_study_makes():
    """A seed-1 row is its seed-0 row with ``train.seed`` changed and a run folder of its own; the rows seeded late
    keep their seed-0 folders (so a resumed study skips them), and every claim's two keys at both seeds name a run
    the study trains (seed 0's unsuffixed folders under their ``_s0`` alias)."""
    import bench.cifar10_tables as study

    rows = study.rows()
    keys = [r.key for r in rows]
    assert len(set(keys)) == len(keys)
    first = {r.label: r for r in rows if r.seed == 0}
    seconds = [r for r in rows if r.seed == 1]
    assert {r.label for r in seconds} >= {first["DAT-FGSM 8B, LALR (official LAMB)"].label}
    for r in seconds:
        f = first[r.label]
        assert (r.ranks, r.batch, r.micro, r.overrides, r.tables) == (
            f.ranks,
            f.batch,
            f.micro,
            f.overrides,
            f.tables,
        )
        assert study._row_overrides(r) == [
            o.replace("train.seed=0", "train.seed=1") for o in study._row_overrides(f)
        ]
        assert r.key != f.key and r.key.endswith("_s1")
    s0, s1 = (study.semi_overrides("cifar10_l400", "cifar10_pseudo", seed) for seed in (0, 1))
    assert [o for o in s1 if o != "train.seed=1"] == [o for o in s0 if o != "train.seed=0"] and s0 != s1
    made = set(keys) | {study.run_key(b, seed) for b, *_ in study.SEMI for seed in (0, 1)}
    for c in study.CLAIMS:
        for seed in (0, 1):
            for k in (c.a.format(seed=seed), c.b.format(seed=seed)):
                assert k in made or (k.endswith("_s0") and k[: -len("_s0")] in made), (c.text, k)
