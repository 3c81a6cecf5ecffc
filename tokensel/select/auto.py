"""`--strategy auto`: run what was measured on this catalogue, and say when a strategy lost it.

A verdict is only trusted on the catalogue it was measured on. In order, auto follows
1. the verdict recorded for this catalogue and bundle (tokensel.select.verdicts: a `tokensel curve`
   or `tokensel check` run on these very item texts) at this budget, or the nearest recorded below it;
2. the bundle's own downstream check (tokensel.evaluate.check, `check.json` beside the weights) if
   it was made on this very catalogue (the same fingerprint);
3. else first-k, which needs no model and is what the user has without tokensel.
The check retrains a recommender on first-k, item-align and the policy's texts and pairs each with
first-k on validation targets. The rule that chose is here too, so the check and its readers cannot
disagree about what "lost" means. Without a catalogue (the in-memory Selector) only the bundle's
check can speak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from tokensel.config import TextConfig
from tokensel.policy.files import bundle_hash, bundle_label, bundle_path, read_bundle_config, read_check, verify_bundle
from tokensel.select.plan import BUNDLE_STRATEGIES
from tokensel.select.verdicts import PROTOCOLS, catalogue_fingerprint, recorded, verdict_for

AUTO = "auto"
ALPHA = 0.05
METRICS = ("N@10", "R@10")
# which test made a row's p (recorded in check.json): the names only, so that reading a check needs no scipy
SEED_AWARE = "seed-aware"
ONE_SEED = "paired (one seed: cannot see seed variance)"
RULE = (
    "best validation NDCG@10 among strategies not significantly below first-k in NDCG@10 or Recall@10 "
    "(p < 0.05; with >= 2 seeds the seed-aware test over seeds and users, with one seed the paired test over "
    "users, which cannot see training-seed variance); ties go to first-k"
)
# what a check made before rows recorded their test used: the paired test on seed-averaged metrics
PAIRED_AVERAGED = "paired over users on seed-averaged metrics (cannot see seed variance)"
ONE_SEED_NOTE = (
    "one seed: this verdict cannot see training-seed variance (a seed that shifts a run shifts all its users "
    "at once, so a tie can look significant); --seeds 3 or more runs the seed-aware test"
)


def row_test(row: dict, check: dict | None = None) -> str | None:
    """Which test made the row's p; rows written before it was recorded: the paired test (one seed
    or seed-averaged, by the check's seeds)."""
    if row.get("strategy") == "first-k":
        return None
    if "test" in row:
        return row["test"]
    return ONE_SEED if (check or {}).get("seeds", 1) <= 1 else PAIRED_AVERAGED


