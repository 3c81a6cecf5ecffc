"""Open an item file by its extension -- Parquet, CSV or JSON Lines -- and stream record batches.

Every reader of item files (compress, train, inspect, the evaluate catalogue) goes through
`open_items`, so the three formats get one validation path (tokensel.io.items.check_columns and
the id checks) and one set of error messages naming file, row and column.

- Parquet keeps its own types.
- CSV has no types: every column is read as a string (an id `007` stays `007`), so a CSV gives the
  same output as a Parquet file of the same rows with string columns. Empty cells are empty strings.
- JSON Lines is read line by line (bounded memory); a value's JSON type is kept, so a number where
  a text column expects a string is an error naming its line, like a non-string Parquet column.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from tokensel.errors import TokenselError

PARQUET = (".parquet", ".pq")
CSV = (".csv",)
JSONL = (".jsonl", ".ndjson")
FORMATS = {**{s: "parquet" for s in PARQUET}, **{s: "csv" for s in CSV}, **{s: "jsonl" for s in JSONL}}


def item_format(path: Path) -> str:
    """csv | jsonl by extension; anything else is read as Parquet, as before there were other formats
    (so a Parquet file named without `.parquet` still works, and a typo fails as unreadable Parquet)."""
    return FORMATS.get(path.suffix.lower(), "parquet")


class ItemSource:
    """An opened item file: its schema (known before any row is read) and a batch iterator."""

    def __init__(self, path: Path, schema: pa.Schema, num_rows: int | None):
        self.path = path
        self.schema = schema
        self.num_rows = num_rows  # None where only a full read would tell (CSV, JSON Lines)

    def iter_batches(self, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError


class ParquetSource(ItemSource):
    def __init__(self, path: Path, pf: pq.ParquetFile):
        super().__init__(path, pf.schema_arrow, pf.metadata.num_rows)
        self.pf = pf

    def iter_batches(self, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        return self.pf.iter_batches(batch_size=batch_size, columns=columns)


class CsvSource(ItemSource):
    def __init__(self, path: Path):
        try:
            names = pcsv.open_csv(path, read_options=pcsv.ReadOptions(block_size=1 << 16)).schema.names
        except (pa.ArrowInvalid, OSError) as exc:
            raise TokenselError(f"{path}: not a readable CSV file ({exc})") from None
        super().__init__(path, pa.schema([pa.field(n, pa.string()) for n in names]), None)

    def iter_batches(self, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        types = {n: pa.string() for n in self.schema.names}
        reader = pcsv.open_csv(
            self.path,
            read_options=pcsv.ReadOptions(block_size=1 << 20),
            convert_options=pcsv.ConvertOptions(column_types=types, include_columns=columns, strings_can_be_null=False),
        )
        for rb in reader:  # blocks are sized in bytes; re-cut them to the rows the caller asked for
            for start in range(0, rb.num_rows, batch_size):
                yield rb.slice(start, batch_size)


def _json_type(value) -> pa.DataType:
    if isinstance(value, str) or value is None:
        return pa.string()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()  # nested values: named as not-a-string when a text column holds one


class JsonLinesSource(ItemSource):
    """One JSON object per line. The schema is the first object's keys and value types."""

    def __init__(self, path: Path):
        first = None
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        first = json.loads(line)
                        break
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenselError(f"{path}: not a readable JSON Lines file ({exc})") from None
        if not isinstance(first, dict):
            raise TokenselError(f"{path}: not a JSON Lines file of objects (first record: {str(first)[:80]!r})")
        super().__init__(path, pa.schema([pa.field(k, _json_type(v)) for k, v in first.items()]), None)

    def _records(self) -> Iterator[tuple[int, dict]]:
        row = 0
        with open(self.path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TokenselError(f"{self.path}: row {row} (line {line_no}): not valid JSON ({exc.msg})") from None
                if not isinstance(rec, dict):
                    raise TokenselError(f"{self.path}: row {row} (line {line_no}): expected a JSON object")
                yield row, rec
                row += 1

    def iter_batches(self, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        fields = [self.schema.field(c) for c in columns]
        buf: list[dict] = []
        try:
            for row, rec in self._records():
                for fld in fields:
                    v = rec.get(fld.name)
                    if v is not None and _json_type(v) != fld.type and not (fld.type == pa.float64() and isinstance(v, int)):
                        what = "string" if fld.type == pa.string() else str(fld.type)
                        raise TokenselError(f"{self.path}: row {row}, column {fld.name!r}: expected a {what}, got {type(v).__name__} {str(v)[:40]!r}")
                buf.append(rec)
                if len(buf) == batch_size:
                    yield self._batch(buf, fields)
                    buf = []
        except UnicodeDecodeError as exc:
            raise TokenselError(f"{self.path}: not UTF-8 text ({exc})") from None
        if buf:
            yield self._batch(buf, fields)

    @staticmethod
    def _batch(recs: list[dict], fields: list[pa.Field]) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([pa.array([r.get(f.name) for r in recs], type=f.type) for f in fields], schema=pa.schema(fields))


def open_items(path: str | Path) -> ItemSource:
    """Open an item file (format by extension) or raise a TokenselError naming it and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise TokenselError(f"{path}: no such file")
    fmt = item_format(path)
    if fmt == "csv":
        return CsvSource(path)
    if fmt == "jsonl":
        return JsonLinesSource(path)
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering keeps every read row group alive: memory grows with rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise TokenselError(f"{path}: not a readable Parquet file ({exc})") from None
    return ParquetSource(path, pf)
