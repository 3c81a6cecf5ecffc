"""Stage-2 reward variants that never beat the paper's (README "Decisions", RESULTS.md), kept for experiments.

The product trains with the paper's reward only (tokensel.train.stage2.history_rewards). Each variant
here is a `Reward` for `train_stage2(..., reward=REWARDS[name])`:
    credit, credit-both  one history item varied at a time (credit-both adds the subset as the positive)
    item                 subset stays close to the full-text embedding
    target               subsets of the next item, everything compressed
    text-sim             subsets as the positive under the training-free text-sim scorer
The scripts beside this file use them: research/train_variant (a bundle trained with a variant, the
command the RESULTS.md rows with a variant reward came from as `tokensel train --reward NAME`),
research/reward_signal.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tokensel.config import PolicyConfig
from tokensel.train.metrics import per_user_metrics, rank_users
from tokensel.evaluate.recommenders import history_means, mean_pool_tokens
from tokensel.policy.head import PolicyHead
from tokensel.models.item_llm import ItemLLM
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.train.common import Catalogue, embed_tokens, infonce, infonce_logits
from tokensel.train.stage1 import validate
from tokensel.train.stage2 import Reward, _embed_subsets, _sample, _subset_tokens, greedy_subsets, history_rewards

def compressed_table(llm: ItemLLM, head: PolicyHead | None, cat: Catalogue, cfg: PolicyConfig) -> torch.Tensor:
    """[N, d] item embeddings of the whole catalogue from its kept tokens (first-k when head is None)."""
    table, _ = embed_tokens(llm, greedy_subsets(head, cat, list(range(len(cat.tokens))), cfg))
    return table


def evaluate_compressed(llm: ItemLLM, user: UserModel, head: PolicyHead | None, cat: Catalogue, hist: list[list[int]], tgt: list[int], cfg: PolicyConfig) -> dict[str, float]:
    """Validation as downstream sees it: histories AND the ranked catalogue embedded from the kept tokens."""
    return compressed_metrics(user, compressed_table(llm, head, cat, cfg).to(llm.device), hist, tgt, cfg.history)


def compressed_metrics(user: UserModel, table: torch.Tensor, hist: list[list[int]], tgt: list[int], history: int) -> dict[str, float]:
    """R@10 / N@10 of g over a given table of compressed item embeddings (histories and ranked catalogue)."""
    m = validate(user, table, hist, tgt, history)
    return {"R@10": m["R@10"], "N@10": m["N@10"]}


@torch.no_grad()
def textsim_table(llm: ItemLLM, head: PolicyHead | None, cat: Catalogue, cfg: PolicyConfig) -> torch.Tensor:
    """[N, d] unit text-sim vectors (mean-pooled frozen f, specials included) of the kept tokens (first-k when head is None)."""
    kept = greedy_subsets(head, cat, list(range(len(cat.tokens))), cfg)
    return F.normalize(mean_pool_tokens(llm, kept, specials=True), dim=-1)


def evaluate_textsim(llm: ItemLLM, user: UserModel, head: PolicyHead | None, cat: Catalogue, hist: list[list[int]], tgt: list[int], cfg: PolicyConfig) -> dict[str, float]:
    """Validation by the training-free text-sim recommender over the compressed catalogue (g unused)."""
    return textsim_metrics(textsim_table(llm, head, cat, cfg), hist, tgt, cfg.history)


def textsim_metrics(table: torch.Tensor, hist: list[list[int]], tgt: list[int], history: int) -> dict[str, float]:
    """Text-sim R@10 / N@10 over a given table of unit item vectors (users = mean of their last `history` rows)."""
    m = per_user_metrics(rank_users(history_means(hist, table, history), table, tgt, hist))
    return {"R@10": round(float(m["R@10"].mean()), 3), "N@10": round(float(m["N@10"].mean()), 3)}


def _item_rewards(llm, user, head, cat, batch, tgt, negs, item_table, cfg, temperature, gen):
    """Item reward: subsets of every history item sampled as the paper's, each judged by how far its
    embedding moves from the full-text one (loss = -cosine); CE of the next item is logged only."""
    dev, S, B = item_table.device, cfg.samples, len(batch)
    occ = [(b, i) for b, (h, _) in enumerate(batch) for i in h]  # every history item occurrence
    sel = [o for o, (_, i) in enumerate(occ) if len(cat.tokens[i]) > cfg.k]
    logp_hist = torch.zeros(S, B, device=dev)
    emb = item_table[[i for _, i in occ]][None].repeat(S, 1, 1)  # short items: full text = kept text
    sims = None
    if sel:
        items = [occ[o][1] for o in sel]
        masks, lp = _sample(head, cat, items, S, cfg, gen)
        owner = torch.tensor([occ[o][0] for o in sel], device=dev)
        logp_hist = logp_hist.index_add(1, owner, lp)
        with torch.no_grad():
            emb[:, sel] = _embed_subsets(llm, cat, items, masks)
        # item-level proxy: how close each subset's embedding stays to its full-text one
        sims = F.cosine_similarity(emb[:, sel], item_table[items][None], dim=-1)  # [S, O]
    seqs, ptr = [], 0
    for h, _ in batch:
        seqs.append(list(range(ptr, ptr + len(h))))
        ptr += len(h)
    ces = []
    with torch.no_grad():
        for si in range(S):
            hs, mask = pad_histories(seqs, emb[si], cfg.history)
            eu = user.user_embedding(hs, mask)
            ces.append(infonce(infonce_logits(eu, item_table[tgt], item_table[negs], temperature, tgt, negs)))
    ce = torch.stack(ces)  # [S, B]
    # lower is better: the negated similarity to the full-text embedding
    return None if sims is None else (-sims, lp, ce)


def _credit_rewards(llm, user, head, cat, batch, tgt, negs, item_table, cfg, temperature, gen, both=False):
    """Per-item credit: the paper's CE of the next item, but only ONE history item's subset varies
    between the compared samples; every other history item keeps its full text. The pairs are
    formed within each history occurrence, so a subset is judged by its own effect on the target,
    not by the sum of every other item's draw (the whole-history reward's variance). `credit-both`
    adds the subset's CE as the positive after the items before it (`as_target_ce`)."""
    S = cfg.samples
    occ = [(b, pos, i) for b, (h, _) in enumerate(batch) for pos, i in enumerate(h)]
    occ = [o for o in occ if len(cat.tokens[o[2]]) > cfg.k]
    if not occ:
        return None
    masks, lp = _sample(head, cat, [i for _, _, i in occ], S, cfg, gen)  # lp: [S, O]
    with torch.no_grad():
        emb = _embed_subsets(llm, cat, [i for _, _, i in occ], masks)  # [S, O, d]
        ce = swapped_ce(user, item_table, emb, occ, batch, tgt, negs, temperature, cfg.history)
        if both:  # the subset also stands as the positive after the items before it
            ce = ce + as_target_ce(user, item_table, emb, occ, batch, negs, temperature, cfg.history)
    return ce, lp, ce


