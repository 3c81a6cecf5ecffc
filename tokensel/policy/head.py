"""The policy head (paper eqs. 5-7): info(t_i) = <W_Q h_i, W_K h_[ITEM]> / sqrt(d), p = softmax over candidates."""

from __future__ import annotations

import math

import torch
from torch import nn


class PolicyHead(nn.Module):
    """theta = {W_Q, W_K}, both d x d, plus a learned token position prior. Initialised to the identity
    and a zero prior: before training, tokens whose states align with the item embedding score
    highest (item-align), a reasonable prior rather than noise.

    The position prior is added to every token's score. It exists so that first-k is reachable: a
    content score alone cannot express "keep the chunks right after the prefix", which on some
    catalogues is what the retrained recommender wants. At zero it changes nothing, so heads saved
    before it existed load and select exactly as before.

    `keeps_first_k`: set when stage 2 found that no head it could train beat the first tokens (the
    e2e objective's choice, `train/e2e.py`). The head then selects exactly first-k, which no finite
    position prior can promise for every item length (a short last chunk can outscore a full one
    under summed log p); the flag is saved with the weights so the choice travels with the bundle."""

    def __init__(self, dim: int, max_positions: int = 512):
        super().__init__()
        self.dim = dim
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.pos_prior = nn.Parameter(torch.zeros(max_positions))
        self.reset()

    def reset(self) -> None:
        """Back to the identity and a zero prior (item-align), keeping the first tokens off."""
        with torch.no_grad():
            self.w_q.weight.copy_(torch.eye(self.dim))
            self.w_k.weight.copy_(torch.eye(self.dim))
            self.pos_prior.zero_()
        self.keeps_first_k = False

    def prior(self, length: int) -> torch.Tensor:
        """[length] position prior (zero past the positions it was trained on)."""
        p = self.pos_prior[:length]
        return nn.functional.pad(p, (0, length - p.shape[0])) if p.shape[0] < length else p

    def info(self, hidden: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[B, L, d], [B, d] -> [B, L] token informativeness (position prior included)."""
        q = self.w_q(hidden.to(self.w_q.weight.dtype))
        key = self.w_k(item.to(self.w_k.weight.dtype))
        return (q * key[:, None]).sum(-1) / math.sqrt(self.dim) + self.prior(hidden.shape[1])[None]

    def info_folded(self, hidden: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """`info` computed as h_i . (W_Q^T W_K h_[ITEM]): the same scores (up to rounding) in O(L d)
        instead of O(L d^2) per item, which is what makes scoring every item of a training step cheap."""
        key = self.w_k(item.to(self.w_k.weight.dtype)) @ self.w_q.weight  # [B, d] = (W_Q^T W_K item)^T
        return torch.einsum("bld,bd->bl", hidden.to(key.dtype), key) / math.sqrt(self.dim) + self.prior(hidden.shape[1])[None]

    def log_probs(self, hidden: torch.Tensor, item: torch.Tensor, n_tokens: torch.Tensor, prefix: int, folded: bool = False) -> torch.Tensor:
        """[B, L] log p_i over each item's candidate tokens (positions prefix..n-1); 0 elsewhere."""
        return candidate_log_probs((self.info_folded if folded else self.info)(hidden, item).float(), n_tokens, prefix)


def candidate_log_probs(info: torch.Tensor, n_tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, L] token informativeness -> log p_i over each item's candidates (positions prefix..n-1); 0 elsewhere.

    Separate from the head so that compress can cache `info` (which depends on neither the budget nor
    the prefix) and normalise it for any prefix later, with the same arithmetic as here.
    """
    pos = torch.arange(info.shape[1], device=info.device)[None]
    cand = (pos >= prefix) & (pos < n_tokens[:, None])
    logp = torch.log_softmax(info.masked_fill(~cand, -math.inf), dim=1)
    return logp.masked_fill(~cand, 0.0)
