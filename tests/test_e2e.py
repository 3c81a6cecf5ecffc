"""End-to-end stage 2: the hard mask is the selection rule, the relaxed gradient is right, training moves the head."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from tokensel.config import CacheConfig, ItemModelConfig, PolicyConfig, TextConfig
from tokensel.errors import TokenselError
from tokensel.io.interactions import read_histories
from tokensel.io.items import read_items
from tokensel.models.gated import kept_vectors
from tokensel.policy.head import PolicyHead
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import ItemReadout
from tokensel.models.user_model import UserModel
from tokensel.config import UserModelConfig
from tokensel.report import bundle_summary
from tokensel.select.rule import select_mask, select_positions_reference
from tokensel.train import e2e, e2e_vectors
from tokensel.train.relaxation import PerturbedMask
from tokensel.train.pipeline import check_settings


def _apply(scores, n, k, prefix, chunk, width, sigma=0.5, samples=8):
    gen = torch.Generator().manual_seed(0)
    s = scores.clone().requires_grad_(True)
    return PerturbedMask.apply(s, n, torch.full((len(n),), sigma), k, prefix, chunk, width, samples, gen), s


@pytest.mark.parametrize("k,prefix,chunk", [(8, 2, 3), (5, 0, 4), (16, 4, 2), (3, 6, 3)])
def test_training_mask_is_the_selection_rule(k, prefix, chunk):
    """Ties (integer scores), a short last chunk (n not a multiple of chunk), n <= k, prefix > k."""
    g = torch.Generator().manual_seed(1)
    n = torch.tensor([2, k, k + 1, 13, 17, 30, 31])
    width = int(n.max())
    C = math.ceil((width - min(prefix, k)) / chunk)
    scores = torch.randint(0, 3, (len(n), C), generator=g).float()  # many ties
    mask, _ = _apply(scores, n, k, prefix, chunk, width)
    want = select_mask(scores, n, k=k, prefix=prefix, chunk=chunk, width=width)
    assert torch.equal(mask.bool(), want)
    for r, nr in enumerate(n.tolist()):
        ref = select_positions_reference(scores[r].tolist(), nr, k=k, prefix=prefix, chunk=chunk)
        assert mask[r].nonzero().flatten().tolist() == ref


def test_perturbed_gradient_matches_the_smoothed_rule():
    """Two chunks of 2 tokens, k = 2: the first is kept with probability Phi((s0 - s1) / (sigma sqrt 2)),
    so d/ds0 of E[<g, mask>] with g = 1 on the first chunk's tokens is known in closed form; the
    estimator must match it and a finite difference of a Monte-Carlo smoothed rule."""
    sigma, s0, s1 = 0.7, 0.3, 0.0
    scores = torch.tensor([[s0, s1]])
    n = torch.tensor([4])
    g = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    s = scores.clone().requires_grad_(True)
    mask = PerturbedMask.apply(s, n, torch.tensor([sigma]), 2, 0, 2, 4, 200_000, gen)
    assert torch.equal(mask, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))
    (mask * g).sum().backward()
    z = (s0 - s1) / (sigma * math.sqrt(2))
    exact = 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi) / (sigma * math.sqrt(2))
    assert s.grad[0, 0].item() == pytest.approx(exact, rel=0.03)
    assert s.grad[0, 1].item() == pytest.approx(-exact, rel=0.03)

    # finite difference of the smoothed rule itself (common random numbers), no formula involved
    noise = torch.randn(400_000, 1, 2, generator=torch.Generator().manual_seed(3))

    def smoothed(a: float) -> float:
        m = select_mask((torch.tensor([[a, s1]]) + sigma * noise).reshape(-1, 2), n.repeat(len(noise)), k=2, prefix=0, chunk=2, width=4)
        return (m.float() * g).sum(-1).mean().item()

    h = 0.05
    fd = (smoothed(s0 + h) - smoothed(s0 - h)) / (2 * h)
    assert s.grad[0, 0].item() == pytest.approx(fd, rel=0.05)


def test_no_gradient_where_the_rule_does_not_depend_on_scores():
    """Items with n <= k keep everything whatever the scores: their chunk scores get exactly 0.
    Seeded: with unseeded scores an antithetic pair can keep the same chunks, and the longer item's
    gradient is then 0 by chance (it failed once in a full run)."""
    torch.manual_seed(0)
    scores = torch.randn(2, 4)
    n = torch.tensor([6, 20])
    mask, s = _apply(scores, n, 8, 2, 4, 20, samples=16)
    (mask * torch.randn(2, 20)).sum().backward()
    assert torch.all(s.grad[0] == 0) and s.grad[1].abs().sum() > 0


def test_readout_weights_equal_hard_masking():
    """0/1 weights on the [ITEM] attention give the same vector as removing those keys from the mask."""
    torch.manual_seed(0)
    from transformers import BertConfig, BertModel

    class Tiny:  # only what ItemReadout needs from an ItemLLM
        pass

    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0))
    llm = Tiny()
    llm.model, llm.name = model, "tiny"
    readout = ItemReadout(llm).eval()
    states, key = torch.randn(3, 9, 16), torch.ones(3, 9, dtype=torch.bool)
    key[2, 7:] = False
    item_pos = torch.tensor([8, 8, 6])
    w = (torch.rand(3, 9) > 0.4).float()
    w[torch.arange(3), item_pos] = 1.0
    got = readout(states, key, item_pos, w)
    want = readout(states, key & w.bool(), item_pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    wg = w.clone().requires_grad_(True)
    (readout(states, key, item_pos, wg) * torch.randn(3, 16)).sum().backward()  # (a plain sum of a LayerNorm output is constant)
    assert wg.grad[0][w[0] == 0].abs().sum() > 0  # dropped positions still get a gradient


def test_position_prior_is_zero_and_saved(tmp_path):
    head = PolicyHead(8)
    h, item = torch.randn(2, 10, 8), torch.randn(2, 8)
    base = (head.w_q(h) * head.w_k(item)[:, None]).sum(-1) / math.sqrt(8)
    assert torch.equal(head.info(h, item), base)  # zero prior: item-align exactly
    torch.testing.assert_close(head.info_folded(h, item), base, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        head.pos_prior[:5] = 10.0
    logp = head.log_probs(h, item, torch.tensor([10, 10]), prefix=0)
    assert torch.all(logp[:, :5].exp().sum(1) > 0.99)  # a strong prior makes first positions win


@pytest.fixture(scope="module")
def setup(tiny_bert, items_path, interactions_path):
    llm = ItemLLM.from_pretrained(tiny_bert)
    ids, texts = read_items(items_path, TextConfig())
    tokens = llm.tokenize(texts, 64)
    hist = read_histories(interactions_path, {i: n for n, i in enumerate(ids)}, "user_id", "item_id", "timestamp")
    return llm, tokens, hist


def test_a_training_step_changes_the_head_and_nothing_else(setup):
    llm, tokens, hist = setup
    cfg = PolicyConfig(objective="e2e", keep_best=False, k=8, prefix=2, train_chunk=2, epochs=1, batch_size=16, negatives=16, valid_users=20, lr=1e-2, prior_lr=0.1)
    user = UserModel(llm.hidden_size, UserModelConfig())
    before_user = {k: v.clone() for k, v in user.state_dict().items()}
    before_f = {k: v.clone() for k, v in llm.model.state_dict().items()}
    head = PolicyHead(llm.hidden_size)
    logs = []
    out = e2e.train_e2e(llm, user, head, tokens, hist, cfg, 0.05, logs.append)
    assert not torch.equal(head.w_q.weight, torch.eye(llm.hidden_size))
    assert head.pos_prior.detach().abs().sum() > 0
    assert all(torch.equal(v, before_user[k]) for k, v in user.state_dict().items())  # surrogate copies trained
    assert all(torch.equal(v, before_f[k]) for k, v in llm.model.state_dict().items())
    ep = out["epochs"]
    assert [e["epoch"] for e in ep] == [0, 1]
    assert set(ep[1]) >= {"policy", "identity", "first_k", "loss", "seconds"}
    assert ep[0]["policy"] == ep[0]["identity"]  # the start is the identity head


def test_every_block_mask_is_exactly_the_kept_token_forward(setup):
    """mask_layers "all": f over all tokens with 0/1 gates in every block equals f over the kept tokens
    alone (renumbered positions), and a dropped token's gate still gets a gradient."""
    llm, tokens, _ = setup
    torch.manual_seed(1)
    items = [i for i, t in enumerate(tokens) if len(t) > 12][:6]
    toks = [tokens[i] for i in items]
    gate = (torch.rand(len(toks), max(map(len, toks))) > 0.5).float()
    gate[:, 0] = 1.0
    readout = ItemReadout(llm).eval()
    got = kept_vectors(llm, readout, toks, gate.requires_grad_(True))
    kept = [[t for j, t in enumerate(tt) if gate[r, j] > 0.5] for r, tt in enumerate(toks)]
    with torch.no_grad():
        want = llm.encode(kept, need_hidden=False).item
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    (got * torch.randn_like(got)).sum().backward()
    dropped = torch.stack([(gate[r] == 0) & (torch.arange(gate.shape[1]) < len(t)) for r, t in enumerate(toks)])
    assert gate.grad[dropped].abs().sum() > 0
    assert torch.all(gate.grad[~dropped & (gate.detach() == 0)] == 0)  # padding past an item's end: no gradient


