"""The one InfoNCE trainer (paper eq. 1) of a user model over an item table, and its pieces.

Stage 1 and the downstream recommenders train the same way: windows of a user's sequence, every
position predicting the next item against shared sampled negatives (`infonce_step`). What differs is
the item side, behind one small protocol (`ItemTable`): fixed vectors (`FrozenItems`), a trainable ID
table (`IdItems`), the item LLM itself (`TunedItems`: LoRA or every weight) or its last block over
cached lower-layer states (`ReadoutItems`). `fit` is the epoch loop with best-epoch selection on
validation NDCG@10 that the recommenders use.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tokensel.config import ItemModelConfig, TrainConfig
from tokensel.train.metrics import per_user_metrics, rank_users
from tokensel.io.interactions import Histories
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import BlockInputs, ItemReadout
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.train.common import draw_negatives, embed_tokens, infonce, infonce_logits


@dataclass
class TrainedRun:
    """What `fit` returns: the ranks of the scored targets (cfg.score) and how it got there."""

    test_ranks: torch.Tensor  # [U] 0-based rank of each user's scored target (test, or validation), history masked
    best_epoch: int
    valid: dict[str, float]  # validation metrics of the chosen epoch
    seconds: float
    log: list[dict] = field(default_factory=list)
    valid_ranks: torch.Tensor | None = None  # [U] ranks of the validation targets at the chosen epoch (what decides, beside the reported test)


def windows(seqs: list[list[int]], size: int, rng: random.Random) -> list[list[int]]:
    """One random window of up to `size` items per training sequence of length >= 2."""
    out = []
    for s in seqs:
        if len(s) < 2:
            continue
        start = rng.randint(0, max(0, len(s) - size))
        out.append(s[start : start + size])
    return out


def length_batches(windows: list[list[int]], batch_size: int, rng: random.Random, pool: int = 50) -> list[list[list[int]]]:
    """Shuffled training batches of similar-length windows: shuffle, sort within pools of `pool` batches,
    cut, shuffle the batch order. Less padding per step, still random."""
    windows = list(windows)
    rng.shuffle(windows)
    batches = []
    step = batch_size * pool
    for s in range(0, len(windows), step):
        chunk = sorted(windows[s : s + step], key=len)
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights being trained (the LoRA adapters, or everything for full tuning)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


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



@torch.no_grad()
def user_embeddings(user: UserModel, table: torch.Tensor, histories: list[list[int]], max_history: int, batch: int = 512) -> torch.Tensor:
    """[U, d] unit-norm user embeddings; users are batched by history length so little padding is computed.

    Histories are left-aligned with learned positions and a causal, key-padded mask, so the result does
    not depend on how much padding a batch has.
    """
    user.eval()
    lengths = [min(len(h), max_history) for h in histories]
    order = sorted(range(len(histories)), key=lambda i: lengths[i])
    out = torch.zeros(len(histories), table.shape[1], device=table.device)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        width = max(1, max(lengths[i] for i in idx))
        items, mask = pad_histories([histories[i] for i in idx], table, width)
        out[torch.tensor(idx, device=table.device)] = F.normalize(user.user_embedding(items, mask).float(), dim=-1)
    return out


def user_ranks(user: UserModel, table: torch.Tensor, histories: list[list[int]], targets: list[int], max_history: int) -> torch.Tensor:
    """Ranks under the user model: cosine scores (as stage 1's validate), full ranking, history masked."""
    emb = user_embeddings(user, table, histories, max_history)
    return rank_users(emb, F.normalize(table.float(), dim=-1), targets, histories)


def mean_metrics(ranks: torch.Tensor) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in per_user_metrics(ranks).items()}


class ItemTable:
    """What the trainer needs from the item side: the catalogue's rows, the rows of one step (with
    gradients where items train), the parameters that train with the user model, and the best state.

    `shared_params` train at the user model's learning rate, `own_params` at cfg.item_lr."""

    shared_params: list[torch.nn.Parameter] = []
    own_params: list[torch.nn.Parameter] = []

    def all_rows(self) -> torch.Tensor:
        """[N, d] every item (validation and the final ranking read it detached)."""
        raise NotImplementedError

    def step(self, need: list[int]) -> torch.Tensor:
        """The table for one training step: [N, d] all rows, or with `needs_rows` the [len(need), d]
        rows `need` alone (the step then indexes them by position in `need`)."""
        return self.all_rows()

    @property
    def needs_rows(self) -> bool:
        """True when `step` re-encodes only the rows it is given (they are then computed per step)."""
        return False

    def after_epoch(self) -> None:
        pass

    def state(self) -> dict[str, torch.Tensor] | None:
        return None

    def load(self, state: dict[str, torch.Tensor]) -> None:
        pass


