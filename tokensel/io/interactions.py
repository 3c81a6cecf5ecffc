"""Interactions: validate, order each user's history, and split leave-one-out (SPEC.md).

The last interaction of each user is the test target, the one before it validation, the rest training.

What changes results silently is refused or counted, never passed on: an order column stored as text
is refused (it sorts "10" before "2"); exact duplicate rows (same user, item and order value: a file
concatenated with itself, a join gone wrong) are dropped and counted; two different items of one user
with the same order value keep their file order and are counted as ties (real logs with day-resolution
timestamps have them); interactions naming unknown items and users too short to split are skipped
and counted. Every count reaches the user through `DataCounts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tokensel.errors import TokenselError
from tokensel.io.items import open_parquet


@dataclass
class DataCounts:
    """What reading the interactions kept, dropped and skipped; shown on screen and written to JSON."""

    rows: int = 0  # interaction rows in the file
    duplicate_rows: int = 0  # exact duplicates (user, item, order value) dropped
    order_ties: int = 0  # rows whose user has another item at the same order value (kept in file order)
    unknown_item_rows: int = 0  # rows naming items not in the item file (skipped)
    short_users: int = 0  # users with fewer than 3 interactions (skipped: no train/valid/test split)
    users: int = 0  # users kept

    def note(self) -> str:
        return (
            f"{self.users:,} users from {self.rows:,} interactions; skipped {self.unknown_item_rows:,} with unknown items "
            f"and {self.short_users:,} users with < 3 interactions; dropped {self.duplicate_rows:,} duplicate rows; "
            f"{self.order_ties:,} rows tie with another item of their user in the order column (file order kept)"
        )


@dataclass
class Histories:
    """Each user's item sequence as item indices, in interaction order."""

    users: list[str]
    sequences: list[list[int]]
    skipped_unknown: int  # interactions naming items not in the item file
    skipped_short: int  # users with fewer than 3 interactions (no train/valid/test split)
    counts: DataCounts = field(default_factory=DataCounts)
    negatives: Sequence[int] | None = None  # the items training may draw as negatives (None: all); the cold protocol leaves its cold items out

    def split(self, part: str) -> tuple[list[list[int]], list[int]]:
        """(history, target) per user for `train` (target = last train item), `valid` or `test`."""
        cut = {"train": 2, "valid": 1, "test": 0}[part]
        hist, tgt = [], []
        for seq in self.sequences:
            s = seq[: len(seq) - cut] if cut else seq
            hist.append(s[:-1])
            tgt.append(s[-1])
        return hist, tgt

    def train_sequences(self) -> list[list[int]]:
        """Training part of every sequence (all but the last two interactions)."""
        return [seq[:-2] for seq in self.sequences]


COLUMNS = ("user_id", "item_id", "timestamp")  # the default user, item and order columns (SPEC's data contract)
_ROW = "__tokensel_row"


def _orderable(t: pa.DataType) -> bool:
    """Numbers and timestamps sort in time order; text does not."""
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_temporal(t)


def _runs(users: list[str], items: list[str]):
    """(user, [items]) for each run of equal users in a user-sorted column pair."""
    start = 0
    for r in range(1, len(users) + 1):
        if r == len(users) or users[r] != users[start]:
            yield users[start], items[start:r]
            start = r


def read_histories(
    path: str | Path,
    item_index: dict,
    user_col: str = COLUMNS[0],
    item_col: str = COLUMNS[1],
    order_col: str = COLUMNS[2],
    min_len: int = 3,
) -> Histories:
    path = Path(path)
    pf = open_parquet(path)
    names = pf.schema_arrow.names
    for col in (user_col, item_col, order_col):
        if col not in names:
            raise TokenselError(
                f"{path}: no column {col!r}; the file has {names}. Choose columns with --user-col / --item-col / --order-col."
            )
    try:
        table = pf.read(columns=[user_col, item_col, order_col])
    except (pa.ArrowInvalid, OSError) as exc:
        raise TokenselError(f"{path}: the file is damaged or truncated ({exc})") from None
    for col in (user_col, item_col, order_col):
        nulls = table[col].null_count
        if nulls:
            row = pc.index(pc.is_null(table[col]), True).as_py()
            raise TokenselError(f"{path}: row {row}, column {col!r}: {nulls} null value(s)")
    order_type = table.schema.field(order_col).type
    if not _orderable(order_type):
        raise TokenselError(
            f"{path}: column {order_col!r} is {order_type} (text); the order must be numbers or timestamps, or "
            f"'10' sorts before '2'. Cast it to integers or timestamps (e.g. pandas pd.to_datetime, polars "
            ".str.to_datetime()) and save the file, or choose another --order-col."
        )
    rows = table.num_rows
    table = pa.table({
        user_col: pc.cast(table[user_col], pa.string()),
        item_col: pc.cast(table[item_col], pa.string()),
        order_col: table[order_col],
        _ROW: pa.array(range(rows), pa.int64()),
    })
    # exact duplicates: keep each (user, item, order) triple's first row
    first = table.group_by([user_col, item_col, order_col], use_threads=False).aggregate([(_ROW, "min")])
    keep = first[f"{_ROW}_min"]
    table = table.take(keep.take(pc.sort_indices(keep)))
    duplicates = rows - table.num_rows
    sizes = table.group_by([user_col, order_col], use_threads=False).aggregate([([], "count_all")])["count_all"]
    ties = pc.sum(pc.filter(sizes, pc.greater(sizes, 1))).as_py() or 0
    is_known = pc.is_in(table[item_col], value_set=pa.array(list(map(str, item_index.keys())), pa.string()))
    unknown = table.num_rows - (pc.sum(is_known).as_py() or 0)
    table = table.filter(is_known)
    str_index = {str(k): v for k, v in item_index.items()}
    # stable: a user's ties keep their file order
    table = table.take(pc.sort_indices(table, sort_keys=[(user_col, "ascending"), (order_col, "ascending"), (_ROW, "ascending")]))
    users, seqs, short = [], [], 0
    for user, items in _runs(table[user_col].to_pylist(), table[item_col].to_pylist()):
        if len(items) < min_len:
            short += 1
            continue
        users.append(user)
        seqs.append([str_index[i] for i in items])
    if not users:
        raise TokenselError(f"{path}: no user has {min_len} or more interactions with known items")
    counts = DataCounts(rows, duplicates, ties, unknown, short, len(users))
    return Histories(users, seqs, unknown, short, counts)


def first_users(hist: Histories, n: int | None) -> Histories:
    """The first n users (a quick check); the counts say how many were kept."""
    if n is None or n >= len(hist.users):
        return hist
    return replace(hist, users=hist.users[:n], sequences=hist.sequences[:n], counts=replace(hist.counts, users=n))
