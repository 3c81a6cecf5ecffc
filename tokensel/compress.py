"""Compress a catalogue: stream items, score chunks, keep the prefix plus the best chunks, write Parquet.

The cost floor is one forward pass of the item LLM over every item that has more than k tokens;
everything else is kept off the hot path:

- Items are read in windows of `batch_rows` rows and tokenised in one call to the fast tokenizer.
- Items with n <= k pass through without a forward pass.
- The others are grouped into forward batches by padded width. The width of an item is a function
  of the item alone (its length rounded up to `pad_multiple`), and small batches are filled with
  dummy rows up to `min_batch_tokens`, so on CPU an item's states -- and therefore its selection --
  are bit-identical whatever the batch size, the batch order or the other items in the batch
  (measured: with a data-dependent width or a very small batch the float results move by ~1e-6,
  enough to flip a near-tie between two chunks). On CUDA the same scheme applies, but GPU kernels
  are not guaranteed batch-invariant, so bit-identity is claimed (and tested) on CPU only.
- Selection is vectorised over the batch (`select_mask`), one device-to-host copy per batch; the
  output columns are built from flat numpy arrays and offsets, and decoded in one Rust call.
- Optionally reading/tokenising and writing run in background threads (tokensel.threads), with bounded
  queues, overlapping the forward pass.
- A selection cache (tokensel.cache) makes runs resumable and incremental.

`select_keep` is the per-batch function every engine uses (the local loop here and the Ray engine in
tokensel.engines.ray_engine); `compress_file` streams a file through it and writes atomically.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from tokensel import __version__
from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.fields import field_columns, per_field  # [formats hook]
from tokensel.io.items import ItemBatch, check_columns, iter_item_batches
from tokensel.io.readers import open_items  # [formats hook]
from tokensel.io.parquet_out import AtomicParquetWriter
from tokensel.models.item_llm import ItemLLM
from tokensel.select.rule import select_mask
from tokensel.select.strategies import Rarity, Strategy
from tokensel.threads import BackgroundWriter, prefetch


@dataclass
class CompressOptions:
    k: int = 64
    chunk: int = 8
    prefix: int = 16
    batch_rows: int = 4096  # rows read (and tokenised) per window; larger windows fill the width buckets
    batch_tokens: int = 8192  # padded tokens per forward pass
    max_batch: int = 64  # items per forward pass
    passthrough: list[str] = field(default_factory=list)
    limit: int | None = None
    pad_multiple: int = 8  # forward widths are rounded up to a multiple of this (a function of the item alone)
    min_batch_tokens: int = 1024  # smaller forward batches get dummy rows: tiny matmuls take other kernel paths
    pipeline: bool | None = None  # overlap reading/tokenising and writing with the forward pass; None: auto
    row_group_rows: int | None = None  # output row groups of about this many rows (None: one per window)

    @classmethod
    def for_device(cls, device: torch.device | str, **kw) -> CompressOptions:
        """Defaults scaled for the device: on CUDA larger windows and batches (what is given in kw wins)."""
        if torch.device(device).type == "cuda":
            kw = {"batch_rows": 16384, "batch_tokens": 65536, "max_batch": 512, **{k: v for k, v in kw.items() if v is not None}}
        return cls(**{k: v for k, v in kw.items() if v is not None})


@dataclass
class CompressSummary:
    items: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    empty: int = 0
    shorter_than_k: int = 0
    scored: int = 0  # items with more than k tokens (they need the strategy's scores)
    computed: int = 0  # ... scored in this run
    reused: int = 0  # ... taken from the selection cache
    seconds: float = 0.0
    out: str = ""
    cache: str | None = None
    engine: str = "local"

    @property
    def ratio(self) -> float:
        return self.tokens_out / max(self.tokens_in, 1)

    def add(self, lengths: np.ndarray, n_kept: np.ndarray, k: int) -> None:
        self.items += len(lengths)
        self.tokens_in += int(lengths.sum())
        self.tokens_out += int(n_kept.sum())
        self.empty += int((lengths == 0).sum())
        self.shorter_than_k += int(((lengths > 0) & (lengths <= k)).sum())
        self.scored += int((lengths > k).sum())


# ---------------------------------------------------------------------------------------- batching
def input_offset(llm: ItemLLM) -> int:
    """Model-input columns before the item's own text (leading specials + template)."""
    return len(llm.lead_ids) + len(llm.template_ids)


