"""Pieces both stages share: embedding the catalogue with f, and the InfoNCE scores (paper eq. 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tokensel.models.batching import length_buckets
from tokensel.models.item_llm import ItemLLM


@dataclass
class Catalogue:
    """Full-text states of every item from frozen f: the [ITEM] embeddings and the token states."""

    tokens: list[list[int]]
    item: torch.Tensor  # [N, d] float32
    hidden: list[torch.Tensor] | None  # per item [n_i, d] (fp16 on CPU), for the policy head


@torch.inference_mode()
def embed_tokens(llm: ItemLLM, token_lists: list[list[int]], keep_hidden: bool = False, batch_tokens: int = 16384, max_batch: int = 128, desc: str | None = None) -> tuple[torch.Tensor, list | None]:
    """[ITEM] states (and optionally the text-token states) for many token lists, length-bucketed."""
    item = torch.zeros(len(token_lists), llm.hidden_size)
    hidden: list | None = [None] * len(token_lists) if keep_hidden else None
    groups = length_buckets([len(t) for t in token_lists], max_batch, batch_tokens)
    bar = tqdm(total=len(token_lists), desc=desc, unit="item", disable=None if desc else True, leave=False)  # a terminal only
    for group in groups:
        enc = llm.encode([token_lists[i] for i in group], need_hidden=keep_hidden)
        item[group] = enc.item.float().cpu()
        if keep_hidden:
            h = enc.hidden.to(torch.float16).cpu()
            for j, i in enumerate(group):
                hidden[i] = h[j, : len(token_lists[i])].clone()
        bar.update(len(group))
    bar.close()
    return item, hidden


def infonce_logits(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, temperature: float, pos_ids: torch.Tensor | None = None, neg_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 1 + N] scaled cosine scores: the positive first, then N shared negatives.

    A negative that is the positive itself is masked out, so it is never pushed away from itself.
    """
    u = F.normalize(user.float(), dim=-1)
    p = F.normalize(pos.float(), dim=-1)
    n = F.normalize(neg.float(), dim=-1)
    pos_s = (u * p).sum(-1, keepdim=True)
    neg_s = u @ n.T
    if pos_ids is not None and neg_ids is not None:
        neg_s = neg_s.masked_fill(pos_ids[..., None] == neg_ids, -torch.inf)
    return torch.cat([pos_s, neg_s], -1) / temperature


def infonce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive at index 0 (paper eq. 2), per row."""
    return -torch.log_softmax(logits, -1)[..., 0]


def draw_negatives(hist, n_items: int, n: int, device: torch.device | str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n] sampled negatives, uniform over the items training may see: all of them (leave-one-out: the
    very draw training always made, so seeded runs are unchanged), or `hist.negatives` (the cold
    protocol's warm items, tokensel.io.cold)."""
    if hist.negatives is None:
        return torch.randint(0, n_items, (n,), device=device, generator=generator)
    pool = torch.as_tensor(hist.negatives, dtype=torch.long)  # no copy for an int64 array: a step costs O(n), not O(items)
    return pool[torch.randint(0, len(pool), (n,), generator=generator)].to(device)


def stage2_users(hist, cfg, rng) -> tuple[list[tuple[list[int], int]], list[list[int]], list[int]]:
    """Stage 2's (history, next item) training pairs (at most cfg.max_users, sampled with `rng`) and its
    validation histories and targets (at most cfg.valid_users): the same draws for every objective."""
    train_h, train_t = hist.split("train")
    pairs = [(h[-cfg.history :], t) for h, t in zip(train_h, train_t) if h]
    if cfg.max_users:
        rng.shuffle(pairs)
        pairs = pairs[: cfg.max_users]
    v_h, v_t = hist.split("valid")
    v_idx = list(range(len(v_t)))
    rng.shuffle(v_idx)
    v_idx = v_idx[: cfg.valid_users] if cfg.valid_users else v_idx
    return pairs, [v_h[i][-cfg.history :] for i in v_idx], [v_t[i] for i in v_idx]
