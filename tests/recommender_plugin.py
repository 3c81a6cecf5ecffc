"""A recommender added the way the registry intends (one file, `@register`): it ranks every item by
popularity in the training sequences, the same for every user. Used by test_evaluate to show that a
new recommender needs no edit to tokensel."""

from __future__ import annotations

import time

import torch

from tokensel.evaluate.recommenders import Recommender, SeedRun, register
from tokensel.train.metrics import per_user_metrics, rank_users


@register
class Popularity(Recommender):
    name = "test-popularity"
    deterministic = True

    def run(self, vectors, hist, seed):
        t0 = time.perf_counter()
        counts = torch.zeros(vectors.shape[0])
        for s in hist.train_sequences():
            for i in s:
                counts[i] += 1
        valid = {}
        for part in ("valid", "test"):
            h, tgt = hist.split(part)
            # a 1-d "embedding" per item scored against a constant user: the rank follows the count
            ranks = rank_users(torch.ones(len(tgt), 1), counts[:, None], tgt, h)
            if part == "valid":
                valid = {k: float(v.mean()) for k, v in per_user_metrics(ranks).items()}
        return SeedRun(seed, ranks, 0, valid, time.perf_counter() - t0)