def forward_batches(lengths: np.ndarray, llm: ItemLLM, opts: CompressOptions) -> list[tuple[int, np.ndarray]]:
    """(text width, item indices) of each forward batch.

    An item's model input is padded to round_up(offset + n + 1, pad_multiple) columns (capped at the
    model's maximum positions): a function of the item alone. Batches hold items of one width, in
    input order, at most `max_batch` rows and `batch_tokens` padded tokens; a width that needs several
    batches is split into batches of even size (no tiny remainder batch).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return []
    off = input_offset(llm)
    m = max(1, opts.pad_multiple)
    need = off + lengths + 1
    widths = -(-need // m) * m
    max_pos = getattr(llm.model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0:
        widths = np.where(widths > max_pos, np.maximum(need, max_pos), widths)
    order = np.lexsort((np.arange(len(lengths)), widths))
    cuts = np.flatnonzero(np.diff(widths[order])) + 1
    out = []
    for group in np.split(order, cuts):
        w = int(widths[group[0]])
        cap = max(1, min(opts.max_batch, opts.batch_tokens // w))
        for part in np.array_split(group, -(-len(group) // cap)):  # even sizes: no tiny remainder batch
            out.append((w - off - 1, part))
    return out


def plain_batches(lengths: np.ndarray, rows: int = 4096) -> list[tuple[int, np.ndarray]]:
    """Batches for strategies without a forward pass: consecutive items, width = the longest."""
    out = []
    for s in range(0, len(lengths), rows):
        idx = np.arange(s, min(s + rows, len(lengths)))
        out.append((int(lengths[idx].max()), idx))
    return out


def dummy_rows(llm: ItemLLM, width: int, rows: int, opts: CompressOptions) -> list[list[int]]:
    """Filler rows that bring a small forward batch up to min_batch_tokens padded tokens."""
    full = width + input_offset(llm) + 1
    return [[llm.pad_id] * width] * max(math.ceil(opts.min_batch_tokens / full) - rows, 0)


# ---------------------------------------------------------------------------------------- selection
@torch.inference_mode()
def score_batch(llm: ItemLLM, strategy: Strategy, toks: list[list[int]], keys: list, width: int, opts: CompressOptions) -> np.ndarray:
    """[B, width] keep mask (numpy bool) for items that all have more than k tokens."""
    prefix = min(opts.prefix, opts.k)
    lengths = [len(t) for t in toks]
    if strategy.needs_forward:
        filler = dummy_rows(llm, width, len(toks), opts)
        batch = toks + filler
        enc = llm.encode(batch, width=width)
        scores = strategy.chunk_scores(batch, list(keys) + [None] * len(filler), enc, prefix, opts.chunk)[: len(toks)]
    else:
        scores = strategy.chunk_scores(toks, list(keys), None, prefix, opts.chunk)
    n = torch.tensor(lengths, dtype=torch.long).to(scores.device, non_blocking=True)
    mask = select_mask(scores, n, k=opts.k, prefix=opts.prefix, chunk=opts.chunk, width=width)
    return mask.cpu().numpy()  # the one device-to-host copy of the batch


def token_offsets(lengths: np.ndarray) -> np.ndarray:
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offs[1:])
    return offs


def select_keep(
    llm: ItemLLM,
    strategy: Strategy,
    token_lists: list[list[int]],
    keys: list,
    opts: CompressOptions,
    rows: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """The per-batch function: a flat keep mask over all tokens of `token_lists` (concatenated).

    Items with n <= k keep everything; items in `rows` (default: all with n > k) are scored and
    selected; items with n > k outside `rows` keep what `keep` already says (e.g. from a cache).
    """
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    offs = token_offsets(lengths)
    if keep is None:
        keep = np.repeat(lengths <= opts.k, lengths)
    todo = np.flatnonzero(lengths > opts.k) if rows is None else np.asarray(rows, dtype=np.int64)
    if not len(todo):
        return keep
    plan = forward_batches(lengths[todo], llm, opts) if strategy.needs_forward else plain_batches(lengths[todo])
    for width, sub in plan:
        idx = todo[sub]
        mask = score_batch(llm, strategy, [token_lists[i] for i in idx], [keys[i] for i in idx], width, opts)
        r, c = np.nonzero(mask)
        keep[offs[idx[r]] + c] = True
    return keep


def keep_to_positions(keep: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat kept positions and per-item offsets [B + 1] from a flat keep mask."""
    offs = token_offsets(lengths)
    cs = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=cs[1:])
    kept_off = cs[offs]
    kept_at = np.flatnonzero(keep)
    positions = kept_at - np.repeat(offs[:-1], np.diff(kept_off))
    return positions, kept_off


