"""`compress` on files: the options a notebook or the CLI passes, turned into a Selector and a
CompressConfig, then the local or the Ray engine. tokensel.api re-exports it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from tokensel.compress.job import CompressSummary, output_paths
from tokensel.compress.local import compress_file
from tokensel.compress.ray import check_ray, compress_file_ray
from tokensel.config import CompressConfig
from tokensel.errors import TokenselError
from tokensel.io.readers import open_items
from tokensel.select.auto import AUTO, auto_choice, catalogue_text, lost_note
from tokensel.select.batching import BatchConfig
from tokensel.select.strategies import BUNDLE_STRATEGIES
from tokensel.select.selector import Selector, SelectorSpec, check_budgets


def compress(
    items: str | Path,
    out: str | Path | None = None,
    *,
    k: int | Sequence[int] = 64,
    chunk: int = 8,
    prefix: int = 16,
    strategy: str = "auto",
    policy: str | Path | None = None,
    model: str | None = None,
    id_col: str | None = None,
    text_cols: list[str] | None = None,
    max_len: int | None = None,
    template: str | None = None,
    labels: bool | None = None,
    passthrough: Sequence[str] = (),
    seed: int = 0,
    batch_rows: int | None = None,
    batch_tokens: int | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    cache: str | Path | bool | None = True,
    engine: str = "local",
    workers: int = 2,
    pipeline: bool | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> CompressSummary | list[CompressSummary]:
    """Compress an items file; text settings default to the bundle's (for `policy`) or TextConfig().

    strategy "auto": the strategy the verdict recorded for this catalogue chose (a curve or check run on
    these item texts), else the bundle's downstream check if it was made on this catalogue, else
    first-k (tokensel.select.auto); the summaries' `notes` say which verdict it followed. Several
    budgets whose verdicts differ are compressed as one run per strategy.

    k: one budget, or several (one file each, from one model pass; a list of summaries is returned).
    out: the output file; with several budgets it must contain `{k}`. Default: beside the items file,
    `<items>.k<k>-<strategy>.parquet`.
    cache: the score cache that makes runs resumable, incremental and free for a new budget
    (tokensel.compress.cache). True (the default) uses `<items>.cache.sqlite` in the output's folder; a
    path uses that file; False/None disables it. Only strategies with a forward pass use it.
    engine: "local" (this process) or "ray" (Ray Data with `workers` model actors; pip install tokensel[ray]).
    batch_rows / batch_tokens: rows per window and padded tokens per forward pass (defaults scale
    with the device: larger on CUDA). The selection does not depend on them.
    """
    notes: list[str] = []
    auto_text = None  # auto -> first-k: the bundle's text settings, under the options given here
    if strategy == AUTO:
        ks = [k] if isinstance(k, int) else list(k)
        text = catalogue_text(policy, id_col=id_col, text_cols=text_cols, max_len=max_len, template=template, labels=labels)
        choices = {kk: auto_choice(policy, model, items, kk, text) for kk in ks}
        if len({c[0] for c in choices.values()}) > 1:  # the verdicts differ between budgets: one run per strategy
            options = dict(
                chunk=chunk, prefix=prefix, policy=policy, id_col=text.id_col, text_cols=text.text_cols, max_len=text.max_len,
                template=text.template, labels=text.labels, passthrough=passthrough, seed=seed, batch_rows=batch_rows, batch_tokens=batch_tokens, limit=limit,
                device=device, dtype=dtype, cache=cache, engine=engine, workers=workers, pipeline=pipeline, on_progress=on_progress,
            )
            done: dict[int, CompressSummary] = {}
            for name in dict.fromkeys(c[0] for c in choices.values()):
                group = [kk for kk in ks if choices[kk][0] == name]
                outs = output_paths(Path(items), out, tuple(ks), name)
                for kk in group:
                    s = compress(items, outs[kk], k=kk, strategy=name, model=choices[kk][1], **options)
                    s.notes = [choices[kk][3], *[n for n in s.notes if not n.startswith("note:")]]
                    done[kk] = s
            return [done[kk] for kk in ks]
        strategy, model, auto_text, why = choices[ks[0]]
        notes.append(why)
    elif strategy in BUNDLE_STRATEGIES and (note := lost_note(strategy, policy)):
        notes.append(note)
    cfg = CompressConfig(
        ks=(k,) if isinstance(k, int) else tuple(k), chunk=chunk, prefix=prefix, passthrough=tuple(passthrough), limit=limit,
        pipeline=pipeline, **({"batch_rows": batch_rows} if batch_rows else {}),
    )
    spec = SelectorSpec(strategy, None if policy is None else str(policy), model, seed, device, dtype)  # refuses an unknown strategy
    if engine not in ("local", "ray"):
        raise TokenselError(f"unknown engine {engine!r}; choose local or ray")
    items = Path(items)
    open_items(items)  # fail on a missing or unreadable file before loading any model
    if engine == "ray":
        check_ray()  # before loading the model: say how to install the extra
        if len(cfg.ks) > 1:
            raise TokenselError("--engine ray compresses one budget per run; give one --k, or use the local engine")
    outs = output_paths(items, out, cfg.ks, strategy)
    sel = Selector.from_spec(spec, text=auto_text)
    sel = sel.with_text(id_col=id_col, text_cols=text_cols, max_len=max_len, template=template, labels=labels)
    sel.batch = BatchConfig.for_device(sel.llm.device, batch_tokens=batch_tokens)
    check_budgets(cfg.ks, cfg.chunk, cfg.prefix, sel.text.max_len, strategy)
    if strategy == "policy" and sel.name == "first-k":
        notes.append("policy: this bundle's stage 2 kept the first tokens (no head it trained beat first-k on its validation), so the output is first-k")
    if batch_rows is None and sel.llm.device.type == "cuda":
        cfg = replace(cfg, batch_rows=16384)  # larger windows fill a GPU's larger batches
    if engine == "ray":
        summaries = [compress_file_ray(items, outs[cfg.ks[0]], sel, cfg, workers=workers, on_progress=on_progress)]
    else:
        first = outs[cfg.ks[0]]
        cache_path = (first.with_name(f"{items.stem}.cache.sqlite") if cache is True else Path(cache)) if cache else None
        summaries = compress_file(items, outs, sel, cfg, on_progress=on_progress, cache=cache_path)
    for summary in summaries:
        summary.notes = notes
    return summaries[0] if isinstance(k, int) else summaries
