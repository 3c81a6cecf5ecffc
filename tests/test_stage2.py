"""Stage-2 building blocks: the policy head, sampling chunks without replacement, greedy subsets."""

from __future__ import annotations

import math

import torch

from tokensel.config import PolicyConfig
from tokensel.models.head import PolicyHead
from tokensel.select.rule import chunk_sums, mask_to_positions
from tokensel.train.common import Catalogue, infonce, infonce_logits
from tokensel.train import stage2
from tokensel.train.stage2 import greedy_subsets, sample_masks


def test_policy_head_probabilities_cover_only_candidates():
    torch.manual_seed(0)
    head = PolicyHead(8)
    assert torch.equal(head.w_q.weight, torch.eye(8)) and torch.equal(head.w_k.weight, torch.eye(8))
    hidden, item = torch.randn(2, 12, 8), torch.randn(2, 8)
    n = torch.tensor([12, 7])
    logp = head.log_probs(hidden, item, n, prefix=3)
    for r, nr in enumerate(n.tolist()):
        assert torch.all(logp[r, :3] == 0) and torch.all(logp[r, nr:] == 0)
        assert math.isclose(logp[r, 3:nr].exp().sum().item(), 1.0, rel_tol=1e-5)
    # info = <W_Q h_i, W_K h_item> / sqrt(d)
    info = head.info(hidden, item)
    assert torch.allclose(info[1, 4], hidden[1, 4] @ item[1] / math.sqrt(8), atol=1e-6)


def test_sampled_masks_respect_the_budget_and_follow_the_scores():
    cfg = PolicyConfig(k=12, prefix=4, train_chunk=2)
    n = torch.tensor([30])
    # 13 chunks of 2 after the prefix; chunk 1 much likelier, chunk 2 much less likely
    scores = torch.zeros(1, 13)
    scores[0, 1], scores[0, 2] = 3.0, -3.0
    gen = torch.Generator().manual_seed(0)
    masks = sample_masks(scores, n, 400, cfg, gen)
    assert masks.shape == (400, 1, 30)
    assert torch.all(masks.sum(-1) == 12)
    assert torch.all(masks[..., :4])
    pos = mask_to_positions(masks[:, 0])
    assert len({tuple(p) for p in pos}) > 20, "samples should vary"
    freq = masks[:, 0].float().mean(0)
    chunk_freq = [freq[4 + 2 * c].item() for c in range(13)]
    assert chunk_freq[1] > 0.95
    assert chunk_freq[2] < min(chunk_freq[0], chunk_freq[3]) / 2
    # each chunk is taken whole (sampling chunks, not tokens)
    m = masks[:, 0, 4:].reshape(400, 13, 2)
    assert torch.all(m[..., 0] == m[..., 1])


def test_greedy_subsets_without_head_is_first_k_and_with_head_is_a_subsequence():
    torch.manual_seed(0)
    cfg = PolicyConfig(k=10, prefix=2, select_chunk=4)
    tokens = [list(range(100, 130)), list(range(200, 208)), list(range(300, 321))]
    hidden = [torch.randn(len(t), 8).half() for t in tokens]
    cat = Catalogue(tokens, torch.randn(3, 8), hidden)
    first = greedy_subsets(None, cat, [0, 1, 2], cfg)
    assert first == [tokens[0][:10], tokens[1], tokens[2][:10]]
    head = PolicyHead(8)
    with torch.no_grad():
        head.w_q.weight.copy_(torch.randn(8, 8))
    chosen = greedy_subsets(head, cat, [0, 1, 2], cfg)
    for sub, full in zip(chosen, tokens):
        assert len(sub) == min(10, len(full))
        assert sub[:2] == full[:2]
        it = iter(full)
        assert all(t in it for t in sub), "kept tokens stay in their original order"
    assert chosen[1] == tokens[1]


def test_chunk_log_prob_is_the_sum_of_token_log_probs():
    logp = torch.log_softmax(torch.randn(1, 14), 1)
    logp[0, :2] = 0
    sums = chunk_sums(logp, 2, 4)
    assert sums.shape == (1, 3)
    assert torch.allclose(sums[0, 1], logp[0, 6:10].sum())


def test_infonce_masks_a_negative_equal_to_the_positive():
    user = torch.randn(3, 4)
    table = torch.randn(5, 4)
    tgt = torch.tensor([0, 1, 2])
    negs = torch.tensor([0, 3, 4])
    logits = infonce_logits(user, table[tgt], table[negs], 0.1, tgt, negs)
    assert logits.shape == (3, 4)
    assert logits[0, 1] == -math.inf and torch.isfinite(logits[1]).all()
    assert torch.all(infonce(logits) >= 0)


