"""The policy head (paper eqs. 5-7): info(t_i) = <W_Q h_i, W_K h_[ITEM]> / sqrt(d), p = softmax over candidates."""

from __future__ import annotations

import math

import torch
from torch import nn


class PolicyHead(nn.Module):
    """theta = {W_Q, W_K}, both d x d. Initialised to the identity: before training, tokens whose
    states align with the item embedding score highest, a reasonable prior rather than noise."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.w_q.weight.copy_(torch.eye(dim))
            self.w_k.weight.copy_(torch.eye(dim))

    def info(self, hidden: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """[B, L, d], [B, d] -> [B, L] token informativeness."""
        q = self.w_q(hidden.to(self.w_q.weight.dtype))
        key = self.w_k(item.to(self.w_k.weight.dtype))
        return (q * key[:, None]).sum(-1) / math.sqrt(self.dim)

    def log_probs(self, hidden: torch.Tensor, item: torch.Tensor, n_tokens: torch.Tensor, prefix: int) -> torch.Tensor:
        """[B, L] log p_i over each item's candidate tokens (positions prefix..n-1); 0 elsewhere."""
        return candidate_log_probs(self.info(hidden, item).float(), n_tokens, prefix)


def candidate_log_probs(info: torch.Tensor, n_tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """[B, L] token informativeness -> log p_i over each item's candidates (positions prefix..n-1); 0 elsewhere.

    Separate from the head so that compress can cache `info` (which depends on neither the budget nor
    the prefix) and normalise it for any prefix later, with the same arithmetic as here.
    """
    pos = torch.arange(info.shape[1], device=info.device)[None]
    cand = (pos >= prefix) & (pos < n_tokens[:, None])
    logp = torch.log_softmax(info.masked_fill(~cand, -math.inf), dim=1)
    return logp.masked_fill(~cand, 0.0)
