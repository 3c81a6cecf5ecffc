"""The decoder path: tiny Llama (with a bos token and a causal LM head) and tiny Qwen2 (no specials)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from tokensel import api
from tokensel.config import ItemModelConfig, PolicyConfig, Stage1Config, TextConfig
from tokensel.errors import TokenselError
from tokensel.io.items import read_items
from tokensel.io.parquet_out import read_metadata
from tokensel.models.item_llm import ItemLLM
from tokensel.policy.bundle import Bundle
from tokensel.train.pipeline import train

from conftest import INTERACTIONS, ITEMS, check_contract

K, CHUNK, PREFIX = 32, 4, 8


@pytest.fixture(scope="module")
def token_lists(tiny_llama):
    llm = ItemLLM.from_pretrained(tiny_llama)
    _, texts = read_items(ITEMS, TextConfig())
    return llm.tokenize(texts[:6], 256)


def test_leading_specials_detected(tiny_llama, tiny_qwen, tiny_bert):
    llama = ItemLLM.from_pretrained(tiny_llama)
    assert llama.lead_ids == [llama.tokenizer.bos_token_id]
    assert ItemLLM.from_pretrained(tiny_qwen).lead_ids == []
    bert = ItemLLM.from_pretrained(tiny_bert)
    assert bert.lead_ids == [bert.tokenizer.cls_token_id]
    for llm in (llama, bert):
        # [ITEM] is a new special token, distinct from every text token, with an embedding row
        assert llm.tokenizer.convert_ids_to_tokens(llm.item_token_id) == "[ITEM]"
        assert llm.item_token_id not in llm.tokenize(["title: a plain text"], 256)[0]
        assert llm.item_token_id < llm.model.get_input_embeddings().weight.shape[0]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen", "tiny_bert"])
def test_item_state_is_taken_at_the_item_token(request, which):
    path = request.getfixturevalue(which)
    llm = ItemLLM.from_pretrained(path)
    _, texts = read_items(ITEMS, TextConfig())
    toks = llm.tokenize([texts[5], texts[0][:80], texts[1]], 256)
    assert len(toks[1]) < len(toks[0])
    enc = llm.encode(toks)
    with torch.no_grad():
        for r, t in enumerate(toks):
            seq = torch.tensor([llm.lead_ids + t + [llm.item_token_id]])
            last = llm.model(input_ids=seq).last_hidden_state[0]
            off = len(llm.lead_ids)
            assert torch.allclose(enc.item[r], last[off + len(t)], atol=1e-5), f"row {r}"
            assert torch.allclose(enc.hidden[r, : len(t)], last[off : off + len(t)], atol=1e-5), f"row {r}"
    assert enc.n_tokens.tolist() == [len(t) for t in toks]


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen"])
def test_right_padding_does_not_change_a_row(request, which, token_lists):
    llm = ItemLLM.from_pretrained(request.getfixturevalue(which))
    _, texts = read_items(ITEMS, TextConfig())
    toks = llm.tokenize([texts[0][:120], texts[1]], 256)
    assert len(toks[0]) < len(toks[1])
    alone = llm.encode(toks[:1])
    batch = llm.encode(toks)
    n = len(toks[0])
    assert torch.allclose(alone.item[0], batch.item[0], atol=1e-5)
    assert torch.allclose(alone.hidden[0, :n], batch.hidden[0, :n], atol=1e-5)


def test_token_logits_come_from_the_causal_lm_head(tiny_llama, token_lists):
    llm = ItemLLM.from_pretrained(tiny_llama, lm_head=True)
    assert llm.lm_kind == "causal"
    toks = [token_lists[0][:40], token_lists[1][:25]]
    enc = llm.encode(toks)
    assert enc.token_logits is not None and enc.token_logits.shape[0] == 2
    with torch.no_grad():
        for r, t in enumerate(toks):
            seq = [llm.tokenizer.bos_token_id] + t + [llm.item_token_id]
            logits = llm.model(input_ids=torch.tensor([seq])).logits[0]
            # the logit of text token p is predicted at the position before it (the bos for p = 0)
            expect = torch.stack([logits[p, t[p]] for p in range(len(t))])
            assert torch.allclose(enc.token_logits[r, : len(t)], expect, atol=1e-4), f"row {r}"


@pytest.mark.parametrize("strategy", ["first-k", "topk-logits"])
def test_compress_with_the_decoder(tmp_path, tiny_llama, strategy):
    out = tmp_path / "out.parquet"
    api.compress(ITEMS, out, k=K, chunk=CHUNK, prefix=PREFIX, strategy=strategy, model=tiny_llama, device="cpu")
    table = check_contract(out, ITEMS, tiny_llama, K)
    assert read_metadata(out)["strategy"] == strategy
    pos = table.column("positions").to_pylist()
    if strategy == "first-k":
        assert all(p == list(range(len(p))) for p in pos)
    else:
        assert sum(p != list(range(len(p))) for p in pos) > 10, "topk-logits kept the first k tokens almost everywhere"


def test_topk_logits_selects_the_chunks_with_the_highest_mean_logit(tmp_path, tiny_llama):
    from tokensel.select.rule import chunk_means, mask_to_positions, select_mask

    out = tmp_path / "out.parquet"
    api.compress(ITEMS, out, k=K, chunk=CHUNK, prefix=PREFIX, strategy="topk-logits", model=tiny_llama, device="cpu", batch_rows=5)
    got = pq.read_table(out).column("positions").to_pylist()
    llm = ItemLLM.from_pretrained(tiny_llama, lm_head=True)
    _, texts = read_items(ITEMS, TextConfig())
    toks = llm.tokenize(texts, 256)
    for r in (0, 7, 20):  # each item alone, scored from the LM head directly
        enc = llm.encode([toks[r]])
        scores = chunk_means(enc.token_logits, enc.n_tokens, PREFIX, CHUNK)
        mask = select_mask(scores, enc.n_tokens, k=K, prefix=PREFIX, chunk=CHUNK)
        assert mask_to_positions(mask)[0] == got[r], f"row {r}"


def test_topk_logits_needs_a_model_with_an_lm_head(tmp_path, tiny_bert):
    out = tmp_path / "out.parquet"
    with pytest.raises(TokenselError, match="head"):
        api.compress(ITEMS, out, k=K, strategy="topk-logits", model=tiny_bert, device="cpu")
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_template_goes_before_the_text_but_not_into_positions(tmp_path, tiny_llama):
    llm = ItemLLM.from_pretrained(tiny_llama)
    llm.set_template("Item: ")
    ids, _, off = llm.build_inputs([[10, 11, 12]])
    assert off == 1 + len(llm.template_ids) and len(llm.template_ids) > 0
    assert ids[0].tolist() == [llm.tokenizer.bos_token_id, *llm.template_ids, 10, 11, 12, llm.item_token_id]
    enc = llm.encode([[10, 11, 12]])
    assert enc.hidden.shape[1] == 3


def test_train_a_bundle_on_the_decoder(tmp_path, tiny_llama):
    out = tmp_path / "llama-bundle"
    train(ITEMS, INTERACTIONS, out, item_cfg=ItemModelConfig(base_model=tiny_llama),
          stage1=Stage1Config(epochs=1, negatives=8), policy=PolicyConfig(epochs=1, negatives=8, batch_size=16, k=K, prefix=PREFIX),
          device="cpu", log=lambda row: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["identity"]["model_type"] == "llama"
    # the default objective (auto) is e2e only where f has a BERT-style readout block: here the pairwise reward
    assert cfg["policy"]["objective"] == "bounded" and cfg["policy"]["epochs"] == 1
    bundle = Bundle.from_pretrained(out)
    assert bundle.policy.dim == 32
    comp = tmp_path / "policy.parquet"
    api.compress(ITEMS, comp, k=K, chunk=CHUNK, prefix=PREFIX, strategy="policy", policy=out, device="cpu")
    check_contract(comp, ITEMS, tiny_llama, K)
    comp2 = tmp_path / "policy2.parquet"
    api.compress(ITEMS, comp2, k=K, chunk=CHUNK, prefix=PREFIX, strategy="policy", policy=out, device="cpu", batch_rows=9)
    assert pq.read_table(comp).equals(pq.read_table(comp2))
