"""The rows the strategy rules (tokensel.select.auto) read: per strategy its validation means, the
ratio to first-k and a paired test over users. Apart from auto because the test needs scipy, which
the rules' readers (`compress --strategy auto`, `tokensel info`) do not."""

from __future__ import annotations

import numpy as np

from tokensel.select.auto import METRICS, ONE_SEED, SEED_AWARE
from tokensel.stats import paired_pvalues, seed_user_test


def rows_vs_first_k(
    results: dict[str, tuple[dict[str, float], dict[str, np.ndarray]]],
    per_seed_user: dict[str, dict[str, np.ndarray]] | None = None,
    paired_test: str = ONE_SEED,
) -> list[dict]:
    """The rows `choose` reads: per strategy (first-k among them) its mean NDCG@10 / Recall@10, the
    ratio to first-k's, the p-value of the difference and which test made it (`test`).

    results: strategy -> (means, per-user values). per_seed_user: strategy -> metric -> [seeds, users]
    (the runs behind those values): with >= 2 seeds on both sides the p is the seed-aware test's
    (`tokensel.stats.seed_user_test`), which sees training-seed variance as well as user variance;
    without it the paired test over users, recorded as `paired_test` (the caller says what that test
    can see)."""
    first_means, first_users = results["first-k"]
    first_seeds = (per_seed_user or {}).get("first-k")
    rows = []
    for strategy, (means, users) in results.items():
        row = {"strategy": strategy, "N@10": round(means["N@10"], 4), "R@10": round(means["R@10"], 4)}
        for m in METRICS:
            row[f"ratio_{m}"] = round(means[m] / first_means[m], 4) if first_means[m] else None
        p: dict[str, float] = {}
        if strategy != "first-k":
            mine = (per_seed_user or {}).get(strategy)
            if mine is not None and first_seeds is not None:
                tests = {m: seed_user_test(mine[m], first_seeds[m]) for m in METRICS}
                p = {m: t[0] for m, t in tests.items()}
                test = SEED_AWARE if all(t[1] for t in tests.values()) else ONE_SEED
            else:
                p = paired_pvalues({m: users[m] for m in METRICS}, first_users)
                test = paired_test
            row["test"] = test
        rows.append({**row, "p_N@10": p.get("N@10"), "p_R@10": p.get("R@10")})
    return rows
