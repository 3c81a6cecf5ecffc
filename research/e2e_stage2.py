"""Run the end-to-end stage 2 on a real catalogue from an existing stage-1 bundle; save a bundle per run.

    python research/e2e_stage2.py ITEMS INTERACTIONS --bundle tokensel/default_bundle --out OUT \
        --k 32 --epochs 3 --max-users 4000 [--set sigma=0.5 --set masked_side=both ...]

Prints one JSON line per epoch (masked-readout validation of the trained head, the identity head =
item-align and first-k under the same jointly trained user model and readout, seconds per epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from tokensel.config import PolicyConfig
from tokensel.io.interactions import read_histories
from tokensel.io.items import read_items
from tokensel.policy.bundle import Bundle
from tokensel.policy.head import PolicyHead
from tokensel.train.e2e import train_e2e
from tokensel.train.e2e_vectors import prepare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("items")
    ap.add_argument("interactions")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-users", type=int, default=None)
    ap.add_argument("--valid-users", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], help="PolicyConfig field=value")
    a = ap.parse_args()
    torch.set_num_threads(1)
    b = Bundle.from_pretrained(a.bundle, need_policy=False)
    llm, text = b.item_llm, b.config.text
    ids, texts = read_items(a.items, text)
    hist = read_histories(a.interactions, {i: n for n, i in enumerate(ids)}, "user_id", "item_id", "timestamp")
    tokens = llm.tokenize(texts, text.max_len)
    types = {f.name: f.type for f in dataclasses.fields(PolicyConfig)}
    over = {}
    for kv in a.set:
        key, val = kv.split("=", 1)
        kind = str(types[key]).split(" ")[0]  # "float | None" -> float
        over[key] = val.lower() in ("1", "true", "yes") if kind == "bool" else {"int": int, "float": float, "str": str}[kind](val)
    cfg = PolicyConfig(objective="e2e", k=a.k, epochs=a.epochs, max_users=a.max_users, valid_users=a.valid_users, **over)
    t0 = time.perf_counter()
    data = prepare(llm, tokens, cfg.mask_layers)
    print(json.dumps({"prepare_seconds": round(time.perf_counter() - t0, 1), "items": len(tokens)}), flush=True)
    head = PolicyHead(llm.hidden_size)
    log = train_e2e(llm, b.user_model, head, tokens, hist, cfg, b.config.stage1.temperature, lambda r: print(json.dumps(r), flush=True), data=data)
    b.config.policy = cfg
    b.config.logs["stage2"] = log
    Bundle(b.config, llm, b.user_model, head, b.path).save_pretrained(a.out)
    print(json.dumps({"saved": a.out, "seconds": log["seconds"]}), flush=True)


if __name__ == "__main__":
    main()
