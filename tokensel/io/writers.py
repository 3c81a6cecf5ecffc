"""Export a compressed Parquet file in the layouts downstream recommenders read, atomically.

- `recbole`: a RecBole atomic item file (`.item`): UTF-8, tab-separated, first line a typed header
  `name:type` per column (RecBole's atomic-file layout: `token` for one id, `token_seq` for
  space-separated tokens). Columns: the id (`<id_col>:token`), `text:token_seq`, and, when the file
  has per-field columns, one `<field>:token_seq` each. Tabs and line breaks inside values become spaces.
- `hllm`: HLLM's item CSV, header `item_id,title,tag,description` (HLLM builds its prompt from these
  columns itself, so values carry no `title:` labels). A per-field column named `title`, `tag` or
  `description` fills that column; every other field is appended to `tag` (in input order), so
  e.g. brand and categories land where HLLM puts its side information. Without per-field columns
  the whole compressed text goes to `title`.

Both read the compressed file in record batches and write to a temporary file beside the target,
renamed only when complete (as tokensel.io.parquet_out), so a failure leaves nothing behind.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from tokensel.errors import TokenselError
from tokensel.io.fields import field_value
from tokensel.io.parquet_out import read_metadata
from tokensel.io.readers import open_items

FORMATS = ("parquet", "recbole", "hllm")
SUFFIX = {"parquet": ".parquet", "recbole": ".item", "hllm": ".csv"}
HLLM_COLUMNS = ("item_id", "title", "tag", "description")


def _clean(value: str | None) -> str:
    return " ".join((value or "").split())  # no tabs or newlines: one record per line, one value per cell


def _layout(compressed: Path) -> tuple[str, list[str]]:
    meta = read_metadata(compressed)
    if "id_col" not in meta:
        raise TokenselError(f"{compressed}: not an output of tokensel compress (no tokensel metadata)")
    names = open_items(compressed).schema.names
    return meta["id_col"], [c for c in meta.get("text_cols", []) if c in names and c != "text"]


def _recbole_rows(id_col: str, fields: list[str], batch: dict) -> list[list[str]]:
    rows = []
    for i, item in enumerate(batch[id_col]):
        rows.append([_clean(str(item)), _clean(batch["text"][i])] + [_clean(field_value(batch[f][i] or "", f)) for f in fields])
    return rows


def _hllm_rows(id_col: str, fields: list[str], batch: dict) -> list[list[str]]:
    rows = []
    for i, item in enumerate(batch[id_col]):
        cell = {"title": "", "tag": "", "description": ""}
        if not fields:
            cell["title"] = _clean(batch["text"][i])
        for f in fields:
            v = _clean(field_value(batch[f][i] or "", f))
            key = f if f in cell else "tag"
            cell[key] = f"{cell[key]} {v}".strip() if key == "tag" else v
        rows.append([str(item), cell["title"], cell["tag"], cell["description"]])
    return rows


def export(compressed: str | Path, out: str | Path, fmt: str, batch_rows: int = 8192) -> int:
    """Write `compressed` (a tokensel compress output) as `fmt` to `out`; returns the rows written."""
    compressed, out = Path(compressed), Path(out)
    if fmt not in ("recbole", "hllm"):
        raise TokenselError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    id_col, fields = _layout(compressed)
    if fmt == "recbole":
        header = [f"{id_col}:token", "text:token_seq"] + [f"{f}:token_seq" for f in fields]
        rows_of, dialect = _recbole_rows, {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None}
    else:
        header, rows_of, dialect = list(HLLM_COLUMNS), _hllm_rows, {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n", **dialect)
            writer.writerow(header)
            for rb in open_items(compressed).iter_batches(batch_rows, [id_col, "text", *fields]):
                rows = rows_of(id_col, fields, rb.to_pydict())
                writer.writerows(rows)
                n += len(rows)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def read_recbole_item(path: str | Path) -> dict[str, list]:
    """A reader written to RecBole's atomic-file layout (header `name:type`, tab-separated; a
    `token_seq` value is a list of space-separated tokens), used to check exports round-trip."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    header = [h.split(":") for h in lines[0].split("\t")]
    cols: dict[str, list] = {name: [] for name, _ in header}
    for line in lines[1:]:
        if not line:
            continue
        for (name, typ), value in zip(header, line.split("\t"), strict=True):
            cols[name].append(value.split(" ") if typ == "token_seq" and value else ([] if typ == "token_seq" else value))
    return cols


def read_hllm_items(path: str | Path) -> dict[str, list[str]]:
    """HLLM's item CSV as its loader reads it (a header row, comma-separated, quoted where needed)."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    return {name: [r[j] for r in rows[1:]] for j, name in enumerate(rows[0])}
