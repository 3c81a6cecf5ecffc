"""The rows the strategy rules (tokensel.select.auto) read: per strategy its validation means, the
ratio to first-k and a paired test over users. Apart from auto because the test needs scipy, which
the rules' readers (`compress --strategy auto`, `tokensel info`) do not."""

from __future__ import annotations

import numpy as np

from tokensel.select.auto import METRICS
from tokensel.stats import paired_pvalues


def rows_vs_first_k(results: dict[str, tuple[dict[str, float], dict[str, np.ndarray]]]) -> list[dict]:
    """The rows `choose` reads: per strategy (first-k among them) its mean NDCG@10 / Recall@10, the
    ratio to first-k's and the paired p-value over users. results: strategy -> (means, per-user values)."""
    first_means, first_users = results["first-k"]
    rows = []
    for strategy, (means, users) in results.items():
        p = paired_pvalues({m: users[m] for m in METRICS}, first_users) if strategy != "first-k" else {}
        row = {"strategy": strategy, "N@10": round(means["N@10"], 4), "R@10": round(means["R@10"], 4)}
        for m in METRICS:
            row[f"ratio_{m}"] = round(means[m] / first_means[m], 4) if first_means[m] else None
        rows.append({**row, "p_N@10": p.get("N@10"), "p_R@10": p.get("R@10")})
    return rows
