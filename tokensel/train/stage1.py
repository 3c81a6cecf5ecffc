"""Stage 1: pretrain the recommender (item LLM f + user model g) with InfoNCE (paper eq. 1).

tuning="none" keeps f frozen (its [ITEM] states are computed once) and trains g: minutes on a CPU.
tuning="top" also trains f's last block, over lower-layer states cached once (models/readout.py):
a trained [ITEM] readout at a few minutes per epoch on a CPU; the block is written back into f.
tuning="lora" / "full" also trains f, re-encoding the batch's items every step (a GPU setting).
The best epoch on validation NDCG@10 is kept.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable

import torch

from tokensel.config import ItemModelConfig, Stage1Config
from tokensel.metrics import per_user_metrics, rank_users
from tokensel.io.interactions import Histories
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import ItemReadout, cache_block_inputs, last_block
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.train.common import embed_tokens, infonce, infonce_logits


def _windows(seqs: list[list[int]], size: int, rng: random.Random) -> list[list[int]]:
    """One random window of up to `size` items per training sequence of length >= 2."""
    out = []
    for s in seqs:
        if len(s) < 2:
            continue
        start = rng.randint(0, max(0, len(s) - size))
        out.append(s[start : start + size])
    return out


def apply_item_tuning(llm: ItemLLM, cfg: ItemModelConfig) -> None:
    """Make f trainable as configured: LoRA adapters on the top blocks, or every weight."""
    if cfg.tuning == "lora":
        from peft import LoraConfig, get_peft_model

        n_layers = llm.model.config.num_hidden_layers
        top = list(range(max(0, n_layers - cfg.lora_layers), n_layers))
        names = {n.split(".")[-1] for n, m in llm.model.named_modules() if isinstance(m, torch.nn.Linear)}
        targets = [t for t in ("query", "value", "q_proj", "v_proj") if t in names]
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets, layers_to_transform=top, lora_dropout=0.0)
        llm.model = get_peft_model(llm.model, lcfg)
    elif cfg.tuning == "full":
        for p in llm.model.parameters():
            p.requires_grad_(True)
    elif cfg.tuning not in ("none", "top"):  # top: trained through an ItemReadout copy (train_stage1)
        raise ValueError(f"unknown item tuning {cfg.tuning!r} (none, top, lora, full)")


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights being trained (the LoRA adapters, or everything for full tuning)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def validate(user: UserModel, item_table: torch.Tensor, histories: list[list[int]], targets: list[int], max_history: int) -> dict[str, float]:
    user.eval()
    embs = []
    for s in range(0, len(targets), 512):
        items, mask = pad_histories(histories[s : s + 512], item_table, max_history)
        embs.append(torch.nn.functional.normalize(user.user_embedding(items, mask), dim=-1))
    ranks = rank_users(torch.cat(embs), torch.nn.functional.normalize(item_table, dim=-1), targets, histories)
    return {k: round(float(v.mean()), 3) for k, v in per_user_metrics(ranks).items()}


def train_stage1(
    llm: ItemLLM,
    user: UserModel,
    tokens: list[list[int]],
    hist: Histories,
    cfg: Stage1Config,
    item_cfg: ItemModelConfig,
    log: Callable[[dict], None] = print,
) -> dict:
    """Train g (and f unless frozen) in place; returns the log of the run."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    dev = llm.device
    n_items = len(tokens)
    user.to(dev)
    frozen = item_cfg.tuning == "none"
    readout = cache = None
    if item_cfg.tuning == "top":  # f's last block trains as a readout over the cached lower layers
        cache = cache_block_inputs(llm, tokens)
        readout = ItemReadout(llm).to(dev)
    elif not frozen:
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
    best = (history[-1]["N@10"], copy.deepcopy(user.state_dict()), None if frozen else _trainable_state(trained))
    for epoch in range(1, cfg.epochs + 1):
        user.train()
        trained.train(not frozen)
        wins = _windows(train_seqs, cfg.history + 1, rng)
        rng.shuffle(wins)
        losses = []
        for s in range(0, len(wins), cfg.batch_size):
            batch = wins[s : s + cfg.batch_size]
            negs = torch.randint(0, n_items, (cfg.negatives,), device=dev)
            if frozen:
                emb = table
            else:  # re-encode only the items this step touches, with gradients
                need = sorted({i for w in batch for i in w} | set(negs.tolist()))
                if readout is not None:
                    enc = readout.encode(cache, need, dev).float()
                else:
                    enc = llm.encode([tokens[i] for i in need], need_hidden=False).item.float()
                emb = torch.zeros(n_items, enc.shape[1], device=dev).index_copy(0, torch.tensor(need, device=dev), enc)
            inputs = [w[:-1] for w in batch]
            items, mask = pad_histories(inputs, emb, cfg.history)
            out = user(items, mask)  # [B, S, d]: the state after each position predicts the next item
            tgt_idx, _ = pad_histories([w[1:] for w in batch], torch.arange(n_items, device=dev)[:, None].float(), cfg.history)
            tgt_idx = tgt_idx.squeeze(-1).long()
            logits = infonce_logits(out, emb[tgt_idx], emb[negs], cfg.temperature, tgt_idx, negs)
            loss = infonce(logits)[mask].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if not frozen:
            table = item_table()
        row = {"epoch": epoch, "loss": round(sum(losses) / max(len(losses), 1), 4), "seconds": round(time.perf_counter() - t0, 1)}
        row.update(validate(user, table, v_hist, v_tgt, cfg.history))
        history.append(row)
        log(row)
        if row["N@10"] > best[0]:
            item_state = None if frozen else _trainable_state(trained)
            best = (row["N@10"], copy.deepcopy(user.state_dict()), item_state)
    user.load_state_dict(best[1])
    if best[2] is not None:
        trained.load_state_dict(best[2], strict=False)
    if readout is not None:  # f itself now carries the trained block: stage 2 and compress see it
        last_block(llm).load_state_dict(readout.block.state_dict())
    user.eval()
    llm.model.eval()
    return {"epochs": history, "best_valid_N@10": best[0]}
