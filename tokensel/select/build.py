"""The one place that picks the selector for a spec, and the selection layer's one deferred import.

First-k with a tokenizer read from its files (tokensel.select.plan) is served by `TokenSelector`
(tokensel.select.base: the fast tokenizer and the rule in numpy, no torch); every other strategy by
the model path's `Selector` (tokensel.select.selector), which needs torch for its rule and, for a
forward strategy, the item LLM (loaded on the first cache miss). The model path is imported only when
it is picked, so that `tokensel compress` with first-k, what `--strategy auto` runs with the shipped
bundle, never imports torch. Nothing the model path imports imports this module.
"""

from __future__ import annotations

from tokensel.config import TextConfig
from tokensel.select.base import TokenSelector
from tokensel.select.batching import BatchConfig
from tokensel.select.plan import FIRST_K, SelectorSpec, plan_selector


def build_selector(spec: SelectorSpec, text: TextConfig | None = None, batch: BatchConfig | None = None) -> TokenSelector:
    """A TokenSelector, or a Selector (a subclass) where the strategy needs torch or transformers."""
    plan = plan_selector(spec)
    if plan.name == FIRST_K and plan.tokenizer is not None:
        return TokenSelector(plan, text or plan.text or TextConfig(), batch)
    from tokensel.select.selector import Selector  # deferred: torch (see the module docstring)

    return Selector.from_plan(plan, text=text, batch=batch)