def test_every_block_training_step_runs_and_moves_the_head(setup):
    """The same training loop with the mask in every block (f run gated per step, no block cache)."""
    llm, tokens, hist = setup
    cfg = PolicyConfig(objective="e2e", keep_best=False, mask_layers="all", k=8, prefix=2, train_chunk=2, epochs=1, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    data = e2e_vectors.prepare(llm, tokens, "all")
    assert data.cache is None and data.llm is llm
    head = PolicyHead(llm.hidden_size)
    out = e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), head, tokens, hist, cfg, 0.05, lambda r: None, data=data)
    assert not torch.equal(head.w_q.weight, torch.eye(llm.hidden_size))
    assert out["epochs"][0]["policy"] == out["epochs"][0]["identity"]
    # validation under the every-block mask is validation of real kept-token vectors: first-k's table
    # equals the readout over a plain forward of the first-k texts
    readout = ItemReadout(llm).eval()
    mask, n = e2e_vectors.keep_mask(None, data, list(range(len(tokens))), cfg)
    kept = [[t for j, t in enumerate(tt) if mask[r, j] > 0.5] for r, tt in enumerate(tokens)]
    table = e2e_vectors.masked_table(readout, None, data, cfg)
    with torch.no_grad():
        want = llm.encode(kept, need_hidden=False).item
    torch.testing.assert_close(table, want, atol=1e-4, rtol=1e-4)


