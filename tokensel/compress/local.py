"""Compress a catalogue in this process: stream items, score each once, write one file per budget.

The cost floor is one forward pass of the item LLM over every item with more than the smallest k
tokens; everything else is kept off the hot path:

- Items are read in windows of `batch_rows` rows and tokenised in one call to the fast tokenizer.
- Items with n <= k pass through without a forward pass.
- The model path is the Selector's (tokensel.select.selector): forward batches whose widths depend on
  the item alone, token scores, then the selection rule for every budget from the same scores. The
  model is loaded on the first item the cache does not have; first-k never loads it (nor torch).
- The score cache (tokensel.compress.cache) sits between scoring and selecting: items scored before
  (by an interrupted run, a run at another budget, prefix or chunk, or an older catalogue) are not
  scored again, and every forward batch is committed as soon as it is scored.
- Optionally reading/tokenising and writing run in background threads (tokensel.compress.threads),
  with bounded queues, overlapping the forward pass.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokensel.compress.cache import ScoreCache, item_key
from tokensel.compress.job import CompressSummary, compress_meta, field_names, output_table, preflight, scorer_config
from tokensel.compress.threads import BackgroundWriter, prefetch
from tokensel.compress.trim import release_free_memory
from tokensel.config import CompressConfig
from tokensel.io.items import ItemBatch, iter_item_batches
from tokensel.io.parquet_out import AtomicParquetWriter
from tokensel.select.base import TokenSelector
from tokensel.select.keep import kept_counts, lengths_of


@dataclass
class Window:
    batch: ItemBatch
    toks: list[list[int]]
    lengths: np.ndarray


@dataclass
class RunCounters:
    computed: int = 0  # items the model scored in this run
    reused: int = 0  # ... whose scores came from the cache
    forward_batches: int = 0  # forward passes run (0: the model never ran)


def auto_pipeline(sel: TokenSelector) -> bool:
    """Threads pay when there are spare cores (or a GPU does the forward pass); on 2 cores they contend."""
    return sel.needs_forward and (sel.device_type == "cuda" or (os.cpu_count() or 1) > 2)


def compress_file(
    items: str | Path,
    outs: dict[int, Path],
    sel: TokenSelector,
    cfg: CompressConfig,
    on_progress: Callable[[int], None] | None = None,
    cache: str | Path | None = None,
) -> list[CompressSummary]:
    """Stream `items` through the selector once and write one file per budget (`outs`: k -> path).

    Each file is written atomically (temporary file, then rename). `cache`: a score cache file for
    resumable, incremental runs and for budgets scored before; used only by strategies with a
    forward pass (the others cost less than the lookups).
    """
    items = Path(items)
    ks = sorted(outs)
    t0 = time.perf_counter()
    schema = preflight(items, [Path(outs[k]) for k in ks], sel, cfg)
    text = sel.text
    fields = field_names(sel)
    if sel.needs_fit:
        sel.fit(batches=(sel.tokenize(b.texts) for b in iter_item_batches(items, text, cfg.batch_rows, check_duplicates=False, limit=cfg.limit)))
    summaries = [CompressSummary(out=str(outs[k]), k=k) for k in ks]
    run = RunCounters()
    store = None
    pipeline = auto_pipeline(sel) if cfg.pipeline is None else cfg.pipeline
    tick = (lambda n: n and on_progress(n)) if on_progress else (lambda n: None)  # no empty ticks

    def read() -> Iterator[Window]:
        for batch in iter_item_batches(items, text, cfg.batch_rows, list(cfg.passthrough), limit=cfg.limit):
            toks = sel.tokenize(batch.texts)
            yield Window(batch, toks, lengths_of(toks))

    try:
        with contextlib.ExitStack() as stack:
            writers = [
                stack.enter_context(AtomicParquetWriter(outs[k], schema, compress_meta(sel, cfg, k), row_group_rows=cfg.row_group_rows))
                for k in ks
            ]
            if cache is not None and sel.needs_forward:  # after the outputs: an unwritable folder is named as such
                store = ScoreCache(cache, scorer_config(sel))

            def write(job: tuple[Window, list[np.ndarray]]) -> None:
                w, keeps = job
                for writer, keep in zip(writers, keeps):
                    cols = sel.columns(w.toks, keep, w.batch.texts, w.batch.spans)
                    ids = w.batch.ids if w.batch.id_array is None else w.batch.id_array
                    writer.write(output_table(text.id_col, ids, cols, w.batch.passthrough, schema, fields))

            sink = BackgroundWriter(write, enabled=pipeline)
            windows = prefetch(read(), 2) if pipeline else read()
            try:
                for w in windows:
                    keeps = window_keeps(sel, w, cfg, ks, store, run, tick)
                    sink.submit((w, keeps))
                    for summary, keep in zip(summaries, keeps):
                        summary.add(w.lengths, kept_counts(keep, w.lengths), w.batch.filled)
            except BaseException:
                sink.close(raise_error=False)
                raise
            finally:
                windows.close()
            sink.close()
        if store is not None and cfg.limit is None:
            store.prune()
    finally:
        if store is not None:
            store.close()  # commits what was scored, also when the run failed
    for summary in summaries:
        summary.computed, summary.reused, summary.forward_batches = run.computed, run.reused, run.forward_batches
        summary.cache = str(store.path) if store is not None and store.path.exists() else None
        summary.seconds = time.perf_counter() - t0
    return summaries


def window_keeps(sel: TokenSelector, w: Window, cfg: CompressConfig, ks: list[int], store, run: RunCounters, tick) -> list[np.ndarray]:
    """One flat keep mask per budget for a window: the model scores each item at most once for all of them."""
    ids = w.batch.ids
    if not sel.needs_forward:
        run.computed += int((w.lengths > ks[0]).sum())
        keeps = [sel.keep(w.toks, ids, k, cfg.chunk, cfg.prefix) for k in ks]
        tick(len(w.toks))
        return keeps
    need = np.flatnonzero(w.lengths > ks[0])
    tick(len(w.toks) - len(need))
    scores = window_scores(sel, w, need, store, run, tick)
    return [sel.keep(w.toks, ids, k, cfg.chunk, cfg.prefix, scores) for k in ks]


def window_scores(sel: TokenSelector, w: Window, need: np.ndarray, store, run: RunCounters, tick) -> dict[int, np.ndarray]:
    """Token scores of the items in `need`: from the cache where it has them, else from the model.

    Each forward batch is committed to the cache as soon as it is scored, so a kill loses at most
    the batch in flight."""
    lengths, ids = w.lengths, w.batch.ids
    scores: dict[int, np.ndarray] = {}
    keys: dict[int, bytes] = {}
    if store is not None:
        # every item's entry is looked up, not only those this run needs: the ones kept whole at
        # these budgets are touched too, so pruning keeps what a smaller budget will want
        keys = {int(i): item_key(ids[i], w.batch.texts[i]) for i in np.flatnonzero(lengths > 0)}
        hits = store.get_many(list(keys.values()))
        present = [i for i, key in keys.items() if key in hits and hits[key][0] == lengths[i]]
        store.touch([keys[i] for i in present])
        wanted = set(need.tolist())
        scores = {i: hits[keys[i]][1] for i in present if i in wanted}
        run.reused += len(scores)
        tick(len(scores))

    def scored(idx: list[int], batch: dict[int, np.ndarray]) -> None:
        if store is not None:
            for i in idx:
                store.put(keys[i], batch[i])
            store.commit()
        run.computed += len(idx)
        run.forward_batches += 1
        release_free_memory()  # the batch's activations: memory stays flat however many items are scored (trim.py)
        tick(len(idx))

    miss = [i for i in need.tolist() if i not in scores]
    scores.update(sel.token_scores(w.toks, miss, on_batch=scored))
    if store is not None:
        store.commit()  # the reused entries' marks
    return scores