class FrozenItems(ItemTable):
    """Fixed item vectors (the item LLM frozen): only the user model trains."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def all_rows(self) -> torch.Tensor:
        return self.table


class IdItems(ItemTable):
    """A trainable item-ID table (nn.Embedding), trained with the user model at its learning rate."""

    def __init__(self, emb: nn.Embedding):
        self.emb = emb
        self.shared_params = list(emb.parameters())

    def all_rows(self) -> torch.Tensor:
        return self.emb.weight

    def state(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.emb.state_dict())

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.emb.load_state_dict(state)


class TrainableItems(ItemTable):
    """An item table whose item LLM (or part of it) trains with the user model.

    `full` is the whole catalogue without gradients (refreshed after each epoch, for validation and
    the final ranking); `step(need)` re-encodes, with gradients, only the rows a training step touches.
    """

    full: torch.Tensor
    mean: torch.Tensor
    center: bool

    def all_rows(self) -> torch.Tensor:
        return self.full

    def after_epoch(self) -> None:
        self.refresh()

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, need: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def refresh(self) -> None:
        table = self.table()
        self.mean = table.mean(0, keepdim=True) if self.center else torch.zeros_like(table[:1])
        self.full = table - self.mean

    @property
    def needs_rows(self) -> bool:
        return True

    def step(self, need: list[int]) -> torch.Tensor:
        """[len(need), d] rows `need` from f with gradients. Only these: a step that built the whole
        [N, d] table would copy it (and its gradient) every step, a cost that grows with the catalogue
        while the step's work does not."""
        return self.encode(need).float() - self.mean

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class TunedItems(TrainableItems):
    """item_tuning lora | full: f itself trains; a step runs f over the items it touches (as stage 1)."""

    def __init__(self, llm: ItemLLM, tokens: list[list[int]], tuning: str, center: bool):
        self.llm, self.tokens, self.center = llm, tokens, center
        apply_item_tuning(llm, ItemModelConfig(tuning=tuning))
        self.own_params = [p for p in llm.model.parameters() if p.requires_grad]
        self.refresh()

    def table(self) -> torch.Tensor:
        self.llm.model.eval()
        return embed_tokens(self.llm, self.tokens, desc="embedding items")[0].to(self.llm.device)

    def encode(self, need: list[int]) -> torch.Tensor:
        self.llm.model.train()
        return self.llm.encode([self.tokens[i] for i in need], need_hidden=False).item

    def state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.llm.model)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.llm.model.load_state_dict(state, strict=False)
        self.refresh()


class ReadoutItems(TrainableItems):
    """item_tuning top: only f's last block trains, over lower-layer states cached once per file
    (tokensel.models.readout); a step runs one block instead of the whole model, so it fits a CPU."""

    def __init__(self, llm: ItemLLM, cache: BlockInputs, center: bool, device: torch.device):
        self.cache, self.center, self.device = cache, center, device
        self.readout = ItemReadout(llm).to(device)
        self.own_params = list(self.readout.parameters())
        self.refresh()

    def table(self) -> torch.Tensor:
        return self.readout.table(self.cache, self.device)

    def encode(self, need: list[int]) -> torch.Tensor:
        self.readout.train()
        return self.readout.encode(self.cache, need, self.device)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.readout.named_parameters()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.readout.load_state_dict(state)
        self.refresh()


def step_rows(batch: list[list[int]], negs: torch.Tensor) -> tuple[list[int], list[list[int]], torch.Tensor]:
    """The items one step touches (sorted), and the batch and negatives as positions among them: a
    step over those rows alone is the step over the whole table at a cost that does not grow with the
    catalogue (a table built per step would be copied, with its gradient, every step)."""
    need = sorted({i for w in batch for i in w} | set(negs.tolist()))
    at = {item: j for j, item in enumerate(need)}
    local_negs = torch.tensor([at[i] for i in negs.tolist()], dtype=torch.long, device=negs.device)
    return need, [[at[i] for i in w] for w in batch], local_negs


def step_table(items: ItemTable, batch: list[list[int]], negs: torch.Tensor) -> tuple[torch.Tensor, list[list[int]], torch.Tensor]:
    """The table one step reads, with the batch and negatives that index it: for a table whose rows
    are computed per step (`needs_rows`), the step's rows alone (`step_rows`)."""
    if not items.needs_rows:
        return items.step([]), batch, negs
    need, batch, negs = step_rows(batch, negs)
    return items.step(need), batch, negs


