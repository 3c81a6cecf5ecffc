"""text-sim: training-free. Item = mean-pooled last hidden states over the kept tokens (by default
sentence-transformers style: `[CLS] kept tokens [SEP]`, pooled over all of them, unit norm), user =
mean of the last `history` items, cosine scores: the SPEC's reference check. Deterministic: one pass,
whatever the seeds."""

from __future__ import annotations

import time

import torch.nn.functional as F

from tokensel.train.metrics import per_user_metrics, rank_users
from tokensel.evaluate.recommenders.base import Recommender, SeedRun, history_means
from tokensel.evaluate.recommenders.registry import register


@register
class TextSim(Recommender):
    """Training-free: user = mean of the last `history` item vectors (unit-normalised), cosine scores."""

    name = "text-sim"
    deterministic = True

    def run(self, vectors, hist, seed):
        t0 = time.perf_counter()
        table = F.normalize(vectors.float(), dim=-1).to(self.device)
        valid, valid_ranks = {}, None
        for part in ("valid", "test")[: 1 if self.cfg.score == "valid" else 2]:  # a validation check never reads test
            h, tgt = hist.split(part)
            ranks = rank_users(history_means(h, table, self.cfg.history), table, tgt, h)
            if part == "valid":
                valid = {k: float(v.mean()) for k, v in per_user_metrics(ranks).items()}
                valid_ranks = ranks.cpu()
        return SeedRun(seed, ranks, 0, valid, time.perf_counter() - t0, valid_ranks=valid_ranks)
