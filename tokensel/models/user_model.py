"""The user model g: a causal transformer over a history of item embeddings (HLLM's user LLM).

At CPU size it is a few pre-LN transformer blocks with learned positions; `kind="pretrained"` wraps
any transformers decoder fed through `inputs_embeds` (the GPU setting of HLLM).
"""

from __future__ import annotations

import torch
from torch import nn

from tokensel.config import UserModelConfig


class UserModel(nn.Module):
    def __init__(self, dim: int, cfg: UserModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        if cfg.kind == "pretrained":
            from transformers import AutoConfig, AutoModel

            if cfg.pretrained is None:
                raise ValueError("user model kind 'pretrained' needs cfg.pretrained (a hub id or folder)")
            self.backbone = AutoModel.from_pretrained(cfg.pretrained)
            inner = AutoConfig.from_pretrained(cfg.pretrained).hidden_size
            self.proj_in = nn.Linear(dim, inner)
            self.proj_out = nn.Linear(inner, dim)
        else:
            self.pos = nn.Embedding(cfg.max_history + 1, dim)
            layer = nn.TransformerEncoderLayer(
                dim, cfg.heads, 4 * dim, cfg.dropout, batch_first=True, norm_first=True, activation="gelu"
            )
            self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """items [B, S, d] left-aligned, mask [B, S] bool -> the user state after each position [B, S, d]."""
        S = items.shape[1]
        if self.cfg.kind == "pretrained":
            out = self.backbone(inputs_embeds=self.proj_in(items), attention_mask=mask.long()).last_hidden_state
            return self.proj_out(out)
        x = items + self.pos(torch.arange(S, device=items.device))[None]
        causal = torch.triu(torch.ones(S, S, dtype=torch.bool, device=items.device), 1)
        x = self.blocks(x, mask=causal, src_key_padding_mask=~mask, is_causal=True)
        return self.norm(x)

    def user_embedding(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The state at the last real item of each history: the user embedding e_u [B, d]."""
        out = self.forward(items, mask)
        last = mask.long().sum(1).clamp(min=1) - 1
        return out[torch.arange(out.shape[0], device=out.device), last]


def padded_index(lists: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(lists), width] the last `width` entries of each list, left-aligned and zero-padded, and the
    mask of the real entries: how variable-length histories become one batch."""
    idx = torch.zeros(len(lists), width, dtype=torch.long)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for r, h in enumerate(lists):
        h = h[-width:] if width else []
        idx[r, : len(h)] = torch.tensor(h, dtype=torch.long)
        mask[r, : len(h)] = True
    return idx, mask


def pad_histories(histories: list[list[int]], table: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the last `max_len` items of each history from an embedding table, left-aligned."""
    idx, mask = padded_index(histories, max_len)
    idx, mask = idx.to(table.device), mask.to(table.device)
    return table[idx], mask