def infonce_step(
    user: UserModel, opt: torch.optim.Optimizer, emb: torch.Tensor, batch: list[list[int]], negs: torch.Tensor, width: int, temperature: float, amp: bool = False
) -> float:
    """One InfoNCE step (paper eq. 1): every position of each window predicts the next item against
    it and the shared negatives (a negative equal to the positive is masked). Returns the loss."""
    dev = emb.device
    inp, mask = pad_histories([w[:-1] for w in batch], emb, width)
    tgt = torch.zeros(len(batch), width, dtype=torch.long)
    for r, w in enumerate(batch):  # windows are at most width + 1 long
        tgt[r, : len(w) - 1] = torch.tensor(w[1:], dtype=torch.long)
    tgt = tgt.to(dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        out = user(inp, mask)  # [B, S, d]: the state after each position predicts the next item
    logits = infonce_logits(out.float(), emb[tgt], emb[negs], temperature, tgt, negs)
    loss = infonce(logits)[mask].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def fit(user: UserModel, items: ItemTable, hist: Histories, seed: int, cfg: TrainConfig, lr: float, epochs: int, device: torch.device, log: Callable[[dict], None]) -> TrainedRun:
    """Train `user` (and the items' trainable part) in place, keep the epoch with the best validation
    NDCG@10 (stopping after cfg.patience epochs without one), and rank the test targets with it.

    cfg.score "valid" (the strategy check): the validation targets are what is ranked, so they cannot
    also choose the epoch: every epoch trains, the last is kept, and the test targets are never read.

    Per epoch: one random window of up to history + 1 items per user, batched by similar length."""
    c, dev = cfg, device
    t0 = time.perf_counter()
    rng = random.Random(seed)
    n_items = items.all_rows().shape[0]
    groups = [{"params": list(user.parameters()) + items.shared_params}] + ([{"params": items.own_params, "lr": c.item_lr}] if items.own_params else [])
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    amp = c.amp == "bf16" or (c.amp == "auto" and dev.type == "cuda")
    train_seqs = hist.train_sequences()
    v_hist, v_tgt = hist.split("valid")
    best = (-math.inf, None, None, 0, {})
    best_ranks = None
    rows: list[dict] = []
    stale = 0
    for epoch in range(1, epochs + 1):
        user.train()
        losses = []
        wins = windows(train_seqs, c.history + 1, rng)
        bar = tqdm(total=len(wins), desc=f"seed {seed} epoch {epoch}", unit="user", disable=None, leave=False)
        for batch in length_batches(wins, c.batch_size, rng):
            bar.update(len(batch))
            width = max(len(w) for w in batch) - 1
            negs = draw_negatives(hist, n_items, c.negatives, dev)
            emb, batch, negs = step_table(items, batch, negs)
            losses.append(infonce_step(user, opt, emb, batch, negs, width, c.temperature, amp))
        bar.close()
        items.after_epoch()
        row = {"seed": seed, "epoch": epoch, "loss": round(sum(losses) / max(len(losses), 1), 4), "seconds": round(time.perf_counter() - t0, 1)}
        if c.score == "valid":
            rows.append(row)
            log(row)
            continue
        v_ranks = user_ranks(user, items.all_rows().detach(), v_hist, v_tgt, c.history)
        v = mean_metrics(v_ranks)
        row["valid_N@10"] = round(v["N@10"], 3)
        rows.append(row)
        log(row)
        if v["N@10"] > best[0]:
            best = (v["N@10"], copy.deepcopy(user.state_dict()), items.state(), epoch, v)
            best_ranks = v_ranks.cpu()
            stale = 0
        else:
            stale += 1
            if c.patience is not None and stale >= c.patience:
                break
    if c.score == "valid":
        ranks = user_ranks(user, items.all_rows().detach(), v_hist, v_tgt, c.history)
        return TrainedRun(ranks.cpu(), len(rows), mean_metrics(ranks), time.perf_counter() - t0, rows, ranks.cpu())
    if rows and best[3] != rows[-1]["epoch"]:  # the best epoch is not the one just trained: go back to it
        if best[1] is not None:
            user.load_state_dict(best[1])
        if best[2] is not None:
            items.load(best[2])  # for a readout, one more pass of the block over every item
    t_hist, t_tgt = hist.split("test")
    ranks = user_ranks(user, items.all_rows().detach(), t_hist, t_tgt, c.history)
    return TrainedRun(ranks.cpu(), best[3], best[4], time.perf_counter() - t0, rows, best_ranks)
