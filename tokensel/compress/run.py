"""`compress` on files: the options a notebook or the CLI passes, turned into a Selector and a
CompressConfig, then the local or the Ray engine. tokensel.api re-exports it.

Nothing here imports torch: first-k runs on the fast tokenizer alone (tokensel.select.build picks
the selector), so the CLI's main job starts in the time it takes to read the items.
"""

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
from tokensel.policy.files import verify_bundle
from tokensel.select.auto import AUTO, auto_choices, catalogue_text, lost_note
from tokensel.select.batching import BatchConfig
from tokensel.select.build import build_selector
from tokensel.select.plan import BUNDLE_STRATEGIES, FIRST_K, SelectorSpec, check_budgets

CHUNK, PREFIX = 8, 16  # the rule's defaults (compress --chunk / --prefix)


def default_prefix(k: int, base: int = PREFIX) -> int:
    """The prefix kept at budget k when none is given: `base`, or half the budget under 2 x base, so that
    a small budget still has chunks to select (tokensel curve measures small budgets by this rule too)."""
    return min(base, k // 2)


def compress(
    items: str | Path,
    out: str | Path | None = None,
    *,
    k: int | Sequence[int] = 64,
    chunk: int | None = None,
    prefix: int | None = None,
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
    first-k (tokensel.select.auto); the summaries' `notes` say which verdict it followed. Budgets whose
    verdicts differ are compressed as one run per strategy.

    k: one budget, or several (one file each, from one model pass; a list of summaries is returned).
    chunk, prefix: the selection rule's (default 8, and 16 or k // 2 where that is smaller; budgets with
    different defaults are compressed as one run each). First-k keeps the first k tokens whatever they
    are: given to it, they are recorded and named in the summaries' `warnings`.
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
    if policy is not None and strategy not in (AUTO, *BUNDLE_STRATEGIES):
        verify_bundle(policy)  # named: checked whatever the strategy (auto and the bundle strategies check it as they read it)
    ks_all = (k,) if isinstance(k, int) else tuple(k)
    text_options = dict(id_col=id_col, text_cols=text_cols, max_len=max_len, template=template, labels=labels)
    choices = None
    if strategy == AUTO:
        text = catalogue_text(policy, **text_options)
        choices = auto_choices(policy, model, items, ks_all, text)
        text_options = dict(id_col=text.id_col, text_cols=text.text_cols, max_len=text.max_len, template=text.template, labels=text.labels)
    # what each budget runs: its strategy and model (auto decides per budget) and, without --prefix, its default prefix
    runs = {}
    for kk in ks_all:
        name, mdl = choices[kk][:2] if choices else (strategy, model)
        runs[kk] = (name, mdl, prefix if prefix is not None or name == FIRST_K else default_prefix(kk))
    groups = {run: [kk for kk in ks_all if runs[kk] == run] for run in dict.fromkeys(runs.values())}
    if len(groups) > 1:  # budgets that run differently: one run per group, each one model pass
        output_paths(Path(items), out, ks_all, strategy)  # several budgets need {k} in an explicit name
        options = dict(
            out=out, chunk=chunk, policy=policy, **text_options, passthrough=passthrough, seed=seed, batch_rows=batch_rows,
            batch_tokens=batch_tokens, limit=limit, device=device, dtype=dtype, cache=cache, engine=engine, workers=workers,
            pipeline=pipeline, on_progress=on_progress,
        )
        done: dict[int, CompressSummary] = {}
        for (name, mdl, pre), group in groups.items():
            for s in compress(items, k=group, strategy=name, model=mdl, prefix=pre, **options):
                if choices:  # auto's own line says what it followed; a strategy's "lost" note is moot
                    s.notes = [choices[s.k][3], *[n for n in s.notes if not n.startswith("note:")]]
                done[s.k] = s
        return [done[kk] for kk in ks_all]
    if choices:
        strategy, model, auto_text, why = choices[ks_all[0]]
        notes.append(why)
    elif strategy in BUNDLE_STRATEGIES and (note := lost_note(strategy, policy)):
        notes.append(note)
    given = {"--prefix": prefix, "--chunk": chunk, "--device": None if device == "auto" else device, "--dtype": None if dtype == "auto" else dtype}
    cfg = CompressConfig(
        ks=ks_all, chunk=CHUNK if chunk is None else chunk, prefix=default_prefix(min(ks_all)) if prefix is None else prefix, passthrough=tuple(passthrough), limit=limit,
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
    sel = build_selector(spec, text=auto_text)
    sel = sel.with_text(id_col=id_col, text_cols=text_cols, max_len=max_len, template=template, labels=labels)
    sel.batch = BatchConfig.for_device(sel.device_type, batch_tokens=batch_tokens)
    check_budgets(cfg.ks, cfg.chunk, cfg.prefix, sel.text.max_len, strategy)
    if strategy == "policy" and sel.name == FIRST_K:
        notes.append("policy: this bundle's stage 2 kept the first tokens (no head it trained beat first-k on its validation), so the output is first-k")
    warnings = []
    ignored = [f"{opt} {v}" for opt, v in given.items() if v is not None and (opt in ("--device", "--dtype") or sel.name == FIRST_K)]
    if ignored and not sel.needs_forward:
        does = "keeps each item's first k tokens and runs no model" if sel.name == FIRST_K else "runs no model"
        warnings.append(f"warning: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored: {sel.name} {does}")
    if batch_rows is None and sel.needs_forward and sel.device_type == "cuda":
        cfg = replace(cfg, batch_rows=16384)  # larger windows fill a GPU's larger batches
    if engine == "ray":
        summaries = [compress_file_ray(items, outs[cfg.ks[0]], sel, cfg, workers=workers, on_progress=on_progress)]
    else:
        first = outs[cfg.ks[0]]
        cache_path = (first.with_name(f"{items.stem}.cache.sqlite") if cache is True else Path(cache)) if cache else None
        summaries = compress_file(items, outs, sel, cfg, on_progress=on_progress, cache=cache_path)
    for summary in summaries:
        summary.notes, summary.warnings = notes, warnings
    return summaries[0] if isinstance(k, int) else summaries
