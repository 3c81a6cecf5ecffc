"""`tokensel compress --engine ray`: the same per-batch function through Ray Data.

    read_parquet -> map_batches(Selector, actor pool: one model per actor) -> driver writes Parquet

Each actor loads the item LLM and the strategy once and runs `tokensel.compress.select_keep` and
`output_columns` on its batches, exactly what the local engine runs, so the selection is the same
(forward widths and filler rows depend on the item alone, not on how Ray cuts the batches).

Order: the dataset runs with `preserve_order`, and the driver carries the input row index itself: it
streams the input id column alongside the results and checks that every result row has the id of the
input row at its index, so the output has one row per input item in input order or the run fails
(it never silently reorders). The driver validates ids (empty, duplicate: same errors as the local
engine) and writes one Parquet file with the same schema and metadata through AtomicParquetWriter,
so a failed run leaves no output behind.

CPU actors claim `num_cpus=0.5` each: on a small machine actors that claim whole CPUs leave nothing
for the read tasks and the job hangs. Install with `pip install 'tokensel[ray]'`. The selection cache
is not used by this engine (each worker would need the shared file); use the local engine to resume.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokensel.compress import (
    preflight,
    CompressOptions,
    CompressSummary,
    compress_meta,
    fit_rarity,
    output_columns,
    output_schema,
    select_keep,
)
from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.item_ids import IdCheck
from tokensel.io.fields import build_text_spans, field_columns, per_field  # [formats hook]
from tokensel.io.items import open_parquet
from tokensel.io.readers import item_format  # [formats hook]
from tokensel.io.parquet_out import AtomicParquetWriter
from tokensel.select.strategies import Rarity, Strategy


def check_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise TokenselError("--engine ray needs Ray Data: pip install 'tokensel[ray]'  (or pip install 'ray[data]')") from None


class Selector:
    """A Ray Data actor: loads the model once, then turns batches of input rows into output columns."""

    def __init__(self, spec: dict):
        import torch

        from tokensel import api

        torch.set_num_threads(spec["threads"])
        llm, sel, _, _ = api.load_selector(
            spec["strategy"], spec["policy"], spec["model"], seed=spec["seed"], device=spec["device"], dtype=spec["dtype"]
        )
        llm.set_template(spec["text"].template)
        if isinstance(sel, Rarity):
            sel.doc_freq, sel.n_docs = spec["doc_freq"], spec["n_docs"]
        self.llm, self.sel, self.text, self.opts = llm, sel, spec["text"], spec["opts"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        text = self.text
        data = batch.select(text.text_cols).to_pydict()
        built = [build_text_spans({c: data[c][i] for c in text.text_cols}, text.text_cols, text.labels) for i in range(batch.num_rows)]
        texts = [t for t, _ in built]
        ids = batch.column(text.id_col).to_pylist()
        toks = self.llm.tokenize(texts, text.max_len)
        keep = select_keep(self.llm, self.sel, toks, ids, self.opts)
        cols = output_columns(self.llm, toks, keep)
        fields = list(text.text_cols) if per_field(text.text_cols) else []  # [formats hook] per-field values
        if fields:
            values = field_columns(self.llm.tokenizer, self.llm.decode_batch, texts, [sp for _, sp in built], toks, keep, cols["text"].to_pylist())
            cols.update({c: pa.array(v, type=pa.string()) for c, v in zip(fields, values)})
        extra = batch.select(self.opts.passthrough) if self.opts.passthrough else None
        return output_table_any(text.id_col, batch.column(text.id_col), cols, extra, fields)


def output_table_any(id_col: str, ids, cols: dict, passthrough: pa.Table | None, fields: list[str] = ()) -> pa.Table:
    names = [id_col, "text", "token_ids", "positions", "n_tokens", "n_kept", *fields]  # [formats hook] fields
    arrays = [ids] + [cols[n] for n in names[1:]]
    if passthrough is not None:
        arrays += [passthrough.column(c) for c in passthrough.column_names]
        names += passthrough.column_names
    return pa.Table.from_arrays(arrays, names=names)


def _input_ids(path: Path, id_col: str, limit: int | None):
    """The input ids, streamed in row order: the driver's row index for the order check."""
    row = 0
    for rb in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=[id_col]):
        vals = rb.column(0).to_pylist()
        if limit is not None:
            vals = vals[: max(0, limit - row)]
        if not vals:
            return
        yield from vals
        row += len(vals)


