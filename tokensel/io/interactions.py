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

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
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


class Sequences(Sequence):
    """Item sequences held as one integer array of items and each sequence's [start, end) in it.

    A catalogue's interactions are millions of rows; a Python list per user costs tens of bytes per
    item and a pointer chase per read. Here an item costs its 4 bytes, and the splits (`Histories.split`)
    are views that share the array: only the ends move. Reading a sequence (`seqs[i]`, iteration) gives
    a fresh list of ints, so code written for lists of lists reads it unchanged."""

    __slots__ = ("items", "starts", "ends")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, items: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        self.items, self.starts, self.ends = items, starts, ends

    @classmethod
    def from_lists(cls, lists) -> Sequences:
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        ends = np.cumsum(lens)
        items = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(ends[-1]) if len(ends) else 0)
        return cls(_item_array(items), ends - lens, ends)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequences(self.items, self.starts[i], self.ends[i])
        return self.items[self.starts[i] : self.ends[i]].tolist()

    def __iter__(self):
        items = self.items
        for s, e in zip(self.starts.tolist(), self.ends.tolist()):
            yield items[s:e].tolist()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(a == list(b) for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Sequences({len(self)} sequences, {int(self.lengths.sum())} items)"


class Labels(Sequence):
    """User ids as one Arrow string array (offsets + bytes) rather than a Python string per user."""

    __slots__ = ("array",)
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, values):
        self.array = values if isinstance(values, pa.Array) else pa.array(list(values), pa.string())

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Labels(self.array[i])
        return self.array[i].as_py()

    def __iter__(self):
        return iter(self.array.to_pylist())

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(other) == len(self) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"Labels({len(self)})"


def _item_array(items: np.ndarray) -> np.ndarray:
    """Item indices in 4 bytes where the catalogue allows (it always does below 2**31 items)."""
    return items.astype(np.int32) if not len(items) or int(items.max()) < 2**31 else items.astype(np.int64)


@dataclass
class Histories:
    """Each user's item sequence as item indices, in interaction order.

    Held as arrays (`Sequences`, `Labels`): a list of lists passed in is converted once."""

    users: Labels
    sequences: Sequences
    skipped_unknown: int  # interactions naming items not in the item file
    skipped_short: int  # users with fewer than 3 interactions (no train/valid/test split)
    counts: DataCounts = field(default_factory=DataCounts)
    negatives: Sequence[int] | None = None  # the items training may draw as negatives (None: all); the cold protocol leaves its cold items out

    def __post_init__(self) -> None:
        if not isinstance(self.sequences, Sequences):
            self.sequences = Sequences.from_lists(self.sequences)
        if not isinstance(self.users, Labels):
            self.users = Labels(self.users)

    def split(self, part: str) -> tuple[Sequences, np.ndarray]:
        """(history, target) per user for `train` (target = last train item), `valid` or `test`: the
        histories are views of the same array, the targets one integer array."""
        cut = {"train": 2, "valid": 1, "test": 0}[part]
        seqs = self.sequences
        last = seqs.ends - cut - 1  # the target's position
        return Sequences(seqs.items, seqs.starts, last), seqs.items[last].astype(np.int64)

    def train_sequences(self) -> Sequences:
        """Training part of every sequence (all but the last two interactions)."""
        return Sequences(self.sequences.items, self.sequences.starts, self.sequences.ends - 2)


COLUMNS = ("user_id", "item_id", "timestamp")  # the default user, item and order columns (SPEC's data contract)
_ROW = "__tokensel_row"


def _orderable(t: pa.DataType) -> bool:
    """Numbers and timestamps sort in time order; text does not."""
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_temporal(t)


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
    keys = pa.array(list(map(str, item_index.keys())), pa.string())
    is_known = pc.is_in(table[item_col], value_set=keys)
    unknown = table.num_rows - (pc.sum(is_known).as_py() or 0)
    table = table.filter(is_known)
    # stable: a user's ties keep their file order
    table = table.take(pc.sort_indices(table, sort_keys=[(user_col, "ascending"), (order_col, "ascending"), (_ROW, "ascending")]))
    values = np.fromiter(item_index.values(), dtype=np.int64, count=len(item_index))
    items = values[pc.index_in(table[item_col], value_set=keys).to_numpy(zero_copy_only=False)]
    user_column = table[user_col].combine_chunks()
    codes = pc.dictionary_encode(user_column).indices.to_numpy(zero_copy_only=False)
    bounds = np.flatnonzero(codes[1:] != codes[:-1]) + 1  # the table is sorted by user: runs of one code
    none = np.zeros(0, np.int64)
    starts, ends = (np.r_[0, bounds], np.r_[bounds, len(codes)]) if len(codes) else (none, none)
    lens = ends - starts
    kept = lens >= min_len
    short = int((~kept).sum())
    if not kept.any():
        raise TokenselError(f"{path}: no user has {min_len} or more interactions with known items")
    new_ends = np.cumsum(lens[kept])
    seqs = Sequences(_item_array(items[np.repeat(kept, lens)]), new_ends - lens[kept], new_ends)
    users = Labels(user_column.take(pa.array(starts[kept])))
    counts = DataCounts(rows, duplicates, ties, unknown, short, len(users))
    return Histories(users, seqs, unknown, short, counts)


def first_users(hist: Histories, n: int | None) -> Histories:
    """The first n users (a quick check); the counts say how many were kept."""
    if n is None or n >= len(hist.users):
        return hist
    return replace(hist, users=hist.users[:n], sequences=hist.sequences[:n], counts=replace(hist.counts, users=n))