def test_credit_reward_varies_one_history_item_at_a_time(monkeypatch):
    """Each (sample, occurrence) CE must be the target's CE under the FULL-text history with only that
    occurrence's item swapped for that sample's subset embedding, and log P must be that subset's."""
    from tokensel.config import UserModelConfig
    from tokensel.models.user_model import UserModel, pad_histories

    torch.manual_seed(0)
    d, S = 8, 3
    cfg = PolicyConfig(k=6, prefix=2, train_chunk=2, samples=S, history=4)
    tokens = [list(range(10 * i, 10 * i + (12 if i % 2 else 5))) for i in range(6)]  # odd items are long
    cat = Catalogue(tokens, torch.randn(6, d), [torch.randn(len(t), d).half() for t in tokens])
    subset_emb = {}

    def fake_embed(llm, cat_, items, masks):  # a distinct, recorded vector per sampled subset
        out = torch.randn(masks.shape[0], len(items), d)
        for s in range(masks.shape[0]):
            for o, i in enumerate(items):
                subset_emb[s, o] = (i, masks[s, o, : len(tokens[i])].clone(), out[s, o])
        return out

    monkeypatch.setattr(stage2, "_embed_subsets", fake_embed)
    user = UserModel(d, UserModelConfig(layers=1, heads=2, max_history=4, dropout=0.0)).eval()
    head = PolicyHead(d)
    batch = [([0, 1, 2, 3], 4), ([5, 2, 1], 0)]
    tgt, negs = torch.tensor([4, 0]), torch.tensor([2, 3, 5])
    ce, lp, _ = stage2._credit_rewards(None, user, head, cat, batch, tgt, negs, cat.item, cfg, 0.1, torch.Generator().manual_seed(0))
    occ = [(0, 1, 1), (0, 3, 3), (1, 0, 5), (1, 2, 1)]  # (user, position, item) of every long history item
    assert ce.shape == lp.shape == (S, len(occ))
    logp, _ = stage2.policy_logp(head, cat, [i for *_, i in occ], cfg.prefix)
    for s in range(S):
        for o, (b, pos, i) in enumerate(occ):
            item, mask, vec = subset_emb[s, o]
            assert item == i and int(mask.sum()) == cfg.k
            hist = cat.item[batch[b][0]].clone()
            hist[pos] = vec
            hs, m = pad_histories([list(range(len(hist)))], hist, cfg.history)
            with torch.no_grad():
                want = infonce(infonce_logits(user.user_embedding(hs, m), cat.item[tgt[b : b + 1]], cat.item[negs], 0.1, tgt[b : b + 1], negs))
            assert torch.allclose(ce[s, o], want[0], atol=1e-5)
            assert torch.allclose(lp[s, o], (logp[o, : len(mask)] * mask).sum(), atol=1e-5)


def test_credit_both_adds_the_subset_as_the_positive_after_the_items_before_it(monkeypatch):
    from tokensel.config import UserModelConfig
    from tokensel.models.user_model import UserModel, pad_histories

    torch.manual_seed(1)
    d, S = 8, 2
    tokens = [list(range(10 * i, 10 * i + (12 if i % 2 else 5))) for i in range(6)]
    cat = Catalogue(tokens, torch.randn(6, d), [torch.randn(len(t), d).half() for t in tokens])
    vecs = torch.randn(S, 4, d)
    monkeypatch.setattr(stage2, "_embed_subsets", lambda llm, cat_, items, masks: vecs[:, : len(items)].clone())
    user = UserModel(d, UserModelConfig(layers=1, heads=2, max_history=4, dropout=0.0)).eval()
    batch = [([0, 1, 2, 3], 4), ([5, 2, 1], 0)]
    tgt, negs = torch.tensor([4, 0]), torch.tensor([2, 3, 5])
    got = {}
    for reward in ("credit", "credit-both"):
        cfg = PolicyConfig(k=6, prefix=2, train_chunk=2, samples=S, history=4, reward=reward)
        got[reward] = stage2._credit_rewards(None, user, PolicyHead(d), cat, batch, tgt, negs, cat.item, cfg, 0.1, torch.Generator().manual_seed(0))[0]
    occ = [(0, 1, 1), (0, 3, 3), (1, 0, 5), (1, 2, 1)]
    for s in range(S):
        for o, (b, pos, i) in enumerate(occ):
            extra = 0.0
            if pos > 0:  # the subset as the positive after batch[b][0][:pos], full text
                hs, m = pad_histories([batch[b][0][:pos]], cat.item, 4)
                with torch.no_grad():
                    eu = user.user_embedding(hs, m)
                extra = infonce(infonce_logits(eu, vecs[s, o][None], cat.item[negs], 0.1, torch.tensor([i]), negs))[0]
            assert torch.allclose(got["credit-both"][s, o], got["credit"][s, o] + extra, atol=1e-5)
    assert not torch.allclose(got["credit-both"], got["credit"])