def kept_counts(keep: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    cs = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=cs[1:])
    return np.diff(cs[token_offsets(lengths)])


def compress_tokens(llm: ItemLLM, strategy: Strategy, token_lists: list[list[int]], keys: list, opts: CompressOptions) -> list[list[int]]:
    """Kept positions for each item; the result does not depend on how items are batched."""
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    keep = select_keep(llm, strategy, token_lists, keys, opts)
    positions, kept_off = keep_to_positions(keep, lengths)
    flat = positions.tolist()
    return [flat[a:b] for a, b in zip(kept_off[:-1].tolist(), kept_off[1:].tolist())]


# ---------------------------------------------------------------------------------------- output
def output_schema(id_col: str, id_type: pa.DataType, passthrough: pa.Schema | None, fields: list[str] = ()) -> pa.Schema:
    fields_out = [
        pa.field(id_col, id_type),
        pa.field("text", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("positions", pa.list_(pa.int32())),
        pa.field("n_tokens", pa.int32()),
        pa.field("n_kept", pa.int32()),
    ]
    fields_out += [pa.field(c, pa.string()) for c in fields]  # [formats hook] per-field compressed values
    if passthrough is not None:
        fields_out.extend(passthrough)
    return pa.schema(fields_out)


def flatten_tokens(token_lists: list[list[int]], lengths: np.ndarray) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))


def output_columns(llm: ItemLLM, token_lists: list[list[int]], keep: np.ndarray) -> dict[str, pa.Array]:
    """text, token_ids, positions, n_tokens, n_kept for a window, built from flat arrays + offsets."""
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    flat = flatten_tokens(token_lists, lengths)
    positions, kept_off = keep_to_positions(keep, lengths)
    kept_ids = flat[keep]
    off32 = pa.array(kept_off.astype(np.int32))
    ids_list = kept_ids.tolist()
    bounds = kept_off.tolist()
    texts = llm.decode_batch([ids_list[a:b] for a, b in zip(bounds[:-1], bounds[1:])]) if len(lengths) else []
    return {
        "text": pa.array(texts, type=pa.string()),
        "token_ids": pa.ListArray.from_arrays(off32, pa.array(kept_ids.astype(np.int32))),
        "positions": pa.ListArray.from_arrays(off32, pa.array(positions.astype(np.int32))),
        "n_tokens": pa.array(lengths.astype(np.int32)),
        "n_kept": pa.array(np.diff(kept_off).astype(np.int32)),
    }


def output_table(schema: pa.Schema, id_col: str, ids, cols: dict[str, pa.Array], passthrough: pa.Table | None, fields: list[str] = ()) -> pa.Table:
    arrays = [ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, type=schema.field(id_col).type)]
    names = [id_col, "text", "token_ids", "positions", "n_tokens", "n_kept", *fields]  # [formats hook] fields
    arrays += [cols[name] for name in names[1:]]
    if passthrough is not None:
        arrays += [passthrough.column(c) for c in passthrough.column_names]
        names += passthrough.column_names
    return pa.Table.from_arrays(arrays, names=names)


# ---------------------------------------------------------------------------------------- pipeline
def auto_pipeline(llm: ItemLLM, strategy: Strategy) -> bool:
    """Threads pay when there are spare cores (or a GPU does the forward pass); on 2 cores they contend."""
    if not strategy.needs_forward:
        return False
    return llm.device.type == "cuda" or (os.cpu_count() or 1) > 2


# ---------------------------------------------------------------------------------------- the file
@dataclass
class Window:
    batch: ItemBatch
    toks: list[list[int]]
    lengths: np.ndarray


