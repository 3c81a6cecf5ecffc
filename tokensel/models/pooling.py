"""Item and user vectors by pooling: the mean of an item LLM's states over a text, the mean of a
user's last history vectors. The training-free text-sim recommender is made of these, and stage 2
uses them where it compares against it."""

from __future__ import annotations

import torch

from tokensel.models.batching import length_buckets
from tokensel.models.item_llm import ItemLLM
from tokensel.models.user_model import pad_histories


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (`[CLS]`, `[SEP]` for BERT)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
    return full[:start], full[start + len(plain) :]


@torch.inference_mode()
def mean_pool_tokens(
    llm: ItemLLM, token_lists: list[list[int]], specials: bool = False, batch_tokens: int = 16384, max_batch: int = 128
) -> torch.Tensor:
    """[N, d] mean of the item LLM's last hidden states.

    specials=False: the input is the kept tokens alone and the mean is over them (an empty text gives 0).
    specials=True: sentence-transformers style, the model's own special tokens around the kept tokens
    (`[CLS] ... [SEP]` for BERT, `<s> ...` for Llama) and the mean over every position, specials included.
    """
    lead, trail = special_wrap(llm.tokenizer) if specials else ([], [])
    inputs = [lead + list(t) + trail for t in token_lists]
    out = torch.zeros(len(token_lists), llm.hidden_size)
    dev = llm.device
    for group in length_buckets([len(x) for x in inputs], max_batch, batch_tokens):
        width = max(len(inputs[i]) for i in group)
        if width == 0:
            continue
        ids = torch.full((len(group), width), llm.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            mask[r, : len(inputs[i])] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        last = llm.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask[..., None].float()
        out[group] = ((last * m).sum(1) / m.sum(1).clamp(min=1)).cpu()
    return out


def history_means(histories: list[list[int]], table: torch.Tensor, n: int) -> torch.Tensor:
    """[U, d] mean of the last `n` history vectors of each user (zeros for an empty history)."""
    out = []
    for s in range(0, len(histories), 2048):
        items, mask = pad_histories(histories[s : s + 2048], table, n)
        m = mask[..., None].float()
        out.append((items * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out) if out else table.new_zeros(0, table.shape[1])
