"""Stage 1: pretrain the recommender (item LLM f + user model g) with InfoNCE (paper eq. 1).

tuning="none" keeps f frozen (its [ITEM] states are computed once) and trains g: cheap on a CPU.
tuning="top" also trains f's last block, over lower-layer states cached once (models/readout.py):
a trained [ITEM] readout that still fits a CPU; the block is written back into f.
tuning="lora" / "full" also trains f, re-encoding the batch's items every step (a GPU setting).
The step is tokensel.train.loop's; this epoch loop pads to the full history and keeps the best
epoch on validation NDCG@10 (epoch 0 included), as the saved bundles were trained.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from tokensel.config import CacheConfig, ItemModelConfig, Stage1Config
from tokensel.train.metrics import per_user_metrics, rank_users
from tokensel.io.interactions import Histories
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import ItemReadout, cache_block_inputs, last_block
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.train.common import draw_negatives, embed_tokens
from tokensel.train.loop import apply_item_tuning, infonce_step, step_rows, trainable_state, windows


@torch.no_grad()
def validate_per_user(user: UserModel, item_table: torch.Tensor, histories: list[list[int]], targets: list[int], max_history: int) -> dict[str, torch.Tensor]:
    """Every metric, one value per user (for paired tests)."""
    user.eval()
    embs = []
    for s in range(0, len(targets), 512):
        items, mask = pad_histories(histories[s : s + 512], item_table, max_history)
        embs.append(torch.nn.functional.normalize(user.user_embedding(items, mask), dim=-1))
    ranks = rank_users(torch.cat(embs), torch.nn.functional.normalize(item_table, dim=-1), targets, histories)
    return per_user_metrics(ranks)


def validate(user: UserModel, item_table: torch.Tensor, histories: list[list[int]], targets: list[int], max_history: int) -> dict[str, float]:
    return {k: round(float(v.mean()), 3) for k, v in validate_per_user(user, item_table, histories, targets, max_history).items()}


def train_stage1(
    llm: ItemLLM,
    user: UserModel,
    tokens: list[list[int]],
    hist: Histories,
    cfg: Stage1Config,
    item_cfg: ItemModelConfig,
    log: Callable[[dict], None] = print,
    cache_cfg: CacheConfig | None = None,
) -> dict:
    """Train g (and f unless frozen) in place; returns the log of the run. `cache_cfg`: where tuning
    top keeps f's lower-layer states (models/scratch.py)."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    dev = llm.device
    n_items = len(tokens)
    user.to(dev)
    frozen = item_cfg.tuning == "none"
    readout = cache = None
    if item_cfg.tuning == "top":  # f's last block trains as a readout over the cached lower layers
        cache = cache_block_inputs(llm, tokens, cache_cfg, desc="stage 1: caching the item LLM's lower layers")
        readout = ItemReadout(llm).to(dev)
    elif not frozen:  # lora | full (ItemModelConfig values are checked by train.pipeline.check_settings)
        apply_item_tuning(llm, item_cfg)
    trained = readout if readout is not None else llm.model  # what holds f's trainable weights

    def item_table(desc: str | None = None) -> torch.Tensor:
        if readout is None:
            return embed_tokens(llm, tokens, desc=desc)[0].to(dev)
        return readout.table(cache, dev)

    t0 = time.perf_counter()
    table = item_table("stage 1: embedding items")
    params = [{"params": user.parameters(), "lr": cfg.lr}]
    if not frozen:
        params.append({"params": [p for p in trained.parameters() if p.requires_grad], "lr": cfg.item_lr})
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    train_seqs = hist.train_sequences()
    v_hist, v_tgt = hist.split("valid")
    history = [
        {"epoch": 0, "seconds": round(time.perf_counter() - t0, 1), **validate(user, table, v_hist, v_tgt, cfg.history)}
    ]
    log(history[-1])
    # the item LLM's trainable weights are part of the best state too (epoch 0 included), so a bad
    # first epoch never leaves g from epoch 0 paired with f from the last epoch
    best = (history[-1]["N@10"], copy.deepcopy(user.state_dict()), None if frozen else trainable_state(trained))
    for epoch in range(1, cfg.epochs + 1):
        user.train()
        trained.train(not frozen)
        wins = windows(train_seqs, cfg.history + 1, rng)
        rng.shuffle(wins)
        losses = []
        bar = tqdm(total=len(wins), desc=f"stage 1 epoch {epoch}", unit="user", disable=None, leave=False)
        for s in range(0, len(wins), cfg.batch_size):
            batch = wins[s : s + cfg.batch_size]
            bar.update(len(batch))
            negs = draw_negatives(hist, n_items, cfg.negatives, dev)
            if frozen:
                emb = table
            else:  # re-encode only the items this step touches, with gradients; the step indexes them by position
                need, batch, negs = step_rows(batch, negs)
                if readout is not None:
                    emb = readout.encode(cache, need, dev).float()
                else:
                    emb = llm.encode([tokens[i] for i in need], need_hidden=False).item.float()
            losses.append(infonce_step(user, opt, emb, batch, negs, cfg.history, cfg.temperature))
        bar.close()
        if not frozen:
            table = item_table()
        row = {"epoch": epoch, "loss": round(sum(losses) / max(len(losses), 1), 4), "seconds": round(time.perf_counter() - t0, 1)}
        row.update(validate(user, table, v_hist, v_tgt, cfg.history))
        history.append(row)
        log(row)
        if row["N@10"] > best[0]:
            item_state = None if frozen else trainable_state(trained)
            best = (row["N@10"], copy.deepcopy(user.state_dict()), item_state)
    user.load_state_dict(best[1])
    if best[2] is not None:
        trained.load_state_dict(best[2], strict=False)
    if readout is not None:  # f itself now carries the trained block: stage 2 and compress see it
        last_block(llm).load_state_dict(readout.block.state_dict())
    user.eval()
    llm.model.eval()
    return {"epochs": history, "best_valid_N@10": best[0]}