def fit_rarity(items: Path, llm: ItemLLM, text: TextConfig, opts: CompressOptions) -> Rarity:
    """Document frequencies over the whole file (one streaming pass, vectorised per window)."""
    vocab = max(len(llm.tokenizer), llm.item_token_id + 1)
    df = np.zeros(vocab, dtype=np.int64)
    n_docs = 0
    for b in iter_item_batches(items, text, opts.batch_rows, check_duplicates=False, limit=opts.limit):
        toks = llm.tokenize(b.texts, text.max_len)
        lengths = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
        flat = flatten_tokens(toks, lengths)
        if flat.size:
            if flat.max() >= len(df):
                df = np.concatenate([df, np.zeros(int(flat.max()) + 1 - len(df), dtype=np.int64)])
            pairs = np.unique(np.repeat(np.arange(len(toks), dtype=np.int64), lengths) * len(df) + flat)
            df += np.bincount(pairs % len(df), minlength=len(df))
        n_docs += len(toks)
    nz = np.flatnonzero(df)
    return Rarity(Counter(dict(zip(nz.tolist(), df[nz].tolist()))), n_docs)


def compress_meta(strategy: Strategy, text: TextConfig, opts: CompressOptions, provenance: dict) -> dict:
    return {
        "version": __version__,
        "k": opts.k,
        "chunk": opts.chunk,
        "prefix": opts.prefix,
        "max_len": text.max_len,
        "text_cols": text.text_cols,
        "labels": text.labels,
        "template": text.template,
        "id_col": text.id_col,
        "strategy": strategy.name,
        "tokenizer_note": "token_ids index tokenizer(text, add_special_tokens=False); feed them directly",
        **provenance,
    }


def cache_config(llm: ItemLLM, strategy: Strategy, text: TextConfig, opts: CompressOptions, provenance: dict) -> dict:
    """Everything a cached selection depends on besides the item's id and text."""
    from tokensel.cache import weights_fingerprint

    head = getattr(strategy, "head", None)
    identity = {k: v for k, v in llm.identity().items() if k != "name"}  # where files live does not matter
    return {
        "version": __version__,
        "strategy": strategy.name,
        "provenance": {k: v for k, v in provenance.items() if k not in ("policy", "model")},
        "identity": identity,
        "weights": weights_fingerprint(llm.model),
        "head": weights_fingerprint(head) if isinstance(head, torch.nn.Module) else None,
        "k": opts.k,
        "chunk": opts.chunk,
        "prefix": opts.prefix,
        "max_len": text.max_len,
        "template": text.template,
        "text_cols": text.text_cols,
        "labels": text.labels,
        "dtype": str(next(llm.model.parameters()).dtype),
        "device": llm.device.type,
        "pad_multiple": opts.pad_multiple,
        "min_batch_tokens": opts.min_batch_tokens,
    }


def preflight(items: Path, out: Path, text: TextConfig, opts: CompressOptions) -> pa.Schema:
    """Checks every engine makes before any work: output is not the input, the file opens, the columns exist."""
    if out.resolve() == items.resolve():
        raise TokenselError(f"{out}: the output would overwrite the input")
    schema_in = open_items(items).schema  # [formats hook] Parquet, CSV or JSON Lines
    check_columns(items, schema_in, text.id_col, text.text_cols, opts.passthrough)
    if per_field(text.text_cols):  # [formats hook] per-field columns must not collide with the output's own
        taken = {text.id_col, "text", "token_ids", "positions", "n_tokens", "n_kept", *opts.passthrough}
        for col in text.text_cols:
            if col in taken:
                raise TokenselError(f"{items}: text column {col!r} would collide with the output column of that name; rename it in the input")
    return schema_in


