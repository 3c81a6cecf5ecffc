"""`--strategy auto`: run what the bundle's downstream check chose, and say when a strategy lost it.

The check (tokensel.evaluate.check) retrains a recommender on first-k, item-align and the policy's
texts and pairs each with first-k on validation targets. Its verdict lives beside the bundle's
weights (`check.json`). This module only reads it: the rule that chose is here too, so the check and
its readers cannot disagree about what "lost" means.
"""

from __future__ import annotations

from pathlib import Path

from tokensel.config import TextConfig
from tokensel.policy.files import bundle_hash, bundle_path, read_check, verify_bundle
from tokensel.select.plan import BUNDLE_STRATEGIES

AUTO = "auto"
ALPHA = 0.05
METRICS = ("N@10", "R@10")
RULE = "best validation NDCG@10 among strategies not significantly below first-k in NDCG@10 or Recall@10 (paired test, p < 0.05); ties go to first-k"


def lost_metrics(row: dict) -> list[str]:
    """The metrics in which `row` is significantly below first-k on validation."""
    if row["strategy"] == "first-k":
        return []
    return [m for m in METRICS if row.get(f"p_{m}") is not None and row.get(f"ratio_{m}") is not None and row[f"ratio_{m}"] < 1 and row[f"p_{m}"] < ALPHA]


def lost_to_first_k(row: dict) -> bool:
    """Significantly below first-k on validation NDCG@10 or Recall@10: a user who keeps first-k
    would rank better by one of the measures the issue's readers quote."""
    return bool(lost_metrics(row))


def choose(rows: list[dict]) -> str:
    """RULE (pure, so its cases are tested). rows: one per strategy, first-k among them."""
    first = next(r for r in rows if r["strategy"] == "first-k")
    fine = [r for r in rows if not lost_to_first_k(r)]
    best = max(fine, key=lambda r: r["N@10"])
    return best["strategy"] if best["N@10"] > first["N@10"] else "first-k"


SURROGATE_RULE = (
    "best validation NDCG@10 among selections above first-k in NDCG@10 (paired test, p < 0.05) and not "
    "significantly below it in Recall@10; none: first-k"
)


def choose_proven(rows: list[dict]) -> str:
    """SURROGATE_RULE: stage 2's end-of-training choice (pure, so its cases are tested).

    Stricter than RULE on purpose: RULE reads a recommender retrained on each strategy's texts, this one
    a surrogate trained beside the head, whose small differences need not survive retraining. First-k
    runs no model and is what the user has without tokensel, so a selection replaces it only on evidence."""
    proven = [
        r for r in rows
        if r["strategy"] != "first-k" and not lost_to_first_k(r)
        and (r.get("ratio_N@10") or 0) > 1 and r.get("p_N@10") is not None and r["p_N@10"] < ALPHA
    ]
    return max(proven, key=lambda r: r["N@10"])["strategy"] if proven else "first-k"


def current_check(policy: str | Path | None) -> dict | None:
    """The bundle's check if it was made for these very weights (a retrained bundle's old check is stale)."""
    path = bundle_path(policy)
    check = read_check(path)
    if check is None or check.get("bundle_hash") != bundle_hash(path):
        return None
    return check


def resolve(policy: str | Path | None) -> tuple[str, str]:
    """(strategy to run, one line saying why) for --strategy auto."""
    path = bundle_path(policy)
    check = current_check(path)
    if check is None:
        return "first-k", f"auto: first-k (bundle {path} has no strategy check for its weights; run tokensel check)"
    where = f"the bundle's downstream check: k={check['k']}, {Path(check['data']['items']).name} validation; tokensel info shows it"
    if check["chosen"] == "first-k":
        return "first-k", f"auto: first-k (no selection beat it in {where})"
    row = next((r for r in check["rows"] if r["strategy"] == check["chosen"]), {})
    return check["chosen"], f"auto: {check['chosen']} ({row.get('ratio_N@10', float('nan')):.2f}x first-k NDCG@10 in {where})"


def auto_choice(policy: str | Path | None, model: str | None = None) -> tuple[str, str | None, TextConfig | None, str]:
    """--strategy auto in full, for the file job and the Selector alike: (strategy, model, text
    settings or None, why). A strategy that reads no bundle (first-k) gets the bundle's model and text
    settings, so it writes the tokens the check measured; a bundle strategy reads them itself."""
    cfg = verify_bundle(policy)  # whatever it resolves to: a damaged bundle is named, not silently half-used
    strategy, why = resolve(policy)
    if strategy in BUNDLE_STRATEGIES:
        return strategy, model, None, why
    return strategy, model or cfg.item.base_model, cfg.text, why


def lost_note(strategy: str, policy: str | Path | None) -> str | None:
    """One line when `strategy` lost to first-k in the bundle's check, else None."""
    check = current_check(policy)
    row = next((r for r in check["rows"] if r["strategy"] == strategy), None) if check else None
    if row is None or not lost_to_first_k(row):
        return None
    name = {"N@10": "NDCG@10", "R@10": "Recall@10"}
    lost = ", ".join(f"{row[f'ratio_{m}']:.2f}x {name[m]} (p {row[f'p_{m}']:.2g})" for m in lost_metrics(row))
    return f"note: {strategy} lost to first-k in this bundle's downstream check ({lost}; k={check['k']}, validation); --strategy auto runs {check['chosen']}"
