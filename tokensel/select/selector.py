"""`tokensel.Selector`: the item LLM and a strategy, loaded once, turning texts into selections in memory.

    sel = Selector.from_pretrained()                 # the shipped policy over the default model
    sel(["text one", "text two"], k=64)              # -> [Selection(text, token_ids, positions, n_in, n_out), ...]
    sel(table, k=64, text_cols=["title", "description"])  # pyarrow / polars / pandas -> the same kind, columns added
    dataset.map(sel.map_fn(k=64), batched=True)      # Hugging Face datasets

It is the one model path of tokensel: both compress engines select through it, so what it returns
for some rows is what `tokensel compress` writes for them, whatever the batch size. It never writes
files and never reads the score cache (that is the file job's business, tokensel.compress): the job
calls its steps one by one (tokenize, token_scores, keep, columns) and puts the cache between
scoring and keeping. It pickles by its spec (what to load), not by its tensors, and loads itself
again on the other side: Ray actors, multiprocessing pools and Spark UDFs can carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import torch

from tokensel.config import TextConfig, check_rule_settings
from tokensel.device import pick_device, pick_dtype
from tokensel.errors import TokenselError
from tokensel.io.fields import build_text_spans, field_columns, per_field
from tokensel.io.items import build_text
from tokensel.policy.bundle import Bundle
from tokensel.models.item_llm import DEFAULT_MODEL, ItemLLM
from tokensel.select import frames
from tokensel.select.auto import AUTO, auto_choice
from tokensel.select.batching import BatchConfig, dummy_rows, forward_batches, plain_batches
from tokensel.select.keep import COLUMNS, lengths_of, output_columns, token_offsets
from tokensel.select.rule import select_mask
from tokensel.select.strategies import (
    BUNDLE_STRATEGIES, STRATEGIES, FirstK, ForwardStrategy, ItemAlign, Policy, RandomChunks, Rarity, Strategy, TopkLogits,
)


@dataclass(frozen=True)
class SelectorSpec:
    """What to load: everything a worker needs to rebuild the same Selector."""

    strategy: str = "policy"
    policy: str | None = None  # bundle folder (policy, item-align); None: the shipped default bundle
    model: str | None = None  # item LLM: hub id or folder; None: the bundle's, or the default model
    seed: int = 0  # the random strategy's seed
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise TokenselError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")


@dataclass
class Selection:
    """One text's selection: the kept tokens decoded, their ids and positions, tokens in and out."""

    text: str
    token_ids: list[int]
    positions: list[int]
    n_in: int
    n_out: int


def check_budgets(ks: Sequence[int], chunk: int, prefix: int, max_len: int, strategy: str) -> None:
    """Refuse budgets that are invalid, or under which a selecting strategy would silently select nothing."""
    check_rule_settings(ks, chunk, prefix)
    if strategy == "first-k":
        return
    if prefix >= min(ks):
        raise TokenselError(
            f"--prefix {prefix} >= --k {min(ks)}: every kept token would be prefix, which is --strategy first-k; lower --prefix or raise --k"
        )
    if max(ks) >= max_len:
        raise TokenselError(
            f"--k {max(ks)} >= --max-len {max_len}: every text fits the budget and is kept whole, so nothing is selected; "
            "lower --k or raise --max-len (or use --strategy first-k for the whole texts)"
        )


def load(spec: SelectorSpec) -> tuple[ItemLLM, Strategy, dict, TextConfig | None]:
    """(item LLM, strategy, provenance for output metadata, the bundle's text config or None)."""
    dev = pick_device(spec.device)
    dt = pick_dtype(dev, spec.dtype)
    if spec.strategy in BUNDLE_STRATEGIES:
        bundle = Bundle.from_pretrained(spec.policy, model=spec.model, device=dev, dtype=dt, need_policy=spec.strategy == "policy")
        prov = {"model": bundle.config.identity.get("name"), **bundle.item_llm.source, "policy": str(bundle.path), "policy_hash": bundle.hash}
        if spec.strategy == "item-align":
            strategy = ItemAlign(bundle.item_llm.hidden_size, dev)
        elif bundle.policy.keeps_first_k:  # stage 2 found nothing better than the first tokens: no forward needed
            strategy = FirstK()
        else:
            strategy = Policy(bundle.policy)
        return bundle.item_llm, strategy, prov, bundle.config.text
    name = spec.model or DEFAULT_MODEL
    llm = ItemLLM.from_pretrained(name, lm_head=spec.strategy == "topk-logits", device=dev, dtype=dt)
    strategy = {"first-k": FirstK, "random": lambda: RandomChunks(spec.seed), "rarity": Rarity, "topk-logits": TopkLogits}[spec.strategy]()
    prov = {"model": name, **llm.source, "policy": None, "policy_hash": None, "seed": spec.seed if spec.strategy == "random" else None}
    return llm, strategy, prov, None