def test_every_block_mask_refuses_a_model_it_cannot_gate(tiny_llama):
    """A decoder without BERT's blocks and absolute positions: a clear error, not a crash mid-training."""
    llm = ItemLLM.from_pretrained(tiny_llama)
    with pytest.raises(TokenselError, match="mask-layers all needs a BERT-style encoder"):
        e2e_vectors.prepare(llm, [[5, 6, 7]], "all")
    with pytest.raises(TokenselError, match="BERT-style"):
        check_settings(ItemModelConfig(base_model=tiny_llama), PolicyConfig(objective="e2e"))


def test_e2e_is_selectable_and_validated():
    check_settings(None, PolicyConfig(objective="e2e"))
    with pytest.raises(TokenselError, match="masked side"):
        check_settings(None, PolicyConfig(objective="e2e", masked_side="neither"))
    with pytest.raises(TokenselError, match="mask layers"):
        check_settings(None, PolicyConfig(objective="e2e", mask_layers="some"))
    with pytest.raises(TokenselError, match="sigma"):
        check_settings(None, PolicyConfig(objective="e2e", sigma=0.0))
    with pytest.raises(TokenselError, match="objective"):
        check_settings(None, PolicyConfig(objective="e3e"))


def test_exact_mask_values_are_the_kept_token_forward_and_its_gradient_reaches_the_head(setup):
    """mask_layers "exact": the item vector is f over the kept tokens (validation and training), the
    mask's gradient comes through the top-block path, and the readout learns from the exact value only."""
    llm, tokens, hist = setup
    cfg = PolicyConfig(objective="e2e", keep_best=False, mask_layers="exact", k=8, prefix=2, train_chunk=2, epochs=1, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    data = e2e_vectors.prepare(llm, tokens, "exact", CacheConfig("ram"))  # float32: exact to 1e-4
    assert data.cache is not None and data.llm is llm
    readout = ItemReadout(llm).eval()
    items = list(range(len(tokens)))
    mask, n = e2e_vectors.keep_mask(None, data, items, cfg)
    kept = [[t for j, t in enumerate(tt) if mask[r, j] > 0.5] for r, tt in enumerate(tokens)]
    with torch.no_grad():
        want = llm.encode(kept, need_hidden=False).item
    torch.testing.assert_close(e2e_vectors.masked_table(readout, None, data, cfg), want, atol=1e-4, rtol=1e-4)
    # with a gradient: same value, the keep weights get the top path's gradient, the readout the exact one's
    head = PolicyHead(llm.hidden_size)
    sub = [i for i in items if len(tokens[i]) > cfg.k][:8]
    m, nn_ = e2e_vectors.keep_mask(head, data, sub, cfg, torch.Generator().manual_seed(0))
    w = torch.randn(len(sub), llm.hidden_size)
    v = e2e_vectors.item_vectors(readout, data, sub, m, nn_)
    kept_h = [[t for j, t in enumerate(tokens[i]) if m[r, j] > 0.5] for r, i in enumerate(sub)]
    assert kept_h != [kept[i] for i in sub]  # the head's selection is not first-k's
    with torch.no_grad():
        torch.testing.assert_close(v, llm.encode(kept_h, need_hidden=False).item, atol=1e-4, rtol=1e-4)
    (v * w).sum().backward()
    assert head.w_q.weight.grad is not None and head.w_q.weight.grad.abs().sum() > 0
    g_hybrid = [None if p.grad is None else p.grad.clone() for p in readout.parameters()]
    readout.zero_grad()
    kb = e2e_vectors.kept_block_inputs(data, sub, m)
    (readout(kb.states, kb.mask, kb.item_pos) * w).sum().backward()
    for a, b in zip(g_hybrid, (p.grad for p in readout.parameters())):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    out = e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), head, tokens, hist, cfg, 0.05, lambda r: None, data=data)
    assert out["epochs"][0]["policy"] == out["epochs"][0]["identity"]
    assert not torch.equal(head.w_q.weight, torch.eye(llm.hidden_size))


