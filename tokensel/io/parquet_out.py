"""Atomic Parquet output: write to a temporary file beside the target, rename only when complete."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tokensel.io.atomic import AtomicTarget, os_error
from tokensel.io.items import open_parquet


class AtomicParquetWriter:
    """A ParquetWriter on `.<out>.tmp-<pid>` (tokensel.io.atomic); `close()` renames it, `abort()` removes it.

    Use as a context manager: an exception -- also one raised by `close()` itself, e.g. a full disk
    while the footer is written -- removes the partial file, so no half-written output exists.
    Filesystem errors are TokenselErrors naming the output.
    `row_group_rows`: small tables are buffered and written as row groups of about this many rows
    (bounded memory; without it every `write` call is its own row group).
    """

    def __init__(self, path: str | Path, schema: pa.Schema, metadata: dict | None = None, row_group_rows: int | None = None):
        self.target = AtomicTarget(path)
        self.path, self.tmp = self.target.path, self.target.tmp
        if metadata is not None:
            schema = schema.with_metadata({b"tokensel": json.dumps(metadata, sort_keys=True).encode()})
        self.schema = schema
        self.row_group_rows = row_group_rows
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0
        self._writer = None
        try:
            self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        except OSError as exc:
            self.target.discard()
            raise os_error(self.path, exc) from None

    def write(self, table: pa.Table) -> None:
        if not table.schema.equals(self.schema):  # a cast imports pyarrow.compute: only where the types differ
            table = table.cast(self.schema)
        self.rows += table.num_rows
        try:
            if not self.row_group_rows:
                self._writer.write_table(table)
                return
            self._buffer.append(table)
            self._buffered += table.num_rows
            if self._buffered >= self.row_group_rows:
                self._flush()
        except OSError as exc:
            raise os_error(self.path, exc) from None

    def _flush(self) -> None:
        if self._buffer:
            table = pa.concat_tables(self._buffer).combine_chunks()
            self._buffer, self._buffered = [], 0
            self._writer.write_table(table, row_group_size=max(self.row_group_rows or 0, table.num_rows))

    def close(self) -> None:
        try:
            self._flush()
            self._writer.close()
        except OSError as exc:
            self.abort()
            raise os_error(self.path, exc) from None
        except BaseException:
            self.abort()
            raise
        self.target.commit()

    def abort(self) -> None:
        self._buffer, self._buffered = [], 0
        try:
            self._writer.close()
        except (OSError, ValueError):  # closing a writer whose disk is full fails again: the file goes anyway
            pass
        finally:
            self.target.discard()

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
