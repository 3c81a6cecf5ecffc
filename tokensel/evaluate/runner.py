"""Stage 3: train the same downstream recommender on each compressed text file and compare them.

    from tokensel.evaluate.runner import evaluate
    rows = evaluate("items.parquet", "interactions.parquet", ["k64-first.parquet", "k64-policy.parquet"],
                    recommender="hllm", seeds=3)

For every file: the kept `token_ids` are read as they are (never re-tokenised), the frozen item LLM
(one model for all files) turns them into item vectors once, and the recommender is trained from
scratch for every seed with the same budget. Test metrics are Recall/NDCG@5/10/50 in percent,
leave-one-out, full ranking over all items with the user's history masked. Per-user metrics are
averaged over seeds and compared with the first file by a paired test (tokensel.stats).
With `protocol="cold"` (tokensel.io.cold) the newest items are held out of all training, the headline
metrics are over the users whose test target is one of them, and the warm-target users are beside.
A file whose kept token lists (and template) equal an earlier file's is the same experiment, so it is
not retrained: it gets that file's runs (`FileResult.same_as`). A stage-2 head that chose first-k or
item-align writes exactly their texts, and retraining them would only spend the budget twice.
The result is the SPEC's evaluate contract: one dict per file, in order.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tokensel.config import COLD_SHARE, check_protocol
from tokensel.device import pick_device, pick_dtype
from tokensel.errors import TokenselError
from tokensel.train.metrics import KS, per_user_metrics
from tokensel.evaluate.recommenders import TrainConfig, make_recommender
from tokensel.evaluate.recommenders.base import SeedRun
from tokensel.stats import paired_pvalues, paired_test_name
from tokensel.evaluate.cache import EvalCache, histories_digest, run_key
from tokensel.evaluate.inputs import check_model, check_vocab, load_texts, read_split
from tokensel.io.cold import ColdCounts, ColdSplit
from tokensel.io.interactions import DataCounts
from tokensel.io.items import open_parquet
from tokensel.io.parquet_out import read_metadata
from tokensel.models.item_llm import DEFAULT_MODEL, ItemLLM, resolve_model_path
from tokensel.models.readout import check_top_tunable

METRICS = tuple(f"{m}@{k}" for m in ("R", "N") for k in KS)  # R@5 R@10 R@50 N@5 N@10 N@50


def protocol_note(test: str = "ttest", n_users: int | None = None, n_items: int | None = None, trained: bool = True, cold: ColdCounts | None = None) -> str:
    """How the numbers were made. `trained` False: a deterministic, untrained scorer (text-sim), which
    has no epochs and gives the same result for every seed, so it runs once. `cold`: the cold split's counts."""
    users = f"{n_users:,} users" if n_users is not None else "all users"
    items = f"all {n_items:,} items" if n_items is not None else "all items"
    split = (
        f"leave-one-out test over {users} (last interaction = test, the one before = validation); " if cold is None else
        f"cold-start {'test' if cold.scored == 'test' else 'validation'} over the {users} whose {cold.scored} target is cold "
        "(cold items removed from every history, then leave-one-out); "
    )
    return (
        split
        + f"full ranking over {items} with the user's history masked (a repeat of the target is not masked); "
        + ("percent; best epoch on validation NDCG@10; " if trained else "percent; untrained and deterministic: one pass, no epochs; ")
        + f"p = paired {paired_test_name(test)} on per-user metrics"
        + (" (averaged over seeds)" if trained else "")
        + " against the first file"
    )


@dataclass
class FileResult:
    texts: str
    recommender: str
    seeds: list[int]
    metrics: dict[str, float]
    std: dict[str, float]
    p_vs_first: dict[str, float] | None
    per_user: dict[str, np.ndarray] = field(repr=False)  # [U] per metric, averaged over seeds
    per_seed_user: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # [seeds, U] per metric: what seed-aware tests read
    per_seed: list[dict] = field(default_factory=list)  # per seed: test metrics, best epoch, validation, seconds
    embed_seconds: float = 0.0
    train_seconds: float = 0.0
    meta: dict = field(default_factory=dict)  # the file's tokensel metadata
    same_as: str | None = None  # an earlier file with the same token lists, whose runs these are
    per_seed_valid_user: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # [seeds, U] per metric on the validation targets (what decides)
    # --protocol cold: the warm-target users' results beside the cold headline ({"users", "metrics", "p_vs_first"})
    warm: dict | None = None
    warm_per_user: dict[str, np.ndarray] = field(repr=False, default_factory=dict)

    def as_dict(self) -> dict:
        """Exactly the SPEC's evaluate contract."""
        return {
            "texts": self.texts,
            "recommender": self.recommender,
            "seeds": list(self.seeds),
            "metrics": dict(self.metrics),
            "std": dict(self.std),
            "p_vs_first": None if self.p_vs_first is None else dict(self.p_vs_first),
        }


