"""Stage-2 building blocks: the policy head, sampling chunks without replacement, greedy subsets."""

from __future__ import annotations

import math

import pytest
import torch

from tokensel.config import PolicyConfig
from tokensel.policy.head import PolicyHead
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


def test_policy_config_keeps_only_the_papers_reward_and_old_bundle_configs_still_load():
    """The reward variants left the product (research/stage2_rewards.py); a saved config with the paper's
    reward, or with keys this version does not know, still loads."""
    from tokensel.config import PolicyConfig, from_dict
    from tokensel.errors import TokenselError

    cfg = from_dict(PolicyConfig, {"reward": "history", "objective": "paper", "k": 32, "some_future_key": 1})
    assert cfg.reward == "history" and cfg.objective == "paper" and cfg.k == 32
    for bad, needle in (({"reward": "credit"}, "credit"), ({"objective": "greedy"}, "greedy"), ({"samples": 1}, "samples")):
        with pytest.raises(TokenselError, match=needle):
            PolicyConfig(**bad)


def test_every_objective_name_maps_to_a_term_that_rewards_the_right_sign():
    """Each accepted objective name has its function (the pairwise ones here, e2e in train/e2e.py), and each
    pairwise term grows when the likelier subset won (r = +1)."""
    from tokensel.config import OBJECTIVE_NAMES, PolicyConfig
    from tokensel.train import e2e

    assert set(stage2.OBJECTIVES) | {e2e.OBJECTIVE} == set(OBJECTIVE_NAMES)
    d = torch.tensor([0.5])
    for name, term in stage2.OBJECTIVES.items():
        cfg = PolicyConfig(objective=name)
        assert term(torch.tensor([1.0]), d, cfg) > term(torch.tensor([-1.0]), d, cfg), name


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


def test_warnings_of_an_e2e_stage_2_say_what_it_kept_not_what_fell():
    """e2e's epoch 0 is scored by the untrained surrogate, so "fell from the start" would compare two
    recommenders; its choice (one surrogate, three selections) is what the user must know."""
    stage2_warnings = stage2.stage2_warnings
    epochs = [{"epoch": 0, "policy": {"N@10": 2.0}, "first_k": {"N@10": 1.8}}, {"epoch": 1, "policy": {"N@10": 1.0}, "first_k": {"N@10": 5.7}}]
    kept_first = stage2_warnings({"epochs": epochs, "choice": {"chosen": "first-k", "rows": []}})
    assert len(kept_first) == 2 and "policy is first-k" in kept_first[0] and not any("fell" in w for w in kept_first)
    assert stage2_warnings({"epochs": epochs, "choice": {"chosen": "policy", "rows": []}}) == []
    assert any("fell" in w for w in stage2_warnings({"epochs": epochs}))  # no choice (the pairwise objectives): as before
