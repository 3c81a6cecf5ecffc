"""Stage 2: learn the policy head with f and g frozen (paper eqs. 8-16, SPEC.md).

Per training history: sample `samples` chunk subsets of every history item without replacement
(Gumbel top-k over chunk log-probabilities, then the same budget rule as selection), embed each
subset with frozen f, build the user embedding with frozen g, score it with InfoNCE against the
target's FULL-text embedding and N shared negatives, and compare subsets pairwise:
r = +1 if CE' <= CE'' else -1. Objectives on d = log P(I') - log P(I''):
    paper    maximise r * d                      (eq. 16, linear and unbounded)
    bounded  minimise -log sigmoid(beta * r * d)
Tokens shared by both subsets cancel in d, so they get no gradient (Theorem 1).
The reward is the paper's (`history_rewards`); `train_stage2` takes another `Reward` so that
experiments (research/stage2_rewards.py) can swap it without changing the product.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy import stats

from tokensel.config import PolicyConfig
from tokensel.train.metrics import per_user_metrics, rank_users
from tokensel.io.interactions import Histories
from tokensel.models.item_llm import ItemLLM
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.policy.head import PolicyHead
from tokensel.select.rule import chunk_sums, select_mask
from tokensel.train.warnings import stage2_warnings  # noqa: F401  (re-exported)
from tokensel.train.common import Catalogue, draw_negatives, embed_tokens, infonce, infonce_logits, stage2_users


def paper_objective(r: torch.Tensor, d: torch.Tensor, cfg: PolicyConfig) -> torch.Tensor:
    """Eq. 16: r * d, linear and unbounded."""
    return r * d


def bounded_objective(r: torch.Tensor, d: torch.Tensor, cfg: PolicyConfig) -> torch.Tensor:
    """log sigmoid(beta * r * d): the same sign, but a pair the head already orders well stops pulling."""
    return F.logsigmoid(cfg.beta * r * d)


# PolicyConfig.objective -> the per-pair term stage 2 maximises (reward sign r, log-probability gap d)
OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor, PolicyConfig], torch.Tensor]] = {
    "paper": paper_objective,
    "bounded": bounded_objective,
}


def pad_hidden(hidden: list[torch.Tensor], items: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.tensor([hidden[i].shape[0] for i in items])
    out = torch.zeros(len(items), int(n.max()), hidden[items[0]].shape[1])
    for r, i in enumerate(items):
        out[r, : n[r]] = hidden[i].float()
    return out.to(device), n.to(device)


def policy_logp(head: PolicyHead, cat: Catalogue, items: list[int], prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[U, L] log p_i of each item's candidate tokens, and [U] token counts."""
    dev = head.w_q.weight.device
    h, n = pad_hidden(cat.hidden, items, dev)
    return head.log_probs(h, cat.item[items].to(dev), n, prefix), n


@torch.no_grad()
def greedy_subsets(head: PolicyHead | None, cat: Catalogue, items: list[int], cfg: PolicyConfig) -> list[list[int]]:
    """Token ids kept by the trained policy (or first-k when head is None), at the selection chunk size."""
    out = {}
    long = [i for i in items if len(cat.tokens[i]) > cfg.k]
    for s in range(0, len(long), 256):
        part = long[s : s + 256]
        n = torch.tensor([len(cat.tokens[i]) for i in part])
        if head is None:
            scores = torch.zeros(len(part), 1 + int(n.max()))
        else:
            logp, _ = policy_logp(head, cat, part, cfg.prefix)
            scores = chunk_sums(logp.cpu(), cfg.prefix, cfg.select_chunk)
        mask = select_mask(scores, n, k=cfg.k, prefix=cfg.prefix, chunk=cfg.select_chunk, width=int(n.max()))
        for r, i in enumerate(part):
            t = torch.tensor(cat.tokens[i])
            out[i] = t[mask[r, : len(t)]].tolist()
    return [out.get(i, cat.tokens[i]) for i in items]


@torch.no_grad()
def evaluate_selection(llm: ItemLLM, user: UserModel, head: PolicyHead | None, cat: Catalogue, hist: list[list[int]], tgt: list[int], cfg: PolicyConfig) -> dict[str, float]:
    """Validation of a selection: users' histories embedded from the kept tokens, targets from full text."""
    items = sorted({i for h in hist for i in h})
    table = cat.item.clone()
    comp, _ = embed_tokens(llm, greedy_subsets(head, cat, items, cfg))
    table[items] = comp
    dev = llm.device
    hs, mask = pad_histories(hist, table.to(dev), cfg.history)
    eu = F.normalize(user.user_embedding(hs, mask), dim=-1)
    ranks = rank_users(eu, F.normalize(cat.item.to(dev), dim=-1), tgt, hist)
    m = per_user_metrics(ranks)
    return {"R@10": round(float(m["R@10"].mean()), 3), "N@10": round(float(m["N@10"].mean()), 3)}