def seed_note(check: dict) -> str | None:
    """One line when the check's verdict could not see seed variance (one seed, or an old check)."""
    tests = {row_test(r, check) for r in check.get("rows", [])} - {None}
    if not tests or tests == {SEED_AWARE}:
        return None
    if check.get("seeds", 1) <= 1:
        return ONE_SEED_NOTE
    return "this check's p-values come from the paired test over users on seed-averaged metrics, which cannot see seed variance; re-run tokensel check for the seed-aware test"


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
SURROGATE_ROW_TEST = "paired over users and settle epochs (one surrogate run: cannot see seed variance)"
# what stage 2's paired test sees: the surrogate is ONE training run, its settle epochs are not seeds
SURROGATE_TEST = (
    "paired over users on per-user metrics averaged over the settle epochs of one surrogate run: it sees "
    "how users and those epochs disagree, not training-seed variance (another surrogate seed can move a "
    "selection's reading); the downstream check retrains with seeds"
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


def current_check(policy: str | Path | None, digest: str | None = None) -> dict | None:
    """The bundle's check if it was made for these very weights (a retrained bundle's old check is stale).
    digest: the bundle's hash where the caller has it already (it reads every weight file)."""
    path = bundle_path(policy)
    check = read_check(path)
    if check is None or check.get("bundle_hash") != (digest or bundle_hash(path)):
        return None
    return check


def catalogue_text(policy: str | Path | None, **changes) -> TextConfig:
    """The text settings a run uses: the bundle's, with the options given (None keeps the bundle's)."""
    return replace(read_bundle_config(policy).text, **{k: v for k, v in changes.items() if v is not None})


def resolve(
    policy: str | Path | None, items: str | Path | None = None, k: int | None = None, text: TextConfig | None = None, digest: str | None = None
) -> tuple[str, str]:
    """(strategy to run, one line saying which verdict it followed) for --strategy auto.

    items/k/text: the catalogue being compressed, at budget k, with these text settings (default: the
    bundle's); without items only the bundle's check is read (the in-memory Selector). digest: the
    bundle's hash where the caller has it already (it reads every weight file)."""
    path = bundle_path(policy)
    digest = digest or bundle_hash(path)
    check = current_check(path, digest)
    if items is not None:
        text = text or read_bundle_config(path).text
        fp = catalogue_fingerprint(items, text)
        for protocol in PROTOCOLS:  # leave-one-out first; a cold-start verdict where none was measured
            by_k, store = recorded(items, fp, digest, protocol)
            v = verdict_for(by_k, k) if k is not None else None
            if v is not None:
                at = f"k={v.k}" if v.k == k else f"k={v.k}, the largest recorded budget below {k}"
                seeds = f"{v.seeds} seed{'s' if v.seeds != 1 else ''}" + ("" if v.sees_seed_variance else ", cannot see seed variance")
                detail = f"; {v.detail}" if v.detail else ""
                cold = " under the cold-start protocol" if protocol == "cold" else ""
                return v.strategy, f"auto: {v.strategy} (this catalogue's {v.source} verdict{cold} at {at}: {v.recommender}, {seeds}{detail}; {store})"
        if check is not None and check.get("catalogue") != fp:
            return "first-k", (
                f"auto: first-k (no verdict for this catalogue, fingerprint {fp}; the bundle's check was made on another catalogue, "
                f"{Path(check['data']['items']).name}, fingerprint {check.get('catalogue', 'not recorded')}; run tokensel curve or tokensel check on this one)"
            )
    if check is None:
        return "first-k", f"auto: first-k ({bundle_label(path)} has no strategy check for its weights; run tokensel check)"
    cold = ", cold-start protocol" if check.get("protocol") else ""
    where = f"the bundle's downstream check: k={check['k']}, {Path(check['data']['items']).name} validation{cold}; tokensel info shows it"
    if check["chosen"] == "first-k":
        return "first-k", f"auto: first-k (no selection beat it in {where})"
    row = next((r for r in check["rows"] if r["strategy"] == check["chosen"]), {})
    return check["chosen"], f"auto: {check['chosen']} ({row.get('ratio_N@10', float('nan')):.2f}x first-k NDCG@10 in {where})"


def auto_choices(
    policy: str | Path | None, model: str | None = None, items: str | Path | None = None, ks: Sequence[int | None] = (None,), text: TextConfig | None = None
) -> dict[int | None, tuple[str, str | None, TextConfig | None, str]]:
    """--strategy auto in full, for the file job and the Selector alike: per budget, (strategy, model,
    text settings or None, why). A strategy that reads no bundle (first-k) gets the bundle's model and
    text settings, so it writes the tokens the check measured; a bundle strategy reads them itself.
    The bundle is verified once, whatever the budgets resolve to: a damaged bundle is named, not
    silently half-used."""
    cfg = verify_bundle(policy)
    digest = bundle_hash(bundle_path(policy))
    out = {}
    for k in ks:
        strategy, why = resolve(policy, items, k, text, digest)
        out[k] = (strategy, model, None, why) if strategy in BUNDLE_STRATEGIES else (strategy, model or cfg.item.base_model, cfg.text, why)
    return out


def auto_choice(policy: str | Path | None, model: str | None = None) -> tuple[str, str | None, TextConfig | None, str]:
    """auto_choices without a catalogue (the in-memory Selector): only the bundle's check can speak."""
    return auto_choices(policy, model)[None]


def lost_note(strategy: str, policy: str | Path | None) -> str | None:
    """One line when `strategy` lost to first-k in the bundle's check, else None."""
    check = current_check(policy)
    row = next((r for r in check["rows"] if r["strategy"] == strategy), None) if check else None
    if row is None or not lost_to_first_k(row):
        return None
    name = {"N@10": "NDCG@10", "R@10": "Recall@10"}
    lost = ", ".join(f"{row[f'ratio_{m}']:.2f}x {name[m]} (p {row[f'p_{m}']:.2g})" for m in lost_metrics(row))
    test = row_test(row, check)
    return (
        f"note: {strategy} lost to first-k in this bundle's downstream check ({lost}; test: {test}; k={check['k']}, "
        f"{check.get('seeds', 1)} seed(s), validation); --strategy auto runs {check['chosen']}"
    )
