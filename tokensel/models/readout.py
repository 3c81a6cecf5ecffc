"""The item LLM's last block as a trainable `[ITEM]` readout over cached lower-layer states.

HLLM trains the whole item LLM; on a CPU that is slow even with LoRA, because every step runs f over
every item it touches. Training only the LAST block is cheap if
the blocks below stay frozen: their output depends only on the item's tokens, so it is computed once
per file (`cache_block_inputs`), and a training step runs the last block for the `[ITEM]` position
alone: keys and values over the item's cached states, then query, attention output and feed-forward
at one position, with the key and value projections folded into the query and the weighted sum (see
`ItemReadout.forward`), so a step's cost barely grows with the text length. The item vector is exactly
f's final state at `[ITEM]` (checked in the tests), yet a step is a small fraction of a LoRA step. It lets the downstream recommender learn how to read the kept
tokens, which a frozen f cannot (the paper fine-tunes f in stages 1 and 3).

Supported: BERT-style post-LayerNorm encoders (`model.encoder.layer`, e.g. the default
all-MiniLM-L6-v2). Other architectures use `item_tuning` lora or full.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tokensel.config import CacheConfig
from tokensel.errors import TokenselError
from tokensel.models.batching import length_buckets
from tokensel.models.item_llm import ItemLLM, resolve_model_path
from tokensel.models.scratch import scratch_states


@dataclass
class BlockInputs:
    """What enters f's last block for every item: states [N, W, d], key mask [N, W], [ITEM] column [N].

    `states` is float32 in RAM or float16 memory-mapped from a scratch file (models/scratch.py): read
    rows with `rows`, which gathers them and returns float32."""

    states: torch.Tensor
    mask: torch.Tensor
    item_pos: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.item_pos + 1  # the key mask is every column up to [ITEM]

    def rows(self, idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [B, width, d] float32, mask [B, width], [ITEM] columns [B]) of the items `idx`."""
        return self.states[idx, :width].float(), self.mask[idx, :width], self.item_pos[idx]


_NEEDED = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output", "intermediate", "output")


def _bert_last_block(model: nn.Module) -> nn.Module | None:
    """The last block of a BERT-style encoder (the layout ItemReadout runs), else None."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    block = layers[-1] if layers is not None and len(layers) else None
    names = {n for n, _ in block.named_modules()} if block is not None else set()
    return block if block is not None and all(n in names for n in _NEEDED) else None


def _not_top_tunable(name: str, model_type: str) -> TokenselError:
    return TokenselError(
        f"item tuning 'top' trains the last block of a BERT-style encoder; model {name!r} "
        f"({model_type}) is not one: use item tuning lora or full"
    )


def last_block(llm: ItemLLM) -> nn.Module:
    """f's last transformer block, if it is one ItemReadout can run (BERT-style), else a clear error."""
    block = _bert_last_block(llm.model)
    if block is None:
        raise _not_top_tunable(llm.name, llm.model.config.model_type)
    return block


def check_top_tunable(name: str) -> None:
    """Refuse item tuning 'top' up front, from the model's config alone: its skeleton is built on the
    meta device (no weights read, no memory), and checked exactly as `last_block` checks the real one.
    A model whose config cannot be read is left to the loader, which reports it."""
    model_type = _untunable_model_type(resolve_model_path(name))
    if model_type is not None:
        raise _not_top_tunable(name, model_type)