@dataclass
class Evaluation:
    files: list[FileResult]
    recommender: str
    model: str
    n_users: int
    n_items: int
    test: str
    config: dict
    data: DataCounts = field(default_factory=DataCounts)
    cold: ColdCounts | None = None  # --protocol cold: what the split held out (n_users is then the cold users)

    @property
    def protocol(self) -> str:
        trained = not make_recommender(self.recommender).deterministic
        note = protocol_note(self.test, self.n_users, self.n_items, trained, self.cold) + "\ndata: " + self.data.note()
        return note + ("\n" + self.cold.note() if self.cold else "")

    def to_list(self) -> list[dict]:
        """The SPEC's evaluate contract, each object with the data counts (`data`) added; under the cold
        protocol also its counts (`protocol`) and the warm-target users' results (`warm_users`)."""
        cold = {"protocol": self.cold.as_dict()} if self.cold else {}
        return [{**f.as_dict(), "data": asdict(self.data), **cold, **({"warm_users": f.warm} if self.cold else {})} for f in self.files]


# ---------------------------------------------------------------------------------------- evaluation
def evaluate_detailed(
    items: str | Path,
    interactions: str | Path,
    texts: list[str | Path],
    recommender: str = "hllm",
    seeds: int | list[int] = 3,
    *,
    model: str | None = None,
    train: TrainConfig | None = None,
    epochs: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    id_col: str | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    order_col: str = "timestamp",
    test: str = "ttest",
    max_users: int | None = None,
    cache: EvalCache | None = None,
    log: Callable[[dict], None] | None = None,
    protocol: str = "loo",
    cold_share: float = COLD_SHARE,
) -> Evaluation:
    """Everything `evaluate` computes, plus per-user metrics, per-seed results and timings.

    protocol "cold": the cold-start split (tokensel.io.cold) with `cold_share` of the items cold; the
    files' metrics, per-user metrics and p-values are the cold-target users', `warm` the others'."""
    check_protocol(protocol, cold_share)
    if not texts:
        raise TokenselError("give at least one --texts file (the output of tokensel compress)")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise TokenselError("--seeds must be at least 1")
    texts = [Path(t) for t in texts]
    log = log or (lambda row: None)
    cfg = train or TrainConfig()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    dev = pick_device(device)
    metas = []
    for p in texts:
        open_parquet(p)
        metas.append(read_metadata(p))
    model = model or metas[0].get("model") or DEFAULT_MODEL
    if recommender == "hllm" and cfg.item_tuning == "top":
        check_top_tunable(model)  # before reading interactions or loading the model
    for p, meta in zip(texts, metas):
        check_model(p, meta, model)
    col = id_col or metas[0].get("id_col") or "item_id"
    # before the model loads: bad interactions and too few cold users are refused at once
    item_ids, hist, split = read_split(items, interactions, col, (user_col, item_col, order_col), max_users, protocol, cold_share, cfg.score)
    if split is not None:
        log({"stage": "cold split", **split.counts.as_dict()})
    rec = make_recommender(recommender, cfg, dev, log)
    llm = ItemLLM.from_pretrained(model, device=dev, dtype=pick_dtype(dev, dtype))
    vocab = len(llm.tokenizer)
    cache = cache or EvalCache()
    hist_digest = histories_digest(hist)
    results: list[FileResult] = []
    seen: dict[str, FileResult] = {}  # content digest -> the first file with those token lists
    for path, meta in zip(texts, metas):
        tokens, _ = load_texts(path, item_ids, items, col)
        check_vocab(path, model, vocab, tokens)
        template = meta.get("template") or ""
        content = hashlib.sha256(json.dumps([template, tokens]).encode()).hexdigest()
        if content in seen:
            twin = seen[content]
            p = paired_pvalues(twin.per_user, results[0].per_user, test) if results else None
            warm = twin.warm and {**twin.warm, "p_vs_first": paired_pvalues(twin.warm_per_user, results[0].warm_per_user, test) if results else None}
            results.append(replace(twin, texts=str(path), p_vs_first=p, embed_seconds=0.0, train_seconds=0.0, meta=meta, same_as=twin.texts, warm=warm))
            log({"texts": str(path), "stage": "reused", "same_as": twin.texts})
            continue
        llm.set_template(template)
        t0 = time.perf_counter()
        # what the recommender reads of the file (its template and kept tokens), not the file's bytes: a
        # file written again with other metadata (the bundle's path, the time) is the same run
        key = hashlib.sha256(json.dumps([content, resolve_model_path(model), rec.vector_kind, str(pick_dtype(dev, dtype)), len(item_ids)]).encode()).hexdigest()[:20]
        keys = {seed: run_key(key, recommender, cfg, seed, dev, hist_digest) for seed in seed_list[: 1 if rec.deterministic else None]}
        kept = {seed: cache.load_run(k) for seed, k in keys.items()}  # runs finished before (a re-run, or one resumed after a kill)
        if any(kept.values()):
            log({"texts": str(path), "stage": "runs reused", "seeds": [s for s, r in kept.items() if r]})
        vectors = None
        if rec.needs_item_llm:  # the item LLM trains in every run: nothing to embed once

            def make_llm(template: str = template) -> ItemLLM:
                fresh = ItemLLM.from_pretrained(model, device=dev, dtype=pick_dtype(dev, dtype))
                fresh.set_template(template)
                return fresh

        elif not all(kept.values()):
            vectors = cache.vectors(rec, llm, tokens, template, key)
        embed_s = time.perf_counter() - t0
        log({"texts": str(path), "stage": "embed", "seconds": round(embed_s, 1)})
        t1 = time.perf_counter()
        runs = []
        for seed in seed_list:
            if rec.deterministic and runs:
                runs.append(replace(runs[0], seed=seed))
            elif kept[seed] is not None:
                runs.append(kept[seed])
            else:
                run = rec.run_tuned(make_llm, tokens, hist, seed) if rec.needs_item_llm else rec.run(vectors, hist, seed)
                runs.append(cache.save_run(keys[seed], run))
        train_s = time.perf_counter() - t1
        results.append(summarise(str(path), recommender, seed_list, runs, split, results[0] if results else None, test, meta, embed_s, train_s))
        metrics = results[-1].metrics
        seen[content] = results[-1]
        log({"texts": str(path), "stage": "train+test", "seconds": round(train_s, 1), "N@10": round(metrics["N@10"], 3), "R@10": round(metrics["R@10"], 3)})
    n_users = int(split.cold_users.sum()) if split else len(hist.users)
    config = {"train": asdict(cfg), "device": str(dev), "dtype": dtype}
    return Evaluation(results, recommender, model, n_users, len(item_ids), test, config, hist.counts, split.counts if split else None)