@torch.no_grad()
def sample_masks(scores: torch.Tensor, n: torch.Tensor, samples: int, cfg: PolicyConfig, gen: torch.Generator) -> torch.Tensor:
    """[S, O, L] keep masks: Gumbel-perturbed chunk scores through the selection rule = sampling without replacement."""
    O, C = scores.shape
    u = torch.rand(samples, O, C, generator=gen).clamp_(1e-9, 1 - 1e-9)
    gumbel = -torch.log(-torch.log(u))
    pert = (scores.detach().cpu()[None] + gumbel).reshape(samples * O, C)
    mask = select_mask(pert, n.cpu().repeat(samples), k=cfg.k, prefix=cfg.prefix, chunk=cfg.train_chunk, width=int(n.max()))
    return mask.reshape(samples, O, -1)


def train_stage2(
    llm: ItemLLM,
    user: UserModel,
    head: PolicyHead,
    cat: Catalogue,
    hist: Histories,
    cfg: PolicyConfig,
    temperature: float,
    log: Callable[[dict], None] = print,
    reward: Reward | None = None,
) -> dict:
    """Train `head` in place (cfg is validated by PolicyConfig); returns the log of the run."""
    reward = reward or PAPER_REWARD
    objective_term = OBJECTIVES[cfg.objective]
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = llm.device
    user.eval()
    llm.model.eval()
    for p in list(user.parameters()) + list(llm.model.parameters()):
        p.requires_grad_(False)
    head.to(dev).train()
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    data, v_h, v_t = stage2_users(hist, cfg, rng)
    n_items = cat.item.shape[0]
    item_table = cat.item.to(dev)
    t0 = time.perf_counter()
    ref_table = item_table if reward.table is None else reward.table(llm, cat, cfg).to(dev)
    evaluate = reward.validate
    first_k = evaluate(llm, user, None, cat, v_h, v_t, cfg)
    start = evaluate(llm, user, head, cat, v_h, v_t, cfg)
    log({"valid first-k": first_k, "valid policy (start)": start})
    steps = []
    epochs = [{"epoch": 0, "policy": start, "first_k": first_k}]
    S = cfg.samples
    pairs = [(a, b) for a in range(S) for b in range(a + 1, S)]
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(data)
        acc = {"objective": 0.0, "reward_rate": 0.0, "mean_r": 0.0, "ce": 0.0, "n": 0}
        agreed = compared = 0  # sampled pairs where the subset the head found likelier had the lower loss
        for s in range(0, len(data), cfg.batch_size):
            batch = data[s : s + cfg.batch_size]
            B = len(batch)
            tgt = torch.tensor([t for _, t in batch], device=dev)
            negs = draw_negatives(hist, n_items, cfg.negatives, generator=gen).to(dev)
            got = reward.losses(llm, user, head, cat, batch, tgt, negs, ref_table, cfg, temperature, gen)
            if got is None:
                continue
            loss_of, units, ce = got
            obj_terms, agree = [], []
            for a, b in pairs:
                r = torch.where(loss_of[a] <= loss_of[b], 1.0, -1.0)
                d = units[a] - units[b]
                obj_terms.append(objective_term(r, d, cfg))
                # the reward of the subset the policy itself prefers: +1 if the likelier one won
                agree.append(((torch.sign(d.detach()) * r) > 0).float())
            objective = torch.stack(obj_terms).mean()
            loss = -objective
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                opt.step()
            acc["objective"] += objective.item() * B
            won = torch.stack(agree)
            acc["reward_rate"] += won.mean().item() * B
            agreed, compared = agreed + int(won.sum().item()), compared + won.numel()
            acc["mean_r"] += torch.stack([torch.where(loss_of[a] <= loss_of[b], 1.0, -1.0) for a, b in pairs]).mean().item() * B
            acc["ce"] += ce.mean().item() * B
            acc["n"] += B
            if len(steps) % 20 == 0:
                log({"epoch": epoch, "users": acc["n"], "objective": round(acc["objective"] / acc["n"], 4), "reward_rate": round(acc["reward_rate"] / acc["n"], 4), "ce": round(acc["ce"] / acc["n"], 4), "seconds": round(time.perf_counter() - t0, 1)})
            steps.append({"epoch": epoch, "objective": objective.item(), "reward_rate": won.mean().item()})
        row = {k: round(v / max(acc["n"], 1), 4) for k, v in acc.items() if k != "n"}
        row.update({"epoch": epoch, "seconds": round(time.perf_counter() - t0, 1), "agreement": agreement(agreed, compared)})
        row["policy"] = evaluate(llm, user, head, cat, v_h, v_t, cfg)
        row["first_k"] = first_k
        epochs.append(row)
        log(row)
    head.eval()
    return {"epochs": epochs, "steps_logged": len(steps), "seconds": round(time.perf_counter() - t0, 1)}


