"""The Python API the CLI wraps, callable from a notebook:

    from tokensel import api
    api.compress("items.parquet", "out.parquet", k=64, chunk=8)
    api.compress("items.parquet", "items.k{k}.parquet", k=[32, 64, 128])   # one model pass, three files
    api.train("items.parquet", "interactions.parquet", "my_bundle")   # ends with the strategy check
    api.check("my_bundle", "items.parquet", "interactions.parquet")   # re-run it (e.g. on other data)
    api.curve("items.parquet", "interactions.parquet", ks=[16, 32, 64, 128])   # quality and cost per budget

In memory (lists of strings, DataFrames, datasets) use `tokensel.Selector`: `compress` is the file job
around it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tokensel.compress.run import compress
from tokensel.errors import TokenselError
from tokensel.config import CHECK_SEEDS
from tokensel.evaluate.check import strategy_check as check
from tokensel.evaluate.curve import curve
from tokensel.io.interactions import COLUMNS
from tokensel.policy.bundle import DEFAULT_BUNDLE, Bundle
from tokensel.select.selector import Selector
from tokensel.train import pipeline

__all__ = ["compress", "train", "check", "curve", "Selector", "DEFAULT_BUNDLE"]


def train(
    items: str | Path, interactions: str | Path, out: str | Path, *, check_strategies: bool = True,
    check_epochs: int | None = None, check_seeds: int = CHECK_SEEDS, log: Callable[[dict], None] = print, **kwargs,
) -> Bundle:
    """`tokensel.train.pipeline.train`, then (when stage 2 ran and check_strategies) the downstream
    strategy check (tokensel.evaluate.check) on the same data, saved in the bundle: which strategy to
    trust, and what `compress --strategy auto` runs (check_seeds training runs per strategy: with 2 or
    more its test sees seed variance). Under `protocol="cold"` the check is made under it too."""
    if check_strategies and check_seeds < 1:  # before hours of training, not after
        raise TokenselError(f"check seeds must be at least 1 (got {check_seeds}); {CHECK_SEEDS} let the check's test see seed variance")
    bundle = pipeline.train(items, interactions, out, log=log, **kwargs)
    if check_strategies and bundle.policy is not None:  # stage 2 ran
        extra = {"epochs": check_epochs} if check_epochs else {}
        try:
            protocol = {k: kwargs[k] for k in ("protocol", "cold_share") if k in kwargs}
            check(bundle.path, items, interactions, seeds=check_seeds, columns=kwargs.get("columns", COLUMNS), device=kwargs.get("device", "auto"), log=log, cache=kwargs.get("cache"), **protocol, **extra)
        except TokenselError as exc:  # the bundle is written and sound; only the verdict is missing
            log({"strategy check": f"not run: {exc}; run tokensel check when fixed (auto keeps first-k until then)"})
    return bundle