def summarise(
    texts: str, recommender: str, seeds: list[int], runs: list[SeedRun], split: ColdSplit | None, first: FileResult | None,
    test: str, meta: dict, embed_s: float, train_s: float,
) -> FileResult:
    """One file's result from its seed runs: per-user metrics per seed (under the cold protocol the
    cold-target users', the warm-target users' beside), their means and spread over seeds, and the
    paired test against the first file."""
    per_seed_users = [per_user_metrics(r.test_ranks) for r in runs]
    warm, warm_per_user = None, {}
    if split is not None:  # the headline is the cold-target users'; the warm-target users' beside
        warm_users = [{m: u[m][torch.from_numpy(~split.cold_users)] for m in METRICS} for u in per_seed_users]
        warm_per_user = {m: torch.stack([u[m] for u in warm_users]).double().mean(0).numpy() for m in METRICS}
        warm = {
            "users": int((~split.cold_users).sum()),
            "metrics": {m: float(warm_per_user[m].mean()) for m in METRICS},
            "p_vs_first": paired_pvalues(warm_per_user, first.warm_per_user, test) if first else None,
        }
        per_seed_users = [{m: u[m][torch.from_numpy(split.cold_users)] for m in METRICS} for u in per_seed_users]
    per_seed_user = {m: torch.stack([u[m] for u in per_seed_users]).double().numpy() for m in METRICS}
    per_user = {m: per_seed_user[m].mean(0) for m in METRICS}
    per_seed_valid_user = {}
    if all(r.valid_ranks is not None for r in runs):
        valid_users = [per_user_metrics(r.valid_ranks) for r in runs]
        per_seed_valid_user = {m: torch.stack([u[m] for u in valid_users]).double().numpy() for m in METRICS}
    seed_means = {m: np.array([float(u[m].double().mean()) for u in per_seed_users]) for m in METRICS}
    metrics = {m: float(seed_means[m].mean()) for m in METRICS}
    std = {m: float(seed_means[m].std(ddof=1)) if len(set(seed_means[m].tolist())) > 1 else 0.0 for m in METRICS}
    p = paired_pvalues(per_user, first.per_user, test) if first else None
    per_seed = [
        {"seed": r.seed, "best_epoch": r.best_epoch, "seconds": round(r.seconds, 1), "valid": r.valid, "test": {m: float(seed_means[m][j]) for m in METRICS}}
        for j, r in enumerate(runs)
    ]
    return FileResult(
        texts, recommender, seeds, metrics, std, p, per_user, per_seed_user, per_seed, embed_s, train_s, meta,
        per_seed_valid_user=per_seed_valid_user, warm=warm, warm_per_user=warm_per_user,
    )


