"""Does a frozen recommender rank selections the way a retrained one does? (issue 17 diagnostic)

The end-to-end stage 2 needs a surrogate recommender whose score of a selection predicts the score of a
recommender retrained on it. This scores first-k, item-align (the identity head) and the bundle's
policy with the bundle's own frozen stage-1 user model, on validation users, with the item vectors read
two ways: the top-block mask (`--mask-layers top`: lower layers saw the full text) and the exact kept-
token forward (`models/gated.py`, what downstream embeds). Compare the order with bench/quality's.

    python research/surrogate_rank.py ITEMS INTERACTIONS --bundle B --k 32 [--text-cols ...]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from tokensel.config import PolicyConfig
from tokensel.io.interactions import read_histories
from tokensel.io.items import read_items
from tokensel.policy.bundle import Bundle
from tokensel.policy.head import PolicyHead
from tokensel.models.readout import ItemReadout
from tokensel.train.common import stage2_users
from tokensel.train.e2e_vectors import masked_table, prepare
from tokensel.train.stage1 import validate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("items")
    ap.add_argument("interactions")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--ways", default="top,exact")
    a = ap.parse_args()
    torch.set_num_threads(1)
    b = Bundle.from_pretrained(a.bundle)
    llm, text = b.item_llm, b.config.text
    ids, texts = read_items(a.items, text)
    hist = read_histories(a.interactions, {i: n for n, i in enumerate(ids)}, "user_id", "item_id", "timestamp")
    tokens = llm.tokenize(texts, text.max_len)
    cfg = PolicyConfig(objective="e2e", k=a.k)
    _, v_h, v_t = stage2_users(hist, cfg, random.Random(cfg.seed))
    heads = {"first_k": None, "item_align": PolicyHead(llm.hidden_size), "bundle_policy": b.policy}
    for way in a.ways.split(","):
        t0 = time.perf_counter()
        data = prepare(llm, tokens, way)
        readout = ItemReadout(llm)
        row = {"text_cols": ",".join(text.text_cols), "k": a.k, "way": way}
        row["full"] = validate(b.user_model, data.item, v_h, v_t, cfg.history)["N@10"]
        for name, h in heads.items():
            row[name] = validate(b.user_model, masked_table(readout, h.cpu() if h is not None else None, data, cfg), v_h, v_t, cfg.history)["N@10"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        del data


if __name__ == "__main__":
    main()