def compress_file(
    items: str | Path,
    out: str | Path,
    llm: ItemLLM,
    strategy: Strategy,
    text: TextConfig,
    opts: CompressOptions,
    provenance: dict,
    on_progress: Callable[[int], None] | None = None,
    cache: str | Path | None = None,
) -> CompressSummary:
    """Stream `items` through the strategy and write `out` atomically (temporary file, then rename).

    `cache`: a selection cache file (tokensel.cache) for resumable, incremental runs; used only by
    strategies with a forward pass (the others cost less than the lookups).
    """
    items, out = Path(items), Path(out)
    t0 = time.perf_counter()
    schema_in = preflight(items, out, text, opts)
    if isinstance(strategy, Rarity) and strategy.n_docs == 0:
        fitted = fit_rarity(items, llm, text, opts)
        strategy.doc_freq, strategy.n_docs, strategy._cache = fitted.doc_freq, fitted.n_docs, {}
    pass_schema = pa.schema([schema_in.field(c) for c in opts.passthrough]) if opts.passthrough else None
    fields = list(text.text_cols) if per_field(text.text_cols) else []  # [formats hook]
    schema = output_schema(text.id_col, schema_in.field(text.id_col).type, pass_schema, fields)
    meta = compress_meta(strategy, text, opts, provenance)
    summary = CompressSummary(out=str(out))
    store = None
    if cache is not None and strategy.needs_forward:
        from tokensel.cache import SelectionCache

        store = SelectionCache(cache, cache_config(llm, strategy, text, opts, provenance))
        summary.cache = str(store.path)
    pipeline = auto_pipeline(llm, strategy) if opts.pipeline is None else opts.pipeline

    def read() -> Iterator[Window]:
        for batch in iter_item_batches(items, text, opts.batch_rows, opts.passthrough, limit=opts.limit):
            toks = llm.tokenize(batch.texts, text.max_len)
            yield Window(batch, toks, np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)))

    try:
        with AtomicParquetWriter(out, schema, meta, row_group_rows=opts.row_group_rows) as writer:

            def write(job: tuple[Window, np.ndarray]) -> None:
                w, keep = job
                cols = output_columns(llm, w.toks, keep)
                if fields:  # [formats hook] per-field values, slices of `text` (tokensel.io.fields)
                    texts = cols["text"].to_pylist()
                    values = field_columns(llm.tokenizer, llm.decode_batch, w.batch.texts, w.batch.spans, w.toks, keep, texts)
                    cols.update({c: pa.array(v, type=pa.string()) for c, v in zip(fields, values)})
                writer.write(output_table(schema, text.id_col, w.batch.ids, cols, w.batch.passthrough, fields))

            sink = BackgroundWriter(write, enabled=pipeline)
            windows = prefetch(read(), 2) if pipeline else read()
            try:
                for w in windows:
                    keep = select_window(llm, strategy, w, opts, store, summary)
                    if store is not None:
                        store.commit()  # from here on this window survives an interruption
                    sink.submit((w, keep))
                    summary.add(w.lengths, kept_counts(keep, w.lengths), opts.k)
                    if on_progress:
                        on_progress(len(w.toks))
            except BaseException:
                sink.close(raise_error=False)
                raise
            finally:
                windows.close()
            sink.close()
        if store is not None and opts.limit is None:
            store.prune()
    finally:
        if store is not None:
            store.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def select_window(llm: ItemLLM, strategy: Strategy, w: Window, opts: CompressOptions, store, summary: CompressSummary) -> np.ndarray:
    """The keep mask of one window: cached selections where the cache has them, scored otherwise."""
    lengths, ids = w.lengths, w.batch.ids
    need = np.flatnonzero(lengths > opts.k)
    if store is None or not len(need):
        summary.computed += len(need)
        return select_keep(llm, strategy, w.toks, ids, opts)
    from tokensel.cache import item_key

    offs = token_offsets(lengths)
    keep = np.repeat(lengths <= opts.k, lengths)
    keys = {int(i): item_key(ids[i], w.batch.texts[i]) for i in need}
    hits = store.get_many(list(keys.values()))
    miss, touched = [], []
    for i, key in keys.items():
        hit = hits.get(key)
        if hit is not None and hit[0] == lengths[i] and (len(hit[1]) == 0 or int(hit[1].max()) < lengths[i]):
            keep[offs[i] + hit[1].astype(np.int64)] = True
            touched.append(key)
        else:
            miss.append(i)
    keep = select_keep(llm, strategy, w.toks, ids, opts, rows=np.array(miss, dtype=np.int64), keep=keep)
    for i in miss:
        store.put(keys[i], lengths[i], np.flatnonzero(keep[offs[i] : offs[i + 1]]))
    store.touch(touched)
    summary.reused += len(touched)
    summary.computed += len(miss)
    return keep
