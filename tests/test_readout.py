"""item_tuning top: f's last block as a trainable [ITEM] readout over cached lower-layer states."""

from __future__ import annotations

import pytest
import torch

from tokensel.config import CacheConfig
from tokensel.errors import TokenselError
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import ItemReadout, cache_block_inputs


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
    cache = cache_block_inputs(llm, tokens, CacheConfig("ram"), batch_tokens=300)  # several length buckets
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
    # the key bias adds the same number to every score of a query, so the softmax cancels it: no gradient
    grads = {n: p.grad for n, p in readout.named_parameters() if not n.endswith("attention.self.key.bias")}
    assert all(g is not None for g in grads.values()) and all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("weight"))
    torch.optim.SGD(readout.parameters(), lr=0.1).step()
    assert all(torch.equal(p, before[n]) for n, p in llm.model.named_parameters())  # f itself untouched


def test_non_bert_models_are_refused(tiny_llama, texts):
    llm = ItemLLM.from_pretrained(tiny_llama)
    with pytest.raises(TokenselError, match="BERT-style"):
        ItemReadout(llm)


def test_a_cache_too_large_for_memory_is_refused(llm, texts, monkeypatch):
    from tokensel.models import scratch

    monkeypatch.setattr(scratch, "_physical_memory", lambda: 1 << 16)  # a 64 KiB machine
    with pytest.raises(TokenselError, match="use --cache-store disk"):
        cache_block_inputs(llm, llm.tokenize(texts[:40], 48), CacheConfig("ram"))


def test_readout_gradients_match_the_block_run_over_every_position(llm, texts):
    """The folded key/value algebra is the same function: same gradients as the block run in full."""
    tokens = llm.tokenize(texts[:12], 40)
    tokens[4], tokens[7] = tokens[4][:5], tokens[7][:19]  # unequal lengths: the padding must be masked
    cache = cache_block_inputs(llm, tokens, CacheConfig("ram"))
    readout = ItemReadout(llm)
    reference = ItemReadout(llm).block  # an identical copy, run the ordinary way over all positions
    readout.eval(), reference.eval()
    idx = [4, 0, 7, 11]
    w = int(cache.lengths[idx].max())
    states, mask, pos = cache.states[idx, :w], cache.mask[idx, :w], cache.item_pos[idx]
    weight = torch.randn(len(idx), llm.hidden_size)
    (readout(states, mask, pos) * weight).sum().backward()
    additive = torch.zeros(len(idx), 1, 1, w).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    out = reference(states, attention_mask=additive)
    out = out[0] if isinstance(out, tuple) else out
    (out[torch.arange(len(idx)), pos] * weight).sum().backward()
    ref = dict(reference.named_parameters())
    for name, p in readout.block.named_parameters():
        if name.endswith("attention.self.key.bias"):
            assert p.grad is None and ref[name].grad.abs().max() < 1e-5  # cancels in the softmax
            continue
        torch.testing.assert_close(p.grad, ref[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_top_tuning_is_refused_up_front_from_the_config_alone(tiny_bert, tiny_llama, tiny_qwen, monkeypatch):
    """train and evaluate refuse a non-BERT model for top tuning before any weights are loaded."""
    from tokensel.config import ItemModelConfig, Stage1Config
    from tokensel.evaluate.recommenders import TrainConfig
    from tokensel.evaluate.runner import evaluate_detailed
    from tokensel.models.readout import check_top_tunable
    from tokensel.train.pipeline import train

    from conftest import INTERACTIONS, ITEMS

    check_top_tunable(tiny_bert)  # the layout ItemReadout runs: accepted
    for name in (tiny_llama, tiny_qwen):
        with pytest.raises(TokenselError, match="BERT-style"):
            check_top_tunable(name)

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(ItemLLM, "from_pretrained", no_loading)
    with pytest.raises(TokenselError, match="BERT-style"):
        train(ITEMS, INTERACTIONS, "unused", stages=(1,), item_cfg=ItemModelConfig(base_model=tiny_llama, tuning="top"), stage1=Stage1Config(epochs=1), device="cpu")
    with pytest.raises(TokenselError, match="BERT-style"):
        evaluate_detailed(ITEMS, INTERACTIONS, [ITEMS], "hllm", seeds=[0], model=tiny_llama, device="cpu", train=TrainConfig(item_tuning="top"))
