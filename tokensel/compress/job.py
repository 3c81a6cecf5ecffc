"""What every compress engine does around the model: check, name, describe and write the outputs.

The local engine (tokensel.compress.local) and the Ray engine (tokensel.compress.ray) share this, so
their files have the same schema, metadata and atomic write, and only differ in where the Selector
runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pyarrow as pa

from tokensel import __version__
from tokensel.config import CompressConfig
from tokensel.errors import TokenselError
from tokensel.io.fields import per_field
from tokensel.io.items import check_columns
from tokensel.io.readers import open_items
from tokensel.select.base import TokenSelector
from tokensel.select.keep import COLUMNS


@dataclass
class CompressSummary:
    """One output file of a run (one budget); the run's shared counts are the same in each."""

    items: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    empty: int = 0
    shorter_than_k: int = 0
    scored: int = 0  # items with more than k tokens (they need the strategy's scores)
    computed: int = 0  # items scored in this run (for every budget of the run at once)
    reused: int = 0  # ... whose scores came from the cache
    forward_batches: int = 0  # forward passes of the item LLM in this run (0: no model ran)
    seconds: float = 0.0
    out: str = ""
    cache: str | None = None
    engine: str = "local"
    k: int = 0
    filled: dict[str, int] = field(default_factory=dict)  # per text column: rows with a non-blank value
    notes: list[str] = field(default_factory=list)  # what --strategy auto chose, or that the strategy lost the bundle's check
    warnings: list[str] = field(default_factory=list)  # options given that the strategy run ignores

    @property
    def ratio(self) -> float:
        return self.tokens_out / max(self.tokens_in, 1)

    @property
    def empty_columns(self) -> list[str]:
        """Text columns that are null or blank in every row read: almost always a wrong --text-cols."""
        return [c for c, n in self.filled.items() if n == 0] if self.items else []

    def add(self, lengths: np.ndarray, n_kept: np.ndarray, filled: dict[str, int] | None = None) -> None:
        self.items += len(lengths)
        self.tokens_in += int(lengths.sum())
        self.tokens_out += int(n_kept.sum())
        self.empty += int((lengths == 0).sum())
        self.shorter_than_k += int(((lengths > 0) & (lengths <= self.k)).sum())
        self.scored += int((lengths > self.k).sum())
        for c, n in (filled or {}).items():
            self.filled[c] = self.filled.get(c, 0) + n


def output_paths(items: Path, out: str | Path | None, ks: tuple[int, ...], strategy: str, suffix: str = ".parquet") -> dict[int, Path]:
    """k -> output file. Default: beside the items, `<items>.k<k>-<strategy><suffix>`; several budgets
    need `{k}` in an explicit name."""
    if out is None:
        return {k: items.with_name(f"{items.stem}.k{k}-{strategy}{suffix}") for k in ks}
    out = str(out)
    if len(ks) > 1 and "{k}" not in out:
        raise TokenselError(f"--out {out}: with several budgets the output name must contain {{k}}, e.g. items.k{{k}}{suffix}")
    return {k: Path(out.replace("{k}", str(k))) for k in ks}


def preflight(items: Path, outs: list[Path], sel: TokenSelector, cfg: CompressConfig) -> pa.Schema:
    """Checks every engine makes before any work; returns the output schema."""
    for out in outs:
        if out.resolve() == items.resolve():
            raise TokenselError(f"{out}: the output would overwrite the input")
    text = sel.text
    schema_in = open_items(items).schema  # Parquet, CSV or JSON Lines
    check_columns(items, schema_in, text.id_col, text.text_cols, list(cfg.passthrough))
    per = field_names(sel)
    taken = {text.id_col, *COLUMNS, *cfg.passthrough}
    for col in per:  # the per-field columns are named after the text columns
        if col in taken:
            raise TokenselError(f"{items}: text column {col!r} would collide with the output column of that name; rename it in the input")
    fields = [pa.field(text.id_col, schema_in.field(text.id_col).type), pa.field("text", pa.string()),
              pa.field("token_ids", pa.list_(pa.int32())), pa.field("positions", pa.list_(pa.int32())),
              pa.field("n_tokens", pa.int32()), pa.field("n_kept", pa.int32())]
    fields += [pa.field(c, pa.string()) for c in per]
    return pa.schema(fields + [schema_in.field(c) for c in cfg.passthrough])


def field_names(sel: TokenSelector) -> list[str]:
    """The per-field output columns (one per text column when there are two or more)."""
    return list(sel.text.text_cols) if per_field(sel.text.text_cols) else []


def output_table(id_col: str, ids, cols: dict, passthrough: pa.Table | None, schema: pa.Schema, fields: list[str] = ()) -> pa.Table:
    """One batch of output rows: the id column, the output contract's columns, the per-field columns,
    the pass-through columns."""
    id_array = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, type=schema.field(id_col).type)
    arrays = [id_array] + [cols[name] for name in (*COLUMNS, *fields)]
    names = [id_col, *COLUMNS, *fields]
    if passthrough is not None:
        arrays += [passthrough.column(c) for c in passthrough.column_names]
        names += passthrough.column_names
    return pa.Table.from_arrays(arrays, names=names)


def compress_meta(sel: TokenSelector, cfg: CompressConfig, k: int) -> dict:
    """The file metadata (`tokensel` key): how the file was made."""
    text = sel.text
    return {
        "version": __version__,
        "k": k,
        "chunk": cfg.chunk,
        "prefix": cfg.prefix,
        "max_len": text.max_len,
        "text_cols": text.text_cols,
        "labels": text.labels,
        "template": text.template,
        "id_col": text.id_col,
        "strategy": sel.name,
        "tokenizer_note": "token_ids index tokenizer(text, add_special_tokens=False); feed them directly",
        **sel.provenance,
    }


def scorer_config(sel: TokenSelector) -> dict:
    """Everything an item's cached token scores depend on besides its id and text (not k, prefix, chunk),
    all of it from files: a run whose scores are all cached never loads the model."""
    text = sel.text
    identity = {k: v for k, v in sel.identity.items() if k != "name"}  # where files live does not matter
    return {
        "version": __version__,
        "strategy": sel.name,
        "provenance": {k: v for k, v in sel.provenance.items() if k not in ("policy", "model", "model_name")},  # revision, bundle hash
        "identity": identity,
        "libraries": {lib: _version(lib) for lib in ("torch", "transformers")},
        "max_len": text.max_len,
        "template": text.template,
        "text_cols": text.text_cols,
        "labels": text.labels,
        "dtype": sel.dtype_name,
        "device": sel.device_type,
        "pad_multiple": sel.batch.pad_multiple,
        "min_batch_tokens": sel.batch.min_batch_tokens,
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
