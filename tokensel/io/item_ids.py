"""Validate a file's item ids as they stream past: none empty, none repeated.

One check for every reader (items, the Ray engine, evaluate's catalogue), so every one of them names
the same rows in the same words. Memory is 8 bytes per id whatever the id type (64-bit hashes in
sorted runs); a hash match is confirmed against the file before an error is raised, so a hash
collision can never reject a valid catalogue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tokensel.errors import TokenselError
from tokensel.io.readers import open_items


class IdSet:
    """The ids seen so far as 64-bit hashes, in sorted runs merged like a binary counter.

    `add` returns the positions (in the batch) of ids whose hash was seen before, in this batch or
    an earlier one.
    """

    def __init__(self):
        self.runs: list[np.ndarray] = []

    @staticmethod
    def hashes(ids: list) -> np.ndarray:
        return np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids)).view(np.uint64)

    def add(self, ids: list) -> np.ndarray:
        h = self.hashes(ids)
        order = np.argsort(h, kind="stable")
        hs = h[order]
        dup = np.zeros(len(h), dtype=bool)
        if len(hs) > 1:
            dup[order[1:][hs[1:] == hs[:-1]]] = True
        for run in self.runs:
            at = np.searchsorted(run, h).clip(max=len(run) - 1)
            dup |= run[at] == h
        self.runs.append(np.unique(hs))
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = np.union1d(self.runs[-1], last)
        return np.flatnonzero(dup)

    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runs)


def first_row_of(path: Path, id_col: str, value, before: int) -> int | None:
    """The first row (before `before`) whose id equals `value`: confirms a duplicate, rarely needed.

    The file was already opened and read up to `before` by the caller, so it opens here without checks."""
    row = 0
    for rb in open_items(path).iter_batches(65536, [id_col]):  # [formats hook] any item format
        if row >= before:
            return None
        vals = rb.column(0).to_pylist()
        for i, v in enumerate(vals[: before - row]):
            if v == value:
                return row + i
        row += rb.num_rows
    return None


class IdCheck:
    """Feed it a file's ids in order, batch by batch; it raises on the first empty or repeated one."""

    def __init__(self, path: str | Path, id_col: str, duplicates: bool = True):
        self.path = Path(path)
        self.id_col = id_col
        self.seen = IdSet() if duplicates else None

    def __call__(self, ids: list, start_row: int) -> None:
        for i, v in enumerate(ids):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise TokenselError(f"{self.path}: row {start_row + i}, column {self.id_col!r}: the item id is empty")
            if isinstance(v, float) and v != v:  # NaN: not equal to itself, so it could never be looked up
                raise TokenselError(f"{self.path}: row {start_row + i}, column {self.id_col!r}: the item id is NaN")
        if self.seen is None:
            return
        for i in self.seen.add(ids):
            row = start_row + int(i)
            first = first_row_of(self.path, self.id_col, ids[i], row)
            if first is not None:
                raise TokenselError(f"{self.path}: row {row}, column {self.id_col!r}: duplicate item id {ids[i]!r} (first seen at row {first})")