def test_warmup_holds_the_head_and_the_mix_is_validated(setup):
    """Warm-up epochs train the surrogate only (the head stays the identity); a first-k share of steps
    still lets the head move afterwards; bad values are user errors."""
    llm, tokens, hist = setup
    data = e2e_vectors.prepare(llm, tokens, "exact")
    head = PolicyHead(llm.hidden_size)
    cfg = PolicyConfig(objective="e2e", keep_best=False, mask_layers="exact", k=8, prefix=2, train_chunk=2, epochs=1, warmup_epochs=1, surrogate_mix=0.5, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    out = e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), head, tokens, hist, cfg, 0.05, lambda r: None, data=data)
    assert torch.equal(head.w_q.weight, torch.eye(llm.hidden_size)) and torch.all(head.pos_prior == 0)
    assert out["epochs"][1]["head_moved"] is False
    cfg = PolicyConfig(objective="e2e", keep_best=False, mask_layers="exact", k=8, prefix=2, train_chunk=2, epochs=2, warmup_epochs=1, surrogate_mix=0.5, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    out = e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), head, tokens, hist, cfg, 0.05, lambda r: None, data=data)
    assert out["epochs"][2]["head_moved"] is True and not torch.equal(head.w_q.weight, torch.eye(llm.hidden_size))
    for bad in ({"warmup_epochs": 3}, {"warmup_epochs": -1}, {"surrogate_mix": 1.0}, {"surrogate_mix": -0.1}):
        with pytest.raises(TokenselError, match="warm-up|mix"):
            check_settings(None, PolicyConfig(objective="e2e", epochs=2, **bad))


def test_warmup_cache_is_the_same_kept_token_forward(setup):
    """The warm-up's cached inputs give the same item vectors as the per-step exact forward."""
    llm, tokens, _ = setup
    data = e2e_vectors.prepare(llm, tokens, "exact")
    cfg = PolicyConfig(objective="e2e", mask_layers="exact", k=8, prefix=2, train_chunk=2)
    readout = ItemReadout(llm).eval()
    head = PolicyHead(llm.hidden_size)
    items = [3, 0, 7, 5]
    for h in (head, None):
        cached = e2e_vectors.kept_inputs_table(data, h, cfg, batch=3)
        mask, n = e2e_vectors.keep_mask(h, data, items, cfg)
        with torch.no_grad():
            torch.testing.assert_close(readout.encode(cached, items), e2e_vectors.item_vectors(readout, data, items, mask, n), atol=1e-5, rtol=1e-5)


