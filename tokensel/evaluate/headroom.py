"""Does the text past k carry signal? First-k against the first `factor`*k tokens, before training.

The two-budget case of the budget curve (tokensel.evaluate.curve): the same grid of first-k files,
compressed and evaluated by the same code, read as one pair per budget.

A selection of k tokens differs from the first k in the text past k it uses and in what of the
first k it leaves out. A cheap look at the first part: the same recommender on the first k tokens
and on the first 4k, paired over users. It describes the data; it does not forecast a selection:
a selection can use the text past k badly, or drop what mattered in the first k (RESULTS.md,
"Headroom", has the layouts where the verdict and the selections disagreed). Only
`tokensel evaluate` on a selection says whether it wins.

    from tokensel.evaluate.headroom import headroom
    rows = headroom("items.parquet", "interactions.parquet", ks=(32, 64))
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokensel.config import COLD_SHARE, TextConfig, check_protocol
from tokensel.errors import TokenselError
from tokensel.evaluate.curve import FIRST_K, compress_grid, evaluate_grid
from tokensel.evaluate.recommenders import TrainConfig, make_recommender
from tokensel.evaluate.inputs import read_split
from tokensel.evaluate.cache import EvalCache
from tokensel.stats import TESTS, paired_pvalues, seed_user_test
from tokensel.io.cold import ColdCounts
from tokensel.io.interactions import DataCounts

ALPHA = 0.05
FEW_LONG = 0.05  # below this share of texts longer than k, there is almost nothing to select from


@dataclass
class Headroom:
    """One budget: first-k and first-(factor*k) under the same recommender, paired over users."""

    k: int
    long_k: int
    recommender: str
    users: int  # test users paired
    longer_than_k: float  # share of non-empty texts with more than k tokens
    first_k: dict[str, float]  # test metrics in percent (mean over seeds)
    first_long: dict[str, float]
    ratio: dict[str, float]  # first_long / first_k for N@10 and R@10
    p: dict[str, float]  # paired test, first_long vs first_k
    data: DataCounts = field(default_factory=DataCounts)  # what reading the interactions kept, dropped, skipped
    p_seed: dict[str, float] = field(default_factory=dict)  # seed-aware test (tokensel.stats.seed_user_test), first_long vs first_k
    sees_seed_variance: bool = False  # False with one seed: p_seed is then the paired t-test
    cold: ColdCounts | None = None  # --protocol cold: what the split held out; `users` are then the cold-target users

    @property
    def verdict(self) -> str:
        return verdict(self.longer_than_k, self.ratio, self.p, self.k, self.long_k)

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict, "protocol": "cold" if self.cold else "loo"}


def verdict(longer_than_k: float, ratio: dict[str, float], p: dict[str, float], k: int, long_k: int) -> str:
    """What the numbers say a selection can do at this budget (pure, so its cases are tested)."""
    if longer_than_k < FEW_LONG:
        return f"nothing to select: {100 * longer_than_k:.1f}% of the texts are longer than {k} tokens"
    gains = [m for m in ("N@10", "R@10") if ratio[m] > 1 and p[m] < ALPHA]
    losses = [m for m in ("N@10", "R@10") if ratio[m] < 1 and p[m] < ALPHA]
    if gains and not losses:
        best = max(ratio[m] for m in gains)
        return f"room: the first {long_k} tokens beat the first {k} ({', '.join(gains)} up to {best:.2f}x): the text past {k} carries signal this recommender uses"
    if losses and not gains:
        return f"none: the first {long_k} tokens are worse than the first {k} ({', '.join(losses)}): more text hurts this recommender"
    return f"none measurable: the first {long_k} and the first {k} tokens do not differ significantly (paired p >= {ALPHA})"


def headroom(
    items: str | Path,
    interactions: str | Path,
    ks: tuple[int, ...] | list[int] = (32, 64),
    *,
    factor: int = 4,
    recommender: str = "text-sim",
    seeds: int = 1,
    model: str | None = None,
    id_col: str | None = None,
    text_cols: list[str] | None = None,
    labels: bool | None = None,
    max_len: int | None = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    order_col: str = "timestamp",
    epochs: int | None = None,
    train: TrainConfig | None = None,
    test: str = "ttest",
    max_users: int | None = None,
    work: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    log: Callable[[dict], None] | None = None,
    protocol: str = "loo",
    cold_share: float = COLD_SHARE,
) -> list[Headroom]:
    """Compress first-k and first-(factor*k) for every k, train/score the recommender on each, pair them.

    `train` is the trained recommenders' budget (e.g. TrainConfig(item_tuning="top") for hllm with
    f's last block trained, the setting of RESULTS.md's downstream tables). `work` keeps the
    compressed files and every finished run, so a killed or repeated headroom trains only what is
    missing (default: a temporary folder, removed at the end). Texts are tokenised up to
    max(max_len, factor * the largest k), so the long side is never cut short. `protocol` "cold": the
    cold-start protocol (tokensel.io.cold), both sides paired over the users whose test target is cold.
    """
    check_protocol(protocol, cold_share)
    if protocol == "cold":  # too few cold users is refused before anything is compressed
        read_split(items, interactions, id_col or TextConfig().id_col, (user_col, item_col, order_col), max_users, protocol, cold_share)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or factor < 2 or seeds < 1:
        raise TokenselError(f"need budgets >= 1, --factor >= 2 and --seeds >= 1 (got ks={ks}, factor={factor}, seeds={seeds})")
    make_recommender(recommender, train)  # refuses an unknown recommender or item tuning before any compression
    if test not in TESTS:
        raise TokenselError(f"--test must be one of {', '.join(TESTS)} (got {test!r})")
    with tempfile.TemporaryDirectory(prefix="tokensel-headroom-") as tmp:
        folder = Path(work) if work else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        budgets = sorted({kk for k in ks for kk in (k, factor * k)})
        text = dict(id_col=id_col, text_cols=text_cols, labels=labels, max_len=max(max_len or 256, factor * ks[-1]))
        summaries = compress_grid(items, {FIRST_K: budgets}, folder, model=model, text=text, device=device, dtype=dtype)
        share = {kk: s.scored / max(s.items - s.empty, 1) for (_, kk), s in summaries.items()}
        ev, res = evaluate_grid(
            items, interactions, {key: Path(s.out) for key, s in summaries.items()}, recommender, seeds, model=model, train=train, epochs=epochs,
            device=device, dtype=dtype, id_col=id_col, user_col=user_col, item_col=item_col, order_col=order_col, test=test, max_users=max_users,
            cache=EvalCache(folder / "cache" if work else None), log=log, protocol=protocol, cold_share=cold_share,
        )
    rows = []
    for k in ks:
        a, b = res[(FIRST_K, k)], res[(FIRST_K, factor * k)]
        p = paired_pvalues(b.per_user, a.per_user, test)
        ratio = {m: b.metrics[m] / a.metrics[m] if a.metrics[m] else float("nan") for m in ("N@10", "R@10")}
        seed = {m: seed_user_test(b.per_seed_user[m], a.per_seed_user[m]) for m in ("N@10", "R@10")}
        rows.append(Headroom(
            k, factor * k, recommender, ev.n_users, share[k], a.metrics, b.metrics, ratio, {m: p[m] for m in ("N@10", "R@10")}, ev.data,
            {m: seed[m][0] for m in seed}, make_recommender(recommender).deterministic or all(seed[m][1] for m in seed), ev.cold,
        ))
    return rows
