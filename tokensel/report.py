"""What `tokensel info` (and the end of `train` and `check`) prints about a bundle, as plain lines:
easy to read, to grep, and never wrapped into table cells."""

from __future__ import annotations

from pathlib import Path

from tokensel.select.auto import SURROGATE_TEST, lost_to_first_k, row_test, seed_note
from tokensel.train.warnings import stage2_warnings


def bundle_summary(cfg: dict) -> list[tuple[str, str]]:
    """The rows of `tokensel info`: what a user needs to judge a bundle, from its config.json."""
    get = lambda *keys: _dig(cfg, keys)  # noqa: E731
    text, data, s1, pol = get("text") or {}, get("data") or {}, get("stage1") or {}, get("policy")
    rows = [
        ("model", f"{get('identity', 'name')} ({get('identity', 'model_type')}, hidden {get('identity', 'hidden_size')}); item-LLM tuning {get('item', 'tuning')}"),
        ("text", f"columns {','.join(text.get('text_cols', []))}; labels {'on' if text.get('labels') else 'off'}; max_len {text.get('max_len')}; template {text.get('template')!r}"),
        ("trained on", trained_on(data)
         + (f"\ncold start: the {c['cold_items']:,} newest items ({100 * c['share']:g}%) held out of both stages" if (c := data.get("protocol")) else "")),
        ("stage 1", f"{s1.get('epochs')} epochs, lr {s1.get('lr')}, {s1.get('negatives')} negatives; best validation NDCG@10 {get('logs', 'stage1', 'best_valid_N@10')}"),
    ]
    if pol is None or get("logs", "stage2") is None:
        rows.append(("stage 2", "not run: compress with --strategy item-align, or tokensel train --stage 2"))
        return rows
    rows.append(("stage 2", f"objective {pol.get('objective')}, k {pol.get('k')}, prefix {pol.get('prefix')}, chunk {pol.get('train_chunk')}/{pol.get('select_chunk')}, {pol.get('epochs')} epoch(s), lr {pol.get('lr')}"))
    log = get("logs", "stage2")
    warnings = log.get("warnings")
    source: list[str] = []
    if warnings is None:  # bundles trained before the warnings were recorded: the same rule over their log
        warnings, source = stage2_warnings(log), ["(derived from the training log: this bundle predates the recorded key)"]
    if (choice := log.get("choice")) is not None:  # e2e: what stage 2 kept, by the surrogate's validation
        scores = ", ".join(f"{r['strategy']} {r['N@10']:.3f}" for r in choice["rows"])
        does = {"policy": "the trained head", "item-align": "the identity head (item-align)", "first-k": "the first tokens (first-k)"}
        pooled = f", the mean of {n} epochs with the head held" if (n := choice.get("epochs_pooled", 1)) > 1 else ""
        rows.append(("stage-2 choice", f"{does.get(choice['chosen'], choice['chosen'])}; validation NDCG@10 {scores} (the surrogate recommender{pooled})"))
        rows.append(("stage-2 test", choice.get("test") or SURROGATE_TEST))  # bundles before the field: the same single surrogate
    rows.append(("stage-2 warnings", "\n".join([*source, *(f"- {w}" for w in warnings)]) or "none"))
    return rows


def trained_on(data: dict) -> str:
    """The training data by file name, size and content hash, one file a line. Bundles from before
    the record left out paths stored the full path: only its name is shown, so `info` prints nothing
    machine-specific (`info --json` shows the record as stored)."""
    items_rows = data.get("items_rows", data.get("n_items"))
    sizes = {
        "items": [f"{items_rows:,} items"] if items_rows is not None else [],
        "interactions": [f"{n:,} rows" for n in [data.get("interactions_rows")] if n is not None]
        + [f"{n:,} users" for n in [data.get("n_users")] if n is not None],
    }
    return "\n".join(
        f"{Path(str(data.get(kind, '?'))).name}: " + ", ".join([*size, *([f"sha256 {data[kind + '_sha']}"] if data.get(kind + "_sha") else [])])
        for kind, size in sizes.items()
    )


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def check_table(check: dict) -> list[str]:
    """The check as a few plain lines (info, train and check print it)."""
    cold = check.get("protocol")
    lines = [
        f"strategy check: k={check['k']}, {check['recommender']}, {check['epochs']} epochs x {check['seeds']} seed(s), "
        f"{check['users']:,} {'cold-target ' if cold else ''}users' {check['scored']} targets ({Path(check['data']['items']).name}), {check['seconds']:.0f} s",
        *([f"  cold start: {cold['cold_items']:,} cold items ({100 * cold['share']:g}% newest by first interaction) never trained on; "
           f"{cold['warm_users']:,} warm-target users not in the verdict; {cold['dropped_interactions']:,} interactions with cold items dropped"] if cold else []),
    ]
    tests = sorted({t for r in check["rows"] if (t := row_test(r, check))})
    if note := seed_note(check):  # one line: what this verdict cannot see
        lines.append(f"  {note}")
    elif tests:
        lines.append(f"  test: {'; '.join(tests)} (over seeds and users: sees training-seed variance)")
    lines += [
        f"  {'strategy':<11} {'N@10':>6} {'vs first-k':>10} {'p':>8} {'R@10':>6} {'vs first-k':>10} {'p':>8}",
    ]
    for r in check["rows"]:
        ratio = lambda m: "-" if r["strategy"] == "first-k" or r.get(f"ratio_{m}") is None else f"{r[f'ratio_{m}']:.3f}x"  # noqa: E731
        pv = lambda m: "-" if r.get(f"p_{m}") is None else f"{r[f'p_{m}']:.2g}"  # noqa: E731
        mark = "  lost to first-k" if lost_to_first_k(r) else ""
        if twin := check.get("same_texts", {}).get(r["strategy"]):
            mark += f"  (the same texts as {twin}: its runs, not retrained)"
        lines.append(f"  {r['strategy']:<11} {r['N@10']:>6.3f} {ratio('N@10'):>10} {pv('N@10'):>8} {r['R@10']:>6.3f} {ratio('R@10'):>10} {pv('R@10'):>8}{mark}")
    lines.append(f"  --strategy auto runs: {check['chosen']} ({check['rule']})")
    return lines
