"""f's blocks below the last with a keep gate in every attention: a forward over the kept tokens only,
differentiable in the gate.

The end-to-end stage 2 needs the item vector a recommender will see downstream (f over the kept
tokens alone) and its gradient with respect to which tokens were kept. Masking only the last block's
`[ITEM]` query (`ItemReadout` with weights) is cheap, but the lower blocks have already mixed the
dropped text into every kept position, so that vector hardly moves when tokens are dropped. Here every
block's attention multiplies each key's softmax weight by its gate and renormalises, and the kept
tokens are renumbered 0, 1, 2, ... as they would be in the compressed text. With a 0/1 gate the kept
positions' states are then exactly those of a forward over the kept tokens (checked in the tests),
while a dropped key's gate still has a gradient: d(out)/d(gate_j) is its renormalised weight times
(v_j - out). The cost is a full forward and backward through f per item per step: a GPU job.

Supported: BERT-style post-LayerNorm encoders with absolute positions (as `ItemReadout`); the blocks
here stay frozen, the last block is the trainable `ItemReadout`.
"""

from __future__ import annotations

import torch
from torch import nn

from tokensel.errors import TokenselError
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import ItemReadout, last_block


def lower_blocks(llm: ItemLLM) -> tuple[nn.Module, list[nn.Module]]:
    """f's embeddings and its blocks below the last, if f is BERT-style with position embeddings."""
    emb = getattr(llm.model, "embeddings", None)
    layers = getattr(getattr(llm.model, "encoder", None), "layer", None)
    if emb is None or layers is None or not hasattr(emb, "position_embeddings"):
        raise TokenselError(
            f"--mask-layers all needs a BERT-style encoder with absolute positions; model {llm.name!r} "
            f"({llm.model.config.model_type}) is not one: use --mask-layers top"
        )
    last_block(llm)  # the same block layout check as the readout
    return emb, list(layers[:-1])


def kept_positions(mask: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """[B, W] position ids that number the kept columns 0, 1, 2, ... (a dropped column repeats the last)."""
    kept = (mask.bool() & (gate > 0.5)).long()
    return (kept.cumsum(1) - 1).clamp(min=0)


def _gated_block(block: nn.Module, x: torch.Tensor, key_mask: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """One BERT block over all positions; each key's attention weight is multiplied by its gate."""
    att = block.attention.self
    B, W, _ = x.shape
    H, dh = att.num_attention_heads, att.attention_head_size

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, W, H, dh).transpose(1, 2)

    q, k, v = split(att.query(x)), split(att.key(x)), split(att.value(x))
    scores = (q.float() @ k.float().transpose(-1, -2)) * dh**-0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], -torch.inf)
    probs = scores.softmax(-1) * gate[:, None, None, :].float()
    probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)
    ctx = (att.dropout(probs).to(v.dtype) @ v).transpose(1, 2).reshape(B, W, H * dh)
    y = block.attention.output(ctx, x)
    return block.output(block.intermediate(y), y)


def kept_vectors(llm: ItemLLM, readout: ItemReadout, token_lists: list[list[int]], gate: torch.Tensor) -> torch.Tensor:
    """[B, d] `[ITEM]` states of these items when only their gated text tokens are kept.

    `gate` [B, L] over the text tokens (L >= the longest item; 1 keeps, 0 drops; values in between
    weigh the key). The lead tokens and `[ITEM]` are always kept. f's lower blocks run gated with the
    kept tokens renumbered, then `readout` (f's last block, trainable) reads `[ITEM]` with the same gate:
    with a 0/1 gate this is exactly f's `[ITEM]` state over the kept text, and gradients reach the gate
    through every block."""
    emb, blocks = lower_blocks(llm)
    dev = next(readout.parameters()).device
    ids, mask, off = llm.build_inputs(token_lists)
    B, W = ids.shape
    n = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=dev)
    L = W - off - 1
    if gate.shape[1] < L:
        raise ValueError(f"the gate covers {gate.shape[1]} tokens, the longest item has {L}")
    text = gate[:, :L].to(dev)
    inside = torch.arange(L, device=dev)[None] < n[:, None]
    text = torch.where(inside, text, torch.ones_like(text))
    ends = torch.ones(B, off, dtype=text.dtype, device=dev), torch.ones(B, 1, dtype=text.dtype, device=dev)
    full = torch.cat([ends[0], text, ends[1]], 1)  # [B, W]: lead, text, [ITEM]
    ids, mask = ids.to(dev), mask.to(dev).bool()
    x = emb(input_ids=ids, position_ids=kept_positions(mask, full.detach()), token_type_ids=torch.zeros_like(ids))
    for block in blocks:
        x = _gated_block(block, x, mask, full)
    return readout(x.float(), mask, off + n, full)