def test_selections_that_never_move_run_f_once_not_every_step(setup, monkeypatch):
    """First-k and the identity head never move, so their kept-token inputs are computed once: while the
    head moves, only its own steps and its own validation run f over kept tokens."""
    llm, tokens, hist = setup
    data = e2e_vectors.prepare(llm, tokens, "exact")
    assert len(tokens) <= 256  # one masked_table batch per selection below
    forwards, head_steps = [], []
    real_forward, real_mask = e2e_vectors.kept_block_inputs, e2e_vectors.keep_mask
    monkeypatch.setattr(e2e_vectors, "kept_block_inputs", lambda *a: forwards.append(1) or real_forward(*a))

    def counted_mask(h, d, i, c, g=None):
        if h is not None and g is not None:  # a step that moves the head
            head_steps.append(1)
        return real_mask(h, d, i, c, g)

    monkeypatch.setattr(e2e, "keep_mask", counted_mask)
    seen = []
    cfg = PolicyConfig(objective="e2e", keep_best=False, mask_layers="exact", k=8, prefix=2, train_chunk=2, epochs=1, warmup_epochs=0, surrogate_mix=0.5, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), PolicyHead(llm.hidden_size), tokens, hist, cfg, 0.05, lambda r: seen.append((len(forwards), len(head_steps))), data=data)
    (at_start, _), (at_end, steps) = seen
    assert at_start == 3  # first-k's and the identity's tables, and the head's start validation
    assert 0 < steps and at_end - at_start == steps + 1  # the head's steps, and its validation table


def test_sampled_exact_gradient_is_the_every_block_gradient_on_the_drawn_chunks(setup):
    """grad_chunks: f gated over the kept tokens plus drawn dropped chunks gives the kept-token value and,
    on every drawn token, the every-block (`all`) gradient scaled by dropped / drawn chunks."""
    llm, tokens, _ = setup
    items = [i for i, t in enumerate(tokens) if len(t) > 16][:5]
    cfg = PolicyConfig(objective="e2e", mask_layers="exact", k=8, prefix=2, train_chunk=2, grad_chunks=100)
    data = e2e_vectors.prepare(llm, tokens, "exact")
    readout = ItemReadout(llm).eval()
    for p in llm.model.parameters():
        p.requires_grad_(False)
    base, n = e2e_vectors.keep_mask(PolicyHead(llm.hidden_size), data, items, cfg)
    w = torch.randn(len(items), llm.hidden_size)
    full = base.clone().requires_grad_(True)
    want = kept_vectors(llm, readout, [tokens[i] for i in items], full)
    (want * w).sum().backward()
    for chunks, one_chunk in ((100, False), (1, True)):
        mask = base.clone().requires_grad_(True)
        v = e2e_vectors.sampled_exact_vectors(readout, data, items, mask, n, dataclasses.replace(cfg, grad_chunks=chunks), torch.Generator().manual_seed(0))
        torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-5)
        (v * w).sum().backward()
        inside = torch.arange(base.shape[1])[None] < n[:, None]
        kept = inside & (base > 0.5)
        torch.testing.assert_close(mask.grad[kept], full.grad[kept], atol=1e-5, rtol=1e-4)
        dropped = inside & (base < 0.5)
        got = mask.grad[dropped]
        if not one_chunk:
            torch.testing.assert_close(got, full.grad[dropped], atol=1e-5, rtol=1e-4)
        else:  # one chunk drawn per item: its tokens' gradient times the number of dropped chunks, the rest 0
            for r in range(len(items)):
                d = dropped[r]
                chunk_of = (torch.arange(base.shape[1]) - cfg.prefix) // cfg.train_chunk
                n_chunks = len(torch.unique(chunk_of[d]))
                nz = d & (mask.grad[r] != 0)
                assert len(torch.unique(chunk_of[nz])) == 1
                torch.testing.assert_close(mask.grad[r][nz], n_chunks * full.grad[r][nz], atol=1e-5, rtol=1e-4)
    for p in llm.model.parameters():
        p.requires_grad_(True)


