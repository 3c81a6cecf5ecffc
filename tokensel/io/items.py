"""Read item texts (Parquet, CSV or JSON Lines: tokensel.io.readers): validate the columns up front, then stream record batches.

The text of an item is its chosen columns' values joined by spaces (`A B`), or HLLM style with
labels (`title: A description: B`) when TextConfig.labels is on; HTML entities are decoded and empty
fields skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.fields import Span, build_text_spans
from tokensel.io.item_ids import IdCheck
from tokensel.io.readers import open_items


def open_parquet(path: str | Path) -> pq.ParquetFile:
    """Open a Parquet file or raise a TokenselError that names it and says what is wrong."""
    path = Path(path)
    if not path.exists():
        raise TokenselError(f"{path}: no such file")
    try:
        return pq.ParquetFile(path, pre_buffer=False)  # pre-buffering keeps every read row group alive: memory grows with rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise TokenselError(f"{path}: not a readable Parquet file ({exc})") from None


def check_columns(path: Path, schema: pa.Schema, id_col: str, text_cols: list[str], extra: list[str] = ()) -> None:
    names = schema.names
    for col in [id_col, *text_cols, *extra]:
        if col not in names:
            raise TokenselError(f"{path}: no column {col!r}; the file has {names}. Choose columns with --id-col / --text-cols.")
    for col in text_cols:
        t = schema.field(col).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise TokenselError(f"{path}: text column {col!r} has type {t}, expected string")


def build_text(fields: dict[str, str | None], text_cols: list[str], labels: bool = True) -> str:
    """`title: A description: B` (or `A B` without labels), entities decoded; empty or null fields left out."""
    return build_text_spans(fields, text_cols, labels)[0]  # [formats hook] one builder, so field spans match the text


@dataclass
class ItemBatch:
    """One record batch of items: ids, built texts, pass-through columns, and the first row index."""

    start_row: int
    ids: list
    texts: list[str]
    passthrough: pa.Table | None
    filled: dict[str, int] = field(default_factory=dict)  # per text column: rows with a non-blank value
    spans: list[list[Span]] | None = None  # [formats hook] each text column's [start, end) in texts[i]
    id_array: pa.Array | None = None  # the ids as read (not dictionary-encoded), written back without a conversion


def iter_item_batches(
    path: str | Path,
    text: TextConfig,
    batch_rows: int = 1024,
    passthrough: list[str] = (),
    check_duplicates: bool = True,
    limit: int | None = None,
) -> Iterator[ItemBatch]:
    """Stream items in record batches (never the whole file in memory), validating as it goes.

    Empty ids raise an error naming the row, duplicate ids one naming both rows (tokensel.io.item_ids).
    """
    path = Path(path)
    src = open_items(path)  # [formats hook] Parquet, CSV or JSON Lines by extension
    check_columns(path, src.schema, text.id_col, text.text_cols, list(passthrough))
    columns = list(dict.fromkeys([text.id_col, *text.text_cols, *passthrough]))
    check_ids = IdCheck(path, text.id_col, duplicates=check_duplicates)
    row = 0
    try:
        for rb in src.iter_batches(batch_rows, columns):
            if limit is not None and row >= limit:
                return
            if limit is not None and row + rb.num_rows > limit:
                rb = rb.slice(0, limit - row)
            data = rb.to_pydict()
            ids = data[text.id_col]
            check_ids(ids, row)
            built = [build_text_spans({c: data[c][i] for c in text.text_cols}, text.text_cols, text.labels) for i in range(rb.num_rows)]
            extra = pa.Table.from_batches([rb]).select(list(passthrough)) if passthrough else None
            filled = {c: sum(1 for v in data[c] if v is not None and not v.isspace() and v) for c in text.text_cols}
            id_array = rb.column(text.id_col)
            id_array = None if pa.types.is_dictionary(id_array.type) else id_array
            yield ItemBatch(row, ids, [t for t, _ in built], extra, filled, [sp for _, sp in built], id_array)
            row += rb.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise TokenselError(f"{path}: the file is damaged or truncated near row {row} ({exc})") from None


def read_items(path: str | Path, text: TextConfig) -> tuple[list, list[str]]:
    """All item ids and texts (for training, where the catalogue must be in memory anyway)."""
    ids: list = []
    texts: list[str] = []
    for b in iter_item_batches(path, text, batch_rows=8192):
        ids.extend(b.ids)
        texts.extend(b.texts)
    return ids, texts
