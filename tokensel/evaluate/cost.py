"""What a budget costs downstream: the item LLM's forward time per item on each set of token lists.

One implementation for `tokensel curve` and bench/cost. The inputs are timed in alternation, each
`repeats` times, and each one's best time counts, so a machine that slows down mid-run hurts them
alike; compare the ratios measured within one call, not absolute numbers across calls. Every input is
encoded in catalogue order, `batch` items per forward pass, padded to the batch's longest, with the
recommender's `[ITEM]` token appended (ItemLLM.encode): what a recommender pays per catalogue epoch.
"""

from __future__ import annotations

import time

import torch

from tokensel.models.item_llm import ItemLLM


def encode_seconds(llm: ItemLLM, token_lists: list[list[int]], batch: int) -> float:
    """Wall time of the forward passes over all items, `batch` items per pass."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(token_lists), batch):
            llm.encode(token_lists[i : i + batch], need_hidden=False)
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    return time.perf_counter() - t0


def best_seconds(llm: ItemLLM, inputs: dict[str, list[list[int]]], batch: int = 32, repeats: int = 2) -> dict[str, float]:
    """name -> the best of `repeats` encode_seconds, the inputs timed in alternation."""
    best = {name: float("inf") for name in inputs}
    for _ in range(max(repeats, 1)):
        for name, toks in inputs.items():
            best[name] = min(best[name], encode_seconds(llm, toks, batch))
    return best
