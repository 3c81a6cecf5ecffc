"""The budget curve: at what budget does the recommender stop losing quality, which tokens should
fill it, and how much item-LLM cost does it save?

    from tokensel.evaluate.curve import curve
    result = curve("items.parquet", "interactions.parquet", ks=(16, 32, 64, 128), seeds=3)
    print(result["verdict"]["line"])

No training: item-align and the policy come from a bundle (default: the shipped one). Per strategy one
model pass scores the catalogue (the score cache in the work folder) and every budget is selected from
those scores. The same downstream recommender is trained on every (strategy, k) file with the same
seeds; files with equal token lists share their runs (tokensel.evaluate.runner). The reference is the
longest budget's first-k, or with reference="full" the whole texts up to max_len. Every comparison is
made twice, on validation targets (which decide: tokensel.evaluate.curve_verdict) and test targets
(which are reported), each with the seed-aware test and the paired test beside it. The item-LLM
cost per item of every file is measured as bench/cost measures it (tokensel.evaluate.cost).

`headroom` (first-k against first factor*k) is the two-budget case of the same grid: compress_grid
and evaluate_grid are what both run.

Budgets up to twice the bundle's prefix keep half the budget as prefix (tokensel.compress.run.default_prefix, the rule compress applies too), so
even the smallest budget selects something; the JSON records the prefix of every budget.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tokensel.compress.job import CompressSummary
from tokensel.compress.run import compress, default_prefix
from tokensel.config import CacheConfig, TextConfig, TrainConfig, check_protocol
from tokensel.device import pick_device, pick_dtype
from tokensel.errors import TokenselError
from tokensel.evaluate.cost import best_seconds
from tokensel.evaluate.curve_verdict import FIRST_K, compare, verdict
from tokensel.evaluate.recommenders import make_recommender
from tokensel.evaluate.inputs import read_split
from tokensel.evaluate.cache import EvalCache
from tokensel.evaluate.runner import METRICS, Evaluation, FileResult, evaluate_detailed
from tokensel.io.readers import open_items
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import is_top_tunable
from tokensel.policy.bundle import bundle_hash, bundle_path, read_bundle_config
from tokensel.select.auto import catalogue_text
from tokensel.select.strategies import BUNDLE_STRATEGIES
from tokensel.select.verdicts import Verdict, catalogue_fingerprint, now, record

STRATEGIES = (FIRST_K, "item-align", "policy")
REFERENCES = ("longest", "full")
Key = tuple[str, int]  # (strategy, k)


# ------------------------------------------------------------------------------- settings
def check_ks(ks: list[int]) -> list[int]:
    """Budgets as given: whole numbers >= 1, strictly increasing (a repeat or an unsorted list is a typo)."""
    ks = [int(k) for k in ks]
    if not ks:
        raise TokenselError("--ks: give at least one budget, e.g. 16,32,64,128")
    if min(ks) < 1:
        raise TokenselError(f"--ks {','.join(map(str, ks))}: budgets must be at least 1")
    if len(set(ks)) < len(ks):
        raise TokenselError(f"--ks {','.join(map(str, ks))}: a budget is repeated")
    if ks != sorted(ks):
        raise TokenselError(f"--ks {','.join(map(str, ks))}: give the budgets in increasing order ({','.join(map(str, sorted(ks)))})")
    return ks


def check_strategies(strategies: list[str]) -> list[str]:
    """Known strategies, first-k first (every ratio is to first-k at the same k, so it is always run)."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise TokenselError(f"--strategies: unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
    return [FIRST_K, *[s for s in dict.fromkeys(strategies) if s != FIRST_K]]


def text_limit(llm: ItemLLM) -> int | None:
    """Text tokens the item LLM takes with its specials, template and `[ITEM]` around them (None: no limit)."""
    n = getattr(llm.model.config, "max_position_embeddings", None)
    return None if n is None else n - len(llm.lead_ids) - len(llm.template_ids) - 2


