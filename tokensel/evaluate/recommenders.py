"""Downstream recommenders for stage 3: train on one compressed text file, report per-user test ranks.

Every recommender works in two steps so that the item LLM runs once per file, not once per seed:

    vectors = rec.prepare(llm, token_lists)      # frozen item LLM over the kept token ids
    run = rec.run(vectors, histories, seed)      # train (if needed), pick the best epoch, rank test

    text-sim     training-free: item = mean-pooled last hidden states over the kept tokens (by default
                 sentence-transformers style: `[CLS] kept tokens [SEP]`, pooled over all of them, unit
                 norm), user = mean of the last `history` items, cosine scores (the SPEC's reference
                 check; the SPEC's first-64 4.48 / 7.60 is reproduced, to 0.01, by 62 text tokens plus
                 [CLS]/[SEP], i.e. sentence-transformers with max_seq_length 64)
    hllm         item = frozen final state at [ITEM] (HLLM / stage 1 with the item LLM frozen),
                 user = tokensel's causal UserModel trained with InfoNCE on sampled negatives;
                 with `item_tuning` the item LLM is trained too (HLLM proper, the paper's stage 3, from
                 a fresh copy of f per run): `top` trains only f's last block over lower layers cached
                 once per file (cheap enough for a CPU), lora | full re-encode every item a step
                 touches (a GPU setting); `run_tuned` takes the token lists instead of vectors
    sasrec-init  LLMinit (Harte et al. 2023): a SASRec-style ID model (trainable item-ID table plus the
                 same causal transformer) whose ID table starts from a PCA projection of the frozen
                 item LLM's mean-pooled embeddings of the kept text

All rank the target among ALL items with the user's history masked (metrics.rank_users), and the
trained ones keep the epoch with the best validation NDCG@10. Token ids are fed as they are in the
compressed file, never re-tokenised (SPEC output contract).
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

from tokensel.models.batching import length_buckets
from tokensel.config import ItemModelConfig, UserModelConfig
from tokensel.metrics import per_user_metrics, rank_users
from tokensel.io.interactions import Histories
from tokensel.models.item_llm import ItemLLM
from tokensel.models.readout import BlockInputs, ItemReadout, cache_block_inputs
from tokensel.models.pooling import history_means, mean_pool_tokens
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.train.common import embed_tokens, infonce, infonce_logits
from tokensel.train.stage1 import _trainable_state, _windows, apply_item_tuning

RECOMMENDERS = ("hllm", "sasrec-init", "text-sim")
# Measured on amazon-scientific (one busy CPU core): an hllm epoch takes ~20 s and lr 5e-4 beat 1e-3,
# 2e-3 and 2.5e-4 after 4 epochs; a sasrec-init epoch (64-d ID model) takes ~3 s and still gains at 12.
DEFAULT_EPOCHS = {"hllm": 8, "sasrec-init": 30, "text-sim": 0}
DEFAULT_LR = {"hllm": 5e-4, "sasrec-init": 1e-3, "text-sim": 0.0}
POOLINGS = ("mean", "mean-specials")
ITEM_TUNINGS = ("none", "top", "lora", "full")  # hllm: how much of the item LLM trains with the user model


@dataclass
class TrainConfig:
    """The training budget, identical for every file and seed of one evaluation."""

    epochs: int | None = None  # None: the recommender's default (DEFAULT_EPOCHS)
    batch_size: int = 128
    lr: float | None = None  # None: the recommender's default (DEFAULT_LR)
    negatives: int = 128  # paper: 128 sampled negatives
    history: int = 10  # paper: maximum sequence length 10
    temperature: float = 0.05
    patience: int | None = 3  # stop after this many epochs without a better validation NDCG@10
    layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    id_dim: int = 64  # sasrec-init: width of the ID table (PCA of the text embeddings)
    pooling: str = "mean-specials"  # text-sim and sasrec-init item vectors: mean-specials | mean
    center: bool = True  # hllm: subtract the catalogue mean from the frozen [ITEM] states (see HLLM)
    item_tuning: str = "none"  # hllm: none (f frozen) | top (f's last block trains; CPU-affordable) | lora | full (a GPU setting)
    item_lr: float = 1e-4  # hllm with item_tuning: learning rate of the item LLM
    amp: str = "auto"  # bf16 autocast of the user model: auto (on CUDA) | bf16 | off


@dataclass
class SeedRun:
    """One training run (or the single deterministic pass of text-sim)."""

    seed: int
    test_ranks: torch.Tensor  # [U] 0-based rank of each user's test target, history masked
    best_epoch: int
    valid: dict[str, float]  # validation metrics of the chosen epoch
    seconds: float
    log: list[dict] = field(default_factory=list)


def pca_init(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Project centred vectors on their top `dim` principal directions; rows scaled to mean norm 1."""
    x = vectors.float() - vectors.float().mean(0, keepdim=True)
    dim = min(dim, x.shape[1], x.shape[0])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    z = x @ v[:dim].T
    return z / z.norm(dim=1).mean().clamp(min=1e-8)


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