@torch.no_grad()
def swapped_ce(user, item_table, emb, occ, batch, tgt, negs, temperature, history) -> torch.Tensor:
    """[S, O] CE of each user's next item (full text, shared negatives) when sample s of occurrence
    o = (row in batch, position, item) stands in for that history item; every other item full text."""
    S, O, _ = emb.shape
    N = item_table.shape[0]
    table = torch.cat([item_table, emb.reshape(S * O, -1)])  # row N + s*O + o = sample s of occurrence o
    seqs, users = [], []
    for s in range(S):
        for o, (b, pos, _) in enumerate(occ):
            h = list(batch[b][0])
            h[pos] = N + s * O + o
            seqs.append(h)
            users.append(b)
    ce = torch.empty(len(seqs), device=item_table.device)
    for c in range(0, len(seqs), 1024):
        hs, mask = pad_histories(seqs[c : c + 1024], table, history)
        t = tgt[users[c : c + 1024]]
        eu = user.user_embedding(hs, mask)
        ce[c : c + 1024] = infonce(infonce_logits(eu, item_table[t], item_table[negs], temperature, t, negs))
    return ce.reshape(S, O)


@torch.no_grad()
def as_target_ce(user, table, emb, occ, batch, negs, temperature, history) -> torch.Tensor:
    """[S, O] CE of each sampled subset as the positive after the (full-text) items before it in its
    history, against shared negatives: how recognisable the kept text leaves the item, the way a
    compressed catalogue is ranked downstream. Occurrences at position 0 have no history: 0."""
    S, O, _ = emb.shape
    out = torch.zeros(S, O, device=emb.device)
    has = [o for o, (_, pos, _) in enumerate(occ) if pos > 0]
    if not has:
        return out
    hs, mask = pad_histories([batch[occ[o][0]][0][: occ[o][1]] for o in has], table, history)
    eu = user.user_embedding(hs, mask)  # [H, d]
    ids = torch.tensor([occ[o][2] for o in has], device=emb.device)
    for s in range(S):
        out[s, has] = infonce(infonce_logits(eu, emb[s, has], table[negs], temperature, ids, negs))
    return out


