"""Compress a catalogue: stream items, score chunks, keep the prefix plus the best chunks, write Parquet.

`compress_tokens` is the per-batch function (pure given the model); `compress_file` streams a file
through it in record batches, length-bucketed, and writes atomically with provenance metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from tokensel import __version__
from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.items import check_columns, iter_item_batches, open_parquet
from tokensel.io.parquet_out import AtomicParquetWriter
from tokensel.models.item_llm import ItemLLM
from tokensel.selection import mask_to_positions, select_mask
from tokensel.strategies import Rarity, Strategy


@dataclass
class CompressOptions:
    k: int = 64
    chunk: int = 8
    prefix: int = 16
    batch_rows: int = 1024  # rows read per record batch
    batch_tokens: int = 8192  # padded tokens per forward pass
    max_batch: int = 64  # items per forward pass
    passthrough: list[str] = field(default_factory=list)
    limit: int | None = None


@dataclass
class CompressSummary:
    items: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    empty: int = 0
    shorter_than_k: int = 0
    seconds: float = 0.0
    out: str = ""

    @property
    def ratio(self) -> float:
        return self.tokens_out / max(self.tokens_in, 1)


def length_buckets(lengths: list[int], max_batch: int, batch_tokens: int) -> list[list[int]]:
    """Group row indices into forward batches of similar length (sorted), bounded in rows and padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:
        width = lengths[i] + 2
        if cur and (len(cur) >= max_batch or width * (len(cur) + 1) > batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def compress_tokens(
    llm: ItemLLM, strategy: Strategy, token_lists: list[list[int]], keys: list, opts: CompressOptions
) -> list[list[int]]:
    """Kept positions for each item; the result does not depend on how items are batched."""
    out: list[list[int]] = [[] for _ in token_lists]
    lengths = [len(t) for t in token_lists]
    prefix = min(opts.prefix, opts.k)
    # items that fit the budget pass through; only the others need scoring
    need = [i for i, n in enumerate(lengths) if n > opts.k]
    for i, n in enumerate(lengths):
        if n <= opts.k:
            out[i] = list(range(n))
    for group in length_buckets([lengths[i] for i in need], opts.max_batch, opts.batch_tokens):
        idx = [need[j] for j in group]
        toks = [token_lists[i] for i in idx]
        enc = llm.encode(toks) if strategy.needs_forward else None
        scores = strategy.chunk_scores(toks, [keys[i] for i in idx], enc, prefix, opts.chunk)
        n = torch.tensor([lengths[i] for i in idx])
        mask = select_mask(scores.cpu(), n, k=opts.k, prefix=opts.prefix, chunk=opts.chunk, width=max(lengths[i] for i in idx))
        for i, pos in zip(idx, mask_to_positions(mask)):
            out[i] = pos
    return out


def output_schema(id_col: str, id_type: pa.DataType, passthrough: pa.Schema | None) -> pa.Schema:
    fields = [
        pa.field(id_col, id_type),
        pa.field("text", pa.string()),
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("positions", pa.list_(pa.int32())),
        pa.field("n_tokens", pa.int32()),
        pa.field("n_kept", pa.int32()),
    ]
    if passthrough is not None:
        fields.extend(passthrough)
    return pa.schema(fields)


def compress_file(
    items: str | Path,
    out: str | Path,
    llm: ItemLLM,
    strategy: Strategy,
    text: TextConfig,
    opts: CompressOptions,
    provenance: dict,
    on_progress: Callable[[int], None] | None = None,
) -> CompressSummary:
    """Stream `items` through the strategy and write `out` atomically (temporary file, then rename)."""
    items, out = Path(items), Path(out)
    if out.resolve() == items.resolve():
        raise TokenselError(f"{out}: the output would overwrite the input")
    t0 = time.perf_counter()
    schema_in = open_parquet(items).schema_arrow
    check_columns(items, schema_in, text.id_col, text.text_cols, opts.passthrough)
    if isinstance(strategy, Rarity) and strategy.n_docs == 0:
        corpus = (t for b in iter_item_batches(items, text, opts.batch_rows, limit=opts.limit) for t in llm.tokenize(b.texts, text.max_len))
        fitted = Rarity.from_corpus(corpus)
        strategy.doc_freq, strategy.n_docs = fitted.doc_freq, fitted.n_docs
    pass_schema = pa.schema([schema_in.field(c) for c in opts.passthrough]) if opts.passthrough else None
    schema = output_schema(text.id_col, schema_in.field(text.id_col).type, pass_schema)
    meta = {
        "version": __version__,
        "k": opts.k,
        "chunk": opts.chunk,
        "prefix": opts.prefix,
        "max_len": text.max_len,
        "text_cols": text.text_cols,
        "template": text.template,
        "id_col": text.id_col,
        "strategy": strategy.name,
        "tokenizer_note": "token_ids index tokenizer(text, add_special_tokens=False); feed them directly",
        **provenance,
    }
    summary = CompressSummary(out=str(out))
    with AtomicParquetWriter(out, schema, meta) as writer:
        for batch in iter_item_batches(items, text, opts.batch_rows, opts.passthrough, limit=opts.limit):
            toks = llm.tokenize(batch.texts, text.max_len)
            kept = compress_tokens(llm, strategy, toks, batch.ids, opts)
            kept_ids = [[t[p] for p in pos] for t, pos in zip(toks, kept)]
            cols = {
                text.id_col: batch.ids,
                "text": llm.tokenizer.batch_decode(kept_ids, clean_up_tokenization_spaces=False) if kept_ids else [],
                "token_ids": kept_ids,
                "positions": kept,
                "n_tokens": [len(t) for t in toks],
                "n_kept": [len(p) for p in kept],
            }
            table = pa.table({name: pa.array(cols[name], type=schema.field(name).type) for name in cols})
            if batch.passthrough is not None:
                for name in batch.passthrough.column_names:
                    table = table.append_column(name, batch.passthrough.column(name))
            writer.write(table)
            summary.items += len(toks)
            summary.tokens_in += sum(cols["n_tokens"])
            summary.tokens_out += sum(cols["n_kept"])
            summary.empty += sum(1 for t in toks if not t)
            summary.shorter_than_k += sum(1 for t in toks if 0 < len(t) <= opts.k)
            if on_progress:
                on_progress(len(toks))
    summary.seconds = time.perf_counter() - t0
    return summary
