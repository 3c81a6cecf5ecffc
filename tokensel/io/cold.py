"""The cold-start protocol (`--protocol cold`): score items the recommender was never trained on.

In leave-one-out every test item is also a training item, so a recommender can learn it by heart and
its first tokens can act as an id. New products are the reason text-based recommenders exist: for an
item nobody has interacted with yet, the text is all there is. This protocol asks how well the
recommender ranks those.

The split, step by step (each a small function below, so that it reads as the protocol does):
1. Cold items (`newest_items`): the share `--cold-share` of the items with interactions whose FIRST
   interaction comes last, by the order column over all the file's interactions with known items
   (short users' included: they are interactions too). Ties in the order column go by file row, as
   read_histories orders ties. Newest first is what "cold" means in production: the items that
   arrived after the model was trained. Items nobody interacted with are neither cold nor in the
   share's base; like every warm item they stay in the ranking and may be drawn as negatives.
2. Histories (`drop_cold`): every cold item is removed from every user's sequence except at the
   scored position, and leave-one-out is applied to what is left. So a user whose test target is
   cold keeps their warm history (the cold items in it removed) and is a cold test user; a user whose
   test target is warm but whose history holds cold items loses those interactions and is a warm
   test user; validation targets and training sequences hold warm items only, so the validation
   target is the last warm interaction before the test. Users left with fewer than 3 interactions
   cannot be split and are dropped (counted). Removing the interactions rather than the users keeps
   every warm signal the data has: dropping users who ever touched a cold item would bias the
   training set towards users active only in the old part of the catalogue.
3. Negatives: the histories carry the warm items as the only items training may sample as negatives
   (`Histories.negatives`), so no stage-1, stage-2 or downstream training step sees a cold item in
   any role. The item vectors of the catalogue are still computed for every item (the ranking is over
   all of them, cold ones included, as in production where new items must be ranked too); with
   hllm's centring the catalogue mean includes them: a fixed shift, not learned from interactions.
4. Scoring: ranking is full ranking over all items with the history masked, as in leave-one-out.
   The headline metrics are over the cold test users only: that is the question the protocol asks,
   and averaging them with the warm users would hide it under the larger group. The warm test users
   (same runs, same model) are reported beside them, so the cost of the protocol's smaller training
   set is visible too. Paired tests pair the cold users across files.
5. The strategy check (`TrainConfig.score == "valid"`) must never read test targets: there the
   scored position is the validation target, the cold items are chosen from the interactions before
   each user's test interaction, and the test interaction is left where it is, never read.

Fewer than `MIN_COLD_USERS` scored cold users is refused: a paired test over a handful of users says
nothing, and a share too small for the data is a setting to change, not a result to report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokensel.errors import TokenselError
from tokensel.io.interactions import Histories
from tokensel.io.items import open_parquet

MIN_COLD_USERS = 200  # fewer scored cold users than this is refused (tests lower it on tiny fixtures)
MIN_LEN = 3  # a user needs a training item, a validation target and a test target
KEEP_LAST = {"test": 1, "valid": 2}  # positions from the end left as they are: the scored target and what follows it


@dataclass(frozen=True)
class ColdCounts:
    """What the cold split held out and dropped; printed with the results and written to JSON."""

    share: float  # --cold-share
    scored: str  # the scored targets: test (evaluate, headroom, curve) or valid (the strategy check)
    items: int  # items with at least one interaction: the share is of these
    cold_items: int
    cold_users: int  # users whose scored target is cold: the headline metrics are theirs
    warm_users: int  # users whose scored target is warm: reported beside
    dropped_interactions: int  # interactions with cold items removed from the kept users' histories
    dropped_users: int  # users left with fewer than 3 interactions once cold items are removed

    def note(self) -> str:
        return (
            f"cold start: {self.cold_items:,} cold items ({100 * self.share:g}% of {self.items:,} items with interactions, "
            f"those whose first interaction comes last) are in no training or validation history, target or sampled negative; "
            f"headline over the {self.cold_users:,} users whose {self.scored} target is cold, the {self.warm_users:,} with a warm "
            f"{self.scored} target beside; {self.dropped_interactions:,} interactions with cold items dropped from histories, "
            f"{self.dropped_users:,} users dropped (fewer than {MIN_LEN} interactions left)"
        )

    def as_dict(self) -> dict:
        return {"protocol": "cold", **asdict(self)}


@dataclass
class ColdSplit:
    histories: Histories  # cold items only at the scored position; negatives: the warm items
    cold: np.ndarray  # [items] bool: the cold items
    cold_users: np.ndarray  # [users of `histories`] bool: the user's scored target is cold
    counts: ColdCounts


# ------------------------------------------------------------------- the Histories this module touches
def _rebuild(hist: Histories, keep: list[int], sequences: list[list[int]], negatives: np.ndarray) -> Histories:
    """`hist` restricted to users `keep` (indices) with new sequences and the items allowed as negatives."""
    return replace(hist, users=[hist.users[u] for u in keep], sequences=sequences, negatives=negatives)


# ----------------------------------------------------------------------------------------- the steps
def first_interaction_order(
    path: str | Path, item_index: dict, user_col: str, item_col: str, order_col: str, skip_last: int = 0
) -> np.ndarray:
    """Item indices in the order of their first interaction, earliest first (ties: file row); items
    with no interaction are absent. `skip_last`: each splittable user's last interactions are left out
    (the check, which must not read the test targets). The file was validated by read_histories."""
    table = open_parquet(Path(path)).read(columns=[user_col, item_col, order_col])
    rows = table.num_rows
    keys = pa.array([str(k) for k in item_index], pa.string())
    index = np.array(list(item_index.values()), dtype=np.int64)
    t = pa.table({
        "user": pc.cast(table[user_col], pa.string()),
        "item": pc.index_in(pc.cast(table[item_col], pa.string()), value_set=keys),  # null: unknown item
        "order": table[order_col],
        "row": pa.array(np.arange(rows, dtype=np.int64)),
    })
    if skip_last:
        # as read_histories: exact duplicates dropped, unknown items skipped, users with < 3 left unsplit
        first = t.group_by(["user", "item", "order"], use_threads=False).aggregate([("row", "min")])["row_min"]
        t = t.take(np.sort(first.to_numpy()))
        t = t.filter(pc.is_valid(t["item"]))
        t = t.take(pc.sort_indices(t, sort_keys=[("user", "ascending"), ("order", "ascending"), ("row", "ascending")]))
        codes = pc.dictionary_encode(t["user"]).combine_chunks().indices.to_numpy()
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        lengths = np.diff(np.r_[starts, len(codes)])
        from_end = np.repeat(starts + lengths, lengths) - 1 - np.arange(len(codes))  # 0 = the user's last
        keep = (from_end >= skip_last) | (np.repeat(lengths, lengths) < MIN_LEN)
        t = t.filter(pa.array(keep))
    else:
        t = t.filter(pc.is_valid(t["item"]))
    t = t.take(pc.sort_indices(t, sort_keys=[("order", "ascending"), ("row", "ascending")]))
    items = t["item"].to_numpy()
    uniq, first_pos = np.unique(items, return_index=True)
    return index[uniq[np.argsort(first_pos, kind="stable")]]


def newest_items(order: np.ndarray, n_items: int, share: float) -> np.ndarray:
    """[n_items] bool: the last round(share x len(order)) items of `order` (at least one) are cold."""
    n = min(len(order), max(1, int(share * len(order) + 0.5)))
    cold = np.zeros(n_items, dtype=bool)
    cold[order[len(order) - n :]] = True
    return cold


def drop_cold(hist: Histories, cold: np.ndarray, keep_last: int = 1) -> tuple[Histories, list[int], int]:
    """Cold items removed from every sequence except its last `keep_last` positions; users left with
    fewer than 3 interactions dropped. Returns the histories (negatives: the warm items), the indices of
    the users kept, and how many interactions with cold items were removed from their sequences."""
    seqs, keep, dropped = [], [], 0
    for u, seq in enumerate(hist.sequences):
        head, tail = seq[: len(seq) - keep_last], seq[len(seq) - keep_last :]
        warm = [i for i in head if not cold[i]]
        if len(warm) + len(tail) < MIN_LEN:
            continue
        keep.append(u)
        seqs.append(warm + list(tail))
        dropped += len(head) - len(warm)
    return _rebuild(hist, keep, seqs, np.flatnonzero(~cold)), keep, dropped


def cold_split(
    hist: Histories,
    interactions: str | Path,
    item_index: dict,
    columns: tuple[str, str, str],
    share: float,
    scored: str = "test",
) -> ColdSplit:
    """The cold-start split of `hist` (read from `interactions` with `columns`): see the module docstring.
    `scored`: test (evaluate) or valid (the strategy check). Refuses fewer than MIN_COLD_USERS cold users."""
    keep_last = KEEP_LAST[scored]
    order = first_interaction_order(interactions, item_index, *columns, skip_last=keep_last - 1)
    cold = newest_items(order, len(item_index), share)
    if cold.all():
        raise TokenselError(f"--cold-share {share:g} makes every one of the {len(item_index):,} items cold: nothing is left to train on; lower --cold-share")
    out, kept, dropped = drop_cold(hist, cold, keep_last)
    cold_users = np.array([bool(cold[s[-keep_last]]) for s in out.sequences], dtype=bool)
    counts = ColdCounts(
        share, scored, len(order), int(cold.sum()), int(cold_users.sum()), int((~cold_users).sum()), dropped, len(hist.sequences) - len(kept)
    )
    if counts.cold_users < MIN_COLD_USERS:
        raise TokenselError(
            f"--cold-share {share:g}: only {counts.cold_users:,} users have a cold {'test' if scored == 'test' else 'validation'} target (one of the {counts.cold_items:,} "
            f"newest items); the cold protocol needs at least {MIN_COLD_USERS} for its per-user statistics to mean anything. "
            "Raise --cold-share, or give it more interactions"
        )
    return ColdSplit(out, cold, cold_users, counts)
