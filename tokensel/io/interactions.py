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

from dataclasses import dataclass, field, replace
from pathlib import Path

import polars as pl
import pyarrow as pa

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


def read_histories(
    path: str | Path,
    item_index: dict,
    user_col: str = "user_id",
    item_col: str = "item_id",
    order_col: str = "timestamp",
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
        df = pl.from_arrow(pf.read(columns=[user_col, item_col, order_col]))
    except (pa.ArrowInvalid, OSError) as exc:
        raise TokenselError(f"{path}: the file is damaged or truncated ({exc})") from None
    for col in (user_col, item_col, order_col):
        nulls = df[col].null_count()
        if nulls:
            row = int(df.with_row_index().filter(pl.col(col).is_null())["index"][0])
            raise TokenselError(f"{path}: row {row}, column {col!r}: {nulls} null value(s)")
    order_type = df[order_col].dtype
    if not (order_type.is_numeric() or order_type.is_temporal()):
        raise TokenselError(
            f"{path}: column {order_col!r} is {order_type} (text); the order must be numbers or timestamps, or "
            f"'10' sorts before '2'. Cast it (e.g. polars .cast(pl.Int64) or .str.to_datetime()) and save the file, "
            "or choose another --order-col."
        )
    rows = df.height
    df = df.with_columns(pl.col(user_col).cast(pl.String), pl.col(item_col).cast(pl.String))
    df = df.unique(maintain_order=True)
    duplicates = rows - df.height
    ties = df.filter(pl.len().over([user_col, order_col]) > 1).height
    known = pl.Series(list(map(str, item_index.keys())), dtype=pl.String)
    unknown = df.filter(~pl.col(item_col).is_in(known.implode()))
    df = df.filter(pl.col(item_col).is_in(known.implode()))
    str_index = {str(k): v for k, v in item_index.items()}
    df = df.sort([user_col, order_col], maintain_order=True)
    grouped = df.group_by(user_col, maintain_order=True).agg(pl.col(item_col))
    users, seqs, short = [], [], 0
    for user, items in grouped.iter_rows():
        if len(items) < min_len:
            short += 1
            continue
        users.append(user)
        seqs.append([str_index[i] for i in items])
    if not users:
        raise TokenselError(f"{path}: no user has {min_len} or more interactions with known items")
    counts = DataCounts(rows, duplicates, ties, unknown.height, short, len(users))
    return Histories(users, seqs, unknown.height, short, counts)


def first_users(hist: Histories, n: int | None) -> Histories:
    """The first n users (a quick check); the counts say how many were kept."""
    if n is None or n >= len(hist.users):
        return hist
    return replace(hist, users=hist.users[:n], sequences=hist.sequences[:n], counts=replace(hist.counts, users=n))
