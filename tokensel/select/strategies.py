"""Selection strategies: each turns a batch of tokenised items into chunk scores for `select_mask`.

    first-k      all chunks tie, so the earliest win: exactly the first k tokens
    random       seeded per item id, so it is the same whatever the batch
    rarity       mean inverse document frequency of a chunk's tokens (rare tokens carry more)
    topk-logits  mean LM logit of a chunk's tokens (needs a model with an LM head)
    policy       log P(c) = sum of log p_i under the learned Q-K policy head (TSPORec)
    item-align   the same rule with W_Q = W_K = I (the head before stage 2): a token scores by how
                 well its state aligns with the stage-1-trained `[ITEM]` state; needs only stage 1
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import Counter
from collections.abc import Iterable

import numpy as np
import torch

from tokensel.models.item_llm import Encoded
from tokensel.policy.head import PolicyHead, candidate_log_probs
from tokensel.select.plan import BUNDLE_STRATEGIES, STRATEGIES  # noqa: F401  (re-exported)
from tokensel.select.rule import chunk_means, chunk_sums, n_chunks


def pad_tokens(token_lists: list[list[int]], value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(t) for t in token_lists), default=0)
    ids = torch.full((len(token_lists), width), -1, dtype=torch.long)
    for r, t in enumerate(token_lists):
        if t:
            ids[r, : len(t)] = torch.tensor(t, dtype=torch.long)
    return ids, torch.tensor([len(t) for t in token_lists], dtype=torch.long)


class Strategy:
    name = "?"
    needs_forward = False  # whether chunk scores need a forward pass of the item LLM

    def chunk_scores(self, token_lists: list[list[int]], keys: list, enc: Encoded | None, prefix: int, chunk: int) -> torch.Tensor:
        raise NotImplementedError


class ForwardStrategy(Strategy):
    """A strategy scored by the item LLM, in two steps so the costly one can be cached:

    token_scores: the forward pass's [B, L] float32 score of every token; it depends on the model and
                  the text alone, not on the budget, prefix or chunk;
    chunk_scores_from: [B, L] token scores -> [B, C] chunk scores for one prefix and chunk (cheap).
    """

    needs_forward = True

    def token_scores(self, enc: Encoded) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def chunk_scores_from(token_scores: torch.Tensor, n_tokens: torch.Tensor, prefix: int, chunk: int) -> torch.Tensor:
        """Needs no weights (a static method), so cached token scores are selected from without the model."""
        raise NotImplementedError

    def chunk_scores(self, token_lists, keys, enc, prefix, chunk):
        assert enc is not None
        return self.chunk_scores_from(self.token_scores(enc), enc.n_tokens, prefix, chunk)


class FirstK(Strategy):
    name = "first-k"

    def chunk_scores(self, token_lists, keys, enc, prefix, chunk):
        width = max((len(t) for t in token_lists), default=0)
        return torch.zeros(len(token_lists), n_chunks(width, prefix, chunk))


class RandomChunks(Strategy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def chunk_scores(self, token_lists, keys, enc, prefix, chunk):
        width = max((len(t) for t in token_lists), default=0)
        C = n_chunks(width, prefix, chunk)
        out = torch.empty(len(token_lists), C)
        for r, key in enumerate(keys):
            digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
            out[r] = torch.rand(C, generator=g)
        return out


class Rarity(Strategy):
    """Token weight log((N + 1) / (df + 1)) from document frequencies over the corpus being compressed."""

    name = "rarity"

    def __init__(self, doc_freq: Counter | None = None, n_docs: int = 0):
        self.n_docs = n_docs
        self.doc_freq = doc_freq if doc_freq is not None else Counter()
        self._cache: dict[int, float] = {}

    @classmethod
    def from_corpus(cls, token_lists: Iterable[list[int]]) -> Rarity:
        return cls(Counter(), 0).fit([list(token_lists)])

    @property
    def fitted(self) -> bool:
        return self.n_docs > 0

    def fit(self, batches: Iterable[list[list[int]]]) -> Rarity:
        """Document frequencies over a corpus given as batches of token lists (vectorised per batch)."""
        df = np.zeros(0, dtype=np.int64)
        n_docs = 0
        for toks in batches:
            lengths = np.fromiter(map(len, toks), dtype=np.int64, count=len(toks))
            flat = np.fromiter(itertools.chain.from_iterable(toks), dtype=np.int64, count=int(lengths.sum()))
            if flat.size:
                if flat.max() >= len(df):
                    df = np.concatenate([df, np.zeros(int(flat.max()) + 1 - len(df), dtype=np.int64)])
                pairs = np.unique(np.repeat(np.arange(len(toks), dtype=np.int64), lengths) * len(df) + flat)
                df += np.bincount(pairs % len(df), minlength=len(df))
            n_docs += len(toks)
        nz = np.flatnonzero(df)
        self.doc_freq, self.n_docs, self._cache = Counter(dict(zip(nz.tolist(), df[nz].tolist()))), n_docs, {}
        return self

    def weight(self, tok: int) -> float:
        w = self._cache.get(tok)
        if w is None:
            w = self._cache[tok] = math.log((self.n_docs + 1) / (self.doc_freq.get(tok, 0) + 1))
        return w

    def token_weights(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(ids, return_inverse=True)
        table = torch.tensor([self.weight(int(t)) if t >= 0 else 0.0 for t in uniq.tolist()])
        return table[inv]

    def chunk_scores(self, token_lists, keys, enc, prefix, chunk):
        ids, n = pad_tokens(token_lists)
        return chunk_means(self.token_weights(ids), n, prefix, chunk)


class TopkLogits(ForwardStrategy):
    name = "topk-logits"

    def token_scores(self, enc):
        assert enc.token_logits is not None
        return enc.token_logits.float()

    @staticmethod
    def chunk_scores_from(token_scores, n_tokens, prefix, chunk):
        return chunk_means(token_scores, n_tokens, prefix, chunk)


class Policy(ForwardStrategy):
    name = "policy"

    def __init__(self, head: PolicyHead):
        self.head = head

    def token_scores(self, enc):
        return self.head.info(enc.hidden, enc.item).float()

    @staticmethod
    def chunk_scores_from(token_scores, n_tokens, prefix, chunk):
        return chunk_sums(candidate_log_probs(token_scores, n_tokens, prefix), prefix, chunk)


class ItemAlign(Policy):
    """TSPORec's scoring rule without its learned projections: info(t_i) = <h_i, h_[ITEM]> / sqrt(d).

    Why offer it: the `[ITEM]` state is what stage 1 trains to stand for the item, so this rule is
    already informed by the recommendation task, for no stage-2 cost, and it is the start every
    trained head is judged against. Whether it beats first-k depends on where the informative text
    lies (RESULTS.md): measure before choosing."""

    name = "item-align"

    def __init__(self, dim: int, device: torch.device | str | None = None):
        super().__init__(PolicyHead(dim).to(device).eval())
