"""Interactions: validate, order each user's history, and split leave-one-out (SPEC.md).

The last interaction of each user is the test target, the one before it validation, the rest training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from tokensel.errors import TokenselError
from tokensel.io.items import open_parquet


@dataclass
class Histories:
    """Each user's item sequence as item indices, in interaction order."""

    users: list[str]
    sequences: list[list[int]]
    skipped_unknown: int  # interactions naming items not in the item file
    skipped_short: int  # users with fewer than 3 interactions (no train/valid/test split)

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
    df = df.with_columns(pl.col(user_col).cast(pl.String), pl.col(item_col).cast(pl.String))
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
    return Histories(users, seqs, unknown.height, short)
