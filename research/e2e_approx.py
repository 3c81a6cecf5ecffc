"""What the masked readout costs: in training the lower layers of f see the full text and only the
`[ITEM]` query of the last block is masked; at inference f runs over the kept tokens alone.

    python research/e2e_approx.py ITEMS --bundle tokensel/default_bundle --n 300 --k 32,64

For a sample of long items (more than k tokens) and the item-align selection (the e2e head's start)
and first-k, compares the masked-readout vector with the real forward over the kept tokens: cosine
of the two vectors per item, Spearman correlation of the item-item cosine similarities, and the
mean overlap of each item's 10 nearest neighbours (within the sample). The unmasked readout
(full text) against the real kept-token forward is printed as the reference for how far apart
"full" and "kept" are at all.

--mask-layers all: the mask in every block with the kept tokens renumbered (models/gated.py), the
end-to-end stage 2's exact variant: masked vs real should be cos 1 up to float error.

--item-from prefix: the `[ITEM]` position's own input to the last block (its query, its residual and
its own key) comes from a forward over the always-kept prefix alone, not the full text, so the
readout's only route to the dropped text is the other kept positions' states (see `prefix_item`).
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F
from scipy import stats

from tokensel.config import PolicyConfig
from tokensel.io.items import read_items
from tokensel.policy.bundle import Bundle
from tokensel.policy.head import PolicyHead
from tokensel.models.readout import ItemReadout
from tokensel.train.common import embed_tokens
from tokensel.train.e2e_vectors import E2EData, item_vectors, keep_mask, prepare


@torch.inference_mode()
def prefix_item(llm, data: E2EData, prefix: int) -> None:
    """Replace each cached `[ITEM]` block input by the one a forward over the first `prefix` tokens gives."""
    short = [t[:prefix] for t in data.tokens]
    ids, mask, off = llm.build_inputs(short)
    for s in range(0, len(short), 128):
        g = list(range(s, min(s + 128, len(short))))
        out = llm.model(input_ids=ids[g].to(llm.device), attention_mask=mask[g].to(llm.device), output_hidden_states=True)
        h = out.hidden_states[-2].float().cpu()
        for j, i in enumerate(g):
            data.cache.states[i, data.cache.item_pos[i]] = h[j, off + len(short[i])]


def agreement(a: torch.Tensor, b: torch.Tensor, center: bool = False) -> dict:
    if center:  # as the hllm recommender does (--center): the catalogue mean carries no ranking signal
        a, b = a - a.mean(0), b - b.mean(0)
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    cos = (a * b).sum(-1)
    sa, sb = a @ a.T, b @ b.T
    iu = torch.triu_indices(len(a), len(a), 1)
    rho = stats.spearmanr(sa[iu[0], iu[1]].numpy(), sb[iu[0], iu[1]].numpy()).statistic
    eye = torch.eye(len(a), dtype=torch.bool)
    na = sa.masked_fill(eye, -2).topk(10, dim=1).indices
    nb = sb.masked_fill(eye, -2).topk(10, dim=1).indices
    overlap = sum(len(set(x) & set(y)) for x, y in zip(na.tolist(), nb.tolist())) / (10 * len(a))
    return {"cos_mean": round(float(cos.mean()), 4), "cos_p10": round(float(cos.quantile(0.1)), 4), "spearman_sims": round(float(rho), 4), "top10_overlap": round(overlap, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("items")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--k", default="32,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask-layers", choices=("top", "all"), default="top", help="where the mask acts (PolicyConfig.mask_layers)")
    ap.add_argument("--item-from", choices=("full", "prefix"), default="full", help="where the [ITEM] position's last-block input comes from")
    a = ap.parse_args()
    torch.set_num_threads(1)
    b = Bundle.from_pretrained(a.bundle, need_policy=False)
    llm = b.item_llm
    _, texts = read_items(a.items, b.config.text)
    tokens_all = llm.tokenize(texts, b.config.text.max_len)
    ks = [int(x) for x in a.k.split(",")]
    long = [i for i, t in enumerate(tokens_all) if len(t) > max(ks)]
    pick = sorted(random.Random(a.seed).sample(long, min(a.n, len(long))))
    tokens = [tokens_all[i] for i in pick]
    data = prepare(llm, tokens, a.mask_layers)
    if a.item_from == "prefix" and a.mask_layers == "top":
        prefix_item(llm, data, PolicyConfig().prefix)
    readout = ItemReadout(llm).eval()
    items = list(range(len(tokens)))
    with torch.no_grad():
        full = item_vectors(readout, data, items, None)
        for k in ks:
            cfg = PolicyConfig(k=k)
            for name, head in (("item-align", PolicyHead(llm.hidden_size).eval()), ("first-k", None)):
                mask, n = keep_mask(head, data, items, cfg)
                masked = item_vectors(readout, data, items, mask, n)
                kept = [torch.tensor(t)[mask[r, : len(t)].bool()].tolist() for r, t in enumerate(tokens)]
                real, _ = embed_tokens(llm, kept)
                row = {"k": k, "selection": name, "items": len(items), "masked_vs_real": agreement(masked, real), "full_vs_real": agreement(full, real), "masked_vs_full": agreement(masked, full),
                       "centered": {"masked_vs_real": agreement(masked, real, True), "full_vs_real": agreement(full, real, True), "masked_vs_full": agreement(masked, full, True)}}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
