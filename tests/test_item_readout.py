"""item_tuning top: f's last block as a trainable [ITEM] readout over cached lower-layer states."""

from __future__ import annotations

import pytest
import torch

from tokensel.errors import TokenselError
from tokensel.models.item_llm import ItemLLM
from tokensel.models.item_readout import ItemReadout, cache_block_inputs


@pytest.fixture(scope="module")
def llm(tiny_bert) -> ItemLLM:
    return ItemLLM.from_pretrained(tiny_bert)


@pytest.mark.parametrize("template", ["", "item:"])
def test_readout_is_f_at_item(llm, texts, template):
    """Untrained, the readout over the cache gives exactly f's final [ITEM] state, whatever the length."""
    llm.set_template(template)
    tokens = llm.tokenize(texts[:40], 48)
    tokens[3] = tokens[3][:1]  # a one-token item among long ones: padding must not leak in
    with torch.no_grad():
        want = llm.encode(tokens, need_hidden=False).item.float()
    cache = cache_block_inputs(llm, tokens, batch_tokens=300)  # several length buckets
    readout = ItemReadout(llm).eval()
    with torch.no_grad():
        got = readout.encode(cache, list(range(len(tokens))))
        some = readout.encode(cache, [5, 3, 0])
    llm.set_template("")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(some, got[[5, 3, 0]], atol=1e-6, rtol=1e-5)


def test_readout_trains_its_own_copy(llm, texts):
    tokens = llm.tokenize(texts[:8], 32)
    cache = cache_block_inputs(llm, tokens)
    readout = ItemReadout(llm)
    before = {n: p.clone() for n, p in llm.model.named_parameters()}
    loss = readout.encode(cache, [0, 1, 2]).pow(2).sum()
    loss.backward()
    grads = [p.grad for p in readout.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    torch.optim.SGD(readout.parameters(), lr=0.1).step()
    assert all(torch.equal(p, before[n]) for n, p in llm.model.named_parameters())  # f itself untouched


def test_non_bert_models_are_refused(tiny_llama, texts):
    llm = ItemLLM.from_pretrained(tiny_llama)
    with pytest.raises(TokenselError, match="BERT-style"):
        ItemReadout(llm)


def test_a_cache_too_large_for_memory_is_refused(llm, texts, monkeypatch):
    from tokensel.models import item_readout

    monkeypatch.setattr(item_readout, "_physical_memory", lambda: 1 << 16)  # a 64 KiB machine
    with pytest.raises(TokenselError, match="use item tuning lora"):
        cache_block_inputs(llm, llm.tokenize(texts[:40], 48))