def test_sampled_exact_training_moves_the_head_and_leaves_f_trainable(setup, monkeypatch):
    llm, tokens, hist = setup
    cfg = PolicyConfig(objective="e2e", keep_best=False, mask_layers="exact", grad_chunks=2, k=8, prefix=2, train_chunk=2, epochs=1, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    head = PolicyHead(llm.hidden_size)
    before = [p.clone() for p in llm.model.parameters()]
    sampled = []
    real = e2e_vectors.sampled_exact_vectors
    monkeypatch.setattr(e2e_vectors, "sampled_exact_vectors", lambda *a: sampled.append(1) or real(*a))
    e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), head, tokens, hist, cfg, 0.05, lambda r: None)
    assert sampled, "the steps never took the sampled exact gradient"
    assert not torch.equal(head.w_q.weight, torch.eye(llm.hidden_size))
    assert all(torch.equal(a, b) for a, b in zip(before, llm.model.parameters()))  # f is not trained here
    assert all(p.requires_grad for p in llm.model.parameters())  # and is left as it was found
    with pytest.raises(TokenselError, match="grad chunks"):
        check_settings(None, PolicyConfig(objective="e2e", mask_layers="top", grad_chunks=2))


def _users(n10: list[float], n: int = 400, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per-user metrics whose N@10 / R@10 means are about `n10` (0/100-style hits, as validation gives)."""
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.rand(n, generator=g) < n10 / 100).float() * 100 for m in ("N@10", "R@10")}


@pytest.mark.parametrize(
    "rates,chosen",
    [
        ((40, 10, 10), "policy"),  # the trained head is best and not below first-k
        ((10, 40, 10), "item-align"),  # the identity head is best: training is undone
        ((10, 10, 40), "first-k"),  # first-k is best: the head is told to keep the first tokens
        ((22, 12, 20), "first-k"),  # above first-k, but not significantly: the first tokens stay
    ],
)
def test_keep_best_sets_the_head_to_the_choice(rates, chosen):
    head = PolicyHead(8)
    with torch.no_grad():
        head.w_q.weight.add_(0.5)
        head.pos_prior[:4] = 1.0
    trained = copy.deepcopy(head.state_dict())
    users = {name: _users(r, seed=i) for i, (name, r) in enumerate(zip(("policy", "identity", "first_k"), rates))}
    out = e2e.keep_best(head, users)
    assert out["chosen"] == chosen
    assert {r["strategy"] for r in out["rows"]} == {"policy", "item-align", "first-k"}
    assert head.keeps_first_k == (chosen == "first-k")
    moved = not torch.equal(head.w_q.weight, torch.eye(8))
    assert moved == (chosen != "item-align")
    if chosen != "item-align":  # first-k keeps the trained weights (the flag decides), policy keeps them
        assert all(torch.equal(v, trained[k]) for k, v in head.state_dict().items())


def test_keep_best_ties_go_to_first_k():
    head = PolicyHead(8)
    same = _users(20)
    out = e2e.keep_best(head, {"policy": same, "identity": same, "first_k": same})
    assert out["chosen"] == "first-k" and head.keeps_first_k


def test_the_choice_says_what_its_test_cannot_see():
    """Stage 2's p comes from one surrogate run: the choice, its rows and `tokensel info` say so
    (bundles written before the field get the same words: they were made the same way)."""
    same = _users(20)
    out = e2e.keep_best(PolicyHead(8), {"policy": same, "identity": same, "first_k": same})
    assert "not training-seed variance" in out["test"] and "one surrogate run" in out["test"]
    assert all("cannot see seed variance" in r["test"] for r in out["rows"] if r["strategy"] != "first-k")
    cfg = {"data": {"n_items": 10, "n_users": 5}, "policy": {"k": 8}, "logs": {"stage2": {"warnings": [], "choice": out}}}
    for choice in (out, {k: v for k, v in out.items() if k != "test"}):
        cfg["logs"]["stage2"]["choice"] = choice
        rows = dict(bundle_summary(cfg))
        assert "not training-seed variance" in rows["stage-2 test"]


def test_training_ends_with_the_choice_in_the_log_and_the_head(setup):
    """keep_best on (the default): the log's choice is what the head now does."""
    llm, tokens, hist = setup
    cfg = PolicyConfig(objective="e2e", mask_layers="exact", k=8, prefix=2, train_chunk=2, epochs=1, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    head = PolicyHead(llm.hidden_size)
    logs = []
    out = e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), head, tokens, hist, cfg, 0.05, logs.append)
    choice = out["choice"]
    assert any(r.get("e2e") == "kept" for r in logs)
    rows = {r["strategy"]: r for r in choice["rows"]}
    assert rows["first-k"]["ratio_N@10"] in (1.0, None) and rows["first-k"]["p_N@10"] is None
    assert choice["chosen"] == e2e.choose_proven(choice["rows"])
    assert head.keeps_first_k == (choice["chosen"] == "first-k")
    if choice["chosen"] == "item-align":
        assert torch.equal(head.w_q.weight, torch.eye(llm.hidden_size)) and not head.pos_prior.any()