# ---------------------------------------------------------------------------------------- recommenders
class TrainableItems:
    """The item table of an hllm run whose item LLM (or part of it) trains with the user model.

    `full` is the whole catalogue without gradients (refreshed after each epoch, for validation and
    the final ranking); `step(need)` re-encodes, with gradients, only the rows a training step touches.
    """

    params: list[torch.nn.Parameter]
    full: torch.Tensor
    mean: torch.Tensor
    center: bool

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, need: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def refresh(self) -> None:
        table = self.table()
        self.mean = table.mean(0, keepdim=True) if self.center else torch.zeros_like(table[:1])
        self.full = table - self.mean

    def step(self, need: list[int]) -> torch.Tensor:
        """[N, d] table whose rows `need` come from f with gradients (the other rows are unused)."""
        enc = self.encode(need).float() - self.mean
        return self.full.index_copy(0, torch.tensor(need, device=self.full.device), enc)

    def state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class TunedItems(TrainableItems):
    """item_tuning lora | full: f itself trains; a step runs f over the items it touches (as stage 1)."""

    def __init__(self, llm: ItemLLM, tokens: list[list[int]], tuning: str, center: bool):
        self.llm, self.tokens, self.center = llm, tokens, center
        apply_item_tuning(llm, ItemModelConfig(tuning=tuning))
        self.params = [p for p in llm.model.parameters() if p.requires_grad]
        self.refresh()

    def table(self) -> torch.Tensor:
        self.llm.model.eval()
        return embed_tokens(self.llm, self.tokens)[0].to(self.llm.device)

    def encode(self, need: list[int]) -> torch.Tensor:
        self.llm.model.train()
        return self.llm.encode([self.tokens[i] for i in need], need_hidden=False).item

    def state(self) -> dict[str, torch.Tensor]:
        return _trainable_state(self.llm.model)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.llm.model.load_state_dict(state, strict=False)
        self.refresh()


class ReadoutItems(TrainableItems):
    """item_tuning top: only f's last block trains, over lower-layer states cached once per file
    (tokensel.models.readout); a step costs ~1/25 of a LoRA step, so it runs on a CPU."""

    def __init__(self, llm: ItemLLM, cache: BlockInputs, center: bool, device: torch.device):
        self.cache, self.center, self.device = cache, center, device
        self.readout = ItemReadout(llm).to(device)
        self.params = list(self.readout.parameters())
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


class Recommender:
    name = "?"
    deterministic = False  # True: seeds do not change the result, so it runs once

    def __init__(self, cfg: TrainConfig | None = None, device: torch.device | str = "cpu", log: Callable[[dict], None] | None = None):
        self.cfg = cfg or TrainConfig()
        self.device = torch.device(device)
        self.log = log or (lambda row: None)

    @property
    def vector_kind(self) -> str:
        """What `prepare` computes (a cache key): depends on the pooling for mean-pooled vectors."""
        return self.cfg.pooling

    def prepare(self, llm: ItemLLM, token_lists: list[list[int]]) -> torch.Tensor:
        """[N, d] item vectors from the frozen item LLM, on the CPU."""
        if self.cfg.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.cfg.pooling!r} ({', '.join(POOLINGS)})")
        return mean_pool_tokens(llm, token_lists, specials=self.cfg.pooling == "mean-specials")

    def run(self, vectors: torch.Tensor, hist: Histories, seed: int) -> SeedRun:
        raise NotImplementedError

    @property
    def needs_item_llm(self) -> bool:
        """True when runs train the item LLM, so they take token lists (run_tuned), not vectors."""
        return False


