"""Paired significance tests on per-user metrics (one value per user, averaged over seeds).

The default is the paired t-test (scipy.stats.ttest_rel, two-sided) on the per-user differences: with
thousands of users the mean difference is close to normal even though each user's Recall is 0 or 100.
`wilcoxon` (scipy.stats.wilcoxon, signed-rank, two-sided, zero differences dropped) is the
distribution-free alternative. Two identical inputs give p = 1.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

TESTS = ("ttest", "wilcoxon")


def paired_test_name(test: str) -> str:
    """The test's name in a report's caption."""
    return "t-test" if test == "ttest" else "Wilcoxon signed-rank test"


def paired_pvalue(a: np.ndarray, b: np.ndarray, test: str = "ttest") -> float:
    """Two-sided p-value that the per-user values `a` and `b` (same users, same order) differ on average."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same users on both sides ({a.shape} vs {b.shape})")
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r} ({', '.join(TESTS)})")
    d = a - b
    if d.size == 0 or not np.any(d):
        return 1.0  # identical: no evidence of a difference
    if np.all(d == d[0]):
        return 0.0  # every user moved by the same non-zero amount: the t statistic is infinite
    if test == "ttest":
        p = stats.ttest_rel(a, b).pvalue
    else:
        p = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided").pvalue
    p = float(p)
    return 1.0 if math.isnan(p) else p


def paired_pvalues(a: dict[str, np.ndarray], b: dict[str, np.ndarray], test: str = "ttest") -> dict[str, float]:
    """The paired test for every metric key of `a` (b must hold the same keys)."""
    return {k: paired_pvalue(a[k], b[k], test) for k in a}


# ------------------------------------------------------------------------------- seeds and users
SEED_TEST = (
    "seed-aware t-test: the difference of the means over seeds and users, its variance the paired "
    "per-user variance / users plus each side's between-seed variance of its per-seed means / seeds "
    "(Welch-Satterthwaite degrees of freedom)"
)


def seed_user_test(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
    """(two-sided p, whether it saw seed variance) that `a` and `b` differ on average.

    a, b: [seeds, users] per-user values of each training run (same users, same order on both sides;
    the seeds of the two sides are separate trainings, so they are not paired). The paired test over
    users cannot see training noise: a seed that shifts one run shifts all its users at once, so one
    seed can make a tie look significant. Here the mean difference's variance has two parts: how users
    disagree (the paired per-user differences of the seed means, / users) and how runs disagree (each
    side's variance of its per-seed means, / its seeds). With one seed on either side the second part
    cannot be estimated: the result is the paired t-test and `False` says it cannot see seed variance.
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"seed-aware test needs the same users on both sides ({a.shape[1]} vs {b.shape[1]})")
    sa, sb = a.shape[0], b.shape[0]
    if sa < 2 or sb < 2:
        return paired_pvalue(a.mean(0), b.mean(0)), False
    d = a.mean(0) - b.mean(0)
    diff = float(d.mean())
    users = d.size
    parts = [  # (variance of the mean difference this part adds, its degrees of freedom)
        (float(d.var(ddof=1)) / users if users > 1 else 0.0, users - 1),
        (float(a.mean(1).var(ddof=1)) / sa, sa - 1),
        (float(b.mean(1).var(ddof=1)) / sb, sb - 1),
    ]
    var = sum(v for v, _ in parts)
    if var <= 0:
        return (1.0 if diff == 0 else 0.0), True
    df = var**2 / sum(v**2 / n for v, n in parts if n > 0 and v > 0)
    p = float(2 * stats.t.sf(abs(diff) / math.sqrt(var), df))
    return (1.0 if math.isnan(p) else p), True
