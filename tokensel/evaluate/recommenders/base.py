"""What every downstream recommender shares: the interface, one run's result, item vectors from the
frozen item LLM, and the InfoNCE-trained base (tokensel.train.loop).

Every recommender works in two steps so that the item LLM runs once per file, not once per seed:

    vectors = rec.prepare(llm, token_lists)      # frozen item LLM over the kept token ids
    run = rec.run(vectors, histories, seed)      # train (if needed), pick the best epoch, rank test

All rank the target among ALL items with the user's history masked (metrics.rank_users), and the
trained ones keep the epoch with the best validation NDCG@10. Token ids are fed as they are in the
compressed file, never re-tokenised (SPEC output contract). A new recommender is one file with a
Recommender subclass decorated with `register` (registry.py) plus its import line in __init__.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tokensel.config import TrainConfig, UserModelConfig
from tokensel.io.interactions import Histories
from tokensel.models.batching import length_buckets
from tokensel.models.item_llm import ItemLLM
from tokensel.models.user_model import UserModel, pad_histories
from tokensel.train.loop import ItemTable, fit


@dataclass
class SeedRun:
    """One training run (or the single deterministic pass of text-sim)."""

    seed: int
    test_ranks: torch.Tensor  # [U] 0-based rank of each user's test target, history masked
    best_epoch: int
    valid: dict[str, float]  # validation metrics of the chosen epoch
    seconds: float
    log: list[dict] = field(default_factory=list)
    valid_ranks: torch.Tensor | None = None  # [U] rank of each user's validation target (the run's chosen epoch)


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (`[CLS]`, `[SEP]` for BERT)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
    return full[:start], full[start + len(plain) :]


@torch.inference_mode()
def mean_pool_tokens(
    llm: ItemLLM, token_lists: list[list[int]], specials: bool = False, batch_tokens: int = 16384, max_batch: int = 128
) -> torch.Tensor:
    """[N, d] mean of the item LLM's last hidden states.

    specials=False: the input is the kept tokens alone and the mean is over them (an empty text gives 0).
    specials=True: sentence-transformers style, the model's own special tokens around the kept tokens
    (`[CLS] ... [SEP]` for BERT, `<s> ...` for Llama) and the mean over every position, specials included.
    """
    lead, trail = special_wrap(llm.tokenizer) if specials else ([], [])
    inputs = [lead + list(t) + trail for t in token_lists]
    out = torch.zeros(len(token_lists), llm.hidden_size)
    dev = llm.device
    for group in length_buckets([len(x) for x in inputs], max_batch, batch_tokens):
        width = max(len(inputs[i]) for i in group)
        if width == 0:
            continue
        ids = torch.full((len(group), width), llm.pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            mask[r, : len(inputs[i])] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        last = llm.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask[..., None].float()
        out[group] = ((last * m).sum(1) / m.sum(1).clamp(min=1)).cpu()
    return out


def pca_init(vectors: torch.Tensor, dim: int) -> torch.Tensor:
    """Project centred vectors on their top `dim` principal directions; rows scaled to mean norm 1."""
    x = vectors.float() - vectors.float().mean(0, keepdim=True)
    dim = min(dim, x.shape[1], x.shape[0])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    z = x @ v[:dim].T
    return z / z.norm(dim=1).mean().clamp(min=1e-8)


def history_means(histories: list[list[int]], table: torch.Tensor, n: int) -> torch.Tensor:
    """[U, d] mean of the last `n` history vectors of each user (zeros for an empty history)."""
    out = []
    for s in range(0, len(histories), 2048):
        items, mask = pad_histories(histories[s : s + 2048], table, n)
        m = mask[..., None].float()
        out.append((items * m).sum(1) / m.sum(1).clamp(min=1))
    return torch.cat(out) if out else table.new_zeros(0, table.shape[1])


class Recommender:
    name = "?"
    deterministic = False  # True: seeds do not change the result, so it runs once
    default_epochs = 0  # TrainConfig.epochs None means this
    default_lr = 0.0  # TrainConfig.lr None means this
    tunes_item_llm = False  # True: accepts TrainConfig.item_tuning other than none

    def __init__(self, cfg: TrainConfig | None = None, device: torch.device | str = "cpu", log: Callable[[dict], None] | None = None):
        self.cfg = cfg or TrainConfig()
        self.device = torch.device(device)
        self.log = log or (lambda row: None)

    @property
    def vector_kind(self) -> str:
        """What `prepare` computes (a cache key): depends on the pooling for mean-pooled vectors."""
        return self.cfg.pooling

    def prepare(self, llm: ItemLLM, token_lists: list[list[int]]) -> torch.Tensor:
        """[N, d] item vectors from the frozen item LLM, on the CPU (TrainConfig checked the pooling)."""
        return mean_pool_tokens(llm, token_lists, specials=self.cfg.pooling == "mean-specials")

    def run(self, vectors: torch.Tensor, hist: Histories, seed: int) -> SeedRun:
        raise NotImplementedError

    @property
    def needs_item_llm(self) -> bool:
        """True when runs train the item LLM, so they take token lists (run_tuned), not vectors."""
        return False


class Trained(Recommender):
    """InfoNCE training of a causal user model over an item table (tokensel.train.loop.fit)."""

    def user_model(self, dim: int) -> UserModel:
        c = self.cfg
        heads = c.heads if dim % c.heads == 0 else 1
        ucfg = UserModelConfig(layers=c.layers, heads=heads, dropout=c.dropout, max_history=c.history)
        return UserModel(dim, ucfg).to(self.device)

    def fit(self, user: UserModel, items: ItemTable, hist: Histories, seed: int) -> SeedRun:
        """Train `user` (and the items' trainable part) in place; the test ranks of the best epoch."""
        c = self.cfg
        run = fit(user, items, hist, seed, c, c.lr or self.default_lr, c.epochs or self.default_epochs, self.device, self.log)
        return SeedRun(seed, run.test_ranks, run.best_epoch, run.valid, run.seconds, run.log, run.valid_ranks)