@functools.lru_cache(maxsize=16)
def _untunable_model_type(path: str) -> str | None:
    """The model type when the model at `path` has no BERT-style last block, else None. Cached: train
    asks once to pick stage 2's objective and again to validate the settings. Transformers is imported
    here, where a model is built, as in ItemLLM.from_pretrained: selecting from cached scores needs
    this module (through the bundle) but not transformers."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModel.from_config(config)
    except (OSError, ValueError, KeyError):
        return None
    return None if _bert_last_block(skeleton) is not None else config.model_type


def is_top_tunable(name: str) -> bool:
    """`check_top_tunable` as a question: for the choices that follow the model (the strategy check's
    item tuning, stage 2's auto objective) rather than refuse it."""
    try:
        check_top_tunable(name)
    except TokenselError:
        return False
    return True


@torch.inference_mode()
def cache_block_inputs(
    llm: ItemLLM, token_lists: list[list[int]], cache: CacheConfig | None = None, batch_tokens: int = 16384, max_batch: int = 128,
    desc: str | None = "caching the item LLM's lower layers",
) -> BlockInputs:
    """Run the frozen blocks below the last one once over every item, into the store `cache` names
    (models/scratch.py: float16 in a memory-mapped file by default, float32 in RAM with store "ram").
    Each length bucket is padded on its own, so no catalogue-wide padded id matrix is built."""
    last_block(llm)
    cache = cache or CacheConfig()
    off = len(llm.lead_ids) + len(llm.template_ids)
    lens = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
    N, W = len(token_lists), off + (int(lens.max()) if len(lens) else 0) + 1
    states = scratch_states((N, W, llm.hidden_size), cache, "item tuning 'top' caches the item LLM's lower layers")
    dev = llm.device
    llm.model.eval()
    groups = length_buckets(lens.tolist(), max_batch, batch_tokens)
    with tqdm(total=N, desc=desc, unit="item", disable=None if desc else True, leave=False) as bar:
        for group in groups:
            ids, mask, _ = llm.build_inputs([token_lists[i] for i in group])
            out = llm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True)
            h = out.hidden_states[-2].cpu().to(states.dtype)
            if not torch.isfinite(h).all():
                raise TokenselError("the item LLM's lower-layer states exceed half precision's range: use --cache-store ram")
            states[group, : h.shape[1]] = h
            bar.update(len(group))
    mask = torch.arange(W)[None, :] < (off + lens + 1)[:, None]
    return BlockInputs(states, mask, off + lens)


class ItemReadout(nn.Module):
    """A trainable copy of f's last block, evaluated at the `[ITEM]` position only."""

    def __init__(self, llm: ItemLLM):
        super().__init__()
        self.block = copy.deepcopy(last_block(llm)).float()
        for p in self.block.parameters():
            p.requires_grad_(True)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, item_pos: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """[B, W, d] block inputs, [B, W] key mask, [B] [ITEM] columns -> [B, d] final [ITEM] states.

        `weights` [B, W] (optional): a keep mask on the `[ITEM]` query's attention, applied
        multiplicatively and renormalised. With 0/1 weights it is exactly -inf masking of the dropped
        positions, and it still gives every position's weight a gradient (the end-to-end stage 2).

        With one query, attention needs no keys or values per position: q.(Wk h + bk) = (Wk^T q).h + const
        (the constant cancels in the softmax) and sum_w p_w (Wv h_w + bv) = Wv (sum_w p_w h_w) + bv sum_w p_w.
        So the query is moved into state space once per head and the value projection is applied after
        the weighted sum: O(W d H) per item instead of O(W d^2), ~d/H = 32x less for MiniLM, same result.
        """
        att = self.block.attention.self
        B, W, d = states.shape
        heads, dh = att.num_attention_heads, att.attention_head_size
        item = states[torch.arange(B, device=states.device), item_pos]
        q = att.query(item).view(B, heads, dh)
        q_state = torch.einsum("bhe,hed->bhd", q, att.key.weight.view(heads, dh, d))  # [B, H, d]
        scores = torch.einsum("bhd,bwd->bhw", q_state, states) * (dh**-0.5)
        scores = scores.masked_fill(~mask[:, None, :], -torch.inf)
        probs = scores.softmax(-1)
        if weights is not None:
            probs = probs * weights[:, None, :].to(probs.dtype)
            probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
        probs = att.dropout(probs)  # [B, H, W]
        mixed = torch.einsum("bhw,bwd->bhd", probs, states)  # [B, H, d]
        ctx = torch.einsum("bhd,hed->bhe", mixed, att.value.weight.view(heads, dh, d))
        ctx = ctx + probs.sum(-1, keepdim=True) * att.value.bias.view(heads, dh)
        x = self.block.attention.output(ctx.reshape(B, heads * dh), item)
        return self.block.output(self.block.intermediate(x), x)

    def encode(self, cache: BlockInputs, items: list[int] | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """[len(items), d] [ITEM] states of these items (gradients flow when enabled)."""
        idx = torch.as_tensor(items, dtype=torch.long)
        w = int(cache.lengths[idx].max()) if len(idx) else 1
        states, mask, pos = cache.rows(idx, w)
        return self(states.to(device), mask.to(device), pos.to(device))

    @torch.no_grad()
    def table(self, cache: BlockInputs, device: torch.device | str = "cpu", batch: int = 512) -> torch.Tensor:
        """[N, d] every cached item's [ITEM] state, in eval mode and without gradients (for validation)."""
        self.eval()
        n = len(cache.item_pos)
        return torch.cat([self.encode(cache, list(range(s, min(s + batch, n))), device) for s in range(0, n, batch)])