def test_textsim_reward_scores_each_subset_as_the_text_sim_positive(monkeypatch):
    """Every long item after position 0 (history items and the next item) is an occurrence; its CE is
    text-sim's: user = unit mean of the last `history` reference vectors before it, the subset's own
    mean-pooled vector as the positive, shared negatives with the item itself masked."""

    torch.manual_seed(2)
    d, S = 8, 3
    cfg = PolicyConfig(k=6, prefix=2, train_chunk=2, samples=S, history=2, reward="text-sim")
    tokens = [list(range(10 * i, 10 * i + (12 if i % 2 else 5))) for i in range(6)]  # odd items are long
    cat = Catalogue(tokens, torch.randn(6, d), [torch.randn(len(t), d).half() for t in tokens])
    basis = torch.randn(100, d)
    pooled = lambda toks: basis[toks].mean(0)  # noqa: E731  a vector that depends on which tokens are kept
    monkeypatch.setattr(stage2, "mean_pool_tokens", lambda llm, lists, specials: torch.stack([pooled(t) for t in lists]))
    ref = torch.nn.functional.normalize(torch.randn(6, d), dim=-1)
    batch = [([0, 1, 2, 3], 5), ([5, 2, 1], 0)]
    negs = torch.tensor([1, 2, 4])
    head = PolicyHead(d)
    ce, lp, _ = stage2._textsim_rewards(None, head, cat, batch, negs, ref, cfg, 0.1, torch.Generator().manual_seed(0))
    occ = [(0, 1, 1), (0, 3, 3), (0, 4, 5), (1, 2, 1)]  # item 5 at position 0 of user 1 has no history: left out
    assert ce.shape == lp.shape == (S, len(occ))
    logp, _ = stage2.policy_logp(head, cat, [i for *_, i in occ], cfg.prefix)
    gen = torch.Generator().manual_seed(0)
    masks, _ = stage2._sample(head, cat, [i for *_, i in occ], S, cfg, gen)  # the same draw as inside
    for s in range(S):
        for o, (b, pos, i) in enumerate(occ):
            kept = [t for t, keep in zip(tokens[i], masks[s, o]) if keep]
            assert len(kept) == cfg.k
            seq = (batch[b][0] + [batch[b][1]])[:pos][-cfg.history :]
            u = torch.nn.functional.normalize(ref[seq].mean(0), dim=-1)
            p = torch.nn.functional.normalize(pooled(kept), dim=-1)
            logits = torch.cat([(u @ p)[None], torch.stack([u @ ref[n] if n != i else torch.tensor(-math.inf) for n in negs.tolist()])]) / 0.1
            assert torch.allclose(ce[s, o], -torch.log_softmax(logits, 0)[0], atol=1e-5)
            assert torch.allclose(lp[s, o], (logp[o, : len(tokens[i])] * masks[s, o, : len(tokens[i])]).sum(), atol=1e-5)


def _log(start, end, rate, pairs, p):
    return {"epochs": [
        {"epoch": 0, "policy": {"N@10": start}, "first_k": {"N@10": 3.0}},
        {"epoch": 1, "policy": {"N@10": end}, "first_k": {"N@10": 3.0}, "agreement": {"rate": rate, "pairs": pairs, "p": p}},
    ]}


def test_stage2_warns_when_the_head_learned_nothing_or_got_worse():
    assert stage2.stage2_warnings(_log(3.8, 3.9, 0.56, 20000, 1e-9)) == []
    chance = stage2.stage2_warnings(_log(3.8, 3.9, 0.48, 20000, 0.99))
    assert len(chance) == 2 and "48.0% of 20,000" in chance[0] and "did not learn" in chance[0]
    worse = stage2.stage2_warnings(_log(3.824, 3.76, 0.56, 20000, 1e-9))
    assert len(worse) == 2 and "3.824" in worse[0] and "3.76" in worse[0] and "item-align" in worse[0]
    assert len(stage2.stage2_warnings(_log(3.8, 3.7, 0.5, 100, 0.5))) == 3


def test_agreement_is_a_one_sided_binomial_test():
    assert stage2.agreement(0, 0) == {"rate": 0.0, "pairs": 0, "p": 1.0}
    assert stage2.agreement(50, 100)["p"] > 0.4
    strong = stage2.agreement(600, 1000)
    assert strong["rate"] == 0.6 and strong["p"] < 1e-9
    assert stage2.agreement(400, 1000)["p"] > 0.99  # worse than chance is not evidence of learning
