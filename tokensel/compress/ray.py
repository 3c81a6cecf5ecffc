"""`tokensel compress --engine ray`: the same per-batch function through Ray Data.

    read_parquet -> map_batches(Selector, actor pool: one model per actor) -> driver writes Parquet

Each actor rebuilds the Selector from its spec (tokensel.select.selector: what to load, not the
tensors) and calls it on its batches: the model path of the local engine, so the selection is the
same (forward widths and filler rows depend on the item alone, not on how Ray cuts the batches).

Order: the dataset runs with `preserve_order`, and the driver carries the input row index itself: it
streams the input id column alongside the results and checks that every result row has the id of the
input row at its index, so the output has one row per input item in input order or the run fails
(it never silently reorders). The driver validates ids (empty, duplicate: same errors as the local
engine) and writes one Parquet file with the same schema and metadata through AtomicParquetWriter,
so a failed run leaves no output behind.

CPU actors claim `num_cpus=0.5` each: on a small machine actors that claim whole CPUs leave nothing
for the read tasks and the job hangs. Install with `pip install 'tokensel[ray]'`. The score cache
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

from tokensel.compress.job import CompressSummary, compress_meta, field_names, preflight
from tokensel.config import CompressConfig
from tokensel.errors import TokenselError
from tokensel.io.item_ids import IdCheck
from tokensel.io.items import iter_item_batches, open_parquet
from tokensel.io.readers import item_format
from tokensel.io.parquet_out import AtomicParquetWriter
from tokensel.select.base import TokenSelector


def check_ray() -> None:
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise TokenselError("--engine ray needs Ray Data: pip install 'tokensel[ray]'  (or pip install 'ray[data]')") from None


class SelectorActor:
    """A Ray Data actor: the pickled Selector loads itself once, then turns input batches into output rows."""

    def __init__(self, selector: TokenSelector, k: int, cfg: CompressConfig, threads: int):
        if selector.needs_forward:  # the model runs in this actor: its share of the cores
            import torch

            torch.set_num_threads(threads)
        self.sel, self.k, self.cfg = selector, k, cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        text, cfg = self.sel.text, self.cfg
        out = self.sel(batch.select([text.id_col, *text.text_cols]), k=self.k, chunk=cfg.chunk, prefix=cfg.prefix, batch_rows=batch.num_rows)
        names = [text.id_col, "text", "token_ids", "positions", "n_tokens", "n_kept", *field_names(self.sel)]
        extra = [batch.column(c) for c in cfg.passthrough]
        return pa.Table.from_arrays([out.column(n) for n in names] + extra, names=names + list(cfg.passthrough))


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
    sel: TokenSelector,
    cfg: CompressConfig,
    *,
    workers: int = 2,
    on_progress: Callable[[int], None] | None = None,
    ray_init: dict | None = None,
) -> CompressSummary:
    """Compress `items` to `out` (one budget) with Ray Data; the output equals the local engine's, row for row."""
    check_ray()
    import ray
    import ray.data

    if len(cfg.ks) > 1:
        raise TokenselError("--engine ray compresses one budget per run; give one --k, or use the local engine")
    k = cfg.ks[0]
    items, out = Path(items), Path(out)
    if item_format(items) != "parquet":  # Ray Data reads the Parquet row groups itself
        raise TokenselError(f"{items}: --engine ray reads Parquet only; use --engine local for CSV / JSON Lines")
    t0 = time.perf_counter()
    schema = preflight(items, [out], sel, cfg)
    text = sel.text
    if sel.needs_fit:  # fitted once here, shipped to the actors in the pickle
        sel.fit(batches=(sel.tokenize(b.texts) for b in iter_item_batches(items, text, cfg.batch_rows, check_duplicates=False, limit=cfg.limit)))
    meta = {**compress_meta(sel, cfg, k), "engine": "ray"}
    started = False
    if not ray.is_initialized():
        ray.init(**{"num_cpus": os.cpu_count(), "include_dashboard": False, "log_to_driver": False, **(ray_init or {})})
        started = True
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.target_max_block_size, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    gpu = sel.device_type == "cuda"
    res = {"num_gpus": 1} if gpu else {"num_cpus": 0.5}
    columns = list(dict.fromkeys([text.id_col, *text.text_cols, *cfg.passthrough]))
    summary = CompressSummary(out=str(out), engine="ray", k=k)
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    try:
        # blocks of about batch_rows rows, so every actor gets work even from a file with one row group
        md = open_parquet(items).metadata
        row_bytes = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / max(md.num_rows, 1)
        ctx.target_max_block_size = max(int(row_bytes * cfg.batch_rows), 1024)
        ds = ray.data.read_parquet(str(items.resolve())).select_columns(columns)
        if cfg.limit is not None:
            ds = ds.limit(cfg.limit)
        ds = ds.map_batches(
            SelectorActor, fn_constructor_kwargs={"selector": sel, "k": k, "cfg": cfg, "threads": threads},
            batch_size=cfg.batch_rows, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers), **res,
        )
        expected = _input_ids(items, text.id_col, cfg.limit)
        check_ids = IdCheck(items, text.id_col)
        row = 0
        with AtomicParquetWriter(out, schema, meta, row_group_rows=cfg.row_group_rows) as writer:
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
                summary.add(n_tokens, table.column("n_kept").to_numpy())
                summary.computed += int((n_tokens > k).sum())
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


__all__ = ["compress_file_ray", "check_ray", "SelectorActor"]
