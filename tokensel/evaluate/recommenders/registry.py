"""The recommenders `tokensel evaluate` knows, by name. A recommender's file registers its class with
`@register`; __init__.py imports each built-in file (one line each)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokensel.config import TrainConfig
from tokensel.errors import TokenselError
from tokensel.evaluate.recommenders.base import Recommender

REGISTRY: dict[str, type[Recommender]] = {}


def register(cls: type[Recommender]) -> type[Recommender]:
    """Make `cls` available under `cls.name` (a class decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    return tuple(sorted(REGISTRY))


def make_recommender(name: str, cfg: TrainConfig | None = None, device: torch.device | str = "cpu", log: Callable[[dict], None] | None = None) -> Recommender:
    if name not in REGISTRY:
        raise TokenselError(f"unknown recommender {name!r}; choose one of {', '.join(names())}")
    cfg = cfg or TrainConfig()
    if cfg.item_tuning != "none" and not REGISTRY[name].tunes_item_llm:
        tuners = " or ".join(n for n in names() if REGISTRY[n].tunes_item_llm)
        raise TokenselError(f"item tuning {cfg.item_tuning!r}: anything but none only with --recommender {tuners}")
    return REGISTRY[name](cfg, device, log)
