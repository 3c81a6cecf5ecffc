"""Downstream recommenders for stage 3: one file each, registered by name (registry.py).

Adding one: a new file with a `Recommender` subclass decorated with `@register`, and its import here.
"""

from tokensel.config import ITEM_TUNINGS, POOLINGS, TrainConfig
from tokensel.evaluate.recommenders.base import Recommender, SeedRun, history_means, mean_pool_tokens
from tokensel.evaluate.recommenders.registry import REGISTRY, make_recommender, names, register

from tokensel.evaluate.recommenders.hllm import HLLM  # noqa: E402
from tokensel.evaluate.recommenders.sasrec_init import SASRecInit  # noqa: E402
from tokensel.evaluate.recommenders.text_sim import TextSim  # noqa: E402

RECOMMENDERS = names()  # the built-in ones (REGISTRY also holds any registered later)

__all__ = [
    "HLLM", "ITEM_TUNINGS", "POOLINGS", "REGISTRY", "RECOMMENDERS", "Recommender", "SASRecInit", "SeedRun", "TextSim",
    "TrainConfig", "history_means", "make_recommender", "mean_pool_tokens", "names", "register",
]