class Selector:
    def __init__(self, spec: SelectorSpec, llm: ItemLLM, strategy: Strategy, text: TextConfig, provenance: dict, batch: BatchConfig | None = None):
        self.spec, self.llm, self.strategy, self.text, self.provenance = spec, llm, strategy, text, provenance
        self.batch = batch or BatchConfig.for_device(llm.device)
        llm.set_template(text.template)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, policy=None, strategy: str = "auto", model: str | None = None, *, device: str = "auto", dtype: str = "auto",
        seed: int = 0, text: TextConfig | None = None, batch: BatchConfig | None = None,
    ) -> Selector:
        """Load the item LLM and the strategy once. `policy=None` is the shipped default bundle; text
        settings default to the bundle's (as in the CLI), else to TextConfig(). strategy "auto": the
        one the bundle's downstream check chose (tokensel.select.auto), with the bundle's text settings."""
        if strategy == AUTO:
            strategy, model, auto_text, _ = auto_choice(policy, model)
            text = text or auto_text
        spec = SelectorSpec(strategy, None if policy is None else str(policy), model, seed, device, dtype)
        return cls.from_spec(spec, text=text, batch=batch)

    @classmethod
    def from_spec(cls, spec: SelectorSpec, text: TextConfig | None = None, batch: BatchConfig | None = None, rarity: tuple | None = None) -> Selector:
        llm, strategy, prov, bundle_text = load(spec)
        if rarity is not None and isinstance(strategy, Rarity):
            strategy.doc_freq, strategy.n_docs = rarity
        return cls(spec, llm, strategy, text or bundle_text or TextConfig(), prov, batch)

    def __reduce__(self):
        rarity = (self.strategy.doc_freq, self.strategy.n_docs) if isinstance(self.strategy, Rarity) else None
        return (Selector.from_spec, (self.spec, self.text, self.batch, rarity))

    @property
    def name(self) -> str:
        return self.strategy.name

    @property
    def needs_forward(self) -> bool:
        return isinstance(self.strategy, ForwardStrategy)

    def with_text(self, **changes) -> Selector:
        """The same loaded model with other text settings (columns, labels, template, max_len, id column)."""
        return Selector(self.spec, self.llm, self.strategy, replace(self.text, **{k: v for k, v in changes.items() if v is not None}), self.provenance, self.batch)

    # ------------------------------------------------------------------------------ the model path
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The items' own tokens (no specials), cut at max_len: the space positions index into."""
        return self.llm.tokenize(texts, self.text.max_len)

    @torch.inference_mode()
    def token_scores(self, token_lists: list[list[int]], rows=None, on_batch: Callable[[list[int], dict], None] | None = None) -> dict[int, np.ndarray]:
        """float32 score of every token of the items in `rows` (default all), one forward pass each.

        They depend on the model and the text alone, not on k, prefix or chunk, which is why they are
        what the file job caches. `on_batch(indices, scores)` runs after each forward batch."""
        assert isinstance(self.strategy, ForwardStrategy), "token scores need a forward strategy"
        lengths = lengths_of(token_lists)
        rows = np.arange(len(token_lists)) if rows is None else np.asarray(rows, dtype=np.int64)
        out: dict[int, np.ndarray] = {}
        for width, sub in forward_batches(lengths[rows], self.llm, self.batch):
            idx = rows[sub].tolist()
            toks = [token_lists[i] for i in idx]
            enc = self.llm.encode(toks + dummy_rows(self.llm, width, len(toks), self.batch), width=width)
            table = self.strategy.token_scores(enc)[: len(toks)].cpu().numpy()  # one device-to-host copy per batch
            done = {i: table[r, : lengths[i]].copy() for r, i in enumerate(idx)}
            out.update(done)
            if on_batch:
                on_batch(idx, done)
        return out

    def keep(self, token_lists: list[list[int]], keys: list, k: int, chunk: int, prefix: int, scores: dict[int, np.ndarray] | None = None) -> np.ndarray:
        """A flat keep mask over all tokens at budget k. Forward strategies select from `scores` (every
        item with more than k tokens; computed here when None), on the CPU and grouped by forward
        width, so cached and fresh scores give the same selection bit for bit on any device."""
        lengths = lengths_of(token_lists)
        offs = token_offsets(lengths)
        keep = np.repeat(lengths <= k, lengths)
        todo = np.flatnonzero(lengths > k)
        if not len(todo):
            return keep
        if self.needs_forward:
            if scores is None:
                scores = self.token_scores(token_lists, todo)
            plan = forward_batches(lengths[todo], self.llm, self.batch)
        else:
            plan = plain_batches(lengths[todo])
        for width, sub in plan:
            idx = todo[sub]
            if self.needs_forward:
                table = np.zeros((len(idx), width), dtype=np.float32)
                for r, i in enumerate(idx.tolist()):
                    table[r, : lengths[i]] = scores[i]
                n = torch.from_numpy(lengths[idx])
                chunk_scores = self.strategy.chunk_scores_from(torch.from_numpy(table), n, min(prefix, k), chunk)
            else:
                chunk_scores = self.strategy.chunk_scores([token_lists[i] for i in idx], [keys[i] for i in idx], None, min(prefix, k), chunk)
                n = torch.from_numpy(lengths[idx])
            mask = select_mask(chunk_scores, n, k=k, prefix=prefix, chunk=chunk, width=width).numpy()
            r, c = np.nonzero(mask)
            keep[offs[idx[r]] + c] = True
        return keep

    def columns(self, token_lists: list[list[int]], keep: np.ndarray, texts: list[str] | None = None, spans=None) -> dict:
        """The output contract's arrays (text, token_ids, positions, n_tokens, n_kept) for a keep mask and,
        given the built texts and their field spans with two or more text columns, each field's
        compressed value as a column named after it (tokensel.io.fields: they re-join to `text`)."""
        cols = output_columns(self.llm, token_lists, keep)
        if spans is not None and per_field(self.text.text_cols):
            values = field_columns(self.llm.tokenizer, self.llm.decode_batch, texts, spans, token_lists, keep, cols["text"].to_pylist())
            cols.update({c: pa.array(v, type=pa.string()) for c, v in zip(self.text.text_cols, values)})
        return cols

    def fit(self, data=None, *, text_cols: list[str] | None = None, batches=None) -> Selector:
        """Rarity: document frequencies over a catalogue (texts or a table), or over `batches` of token lists."""
        if not isinstance(self.strategy, Rarity):
            return self
        if batches is None:
            texts = self._texts(data, text_cols, None)[0]
            batches = [self.tokenize(texts[s : s + 4096]) for s in range(0, len(texts), 4096)]
        self.strategy.fit(batches)
        return self

    # ------------------------------------------------------------------------------ in memory
    def __call__(self, data, *, k: int = 64, chunk: int = 8, prefix: int = 16, text_cols: list[str] | None = None,
                 id_col: str | None = None, batch_rows: int = 4096, on_progress: Callable[[int], None] | None = None):
        """Select for a list of strings (-> list of Selection) or a table (pyarrow, polars, pandas: the
        same kind back, same rows and order, with text, token_ids, positions, n_tokens, n_kept)."""
        check_budgets([k], chunk, prefix, self.text.max_len, self.name)
        if isinstance(self.strategy, Rarity) and not self.strategy.fitted:
            raise TokenselError("strategy 'rarity' weighs tokens by their document frequency: call .fit(catalogue) first")
        texts, keys, table, spans = self._texts(data, text_cols, id_col)
        sel = self if table is None or not text_cols else self.with_text(text_cols=list(text_cols))
        parts = []
        for s in range(0, len(texts), max(1, batch_rows)):
            toks = sel.tokenize(texts[s : s + batch_rows])
            keep = sel.keep(toks, keys[s : s + batch_rows], k, chunk, prefix)
            parts.append(sel.columns(toks, keep, texts[s : s + batch_rows], None if spans is None else spans[s : s + batch_rows]))
            if on_progress:
                on_progress(len(toks))
        names = COLUMNS if not parts else tuple(parts[0])
        cols = frames.concat_columns(parts, names)
        if table is None:
            rows = zip(*(cols[c].to_pylist() for c in COLUMNS))
            return [Selection(t, ids, pos, n_in, n_out) for t, ids, pos, n_in, n_out in rows]
        return frames.with_columns(table, data, cols)

    def map_fn(self, **kw) -> Callable[[dict], dict]:
        """For `datasets.Dataset.map(fn, batched=True)`: a batch (dict of columns) -> the new columns."""

        def fn(batch: dict) -> dict:
            return self(frames.from_dict(batch), **kw).to_pydict() if batch else {}

        return fn

    def _texts(self, data, text_cols, id_col) -> tuple[list[str], list, object, list | None]:
        """(built texts, keys of the random strategy, the input as an arrow table or None for strings,
        each text's field spans or None)."""
        if isinstance(data, str) or data is None:
            raise TokenselError("give a list of strings or a table (pyarrow, polars, pandas), not a single string")
        table = frames.to_arrow(data)
        if table is None:
            texts = list(data)
            bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
            if bad is not None:
                raise TokenselError(f"text {bad} is {type(texts[bad]).__name__}, not a string")
            built = [build_text({"text": t}, ["text"], labels=False) for t in texts]
            return built, built, None, None  # without ids, the random strategy is seeded by the text itself
        cols = text_cols or self.text.text_cols
        frames.check_text_columns(table, cols)
        data_cols = table.select(cols).to_pydict()
        built = [build_text_spans({c: data_cols[c][i] for c in cols}, cols, self.text.labels) for i in range(table.num_rows)]
        texts = [t for t, _ in built]
        id_col = id_col or self.text.id_col
        keys = table.column(id_col).to_pylist() if id_col in table.column_names else texts
        return texts, keys, table, [sp for _, sp in built]


__all__ = ["Selector", "SelectorSpec", "Selection", "check_budgets", "load"]