class TextSim(Recommender):
    """Training-free: user = mean of the last `history` item vectors (unit-normalised), cosine scores."""

    name = "text-sim"
    deterministic = True

    def run(self, vectors, hist, seed):
        t0 = time.perf_counter()
        table = F.normalize(vectors.float(), dim=-1).to(self.device)
        valid = {}
        for part in ("valid", "test"):
            h, tgt = hist.split(part)
            ranks = rank_users(history_means(h, table, self.cfg.history), table, tgt, h)
            if part == "valid":
                valid = {k: float(v.mean()) for k, v in per_user_metrics(ranks).items()}
        return SeedRun(seed, ranks, 0, valid, time.perf_counter() - t0)


class _Trained(Recommender):
    """InfoNCE training of a causal user model over an item table, best epoch on validation NDCG@10."""

    def _user_model(self, dim: int) -> UserModel:
        c = self.cfg
        heads = c.heads if dim % c.heads == 0 else 1
        ucfg = UserModelConfig(layers=c.layers, heads=heads, dropout=c.dropout, max_history=c.history)
        return UserModel(dim, ucfg).to(self.device)

    def _fit(self, user: UserModel, items: torch.Tensor | nn.Embedding, hist: Histories, seed: int) -> SeedRun:
        """Train `user` (and `items` when it is an nn.Embedding) in place; returns the test ranks of the best epoch.

        The step is stage 1's (tokensel.train.stage1) with a frozen item LLM: one random window of up to
        history + 1 items per user per epoch, every position predicts the next item against the positive
        and `negatives` shared uniform negatives (a negative equal to the positive is masked).
        """
        c, dev = self.cfg, self.device
        t0 = time.perf_counter()
        rng = random.Random(seed)
        trainable = isinstance(items, nn.Embedding)
        tuned = isinstance(items, TrainableItems)

        def table() -> torch.Tensor:
            return items.weight if trainable else items.full if tuned else items

        n_items = table().shape[0]
        params = list(user.parameters()) + (list(items.parameters()) if trainable else [])
        groups = [{"params": params}] + ([{"params": items.params, "lr": c.item_lr}] if tuned else [])
        opt = torch.optim.AdamW(groups, lr=c.lr or DEFAULT_LR[self.name], weight_decay=0.01)
        amp = c.amp == "bf16" or (c.amp == "auto" and dev.type == "cuda")
        train_seqs = hist.train_sequences()
        v_hist, v_tgt = hist.split("valid")
        best = (-math.inf, None, None, 0, {})
        log: list[dict] = []
        stale = 0
        for epoch in range(1, (c.epochs or DEFAULT_EPOCHS[self.name]) + 1):
            user.train()
            losses = []
            for batch in length_batches(_windows(train_seqs, c.history + 1, rng), c.batch_size, rng):
                width = max(len(w) for w in batch) - 1
                negs = torch.randint(0, n_items, (c.negatives,), device=dev)
                emb = items.step(sorted({i for w in batch for i in w} | set(negs.tolist()))) if tuned else table()
                inp, mask = pad_histories([w[:-1] for w in batch], emb, width)
                tgt = torch.zeros(len(batch), width, dtype=torch.long)
                for r, w in enumerate(batch):
                    tgt[r, : len(w) - 1] = torch.tensor(w[1:], dtype=torch.long)
                tgt = tgt.to(dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    out = user(inp, mask)
                logits = infonce_logits(out.float(), emb[tgt], emb[negs], c.temperature, tgt, negs)
                loss = infonce(logits)[mask].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if tuned:
                items.refresh()
            v = mean_metrics(user_ranks(user, table().detach(), v_hist, v_tgt, c.history))
            row = {"seed": seed, "epoch": epoch, "loss": round(sum(losses) / max(len(losses), 1), 4), "seconds": round(time.perf_counter() - t0, 1), "valid_N@10": round(v["N@10"], 3)}
            log.append(row)
            self.log(row)
            if v["N@10"] > best[0]:
                item_state = copy.deepcopy(items.state_dict()) if trainable else items.state() if tuned else None
                best = (v["N@10"], copy.deepcopy(user.state_dict()), item_state, epoch, v)
                stale = 0
            else:
                stale += 1
                if c.patience is not None and stale >= c.patience:
                    break
        if best[1] is not None:
            user.load_state_dict(best[1])
        if best[2] is not None and tuned:
            items.load(best[2])
        elif best[2] is not None:
            items.load_state_dict(best[2])
        t_hist, t_tgt = hist.split("test")
        ranks = user_ranks(user, table().detach(), t_hist, t_tgt, c.history)
        return SeedRun(seed, ranks.cpu(), best[3], best[4], time.perf_counter() - t0, log)


class HLLM(_Trained):
    """HLLM with the item LLM frozen: item = [ITEM] final state over the kept tokens, user model trained.

    With `center` (default) the catalogue mean is subtracted from the frozen [ITEM] states first. The
    [ITEM] state of a frozen, untuned model is strongly anisotropic (mean pairwise cosine 0.82 for
    all-MiniLM-L6-v2 on amazon-scientific), so cosine scores against fixed item vectors barely separate
    items; centring (a fixed shift, no parameters) raised validation NDCG@10 after 4 epochs from 3.4 to
    4.7 there. A tuned item LLM (the paper's HLLM) learns this away; frozen, it is the cheapest fix.
    """

    name = "hllm"
    _block_cache: tuple[int, BlockInputs] | None = None  # item_tuning top: the current file's lower-layer states

    @property
    def vector_kind(self) -> str:
        return "item-token"

    def prepare(self, llm, token_lists):
        return embed_tokens(llm, token_lists)[0]

    @property
    def needs_item_llm(self) -> bool:
        return self.cfg.item_tuning != "none"

    def run_tuned(self, make_llm: Callable[[], ItemLLM], tokens: list[list[int]], hist: Histories, seed: int) -> SeedRun:
        """HLLM proper: a fresh item LLM from `make_llm`, trained with the user model from this seed
        (all of it, LoRA adapters, or with `top` only its last block over cached lower layers)."""
        if self.cfg.item_tuning == "top":
            llm = make_llm()
            key = hash((tuple(llm.lead_ids + llm.template_ids), tuple(map(tuple, tokens))))  # the template is input too
            if self._block_cache is None or self._block_cache[0] != key:  # the lower layers run once per file, not per seed
                self._block_cache = (key, cache_block_inputs(llm, tokens))
            torch.manual_seed(seed)
            items: TrainableItems = ReadoutItems(llm, self._block_cache[1], self.cfg.center, self.device)
        else:
            torch.manual_seed(seed)
            items = TunedItems(make_llm(), tokens, self.cfg.item_tuning, self.cfg.center)
        user = self._user_model(items.full.shape[1])
        return self._fit(user, items, hist, seed)

    def run(self, vectors, hist, seed):
        torch.manual_seed(seed)
        table = vectors.float()
        if self.cfg.center:
            table = table - table.mean(0, keepdim=True)
        user = self._user_model(vectors.shape[1])
        return self._fit(user, table.to(self.device), hist, seed)


class SASRecInit(_Trained):
    """LLMinit: an ID model whose item table starts from the PCA of the text embeddings, then trains on IDs."""

    name = "sasrec-init"

    def run(self, vectors, hist, seed):
        torch.manual_seed(seed)
        init = pca_init(vectors, self.cfg.id_dim)
        items = nn.Embedding(init.shape[0], init.shape[1]).to(self.device)
        with torch.no_grad():
            items.weight.copy_(init)
        user = self._user_model(init.shape[1])
        return self._fit(user, items, hist, seed)


def make_recommender(name: str, cfg: TrainConfig | None = None, device: torch.device | str = "cpu", log: Callable[[dict], None] | None = None) -> Recommender:
    classes = {"hllm": HLLM, "sasrec-init": SASRecInit, "text-sim": TextSim}
    if name not in classes:
        from tokensel.errors import TokenselError

        raise TokenselError(f"unknown recommender {name!r}; choose one of {', '.join(RECOMMENDERS)}")
    tuning = (cfg or TrainConfig()).item_tuning
    if tuning not in ITEM_TUNINGS or (tuning != "none" and name != "hllm"):
        from tokensel.errors import TokenselError

        raise TokenselError(f"item tuning {tuning!r}: choose one of {', '.join(ITEM_TUNINGS)}, and anything but none only with --recommender hllm")
    return classes[name](cfg, device, log)
