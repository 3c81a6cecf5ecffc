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
