"""Atomic Parquet output: write to a temporary file beside the target, rename only when complete."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tokensel.io.items import open_parquet


class AtomicParquetWriter:
    """A ParquetWriter on `.<out>.tmp-<pid>`; `close()` renames it, `abort()` removes it.

    Use as a context manager: an exception removes the partial file, so no half-written output exists.
    `row_group_rows`: small tables are buffered and written as row groups of about this many rows
    (bounded memory; without it every `write` call is its own row group).
    """

    def __init__(self, path: str | Path, schema: pa.Schema, metadata: dict | None = None, row_group_rows: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if metadata is not None:
            schema = schema.with_metadata({b"tokensel": json.dumps(metadata, sort_keys=True).encode()})
        self.schema = schema
        self.row_group_rows = row_group_rows
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        table = table.cast(self.schema)
        self.rows += table.num_rows
        if not self.row_group_rows:
            self._writer.write_table(table)
            return
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            table = pa.concat_tables(self._buffer).combine_chunks()
            self._buffer, self._buffered = [], 0
            self._writer.write_table(table, row_group_size=max(self.row_group_rows or 0, table.num_rows))

    def close(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._buffer, self._buffered = [], 0
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_metadata(path: str | Path) -> dict:
    """The `tokensel` provenance JSON of a compressed file ({} if it has none; a missing or unreadable
    file is a TokenselError naming it)."""
    meta = open_parquet(path).schema_arrow.metadata or {}
    return json.loads(meta.get(b"tokensel", b"{}"))
