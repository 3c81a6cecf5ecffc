"""The seed-aware test (tokensel.stats.seed_user_test) and the A/A split counter, on synthetic runs
with known seed and user effects: x[seed, user] = user effect + seed effect + per-run user noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tokensel.stats import aa_rejections, paired_pvalue, seed_splits, seed_user_test


def runs(rng, seeds: int, users: int, seed_sd: float, noise_sd: float = 1.0, user=None, shift: float = 0.0) -> np.ndarray:
    user = rng.normal(0, 1, users) if user is None else user
    return user[None, :] + shift + rng.normal(0, seed_sd, (seeds, 1)) + rng.normal(0, noise_sd, (seeds, users))


def rejection_rate(test, seed_sd: float, sims: int = 400, seeds: int = 3, users: int = 300, alpha: float = 0.05) -> float:
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(sims):
        user = rng.normal(0, 1, users)  # the same users on both sides: the A/A null
        a, b = runs(rng, seeds, users, seed_sd, user=user), runs(rng, seeds, users, seed_sd, user=user)
        hits += test(a, b) < alpha
    return hits / sims


def paired(a, b):
    return paired_pvalue(a.mean(0), b.mean(0))


def seed_aware(a, b):
    return seed_user_test(a, b)[0]


def test_one_seed_is_the_paired_test_and_says_so():
    rng = np.random.default_rng(1)
    a, b = runs(rng, 1, 200, 0.3), runs(rng, 3, 200, 0.3)
    p, sees = seed_user_test(a, b)
    assert not sees
    assert p == pytest.approx(paired_pvalue(a.mean(0), b.mean(0)))
    assert seed_user_test(runs(rng, 2, 200, 0.3), runs(rng, 2, 200, 0.3))[1]


def test_identical_runs_give_p_one():
    rng = np.random.default_rng(2)
    a = runs(rng, 3, 100, 0.2)
    assert seed_user_test(a, a.copy()) == (1.0, True)


def test_seed_effects_fool_the_paired_test_but_not_the_seed_aware_one():
    # a seed shifts all its users at once: the paired test over users calls most A/A splits different
    assert rejection_rate(paired, seed_sd=0.3) > 0.5
    assert 0.01 <= rejection_rate(seed_aware, seed_sd=0.3) <= 0.10


def test_no_seed_effect_keeps_the_nominal_rate():
    # without seed effects the per-user noise inside each per-seed mean must not be counted twice (it is
    # already in the paired per-user variance): counting it twice halves the z-statistic's variance
    # and the rate falls far below 5%
    assert 0.02 <= rejection_rate(seed_aware, seed_sd=0.0) <= 0.09


def test_a_seed_that_shifts_groups_of_users_keeps_the_nominal_rate():
    """A seed need not shift every user alike: here it shifts 20 groups of users (those sharing items)
    by different amounts. Estimating the seed part from the per-seed means (not from a residual that
    assumes users independent) keeps the rate near 5%; the paired test calls half the splits different."""
    rng = np.random.default_rng(7)
    group = np.arange(400) % 20
    hits = np.zeros(2)
    for _ in range(400):
        user = rng.normal(0, 1, 400)
        a, b = (user[None, :] + rng.normal(0, 1.0, (3, 20))[:, group] + rng.normal(0, 1, (3, 400)) for _ in range(2))
        hits += [paired(a, b) < 0.05, seed_aware(a, b) < 0.05]
    assert hits[0] / 400 > 0.4
    assert 0.01 <= hits[1] / 400 <= 0.08


def test_variance_matches_the_sampling_distribution():
    """The test's standard error against the mean difference's real spread over many replications
    (the truth a hierarchical bootstrap would only approximate)."""
    rng = np.random.default_rng(3)
    users, seeds, seed_sd = 400, 3, 0.05
    diffs, z2 = [], []
    for _ in range(600):  # users drawn anew each time: the test's inference is about the user population
        user_a = rng.normal(0, 1, users)
        user_b = user_a + rng.normal(0, 0.1, users)  # users differ between the two sides, by zero on average
        a, b = runs(rng, seeds, users, seed_sd, user=user_a), runs(rng, seeds, users, seed_sd, user=user_b)
        diffs.append(a.mean() - b.mean())
        p, _ = seed_user_test(a, b)
        z2.append(stats.norm.isf(p / 2) ** 2)  # the squared statistic the p implies (large df: ~ t)
    # diff / se is ~ standard normal when se is right, so its mean square is ~1 (counting the per-user
    # noise inside the per-seed means twice made it ~0.6 here)
    assert abs(np.mean(diffs)) < 3 * np.std(diffs) / np.sqrt(len(diffs))
    assert 0.8 <= np.mean(z2) <= 1.25


def test_a_real_difference_is_found():
    rng = np.random.default_rng(4)
    user = rng.normal(0, 1, 500)
    a, b = runs(rng, 3, 500, 0.05, user=user, shift=0.5), runs(rng, 3, 500, 0.05, user=user)
    assert seed_user_test(a, b)[0] < 0.01


@pytest.mark.parametrize(("seeds", "size", "count"), [(8, 1, 28), (8, 2, 210), (8, 3, 280), (6, 3, 10), (5, 3, 0)])
def test_seed_splits_are_disjoint_and_counted_once(seeds, size, count):
    splits = seed_splits(seeds, size)
    assert len(splits) == count
    assert len({frozenset([g, h]) for g, h in splits}) == count
    for g, h in splits:
        assert len(g) == len(h) == size and not set(g) & set(h)


def test_aa_rejections_old_rule_fooled_new_rule_not():
    rng = np.random.default_rng(5)
    users = rng.normal(0, 1, 400)
    per_seed_user = {"N@10": runs(rng, 8, 400, 0.4, user=users), "R@10": runs(rng, 8, 400, 0.4, user=users)}
    one, three = aa_rejections(per_seed_user, 1), aa_rejections(per_seed_user, 3)
    assert (one["comparisons"], three["comparisons"]) == (28, 280)
    assert one["old"] == one["new"]  # one seed per group: the same paired test
    assert three["old"]["either"] > 0.5
    assert three["new"]["either"] < three["old"]["either"] / 2
    assert three["old"]["either"] >= max(three["old"]["N@10"], three["old"]["R@10"])


def test_aa_rejections_identical_seeds_never_reject():
    x = np.tile(np.random.default_rng(6).normal(0, 1, 50), (6, 1))
    r = aa_rejections({"N@10": x}, 2)
    assert r["old"]["N@10"] == r["new"]["N@10"] == 0.0


def test_bench_aa_prints_the_table_from_saved_runs(tmp_path):
    """bench/aa's table without training: runs saved by --save-runs, here synthetic with a seed effect."""
    rng = np.random.default_rng(8)
    user = rng.normal(0, 1, 200)
    x = runs(rng, 6, 200, 0.4, user=user)
    saved = tmp_path / "runs.npz"
    np.savez(saved, title=np.array("synthetic A/A"), N_at_10=x, R_at_10=x + 1)
    bench = Path(__file__).resolve().parents[1] / "bench" / "aa"
    r = subprocess.run([sys.executable, str(bench), "--from-runs", str(saved)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line for line in r.stdout.splitlines() if line.startswith("│ ") and "v" in line.split()[1]}
    assert set(rows) == {"1v1", "2v2", "3v3"}
    assert rows["3v3"].split()[3] == "10"  # 6 seeds: 20 groups of 3, each pair once
    bad = subprocess.run([sys.executable, str(bench), "--from-runs", str(saved), "--sizes", "4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "need 8 seeds" in bad.stderr and "Traceback" not in bad.stderr