# ------------------------------------------------------------------------------- the grid
def grid_name(strategy: str, k: int | str) -> str:
    """first-64.parquet, item-align-64.parquet, policy-64.parquet."""
    return f"{'first' if strategy == FIRST_K else strategy}-{k}.parquet"


def compress_grid(
    items: str | Path, plan: dict[str, list[int]], folder: Path, *, policy: str | Path | None = None, model: str | None = None,
    text: dict | None = None, chunk: int = 8, prefix: int = 16, device: str = "auto", dtype: str = "auto",
) -> dict[Key, CompressSummary]:
    """Every (strategy, k) file of the plan in `folder` (named by grid_name). One compress call per
    strategy and prefix, so a strategy's model scores the catalogue once (the score cache in
    `folder`) and every budget is a selection from those scores; first-k runs no model."""
    text = text or {}
    out: dict[Key, CompressSummary] = {}
    for strategy, ks in plan.items():
        groups: dict[int, list[int]] = {}
        for k in sorted(set(ks)):
            groups.setdefault(0 if strategy == FIRST_K else default_prefix(k, prefix), []).append(k)
        for pre, group in groups.items():
            pattern = folder / grid_name(strategy, "{k}")
            summaries = compress(
                items, pattern, k=group, chunk=None if strategy == FIRST_K else chunk, prefix=None if strategy == FIRST_K else pre, strategy=strategy,
                policy=policy if strategy in BUNDLE_STRATEGIES else None, model=None if strategy in BUNDLE_STRATEGIES else model,
                device=device, dtype=dtype, cache=(folder / "scores.sqlite") if strategy != FIRST_K else False, **text,
            )
            for s in summaries:
                out[(strategy, s.k)] = s
    return out


def evaluate_grid(
    items: str | Path, interactions: str | Path, files: dict[Key, Path], recommender: str, seeds: int, **options
) -> tuple[Evaluation, dict[Key, FileResult]]:
    """evaluate_detailed over the grid's distinct files (equal token lists share runs there)."""
    paths = list(dict.fromkeys(files.values()))
    ev = evaluate_detailed(items, interactions, paths, recommender, seeds, **options)
    by_path = {Path(f.texts): f for f in ev.files}
    return ev, {key: by_path[path] for key, path in files.items()}


def token_lists(path: Path, n: int | None) -> list[list[int]]:
    table = pq.read_table(path, columns=["token_ids"])
    if n is not None:
        table = table.slice(0, n)
    return [t or [] for t in table.column("token_ids").to_pylist()]


def merged_items(path: Path, batch_rows: int = 65536) -> int:
    """Items whose kept tokens equal another item's. A text-based recommender sees one item where the
    catalogue has several, and the ranking counts a tie against the target, so a budget (or a
    selection) that drops what told items apart shows here before any training does. Streams the
    file and keeps one 64-bit hash per item."""
    rows = pq.ParquetFile(path).iter_batches(batch_rows, columns=["token_ids"])
    hashes = np.fromiter((hash(tuple(t or ())) for b in rows for t in b.column(0).to_pylist()), dtype=np.int64)
    _, counts = np.unique(hashes, return_counts=True)
    return int(counts[counts > 1].sum())


def measure_cost(llm: ItemLLM, files: dict[Key, Path], n_items: int | None, batch: int, repeats: int) -> dict[Key, float]:
    """Seconds per item of the item LLM's forward pass over each file's first n_items token lists
    (files with equal token lists are timed once)."""
    lists = {key: token_lists(path, n_items) for key, path in files.items()}
    digest = {key: hashlib.sha256(json.dumps(t).encode()).hexdigest() for key, t in lists.items()}
    inputs = {digest[key]: lists[key] for key in files}
    seconds = best_seconds(llm, inputs, batch, repeats)
    return {key: seconds[digest[key]] / max(len(lists[key]), 1) for key in files}


# ------------------------------------------------------------------------------- the curve
def _valid(f: FileResult) -> dict:
    return f.per_seed_valid_user or f.per_seed_user


