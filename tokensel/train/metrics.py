"""Full-ranking Recall@K and NDCG@K per user (leave-one-out, one target per user), in percent."""

from __future__ import annotations

import torch

from tokensel.models.user_model import padded_index

KS = (5, 10, 50)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: list[list[int]] | None = None) -> torch.Tensor:
    """0-based rank of each target among all items; items in `exclude` (the history) are masked out.

    Ties count against the target (pessimistic), so a constant scorer gets no credit. Masking is done
    by counting, not by writing: the items at or above the target's score, less the distinct history
    items (other than the target) among them. The [users, items] scores are read once and never copied,
    which matters because this runs over every user and every item after each epoch."""
    tgt = scores.gather(1, targets[:, None]).float()
    at_or_above = (scores >= tgt).sum(1) - 1
    if not exclude:
        return at_or_above
    hist = [sorted(set(items) - {int(t)}) for items, t in zip(exclude, targets.tolist())]
    width = max(map(len, hist), default=0)
    if width == 0:
        return at_or_above
    idx, valid = padded_index(hist, width)
    idx, valid = idx.to(scores.device), valid.to(scores.device)
    masked = ((scores.gather(1, idx) >= tgt) & valid).sum(1)
    return at_or_above - masked


def target_ranks_reference(scores: torch.Tensor, targets: torch.Tensor, exclude: list[list[int]] | None = None) -> torch.Tensor:
    """The same ranks by writing -inf over a copy of the scores: slow and plain, what the tests hold
    `target_ranks` to."""
    scores = scores.float().clone()
    if exclude is not None:
        for r, items in enumerate(exclude):
            hist = [i for i in items if i != int(targets[r])]
            if hist:
                scores[r, hist] = -torch.inf
    tgt = scores.gather(1, targets[:, None])
    return (scores >= tgt).sum(1) - 1


def per_user_metrics(ranks: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, torch.Tensor]:
    """{'R@K': [U], 'N@K': [U]} in percent, for one target per user."""
    out = {}
    r = ranks.float()
    for k in ks:
        hit = (r < k).float()
        out[f"R@{k}"] = 100 * hit
        out[f"N@{k}"] = 100 * hit / torch.log2(r + 2)
    return out


def rank_users(user_emb: torch.Tensor, item_emb: torch.Tensor, targets: list[int], histories: list[list[int]], batch: int = 1024) -> torch.Tensor:
    """Ranks of the targets under dot-product scores, history masked, in user batches."""
    ranks = []
    for s in range(0, len(targets), batch):
        sc = user_emb[s : s + batch] @ item_emb.T
        t = torch.tensor(targets[s : s + batch], device=sc.device)
        ranks.append(target_ranks(sc, t, histories[s : s + batch]).cpu())
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