def evaluate(
    items: str | Path,
    interactions: str | Path,
    texts: list[str | Path],
    recommender: str = "hllm",
    seeds: int | list[int] = 3,
    **kwargs,
) -> list[dict]:
    """The SPEC's evaluate contract: one dict per texts file, in order (see evaluate_detailed for options)."""
    return evaluate_detailed(items, interactions, texts, recommender, seeds, **kwargs).to_list()


# ---------------------------------------------------------------------------------------- output
def write_results(ev: Evaluation, out: str | Path) -> Path:
    """JSON (the evaluate contract) or, for a `.parquet` path, one row per file with the same numbers."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = ev.to_list()
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        cols: dict[str, list] = {"texts": [r["texts"] for r in rows], "recommender": [r["recommender"] for r in rows], "seeds": [r["seeds"] for r in rows]}
        for m in METRICS:
            cols[m] = [r["metrics"][m] for r in rows]
            cols[f"{m} std"] = [r["std"][m] for r in rows]
            cols[f"{m} p_vs_first"] = [None if r["p_vs_first"] is None else r["p_vs_first"][m] for r in rows]
        table = pa.table(cols)
        table = table.replace_schema_metadata({b"tokensel_evaluate": json.dumps({"protocol": ev.protocol, "model": ev.model, **ev.config}).encode()})
        pq.write_table(table, tmp)
    else:
        tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(out)
    return out


def fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def results_table(ev: Evaluation, title: str | None = None):
    """A rich table: one row per file, metrics as mean ± std over seeds, p-values vs the first file."""
    from rich.markup import escape
    from rich.table import Table

    deterministic = make_recommender(ev.recommender).deterministic
    multi = len(ev.files[0].seeds) > 1 and not deterministic
    runs = "deterministic, one run" if deterministic else f"seeds {ev.files[0].seeds}"
    users = f", {ev.n_users:,} cold-target users (warm-target users beside)" if ev.cold else ""
    t = Table(title=title or f"tokensel evaluate: {ev.recommender}, {runs}{users}", caption=ev.protocol, caption_justify="left")
    t.add_column("texts", overflow="fold")
    for m in METRICS:
        t.add_column(m, justify="right")
    t.add_column("p R@10", justify="right")
    t.add_column("p N@10", justify="right")
    if ev.cold:
        for c in ("warm N@10", "warm R@10", "warm p N@10"):
            t.add_column(c, justify="right")
    names = [Path(f.texts).name for f in ev.files]
    if len(set(names)) < len(names):  # the file names alone would be ambiguous
        names = [f.texts for f in ev.files]
    twin = {f.texts: name for f, name in zip(ev.files, names)}
    for f, name in zip(ev.files, names):
        if f.same_as:
            name += f" (same token lists as {twin[f.same_as]}: its runs)"
        cells = [f"{f.metrics[m]:.2f}" + (f" ±{f.std[m]:.2f}" if multi else "") for m in METRICS]
        p = f.p_vs_first
        warm = [f"{f.warm['metrics']['N@10']:.2f}", f"{f.warm['metrics']['R@10']:.2f}", fmt_p(f.warm["p_vs_first"] and f.warm["p_vs_first"]["N@10"])] if f.warm else []
        t.add_row(escape(name), *cells, fmt_p(p and p["R@10"]), fmt_p(p and p["N@10"]), *warm)
    return t