def compress_file_ray(
    items: str | Path,
    out: str | Path,
    strategy: Strategy,
    text: TextConfig,
    opts: CompressOptions,
    provenance: dict,
    *,
    strategy_name: str | None = None,
    policy=None,
    model=None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    workers: int = 2,
    llm=None,
    on_progress: Callable[[int], None] | None = None,
    ray_init: dict | None = None,
) -> CompressSummary:
    """Compress `items` to `out` with Ray Data; the output equals `compress_file`'s, row for row."""
    check_ray()
    import ray
    import ray.data
    import torch

    strategy_name = strategy_name or strategy.name
    items, out = Path(items), Path(out)
    t0 = time.perf_counter()
    schema_in = preflight(items, out, text, opts)
    if item_format(items) != "parquet":  # [formats hook] Ray Data reads the Parquet row groups itself
        raise TokenselError(f"{items}: --engine ray reads Parquet only; use --engine local for CSV / JSON Lines")

    def local(p):  # workers may run elsewhere: hand them absolute paths for local files
        return str(Path(p).resolve()) if p is not None and Path(p).exists() else (str(p) if p is not None else None)

    spec = {
        "strategy": strategy_name, "policy": local(policy), "model": local(model), "seed": seed,
        "device": device, "dtype": dtype, "text": text, "opts": opts,
        "threads": max(1, (os.cpu_count() or 1) // max(workers, 1)),
    }
    if isinstance(strategy, Rarity):
        if strategy.n_docs == 0:
            fitted = fit_rarity(items, llm, text, opts)
            strategy.doc_freq, strategy.n_docs = fitted.doc_freq, fitted.n_docs
        spec["doc_freq"], spec["n_docs"] = strategy.doc_freq, strategy.n_docs
    pass_schema = pa.schema([schema_in.field(c) for c in opts.passthrough]) if opts.passthrough else None
    fields = list(text.text_cols) if per_field(text.text_cols) else []  # [formats hook]
    schema = output_schema(text.id_col, schema_in.field(text.id_col).type, pass_schema, fields)
    meta = {**compress_meta(strategy, text, opts, provenance), "engine": "ray"}

    started = False
    if not ray.is_initialized():
        ray.init(**{"num_cpus": os.cpu_count(), "include_dashboard": False, "log_to_driver": False, **(ray_init or {})})
        started = True
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    gpu = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    res = {"num_gpus": 1} if gpu else {"num_cpus": 0.5}
    columns = list(dict.fromkeys([text.id_col, *text.text_cols, *opts.passthrough]))
    summary = CompressSummary(out=str(out), engine="ray")
    try:
        # blocks of about batch_rows rows, so every actor gets work even from a file with one row group
        md = open_parquet(items).metadata
        row_bytes = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / max(md.num_rows, 1)
        ctx.target_max_block_size = max(int(row_bytes * opts.batch_rows), 1024)
        ds = ray.data.read_parquet(str(items.resolve())).select_columns(columns)
        if opts.limit is not None:
            ds = ds.limit(opts.limit)
        ds = ds.map_batches(
            Selector, fn_constructor_kwargs={"spec": spec}, batch_size=opts.batch_rows, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers), **res,
        )
        expected = _input_ids(items, text.id_col, opts.limit)
        check_ids = IdCheck(items, text.id_col)
        row = 0
        with AtomicParquetWriter(out, schema, meta, row_group_rows=opts.row_group_rows) as writer:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
                if table.num_rows == 0:
                    continue
                ids = table.column(text.id_col).to_pylist()
                for i, v in enumerate(ids):
                    if v != next(expected, None):
                        raise TokenselError(f"{items}: the ray engine returned row {row + i} out of input order")
                check_ids(ids, row)
                writer.write(table.select(schema.names))
                n_tokens = table.column("n_tokens").to_numpy().astype(np.int64)
                summary.add(n_tokens, table.column("n_kept").to_numpy(), opts.k)
                summary.computed += int((n_tokens > opts.k).sum())
                row += table.num_rows
                if on_progress:
                    on_progress(table.num_rows)
            if next(expected, None) is not None:
                raise TokenselError(f"{items}: the ray engine returned {row} rows, fewer than the input has")
    except ray.exceptions.RayTaskError as exc:  # a worker's TokenselError (e.g. a bundle it cannot load) stays one
        if isinstance(exc.cause, TokenselError):
            raise TokenselError(str(exc.cause)) from None
        raise
    finally:
        ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary


__all__ = ["compress_file_ray", "check_ray", "Selector"]
