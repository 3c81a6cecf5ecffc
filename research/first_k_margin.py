"""Item-align with a first-k margin: a per-item middle ground between first-k and item-align.

An identity head whose position prior adds `margin` to every token score inside the first k tokens
(after the prefix). Scores are summed per chunk after a softmax whose normaliser is shared by the
item's tokens, so a chunk inside the first k gains chunk * margin over every chunk past it: a later
chunk replaces an early one only where item-align prefers it by more than that. margin 0 is item-align,
a large margin is first-k. The choice stays per item: an item whose later text aligns much better with
its `[ITEM]` state still swaps, one where the gain is marginal keeps its first tokens.

    python research/first_k_margin.py BUNDLE ITEMS --k 32 --margins 0.8,3.2 --out DIR [--text-cols ...]

writes DIR/m<margin> bundles (the stage-1 bundle with that head; `bench/quality --policy mX=DIR/mX`
measures them downstream) and prints, on a sample, the share of items whose selection differs from
first-k and the mean number of tokens kept past k.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tokensel.policy.bundle import Bundle
from tokensel.policy.head import PolicyHead
from tokensel.select.selector import Selector, SelectorSpec


def margin_head(dim: int, k: int, prefix: int, margin: float) -> PolicyHead:
    """The identity head (item-align) with `margin` on the prior of every position in [prefix, k)."""
    head = PolicyHead(dim)
    with torch.no_grad():
        head.pos_prior[prefix:k] = margin
    return head


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("items", type=Path)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--margins", default="0.2,0.8,3.2")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sample", type=int, default=600)
    ap.add_argument("--text-cols", nargs="*", default=None)
    a = ap.parse_args()
    table = pq.read_table(a.items).slice(0, a.sample)
    margins = [0.0] + [float(m) for m in a.margins.split(",")]
    bundle = Bundle.from_pretrained(a.bundle, need_policy=False)  # its stage 1, saved again with each margin head
    first = Selector.from_spec(SelectorSpec(strategy="first-k", policy=str(a.bundle)))
    ref = first(table, k=a.k, chunk=a.chunk, prefix=a.prefix, text_cols=a.text_cols).column("positions").to_pylist()
    print(f"{'margin':>8} {'items != first-k':>17} {'tokens past k':>14}")
    for m in margins:
        dst = a.out / f"m{m:g}"
        bundle.policy = margin_head(bundle.item_llm.hidden_size, a.k, a.prefix, m)
        bundle.save_pretrained(dst)  # drops a stale check.json, writes the policy as every bundle does
        sel = Selector.from_spec(SelectorSpec(strategy="policy", policy=str(dst)))
        out = sel(table, k=a.k, chunk=a.chunk, prefix=a.prefix, text_cols=a.text_cols).column("positions").to_pylist()
        differ = np.mean([s != r for s, r in zip(out, ref)])
        past = np.mean([sum(p >= a.k for p in s) for s in out])
        print(f"{m:>8g} {differ:>17.3f} {past:>14.2f}")


if __name__ == "__main__":
    main()
