"""Which strategy to trust with a bundle: the downstream check that `tokensel train` ends with.

A trained head is only worth running if the recommender retrained on its texts does better than on
the first k tokens. Where the title and the key facts come first, every selection can lose: what the
check measures is that verdict, on this bundle's own data, before anyone relies on the head.

It compresses the catalogue with first-k, item-align and the trained policy at the bundle's k,
retrains the same downstream recommender on each (hllm with f's last block trained where the model
allows it, else hllm over frozen vectors; CHECK_SEEDS seeds by default) and scores the VALIDATION targets:
the recommender trains a fixed number of epochs and the last one is scored, so the validation
targets never choose anything and the test targets are never read (`TrainConfig.score`). Each
strategy is compared with first-k by the seed-aware test over seeds and users
(`tokensel.stats.seed_user_test`): a seed shifts all of a run's users at once, so the paired test over
users alone can call a tie significant. With one seed (`seeds=1`) only the paired test is possible and
the check records that its verdict cannot see seed variance. The result is written beside the bundle's weights
(`check.json`, see `tokensel.policy.bundle.write_check`); `tokensel info` prints it, and
`tokensel compress --strategy auto` runs the strategy it chose on this catalogue (the check records
the catalogue's fingerprint, and its verdict in tokensel.select.verdicts) (`tokensel.select.auto.RULE`: the
best validation NDCG@10 among the strategies not significantly below first-k in NDCG@10 or
Recall@10, first-k included; a tie goes to first-k, which needs no model). A policy whose stage 2
kept first-k or item-align writes their very texts; the runner then reuses that strategy's runs
instead of retraining, and the check records it (`same_texts`). With `protocol="cold"` the scored
validation targets are cold items, held out of all training (tokensel.io.cold), and the verdict is
over the users whose validation target is cold; the check records the protocol and its counts.

    from tokensel.evaluate.check import strategy_check
    check = strategy_check("bundle/", "items.parquet", "interactions.parquet")
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tokensel.compress.run import compress
from tokensel.config import CHECK_EPOCHS, CHECK_SEEDS, COLD_SHARE, CacheConfig, TrainConfig, check_protocol
from tokensel.errors import TokenselError
from tokensel.evaluate.inputs import read_split
from tokensel.evaluate.cache import EvalCache
from tokensel.evaluate.runner import evaluate_detailed
from tokensel.io.interactions import COLUMNS
from tokensel.policy.bundle import BundleConfig, bundle_hash, read_bundle_config, write_check
from tokensel.models.readout import is_top_tunable
from tokensel.select.auto import RULE, choose, seed_note
from tokensel.select.rows import rows_vs_first_k
from tokensel.select.verdicts import Verdict, catalogue_fingerprint, now, record
from tokensel.train.pipeline import data_record

CHECKED = ("first-k", "item-align", "policy")


def item_tuning_for(model: str) -> str:
    """f's last block trains where the model is BERT-style (cheap on a CPU); else the vectors stay frozen."""
    return "top" if is_top_tunable(model) else "none"


def strategy_check(
    bundle: str | Path,
    items: str | Path,
    interactions: str | Path,
    *,
    k: int | None = None,
    seeds: int = CHECK_SEEDS,
    epochs: int = CHECK_EPOCHS,
    columns: tuple[str, str, str] = COLUMNS,
    max_users: int | None = None,
    device: str = "auto",
    save: bool = True,
    log: Callable[[dict], None] | None = None,
    protocol: str = "loo",
    cold_share: float = COLD_SHARE,
    cache: CacheConfig | None = None,
) -> dict:
    """Run the check for `bundle` on these items and interactions, save it in the bundle (unless
    save=False) and return it. k defaults to the budget the bundle's policy was trained at. `cache`:
    where item tuning top keeps f's lower-layer states."""
    check_protocol(protocol, cold_share)
    if seeds < 1:
        raise TokenselError(f"the strategy check's seeds must be at least 1 (got {seeds}); {CHECK_SEEDS} let its test see seed variance")
    bundle = Path(bundle)
    cfg: BundleConfig = read_bundle_config(bundle)
    if cfg.policy is None:
        raise TokenselError(f"{bundle}: the bundle has no policy yet (stage 2 has not run), so there is nothing to check")
    k = k or cfg.policy.k
    chunk, prefix = cfg.policy.select_chunk, cfg.policy.prefix
    model = cfg.item.base_model
    tuning = item_tuning_for(model)
    train = TrainConfig(item_tuning=tuning, score="valid", patience=None, cache=cache or CacheConfig())
    text = cfg.text
    if protocol == "cold":  # too few cold users is refused before anything is compressed
        read_split(items, interactions, text.id_col, columns, max_users, protocol, cold_share, train.score)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tokensel-check-") as tmp:
        files = []
        for strategy in CHECKED:
            out = Path(tmp) / f"{strategy}.parquet"
            compress(
                items, out, k=k, chunk=chunk, prefix=prefix, strategy=strategy,
                policy=bundle if strategy != "first-k" else None, model=model if strategy == "first-k" else None,
                id_col=text.id_col, text_cols=text.text_cols, max_len=text.max_len, template=text.template, labels=text.labels,
                device=device, cache=False,
            )
            files.append(out)
            if log:
                log({"check": "compressed", "strategy": strategy, "seconds": round(time.perf_counter() - t0, 1)})
        ev = evaluate_detailed(
            items, interactions, files, "hllm", seeds, model=model, train=train, epochs=epochs, device=device,
            id_col=text.id_col, user_col=columns[0], item_col=columns[1], order_col=columns[2], max_users=max_users,
            cache=EvalCache(), log=log, protocol=protocol, cold_share=cold_share,
        )
    rows = rows_vs_first_k(
        {strategy: (f.metrics, f.per_user) for strategy, f in zip(CHECKED, ev.files)},
        {strategy: f.per_seed_user for strategy, f in zip(CHECKED, ev.files)} if seeds > 1 else None,
    )
    strategy_of = {str(path): strategy for strategy, path in zip(CHECKED, files)}
    same = {strategy: strategy_of[f.same_as] for strategy, f in zip(CHECKED, ev.files) if f.same_as}
    check = {
        "k": k, "chunk": chunk, "prefix": prefix,
        "recommender": f"hllm, item tuning {tuning}", "epochs": epochs, "seeds": seeds, "scored": "validation",
        "users": ev.n_users, "items": ev.n_items,
        "data": data_record(items, interactions, ev.n_items, ev.data.rows),
        "bundle_hash": bundle_hash(bundle),
        "rows": rows, "rule": RULE, "chosen": choose(rows) if all(r["ratio_N@10"] is not None for r in rows) else "first-k",
        "seconds": round(time.perf_counter() - t0, 1),
        **({"same_texts": same} if same else {}),
        **({"protocol": ev.cold.as_dict()} if ev.cold else {}),
    }
    if note := seed_note(check):
        check["seed_note"] = note
    check["catalogue"] = catalogue_fingerprint(items, text)  # auto follows this check only on this very catalogue
    if save:
        write_check(bundle, check)
        row = next(r for r in rows if r["strategy"] == check["chosen"])
        detail = f"{row['ratio_N@10']:.2f}x first-k validation NDCG@10" if check["chosen"] != "first-k" and row.get("ratio_N@10") else ""
        record(items, check["catalogue"], check["bundle_hash"], text, [Verdict(
            k, check["chosen"], "check", check["recommender"], seeds, seeds > 1, now(), detail, protocol,
        )])
    return check

