"""`--strategy auto`: run what the bundle's downstream check chose, and say when a strategy lost it.

The check (tokensel.evaluate.check) retrains a recommender on first-k, item-align and the policy's
texts and pairs each with first-k on validation targets. Its verdict lives beside the bundle's
weights (`check.json`). This module only reads it: the rule that chose is here too, so the check and
its readers cannot disagree about what "lost" means.
"""

from __future__ import annotations

from pathlib import Path

from tokensel.models.bundle import DEFAULT_BUNDLE, bundle_hash, read_check

AUTO = "auto"
ALPHA = 0.05
RULE = "best validation NDCG@10 among strategies not significantly below first-k (paired test, p < 0.05); ties go to first-k"


def lost_to_first_k(row: dict) -> bool:
    """Significantly below first-k on validation NDCG@10."""
    p = row.get("p_N@10")
    return row["strategy"] != "first-k" and p is not None and row.get("ratio_N@10") is not None and row["ratio_N@10"] < 1 and p < ALPHA


def choose(rows: list[dict]) -> str:
    """RULE (pure, so its cases are tested). rows: one per strategy, first-k among them."""
    first = next(r for r in rows if r["strategy"] == "first-k")
    fine = [r for r in rows if not lost_to_first_k(r)]
    best = max(fine, key=lambda r: r["N@10"])
    return best["strategy"] if best["N@10"] > first["N@10"] else "first-k"


def current_check(policy: str | Path | None) -> dict | None:
    """The bundle's check if it was made for these very weights (a retrained bundle's old check is stale)."""
    path = Path(policy) if policy is not None else DEFAULT_BUNDLE
    check = read_check(path)
    if check is None or check.get("bundle_hash") != bundle_hash(path):
        return None
    return check


def resolve(policy: str | Path | None) -> tuple[str, str]:
    """(strategy to run, one line saying why) for --strategy auto."""
    path = Path(policy) if policy is not None else DEFAULT_BUNDLE
    check = current_check(path)
    if check is None:
        return "first-k", f"auto: first-k (bundle {path} has no strategy check for its weights; run tokensel check)"
    row = next((r for r in check["rows"] if r["strategy"] == check["chosen"]), {})
    vs = "" if check["chosen"] == "first-k" else f", {row.get('ratio_N@10', float('nan')):.2f}x first-k NDCG@10"
    return check["chosen"], f"auto: {check['chosen']} (the bundle's downstream check at k={check['k']}{vs}, on {Path(check['data']['items']).name} validation)"


def lost_note(strategy: str, policy: str | Path | None) -> str | None:
    """One line when `strategy` lost to first-k in the bundle's check, else None."""
    check = current_check(policy)
    row = next((r for r in check["rows"] if r["strategy"] == strategy), None) if check else None
    if row is None or not lost_to_first_k(row):
        return None
    return (
        f"note: {strategy} lost to first-k in this bundle's downstream check ({row['ratio_N@10']:.2f}x NDCG@10, "
        f"p {row['p_N@10']:.2g}, k={check['k']}, validation); --strategy auto runs {check['chosen']}"
    )