def test_pooled_epochs_keep_only_a_win_that_persists():
    """A head that wins on one epoch's surrogate and loses on the next is not kept; pooling one epoch
    (or the same epoch twice) changes nothing."""
    win = {"policy": _users(40, seed=0), "identity": _users(10, seed=1), "first_k": _users(10, seed=2)}
    lose = {"policy": _users(10, seed=3), "identity": _users(10, seed=4), "first_k": _users(40, seed=5)}
    assert e2e.keep_best(PolicyHead(8), win)["chosen"] == "policy"
    assert e2e.keep_best(PolicyHead(8), e2e.pool_epochs([win, lose]))["chosen"] == "first-k"
    for name in win:
        for m in win[name]:
            assert torch.equal(e2e.pool_epochs([win])[name][m], win[name][m].double())
            assert torch.allclose(e2e.pool_epochs([win, win])[name][m], win[name][m].double())


def test_settle_epochs_hold_the_head_and_the_choice_pools_them(setup, monkeypatch):
    """After the head's last step the surrogate trains `settle_epochs` more epochs on the held head's
    texts; the choice reads the mean of those epochs' validations, and the head it judges is the one
    the last head epoch left."""
    llm, tokens, hist = setup
    cfg = PolicyConfig(objective="e2e", mask_layers="exact", k=8, prefix=2, train_chunk=2, epochs=2, warmup_epochs=1, settle_epochs=2, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    head = PolicyHead(llm.hidden_size)
    snaps, judged = {}, {}
    def log(row):
        if row.get("epoch") == cfg.epochs:
            snaps["last head epoch"] = copy.deepcopy(head.state_dict())
    real = e2e.keep_best
    def spy(h, users):
        judged.update(copy.deepcopy(h.state_dict()))
        return real(h, users)
    monkeypatch.setattr(e2e, "keep_best", spy)
    out = e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), head, tokens, hist, cfg, 0.05, log)
    ep = out["epochs"]
    assert len(ep) == 1 + cfg.epochs + cfg.settle_epochs
    assert [r["head_moved"] for r in ep[1:]] == [False, True, False, False]
    assert [r.get("settle", False) for r in ep[1:]] == [False, False, True, True]
    assert all(torch.equal(v, snaps["last head epoch"][k]) for k, v in judged.items())
    assert not torch.equal(judged["w_q.weight"], torch.eye(llm.hidden_size))  # the head did move
    assert out["choice"]["epochs_pooled"] == 2
    names = {"policy": "policy", "item-align": "identity", "first-k": "first_k"}
    for row in out["choice"]["rows"]:
        settle_mean = sum(r[names[row["strategy"]]]["N@10"] for r in ep[-2:]) / 2
        assert abs(row["N@10"] - settle_mean) < 2e-3  # the epoch rows are rounded to 3 places


def test_no_settle_epochs_judges_the_last_epoch(setup):
    llm, tokens, hist = setup
    cfg = PolicyConfig(objective="e2e", mask_layers="exact", k=8, prefix=2, train_chunk=2, epochs=1, settle_epochs=0, batch_size=16, negatives=16, valid_users=20, lr=1e-2)
    out = e2e.train_e2e(llm, UserModel(llm.hidden_size, UserModelConfig()), PolicyHead(llm.hidden_size), tokens, hist, cfg, 0.05, lambda r: None)
    assert len(out["epochs"]) == 2 and out["choice"]["epochs_pooled"] == 1
    last = out["epochs"][-1]
    rows = {r["strategy"]: r for r in out["choice"]["rows"]}
    assert abs(rows["policy"]["N@10"] - last["policy"]["N@10"]) < 1e-3


def test_settle_epochs_must_not_be_negative():
    with pytest.raises(TokenselError, match="settle epochs"):
        PolicyConfig(objective="e2e", settle_epochs=-1)