def curve(
    items: str | Path,
    interactions: str | Path,
    ks: list[int] | tuple[int, ...] = (16, 32, 64, 128),
    *,
    strategies: list[str] | tuple[str, ...] = STRATEGIES,
    policy: str | Path | None = None,
    recommender: str = "hllm",
    item_tuning: str | None = None,
    train: TrainConfig | None = None,
    seeds: int = 3,
    epochs: int | None = None,
    protocol: str = "loo",
    cold_share: float = 0.1,
    reference: str = "longest",
    model: str | None = None,
    id_col: str | None = None,
    text_cols: list[str] | None = None,
    labels: bool | None = None,
    max_len: int | None = None,
    template: str | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    order_col: str = "timestamp",
    max_users: int | None = None,
    cost_items: int | None = 256,
    cost_batch: int = 32,
    cost_repeats: int = 2,
    work: str | Path | None = None,
    record_verdict: bool = True,
    cache: CacheConfig | None = None,
    device: str = "auto",
    dtype: str = "auto",
    log: Callable[[dict], None] | None = None,
) -> dict:
    """The curve as a JSON-ready dict: cells (one per strategy and k), the reference, the verdict.

    item_tuning: hllm's item tuning (default: f's last block trains where the model allows it, as in
    the strategy check); `train` overrides the whole training budget. work: keep the compressed files,
    the score cache, the item vectors and every finished run there, so a killed curve started again
    with the same folder, or one given more strategies, budgets or seeds, trains only what is missing
    (tokensel.evaluate.cache; default: a temporary folder, removed at the end).
    cost_items: items timed per file for the cost column (None: all). record_verdict: record the
    strategy to run at each k for this catalogue (tokensel.select.verdicts), for `compress --strategy auto`.
    """
    t0 = time.perf_counter()
    log = log or (lambda row: None)
    ks = check_ks(list(ks))
    strategies = check_strategies(list(strategies))
    if reference not in REFERENCES:
        raise TokenselError(f"--reference must be one of {', '.join(REFERENCES)} (got {reference!r})")
    if seeds < 1 or (epochs is not None and epochs < 1):
        raise TokenselError("--seeds and --epochs must be at least 1")
    check_protocol(protocol, cold_share)
    bundle = bundle_path(policy)
    cfg = read_bundle_config(bundle)
    if any(s in BUNDLE_STRATEGIES for s in strategies) and cfg.policy is None and "policy" in strategies:
        raise TokenselError(f"{bundle}: the bundle has no policy yet (stage 2 has not run); leave policy out of --strategies")
    model = model or cfg.item.base_model
    if any(s in BUNDLE_STRATEGIES for s in strategies) and model != cfg.item.base_model:
        raise TokenselError(f"--model {model}: item-align and policy select with the bundle's model {cfg.item.base_model!r}; leave --model out or the bundle strategies")
    text = catalogue_text(bundle, id_col=id_col, text_cols=text_cols, labels=labels, max_len=max_len, template=template)
    if train is None:
        tuning = item_tuning or ("top" if recommender == "hllm" and is_top_tunable(model) else "none")
        train = TrainConfig(item_tuning=tuning, cache=cache or CacheConfig())
    make_recommender(recommender, train)  # an unknown recommender or item tuning fails before any work
    open_items(items)
    if protocol == "cold":  # too few cold users is refused before anything is compressed
        read_split(items, interactions, text.id_col, (user_col, item_col, order_col), max_users, protocol, cold_share)
    dev = pick_device(device)
    llm = ItemLLM.from_pretrained(model, device=dev, dtype=pick_dtype(dev, dtype))
    llm.set_template(text.template)
    limit = text_limit(llm)
    if limit is not None and ks[-1] > limit:
        raise TokenselError(f"--ks: k={ks[-1]} is over the item LLM's max length ({limit} text tokens for {model!r}); lower --ks")
    selecting = [s for s in strategies if s != FIRST_K]
    if reference == "full" or selecting:
        if text.max_len > (limit or text.max_len):
            raise TokenselError(f"--max-len {text.max_len} is over the item LLM's max length ({limit} text tokens for {model!r})")
    if selecting and ks[-1] >= text.max_len:
        raise TokenselError(f"--ks: k={ks[-1]} >= --max-len {text.max_len}: every text fits, so {selecting[0]} selects nothing; lower --ks or raise --max-len")
    if reference == "full" and ks[-1] > text.max_len:
        raise TokenselError(f"--ks: k={ks[-1]} > --max-len {text.max_len}, the full texts' length")
    ref_key: Key = (FIRST_K, ks[-1] if reference == "longest" else text.max_len)
    chunk, prefix = (cfg.policy.select_chunk, cfg.policy.prefix) if cfg.policy else (8, 16)

    with tempfile.TemporaryDirectory(prefix="tokensel-curve-") as tmp:
        folder = Path(work) if work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        plan = {s: list(ks) for s in strategies}
        plan[FIRST_K] = sorted(set(ks) | {ref_key[1]})
        text_opts = dict(id_col=text.id_col, text_cols=list(text.text_cols), labels=text.labels, max_len=text.max_len, template=text.template)
        summaries = compress_grid(items, plan, folder, policy=policy, model=model, text=text_opts, chunk=chunk, prefix=prefix, device=device, dtype=dtype)
        log({"stage": "compressed", "files": len(summaries), "seconds": round(time.perf_counter() - t0, 1)})
        files = {key: Path(s.out) for key, s in summaries.items()}
        ev, res = evaluate_grid(
            items, interactions, files, recommender, seeds, model=model, train=train, epochs=epochs, device=device, dtype=dtype,
            id_col=text.id_col, user_col=user_col, item_col=item_col, order_col=order_col, max_users=max_users,
            cache=EvalCache(folder / "cache" if work else None), log=log, protocol=protocol, cold_share=cold_share,
        )
        merged = {path: merged_items(path) for path in set(files.values())}
        cost_s = measure_cost(llm, files, cost_items, cost_batch, cost_repeats)
        log({"stage": "cost", "seconds": round(time.perf_counter() - t0, 1)})
    del llm

    deterministic = make_recommender(recommender).deterministic
    cells = [
        make_cell(s, k, res, res[ref_key], summaries[(s, k)], merged[files[(s, k)]], cost_s[(s, k)], cost_s[ref_key], None if s == FIRST_K else default_prefix(k, prefix))
        for s in strategies for k in ks
    ]
    decide = {
        (c["strategy"], c["k"]): {"valid_N@10": c["valid"]["N@10"], "valid_vs_first_k": c["valid_vs_first_k"],
                                  "valid_vs_reference": c["valid_vs_reference"], "cost": c["cost_vs_reference"],
                                  "first_k_texts": c["strategy"] != FIRST_K and c["same_as"] == Path(res[(FIRST_K, c["k"])].texts).name}
        for c in cells
    }
    ref = res[ref_key]
    ref_name = f"first-{ref_key[1]}" if reference == "longest" else f"the full texts (first {ref_key[1]} tokens)"
    v = verdict(decide, ks, ref_name, deterministic, ref_key[1] if reference == "longest" else None)
    if not all(f.per_seed_valid_user for f in res.values()):
        v["line"] += f" {recommender} reports no per-user validation ranks: these decisions read the test targets."
    if protocol == "cold":
        v["decided_on"] = "warm validation targets"
        v["line"] += (
            " Under the cold protocol the validation targets are warm items (a cold item is only ever a test target), so these"
            " decisions are leave-one-out's on the smaller training set: the cold-target test columns are the cold evidence, and they do not decide."
        )
    item_tuning_used = train.item_tuning
    rec_name = recommender + (f", item tuning {item_tuning_used}" if recommender == "hllm" else "")
    out = {
        "items": str(items), "interactions": str(interactions),
        "recommender": rec_name, "train": asdict(train), "epochs": epochs, "seeds": list(ev.files[0].seeds), "deterministic": deterministic,
        "protocol": protocol, **({"cold_share": cold_share} if protocol != "loo" else {}),
        "model": model, "bundle": str(bundle), "bundle_hash": bundle_hash(bundle), "text": asdict(text), "chunk": chunk,
        "ks": ks, "strategies": strategies,
        "reference": {
            "name": ref_name, "kind": reference, "k": ref_key[1], "texts": Path(ref.texts).name,
            "tokens_per_item": summaries[ref_key].tokens_out / max(summaries[ref_key].items, 1), "merged_items": merged[files[ref_key]],
            "test": dict(ref.metrics), "test_std": dict(ref.std), "valid": {m: float(_valid(ref)[m].mean()) for m in METRICS},
            "cost_ms_per_item": 1e3 * cost_s[ref_key],
        },
        "users": ev.n_users, "n_items": ev.n_items, "data": asdict(ev.data), "protocol_note": ev.protocol,
        "cost": {"items_timed": min(cost_items or ev.n_items, ev.n_items), "batch": cost_batch, "repeats": cost_repeats, "device": str(dev)},
        "runs_shared": {c["texts"]: c["same_as"] for c in cells if c["same_as"]},
        "cells": cells, "verdict": v,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if record_verdict:
        out.update(record_curve(items, text, out))
    return out


def make_cell(
    strategy: str, k: int, res: dict[Key, FileResult], ref: FileResult, summary: CompressSummary, merged: int, cost: float, ref_cost: float, prefix: int | None
) -> dict:
    """One row of the curve: test metrics (reported), validation metrics (deciding), both compared
    with first-k at k and with the reference, tokens, merged items and cost per item."""
    f, first = res[(strategy, k)], res[(FIRST_K, k)]
    return {
        "strategy": strategy, "k": k, "prefix": prefix,
        "texts": Path(f.texts).name, "same_as": Path(f.same_as).name if f.same_as else None,
        "tokens_per_item": summary.tokens_out / max(summary.items, 1), "merged_items": merged,
        "test": dict(f.metrics), "test_std": dict(f.std),
        "valid": {m: float(_valid(f)[m].mean()) for m in METRICS},
        "vs_first_k": compare(f.per_seed_user, first.per_seed_user),
        "vs_reference": compare(f.per_seed_user, ref.per_seed_user),
        "valid_vs_first_k": compare(_valid(f), _valid(first)),
        "valid_vs_reference": compare(_valid(f), _valid(ref)),
        "cost_ms_per_item": 1e3 * cost,
        "cost_vs_reference": cost / ref_cost if ref_cost else None,
    }


def record_curve(items: str | Path, text: TextConfig, result: dict) -> dict:
    """Record the strategy to run at every k for this catalogue (what compress --strategy auto follows);
    returns the catalogue's fingerprint and where the verdict went (or why it could not be recorded)."""
    fp = catalogue_fingerprint(items, text)
    v = result["verdict"]
    verdicts = []
    for k in result["ks"]:
        chosen = v["run"][str(k)]
        c = next(c for c in result["cells"] if c["strategy"] == chosen and c["k"] == k)
        detail = "" if chosen == FIRST_K else f"{c['valid_vs_first_k']['N@10']['ratio']:.2f}x first-k validation NDCG@10"
        if v.get("decided_on"):  # the cold protocol: say what decided, with the decision
            detail = "; ".join(filter(None, [detail, f"decided on {v['decided_on']}"]))
        verdicts.append(Verdict(k, chosen, "curve", result["recommender"], len(result["seeds"]), v["sees_seed_variance"], now(), detail, result["protocol"]))
    try:
        return {"catalogue": fp, "verdict_store": str(record(items, fp, result["bundle_hash"], text, verdicts))}
    except TokenselError as exc:  # the curve itself is done: report it, say the verdict was not recorded
        return {"catalogue": fp, "verdict_store_error": str(exc)}
