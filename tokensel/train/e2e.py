"""End-to-end stage 2 (`objective="e2e"`): the policy head learns from the recommendation loss itself.

The pairwise reward of `stage2.py` compares two sampled subsets with frozen models; its sign carries
almost no item-level signal. Here the head's selection acts inside the recommender it serves and the
InfoNCE loss of that recommender trains the head, the user model and the item readout together:

- Selection: the head scores tokens against the `[ITEM]` state (W_Q, W_K and a position prior), chunk
  scores are sums of log p as in the `policy` strategy, and the forward pass keeps exactly the tokens
  `select_mask` keeps (prefix always, budget k, ties to the earlier chunk, short last chunk cut).
- Relaxation: perturbed top-k (Berthet et al. 2020) with a hard forward. The backward pass returns
  E_Z[<dL/dmask, mask(s + sigma Z)> Z] / sigma, the gradient of the Gaussian-smoothed mask,
  estimated with antithetic samples of the same rule. Chosen over Gumbel / soft top-k because it
  needs no second relaxed definition of the rule (short chunks, prefix and ties are handled by
  `select_mask` itself), and its samples are cheap: only the rule runs per sample, not the model.
  sigma is relative to each item's chunk-score spread, so it means the same as the head's scale moves.
- Where the mask acts (`mask_layers`):
  - `top` (CPU-affordable): the top readout (`ItemReadout`: f's last block at `[ITEM]` over cached
    lower-layer states). Dropped tokens get weight 0 in the `[ITEM]` query's attention (renormalised),
    i.e. -inf masking, while the weight still receives a gradient. Approximation: lower layers saw the
    full text, at inference they see only the kept tokens, so the vector barely moves when tokens are
    dropped (measured in research/e2e_approx.py).
  - `exact` (CPU-sized): the item vector's value is f over the kept tokens alone (a forward over at
    most k tokens per item, no gradient through the lower blocks), its gradient with respect to the
    mask is the `top` path's (straight-through). The surrogate recommender then learns from, and
    validation scores, the vectors downstream will embed; only the head's gradient is approximate.
  - `all` (GPU-sized): the same gate in every block's attention with the kept tokens renumbered
    (`models/gated.py`): exactly f over the kept tokens, no approximation, at the price of a forward
    and backward through f per item per step.
- Masked side (`masked_side`): `both` by default (history items, the target and the sampled
  negatives), because downstream every item, the ranked catalogue included, is embedded from its
  compressed text; `history` or `target` mask one side only and embed the other from full text.
- Start: the identity head with a zero prior is `item-align`, so each epoch's validation reports the
  trained head, the identity head and first-k under the same (jointly trained) user model and readout.
  A surrogate trained on the head's selections only favours the head in that comparison (first-k and
  the identity head are scored by a recommender that never read their texts); `surrogate_mix` trains
  it on first-k's texts too, and the warm-up on the identity head's, which is what makes the end of
  training's choice (`keep_best`) fair enough to act on. A recommender retrained per strategy (the
  strategy check at the end of `train`) still has the last word for `--strategy auto`.
- Settle (`settle_epochs`): after the head's last step the surrogate trains a few more epochs with the
  head held, and the choice reads the per-user mean of those epochs' validations (`pool_epochs`). The
  head's last texts then meet a surrogate that has read them, and one epoch's lucky snapshot (the
  surrogate's scores move between epochs by as much as the differences it judges) has to persist.

Surrogate warm-up and mix: a recommender trained on full texts scores the kept tokens' exact vectors
far below what one retrained on them does (research/surrogate_rank.py), so with `exact` or `all` the
head's first gradients would come from a surrogate that cannot yet read compressed texts.
`warmup_epochs` hold the head while the surrogate learns on compressed texts; `surrogate_mix` trains
it on first-k's texts on that share of steps, so it is not fitted to the head's selections alone and
its validation of first-k is not a recommender that never saw first-k's texts.

Only the head is kept: the user model and readout trained here are surrogates (downstream retrains
its own recommender on the compressed texts), so the bundle's stage-1 models are left untouched.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from tokensel.config import CacheConfig, PolicyConfig
from tokensel.errors import TokenselError
from tokensel.io.interactions import Histories
from tokensel.policy.head import PolicyHead
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import BlockInputs, ItemReadout
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.train.e2e_vectors import (
    MASK_LAYERS,
    E2EData,
    keep_mask,
    kept_inputs_table,
    masked_table,
    prepare,
    step_vectors,
)
from tokensel.train.common import draw_negatives, infonce, infonce_logits, stage2_users
from tokensel.train.loop import step_rows
from tokensel.select.auto import SURROGATE_ROW_TEST, SURROGATE_RULE, SURROGATE_TEST, choose_proven
from tokensel.select.rows import rows_vs_first_k
from tokensel.train.stage1 import validate_per_user

OBJECTIVE = "e2e"
MASKED_SIDES = ("both", "history", "target")


def check_e2e(cfg: PolicyConfig) -> None:
    """Refuse bad end-to-end settings as user errors, before anything is loaded."""
    if cfg.masked_side not in MASKED_SIDES:
        raise TokenselError(f"unknown masked side {cfg.masked_side!r}; choose {', '.join(MASKED_SIDES)}")
    if cfg.mask_layers not in MASK_LAYERS:
        raise TokenselError(f"unknown mask layers {cfg.mask_layers!r}; choose {', '.join(MASK_LAYERS)}")
    if not cfg.sigma > 0:
        raise TokenselError(f"the e2e objective needs sigma > 0 (got {cfg.sigma})")
    if cfg.perturb_samples < 2:
        raise TokenselError(f"the e2e objective needs at least 2 perturbation samples (got {cfg.perturb_samples})")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise TokenselError(f"the e2e warm-up needs 0 <= warmup epochs <= epochs (got {cfg.warmup_epochs} of {cfg.epochs})")
    if cfg.grad_chunks < 0 or (cfg.grad_chunks and cfg.mask_layers != "exact"):
        raise TokenselError(f"grad chunks (got {cfg.grad_chunks}) need --mask-layers exact and >= 0")
    if not 0 <= cfg.surrogate_mix < 1:
        raise TokenselError(f"the e2e surrogate mix is a share of steps in [0, 1) (got {cfg.surrogate_mix})")


def masked_validation(readout, user, heads: dict[str, PolicyHead | None], data, hist_v, tgt_v, cfg, fixed: dict[str, BlockInputs] | None = None) -> tuple[dict, dict]:
    """Each selection under the same user model and readout (every item masked): (R@10 / N@10 means,
    every metric per user); `fixed`: the cached kept-token inputs of the selections that do not move."""
    means, users = {}, {}
    for name, h in heads.items():
        table = readout.table(fixed[name]) if fixed and name in fixed else masked_table(readout, h, data, cfg)
        users[name] = validate_per_user(user, table, hist_v, tgt_v, cfg.history)
        means[name] = {m: round(float(users[name][m].mean()), 3) for m in ("R@10", "N@10")}
    return means, users


def pool_epochs(validations: list[dict[str, dict[str, torch.Tensor]]]) -> dict[str, dict[str, torch.Tensor]]:
    """Each selection's per-user metrics averaged over several epochs' validations (the settle epochs).

    Why: the surrogate's reading of a selection moves between epochs by more than the paired test over
    users sees (it treats one epoch's surrogate as fixed), so a choice read off one epoch can flip with
    the run's floating-point order; averaging each user's metrics over several surrogates of the same
    held head leaves the test the differences that persist."""
    return {
        name: {m: torch.stack([v[name][m].double() for v in validations]).mean(0) for m in validations[0][name]}
        for name in validations[0]
    }


# which selection each validated head stands for (select/auto.py's strategy names)
STRATEGY_OF = {"policy": "policy", "identity": "item-align", "first_k": "first-k"}


def keep_best(head: PolicyHead, users: dict[str, dict[str, torch.Tensor]]) -> dict:
    """End of training: keep whichever of the trained head, the identity head (item-align) and first-k
    served the surrogate best on validation (`select.auto.choose_proven`: a selection replaces first-k
    only where it beats it significantly, p < 0.05). The head is set to the choice: left as trained,
    reset to the identity, or told to keep the first tokens.

    Why: the head's gradient can point away from what the recommender rewards (where the title comes
    first it gave title tokens up), and no finite head reaches first-k exactly; a selector that knows
    when the first tokens are the best it can keep must be able to say so. The surrogate was trained on
    the head's and (with `surrogate_mix`) first-k's texts, so the three are read by the same model.
    What the test cannot see: the surrogate is one training run, so its p covers users and the settle
    epochs pooled, not training-seed variance; the choice records that (`test`, SURROGATE_TEST) and
    the downstream check, which retrains with several seeds, is the verdict `--strategy auto` reads."""
    results = {
        STRATEGY_OF[name]: ({m: float(v.mean()) for m, v in u.items()}, {m: v.double().numpy() for m, v in u.items()})
        for name, u in users.items()
    }
    rows = rows_vs_first_k(results, paired_test=SURROGATE_ROW_TEST)
    chosen = choose_proven(rows)
    if chosen == "item-align":
        head.reset()
    elif chosen == "first-k":
        head.keeps_first_k = True
    return {"chosen": chosen, "rows": rows, "rule": SURROGATE_RULE, "test": SURROGATE_TEST, "scored": "stage-2 validation, the surrogate recommender"}


# ----------------------------------------------------------------------------------------- training
def train_e2e(
    llm: ItemLLM,
    user: UserModel,
    head: PolicyHead,
    tokens: list[list[int]],
    hist: Histories,
    cfg: PolicyConfig,
    temperature: float,
    log: Callable[[dict], None] = print,
    data: E2EData | None = None,
    cache: CacheConfig | None = None,
) -> dict:
    """Train `head` in place (the user model and readout are trained copies, then dropped); returns the
    log: per epoch the masked-readout validation of the head, the identity head and first-k."""
    check_e2e(cfg)
    lower = [p for p in llm.model.parameters() if p.requires_grad]
    for p in lower:  # f itself is never trained here: gradients through it reach only the gate
        p.requires_grad_(False)
    try:
        return _train(llm, user, head, tokens, hist, cfg, temperature, log, data, cache)
    finally:
        for p in lower:
            p.requires_grad_(True)


def _train(llm, user, head, tokens, hist, cfg, temperature, log, data, cache) -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if cfg.mask_layers == "all" and llm.device.type == "cpu":
        log({"e2e": "the mask in every block runs f forward and backward over every item of every step: on a CPU expect hours per epoch (a GPU job; --mask-layers top fits a CPU)"})
    data = data or prepare(llm, tokens, cfg.mask_layers, cache)
    prep_s = round(time.perf_counter() - t0, 1)
    dev = llm.device if data.mask_layers == "all" else torch.device("cpu")  # top-block steps are CPU-sized
    user = copy.deepcopy(user).float().to(dev)
    for p in user.parameters():
        p.requires_grad_(True)
    readout = ItemReadout(llm).to(dev)
    head.cpu()  # the head scores on the CPU (cheap); its mask travels to `dev` with its gradient
    identity = PolicyHead(head.dim).eval()
    opt = torch.optim.Adam(
        [
            {"params": [head.w_q.weight, head.w_k.weight], "lr": cfg.lr},
            {"params": [head.pos_prior], "lr": cfg.prior_lr},
            {"params": list(user.parameters()), "lr": cfg.model_lr},
            {"params": list(readout.parameters()), "lr": cfg.model_lr if cfg.readout_lr is None else cfg.readout_lr},
        ]
    )
    pairs, v_h, v_t = stage2_users(hist, cfg, rng)
    n_items = len(data.tokens)
    heads = {"policy": head, "identity": identity, "first_k": None}
    # exact mask: the kept-token inputs of every selection that does not move, once (steps and validation
    # read them). First-k and the identity never move; the head's own is held only while it warms up.
    held = [name for name in heads if name != "policy" or cfg.warmup_epochs]
    fixed = {name: kept_inputs_table(data, heads[name], cfg) for name in held} if data.mask_layers == "exact" else {}
    start, users = masked_validation(readout, user, heads, data, v_h, v_t, cfg, fixed)
    epochs = [{"epoch": 0, **start, "seconds_prepare": prep_s}]
    log({"e2e": "start (stage-1 user model, untrained readout)", **epochs[0]})
    settle = cfg.settle_epochs if cfg.keep_best else 0
    settled: list[dict[str, dict[str, torch.Tensor]]] = []  # each settle epoch's per-user validation
    for epoch in range(1, cfg.epochs + settle + 1):
        t1 = time.perf_counter()
        rng.shuffle(pairs)
        head.train(), user.train(), readout.train()
        total, seen = 0.0, 0
        settling = epoch > cfg.epochs
        moves = cfg.warmup_epochs < epoch and not settling  # warm-up and settle: the head is held, the surrogate learns
        if moves:
            fixed.pop("policy", None)  # the head's selection moves from here on
        elif settling and "policy" not in fixed and data.mask_layers == "exact":
            fixed["policy"] = kept_inputs_table(data, head, cfg)  # settle: the final head's texts, once
        bar = tqdm(total=len(pairs), desc=f"stage 2 epoch {epoch}", unit="user", disable=None, leave=False)
        for s in range(0, len(pairs), cfg.batch_size):
            batch = pairs[s : s + cfg.batch_size]
            bar.update(len(batch))
            first_k_step = cfg.surrogate_mix > 0 and rng.random() < cfg.surrogate_mix
            selector = None if first_k_step else head
            negs = draw_negatives(hist, n_items, cfg.negatives, generator=gen)
            hist_items = sorted({i for h, _ in batch for i in h})
            side_items = sorted({t for _, t in batch} | set(negs.tolist()))
            # the step's rows alone, items indexed by position among them (step_rows)
            need, local, local_negs = step_rows([[*h, t] for h, t in batch], negs)
            at = {item: j for j, item in enumerate(need)}
            table = torch.zeros(len(need), data.item.shape[1], device=dev)
            if cfg.masked_side == "both":  # every item once, masked
                groups = [(need, True)]
            else:  # an item on both sides is embedded as the later (target/negative) side wants
                groups = [(hist_items, cfg.masked_side == "history"), (side_items, cfg.masked_side == "target")]
            for group, masked in groups:
                if masked and (source := "first_k" if first_k_step else "policy") in fixed:
                    vec = readout.encode(fixed[source], group, dev)
                else:
                    mask, n = keep_mask(selector, data, group, cfg, gen if moves else None) if masked else (None, None)
                    vec = step_vectors(readout, data, group, mask, n, cfg, gen)
                table = table.index_copy(0, torch.tensor([at[i] for i in group], device=dev), vec)
            hs, hm = pad_histories([w[:-1] for w in local], table, cfg.history)
            eu = user.user_embedding(hs, hm)
            tgt, negs = torch.tensor([w[-1] for w in local], device=dev), local_negs.to(dev)
            loss = infonce(infonce_logits(eu, table[tgt], table[negs], temperature, tgt, negs)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
        bar.close()
        row = {"epoch": epoch, "loss": round(total / max(seen, 1), 4), "seconds": round(time.perf_counter() - t1, 1), "head_moved": moves}
        if settling:
            row["settle"] = True
        head.eval()
        means, users = masked_validation(readout, user, heads, data, v_h, v_t, cfg, fixed)
        if settling:
            settled.append(users)
        row.update(means)
        prior = head.pos_prior.detach()
        row["prior"] = {"mean_first_k": round(float(prior[cfg.prefix : cfg.k].mean()), 3), "mean_after_k": round(float(prior[cfg.k : 256].mean()), 3)}
        with torch.no_grad():
            row["w_change"] = round(float((head.w_q.weight - torch.eye(head.dim)).norm() + (head.w_k.weight - torch.eye(head.dim)).norm()), 4)
        epochs.append(row)
        log(row)
    head.eval()
    out = {"objective": OBJECTIVE, "epochs": epochs}
    if cfg.keep_best:
        out["choice"] = keep_best(head, pool_epochs(settled) if settled else users)
        out["choice"]["epochs_pooled"] = max(len(settled), 1)
        log({"e2e": "kept", **out["choice"]})
    head.to(llm.device)
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}