def _target_rewards(llm, user, head, cat, batch, tgt, negs, ref_table, cfg, temperature, gen):
    """Target reward: subsets of the user's NEXT item, scored by the CE of that subset's embedding against
    the user embedding and shared negatives, history and negatives embedded from their first-k tokens.
    Credit goes to one item's choice, and both sides are compressed, as in the downstream recommender."""
    pick = [b for b, (_, t) in enumerate(batch) if len(cat.tokens[t]) > cfg.k]
    if not pick:
        return None
    items = [batch[b][1] for b in pick]
    masks, lp = _sample(head, cat, items, cfg.samples, cfg, gen)
    with torch.no_grad():
        emb = _embed_subsets(llm, cat, items, masks)  # [S, P, d]
        hs, mask = pad_histories([batch[b][0] for b in pick], ref_table, cfg.history)
        eu = user.user_embedding(hs, mask)
        t = tgt[pick]
        ce = torch.stack([infonce(infonce_logits(eu, emb[si], ref_table[negs], temperature, t, negs)) for si in range(cfg.samples)])
    return ce, lp, ce


def _textsim_rewards(llm, head, cat, batch, negs, ref_table, cfg, temperature, gen):
    """Text-sim reward: sampled subsets of every long item that follows at least one item in a training
    sequence (history items and the next item) stand as the positive of the training-free text-sim
    scorer: user = mean of the unit text-sim vectors of the (first-k) items before it, InfoNCE against
    shared first-k negatives. f and g's [ITEM] readout are not involved: this is the representation
    under which retrained recommenders and text-sim alike prefer first-k to random chunks, and a
    subset's effect here is mostly the item's own (research/reward_signal, `text-sim` side). Measured on
    the results are in RESULTS.md."""
    occ = [(b, pos, i) for b, (h, t) in enumerate(batch) for pos, i in enumerate(list(h) + [t])]
    occ = [o for o in occ if o[1] > 0 and len(cat.tokens[o[2]]) > cfg.k]
    if not occ:
        return None
    items = [i for _, _, i in occ]
    masks, lp = _sample(head, cat, items, cfg.samples, cfg, gen)
    with torch.no_grad():
        seqs = [(list(batch[b][0]) + [batch[b][1]])[:pos] for b, pos, _ in occ]
        pooled = mean_pool_tokens(llm, _subset_tokens(cat, items, masks), specials=True).to(ref_table.device)
        ce = textsim_positive_ce(pooled.reshape(cfg.samples, len(items), -1), seqs, items, negs, ref_table, cfg.history, temperature)
    return ce, lp, ce


@torch.no_grad()
def textsim_positive_ce(emb: torch.Tensor, seqs: list[list[int]], items: list[int], negs: torch.Tensor, ref_table: torch.Tensor, history: int, temperature: float) -> torch.Tensor:
    """[S, O] InfoNCE CE of each subset vector emb[s, o] (mean-pooled) as the positive after seqs[o], the
    items before it, text-sim style: the user is the unit mean of their last `history` rows of ref_table
    (unit vectors), scores are cosines / temperature, shared negatives with the item itself masked."""
    users = F.normalize(history_means(seqs, ref_table, history), dim=-1)  # [O, d]
    ids = torch.tensor(items, device=ref_table.device)
    return torch.stack([infonce(infonce_logits(users, e, ref_table[negs], temperature, ids, negs)) for e in emb])


REWARDS: dict[str, Reward] = {
    "history": Reward(history_rewards),
    "credit": Reward(_credit_rewards, name="credit"),
    "credit-both": Reward(functools.partial(_credit_rewards, both=True), name="credit-both"),
    "item": Reward(_item_rewards, name="item"),
    "target": Reward(_target_rewards, validate=evaluate_compressed, table=lambda llm, cat, cfg: compressed_table(llm, None, cat, cfg), name="target"),
    "text-sim": Reward(
        lambda llm, user, head, cat, batch, tgt, negs, table, cfg, temperature, gen: _textsim_rewards(llm, head, cat, batch, negs, table, cfg, temperature, gen),
        validate=evaluate_textsim,
        table=lambda llm, cat, cfg: textsim_table(llm, None, cat, cfg),
        name="text-sim",
    ),
}
