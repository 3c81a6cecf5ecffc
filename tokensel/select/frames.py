"""The kinds of table a Selector takes and gives back: pyarrow, polars, pandas, a datasets batch.

Everything is done on Arrow; polars and pandas are converted at the edges (and only when the caller
passed one, so neither is imported otherwise), and the result is the kind that came in, with the same
rows in the same order and the output columns added (replacing input columns of the same name).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import pyarrow as pa

from tokensel.errors import TokenselError


def to_arrow(data) -> pa.Table | None:
    """The input as an Arrow table, or None for a plain sequence of strings."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    pl = sys.modules.get("polars")
    if pl is not None and isinstance(data, pl.DataFrame):
        return data.to_arrow()
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, Mapping):  # a datasets batch (a LazyBatch is a Mapping, not a dict)
        return from_dict(data)
    if isinstance(data, (list, tuple)):
        return None
    raise TokenselError(f"cannot select from a {type(data).__name__}: give a list of strings or a pyarrow, polars or pandas table")


def from_dict(batch: Mapping) -> pa.Table:
    """A datasets batch (column name -> list of values) as an Arrow table."""
    try:
        return pa.table({k: batch[k] for k in batch.keys()})
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise TokenselError(f"cannot read the batch as a table ({exc})") from None


def check_text_columns(table: pa.Table, cols: list[str]) -> None:
    for col in cols:
        if col not in table.column_names:
            raise TokenselError(f"no column {col!r}; the table has {table.column_names}. Choose columns with text_cols=[...]")
        t = table.schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise TokenselError(f"text column {col!r} has type {t}, expected string")


def concat_columns(parts: list[dict], names: tuple[str, ...]) -> dict[str, pa.ChunkedArray]:
    return {n: pa.chunked_array([p[n] for p in parts], type=parts[0][n].type) if parts else pa.chunked_array([], type=pa.null()) for n in names}


def with_columns(table: pa.Table, original, cols: dict) -> object:
    """`table` with `cols` set (replacing same-named columns), returned as the kind `original` was."""
    for name, values in cols.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)
    pl = sys.modules.get("polars")
    if pl is not None and isinstance(original, pl.DataFrame):
        return pl.from_arrow(table)
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(original, pd.DataFrame):
        out = table.to_pandas()
        out.index = original.index
        return out
    return table
