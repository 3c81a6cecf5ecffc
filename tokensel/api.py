"""The Python API the CLI wraps, callable from a notebook:

    from tokensel import api
    api.compress("items.parquet", "out.parquet", k=64, chunk=8)
    api.train("items.parquet", "interactions.parquet", "my_bundle")
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tokensel.compress import CompressOptions, CompressSummary, compress_file
from tokensel.config import TextConfig
from tokensel.device import pick_device, pick_dtype
from tokensel.errors import TokenselError
from tokensel.io.readers import open_items  # [formats hook]
from tokensel.models.item_llm import DEFAULT_MODEL, ItemLLM
from tokensel.models.bundle import DEFAULT_BUNDLE, Bundle
from tokensel.select.strategies import BUNDLE_STRATEGIES, STRATEGIES, FirstK, ItemAlign, Policy, RandomChunks, Rarity, TopkLogits
from tokensel.train.pipeline import train  # noqa: F401  (re-exported)


def load_selector(
    strategy: str = "policy",
    policy: str | Path | None = None,
    model: str | None = None,
    *,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
):
    """(item LLM, strategy, provenance, bundle text config or None) for a strategy name."""
    if strategy not in STRATEGIES:
        raise TokenselError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if strategy in BUNDLE_STRATEGIES:
        bundle = Bundle.from_pretrained(policy, model=model, device=dev, dtype=dt, need_policy=strategy == "policy")
        prov = {"model": bundle.config.identity.get("name"), "policy": str(bundle.path), "policy_hash": bundle.hash}
        if strategy == "item-align":
            return bundle.item_llm, ItemAlign(bundle.item_llm.hidden_size, dev), prov, bundle.config.text
        return bundle.item_llm, Policy(bundle.policy), prov, bundle.config.text
    name = model or DEFAULT_MODEL
    llm = ItemLLM.from_pretrained(name, lm_head=strategy == "topk-logits", device=dev, dtype=dt)
    sel = {"first-k": lambda: FirstK(), "random": lambda: RandomChunks(seed), "rarity": lambda: Rarity({}, 0), "topk-logits": lambda: TopkLogits()}[strategy]()
    return llm, sel, {"model": name, "policy": None, "policy_hash": None, "seed": seed if strategy == "random" else None}, None


def compress(
    items: str | Path,
    out: str | Path | None = None,
    *,
    k: int = 64,
    chunk: int = 8,
    prefix: int = 16,
    strategy: str = "policy",
    policy: str | Path | None = None,
    model: str | None = None,
    id_col: str | None = None,
    text_cols: list[str] | None = None,
    max_len: int | None = None,
    template: str | None = None,
    labels: bool | None = None,
    passthrough: list[str] = (),
    seed: int = 0,
    batch_rows: int | None = None,
    batch_tokens: int | None = None,
    limit: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
    cache: str | Path | bool | None = True,
    engine: str = "local",
    workers: int = 2,
    pipeline: bool | None = None,
    on_progress=None,
) -> CompressSummary:
    """Compress an items file; text settings default to the bundle's (for `policy`) or TextConfig().

    cache: the selection cache that makes runs resumable and incremental (tokensel.cache). True (the
    default) uses `<out>.cache.sqlite`; a path uses that file; False/None disables it. Only strategies
    with a forward pass (policy, topk-logits) use it.
    engine: "local" (this process) or "ray" (Ray Data with `workers` model actors; pip install tokensel[ray]).
    batch_rows / batch_tokens: rows per window and padded tokens per forward pass (defaults scale
    with the device: larger on CUDA). The selection does not depend on them.
    """
    if k < 1 or chunk < 1 or prefix < 0:
        raise TokenselError(f"need --k >= 1, --chunk >= 1, --prefix >= 0 (got k={k}, chunk={chunk}, prefix={prefix})")
    if engine not in ("local", "ray"):
        raise TokenselError(f"unknown engine {engine!r}; choose local or ray")
    items = Path(items)
    open_items(items)  # [formats hook] fail on a missing or unreadable file before loading any model
    if engine == "ray":
        from tokensel.engines.ray_engine import check_ray

        check_ray()  # before loading the model: say how to install the extra
    llm, sel, prov, bundle_text = load_selector(strategy, policy, model, seed=seed, device=device, dtype=dtype)
    text = bundle_text or TextConfig()
    text = replace(
        text,
        id_col=id_col or text.id_col,
        text_cols=text_cols or text.text_cols,
        max_len=max_len or text.max_len,
        template=text.template if template is None else template,
        labels=text.labels if labels is None else labels,
    )
    llm.set_template(text.template)
    out = Path(out) if out else Path.cwd() / f"{items.stem}.k{k}-{strategy}.parquet"
    opts = CompressOptions.for_device(
        llm.device, k=k, chunk=chunk, prefix=prefix, batch_rows=batch_rows, batch_tokens=batch_tokens,
        passthrough=list(passthrough), limit=limit, pipeline=pipeline,
    )
    cache_path = (out.with_name(out.name + ".cache.sqlite") if cache is True else Path(cache)) if cache else None
    if engine == "ray":
        from tokensel.engines.ray_engine import compress_file_ray

        run = lambda tick: compress_file_ray(  # noqa: E731
            items, out, sel, text, opts, prov, strategy_name=strategy, policy=policy, model=model, seed=seed,
            device=device, dtype=dtype, workers=workers, llm=llm, on_progress=tick,
        )
    else:
        run = lambda tick: compress_file(items, out, llm, sel, text, opts, prov, on_progress=tick, cache=cache_path)  # noqa: E731
    if not progress:
        return run(on_progress)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    total = open_items(items).num_rows  # [formats hook] None for CSV / JSON Lines: an open-ended bar
    total = (min(total, limit) if total is not None else limit) if limit else total
    columns = [TextColumn("compress"), BarColumn(), MofNCompleteColumn(), TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("compress", total=total, rate="")

        def tick(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.1f} items/s" if speed else "")
            if on_progress:
                on_progress(n)

        return run(tick)


__all__ = ["compress", "train", "load_selector", "DEFAULT_BUNDLE"]