def agreement(agreed: int, compared: int) -> dict:
    """How often the head, before its update on a batch, preferred the subset its reward preferred; p is
    the one-sided binomial test against chance (ties count as misses, so it errs towards "not learned";
    approximate: the pairs of one user are not independent)."""
    p = stats.binomtest(agreed, compared, 0.5, alternative="greater").pvalue if compared else 1.0
    return {"rate": round(agreed / max(compared, 1), 4), "pairs": compared, "p": float(f"{p:.3g}")}


def _subset_tokens(cat: Catalogue, items: list[int], masks: torch.Tensor) -> list[list[int]]:
    """The kept tokens of every sampled subset, sample-major ([S, O, L] keep masks over items' tokens)."""
    out = []
    for si in range(masks.shape[0]):
        for r, i in enumerate(items):
            t = torch.tensor(cat.tokens[i])
            out.append(t[masks[si, r, : len(t)].cpu()].tolist())
    return out


def _embed_subsets(llm: ItemLLM, cat: Catalogue, items: list[int], masks: torch.Tensor) -> torch.Tensor:
    """[S, O, d] frozen-f [ITEM] embeddings of every sampled subset."""
    emb, _ = embed_tokens(llm, _subset_tokens(cat, items, masks))
    return emb.to(masks.device).reshape(masks.shape[0], len(items), -1)


def _sample(head: PolicyHead, cat: Catalogue, items: list[int], S: int, cfg: PolicyConfig, gen: torch.Generator):
    """S sampled keep masks over the items' tokens ([S, O, L]) and each subset's log P ([S, O])."""
    logp, n = policy_logp(head, cat, items, cfg.prefix)
    scores = chunk_sums(logp, cfg.prefix, cfg.train_chunk)
    masks = sample_masks(scores, n, S, cfg, gen).to(logp.device)  # [S, O, L]
    return masks, (logp[None] * masks[..., : logp.shape[1]]).sum(-1)


def history_rewards(llm, user, head, cat, batch, tgt, negs, item_table, cfg, temperature, gen):
    """The paper's reward (eqs. 13-15): subsets of every history item, CE of the user's next item (full
    text) against shared negatives. Returns (loss per sample and user, log P per sample and user, CE)."""
    dev, S, B = item_table.device, cfg.samples, len(batch)
    occ = [(b, i) for b, (h, _) in enumerate(batch) for i in h]  # every history item occurrence
    sel = [o for o, (_, i) in enumerate(occ) if len(cat.tokens[i]) > cfg.k]
    logp_hist = torch.zeros(S, B, device=dev)
    emb = item_table[[i for _, i in occ]][None].repeat(S, 1, 1)  # short items: full text = kept text
    if sel:
        items = [occ[o][1] for o in sel]
        masks, lp = _sample(head, cat, items, S, cfg, gen)
        owner = torch.tensor([occ[o][0] for o in sel], device=dev)
        logp_hist = logp_hist.index_add(1, owner, lp)
        with torch.no_grad():
            emb[:, sel] = _embed_subsets(llm, cat, items, masks)
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
    return ce, logp_hist, ce


@dataclass(frozen=True)
class Reward:
    """How stage 2 judges sampled subsets: `losses` gives (loss per sample and unit, the units' log P, CE)
    or None for a batch with nothing to compare (lower loss wins the pair); `validate` the validation
    metrics of a head (None: first-k); `table`, when set, the item table `losses` receives instead of
    the full-text [ITEM] states."""

    losses: Callable
    validate: Callable = evaluate_selection
    table: Callable | None = None
    name: str = "history"


PAPER_REWARD = Reward(history_rewards)
