"""The budget curve's verdicts, as pure functions of per-seed, per-user metrics (so every case is tested).

Every comparison is two-sided and reads both tests: the seed-aware test (tokensel.stats.seed_user_test:
user variance and training-seed variance) decides; the paired test over users is reported beside it,
because it is what earlier verdicts used and the gap between the two is the seed noise it missed.
"Below" means significantly lower (seed-aware p < ALPHA) in NDCG@10 or Recall@10, the measures a
reader quotes. The decisions read validation targets; the test targets are only reported.

The decisions:
- first-k holds the reference at k: first-k at k is not below the reference;
- a selection holds it at k: some strategy other than first-k at k is not below the reference;
- the strategy to run at k (RULE): the best validation NDCG@10 among the strategies not below first-k
  at k, first-k included; a tie goes to first-k, which needs no model;
- the cost saved: at the smallest budget where something holds the reference, 1 - that strategy's
  item-LLM cost per item relative to the reference's.
"""

from __future__ import annotations

import math

import numpy as np

from tokensel.stats import paired_pvalue, seed_user_test

ALPHA = 0.05
METRICS = ("N@10", "R@10")
FIRST_K = "first-k"
RULE = (
    "best validation NDCG@10 among the strategies not significantly below first-k at the same k in NDCG@10 or "
    f"Recall@10 (seed-aware test, p < {ALPHA}); ties go to first-k"
)


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict]:
    """a against b per metric: ratio of the means, seed-aware p, paired p, whether seeds were seen.
    a, b: metric -> [seeds, users] (the same users in the same order)."""
    out = {}
    for m in METRICS:
        x, y = np.atleast_2d(a[m]), np.atleast_2d(b[m])
        mx, my = float(x.mean()), float(y.mean())
        p_seed, sees = seed_user_test(x, y)
        out[m] = {
            "ratio": mx / my if my else (1.0 if mx == my else math.nan),
            "p": p_seed,
            "p_paired": paired_pvalue(x.mean(0), y.mean(0)),
            "sees_seed_variance": sees,
        }
    return out


def below(cmp: dict[str, dict]) -> list[str]:
    """The metrics in which a comparison is significantly lower (seed-aware p)."""
    return [m for m in METRICS if not math.isnan(cmp[m]["ratio"]) and cmp[m]["ratio"] < 1 and cmp[m]["p"] < ALPHA]


def choose(at_k: dict[str, dict]) -> str:
    """RULE at one budget. at_k: strategy -> {"valid_N@10": mean, "valid_vs_first_k": compare(...)}."""
    first = at_k[FIRST_K]["valid_N@10"]
    fine = {s: c for s, c in at_k.items() if s == FIRST_K or not below(c["valid_vs_first_k"])}
    best = max(fine, key=lambda s: (fine[s]["valid_N@10"], s == FIRST_K))
    return best if fine[best]["valid_N@10"] > first else FIRST_K


def verdict(cells: dict[tuple[str, int], dict], ks: list[int], reference: str, deterministic: bool = False, reference_k: int | None = None) -> dict:
    """The curve's verdicts and its one line.

    cells: (strategy, k) -> {"valid_N@10", "valid_vs_first_k", "valid_vs_reference", "cost", "first_k_texts"}
    where cost is the item-LLM time per item relative to the reference (None if not measured) and
    first_k_texts says the strategy wrote exactly first-k's texts at k. reference: how the
    reference reads in the line ("first-128", "the full texts (first 256)"). deterministic: the
    recommender has no seed variance to see (text-sim). reference_k: the budget whose first-k is the
    reference, if it is one of ks (holding there is no finding)."""
    strategies = list(dict.fromkeys(s for s, _ in cells))
    first_holds = next((k for k in ks if not below(cells[(FIRST_K, k)]["valid_vs_reference"])), None)
    selection = next(
        ((k, s) for k in ks for s in strategies
         if s != FIRST_K and (s, k) in cells and not cells[(s, k)].get("first_k_texts") and not below(cells[(s, k)]["valid_vs_reference"])),
        None,
    )  # a strategy that wrote first-k's very texts at k (a policy whose stage 2 kept first-k) is no selection there
    run = {k: choose({s: cells[(s, k)] for s in strategies if (s, k) in cells}) for k in ks}
    # the cheapest budget that holds the reference, and what runs there
    holding = [(k, FIRST_K) for k in [first_holds] if k is not None] + ([selection] if selection else [])
    at = min(holding, key=lambda x: x[0]) if holding else None
    if at is not None and selection is not None and first_holds is not None and selection[0] == first_holds:
        at = (first_holds, FIRST_K)  # the same budget: first-k needs no model
    cost = cells[at[1], at[0]].get("cost") if at else None
    saved = None if cost is None else 1 - cost
    sees = deterministic or all(
        c[key][m]["sees_seed_variance"] for c in cells.values() for key in ("valid_vs_first_k", "valid_vs_reference") for m in METRICS
    )
    if first_holds is None:
        first_part = f"first-k is below {reference} at every k"
    elif first_holds == reference_k:
        first_part = f"first-k holds {reference} only at k={first_holds}, the reference itself"
    else:
        first_part = f"first-k holds {reference} from k={first_holds}"
    parts = [
        first_part,
        f"a selection from k={selection[0]} ({selection[1]})" if selection else "no selection holds it at any k",
        "run " + ", ".join(f"{run[k]} at {k}" for k in ks),
    ]
    if at is None:
        parts.append("no budget saves item-LLM cost without losing quality")
    elif saved is not None:
        parts.append(f"{at[1]} at k={at[0]} costs {cost:.2f}x the reference per item: {100 * saved:.0f}% of the item-LLM cost saved")
    line = "verdict (validation, seed-aware test): " + "; ".join(parts) + "."
    if deterministic:
        line += " The recommender is deterministic: there is no seed variance to see."
    elif not sees:
        line += " One seed: these verdicts cannot see seed variance (run --seeds 3 or more)."
    return {
        "first_k_holds_from": first_holds,
        "selection_holds_from": None if selection is None else {"k": selection[0], "strategy": selection[1]},
        "run": {str(k): s for k, s in run.items()},
        "cheapest_holding": None if at is None else {"k": at[0], "strategy": at[1], "cost_vs_reference": cost, "cost_saved": saved},
        "sees_seed_variance": sees,
        "rule": RULE,
        "line": line,
    }
