"""`tokensel.Selector`: the item LLM and a strategy, turning texts into selections in memory.

    sel = Selector.from_pretrained()                 # the shipped bundle's choice over the default model
    sel(["text one", "text two"], k=64)              # -> [Selection(text, token_ids, positions, n_in, n_out), ...]
    sel(table, k=64, text_cols=["title", "description"])  # pyarrow / polars / pandas -> the same kind, columns added
    dataset.map(sel.map_fn(k=64), batched=True)      # Hugging Face datasets

It is the one model path of tokensel: both compress engines select through it (first-k alone goes
through its tokenizer-only base, tokensel.select.base), so what it returns for some rows is what
`tokensel compress` writes for them, whatever the batch size. It never writes files and never reads
the score cache (that is the file job's business, tokensel.compress): the job calls its steps one by
one (tokenize, token_scores, keep, columns) and puts the cache between scoring and keeping.

Nothing is loaded that the strategy does not need: a strategy without a forward pass (first-k,
random, rarity) uses the fast tokenizer read from the model's files and never loads the item LLM;
a forward strategy loads it (and the bundle) on its first call to `token_scores`, so a run whose
scores all come from the cache never does. It pickles by its spec (what to load), not by its
tensors, and loads itself again on the other side: Ray actors, multiprocessing pools and Spark UDFs
can carry it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tokensel.config import TextConfig
from tokensel.device import pick_device, pick_dtype
from tokensel.errors import TokenselError
from tokensel.models.item_llm import DEFAULT_MODEL, ItemLLM
from tokensel.policy.bundle import Bundle
from tokensel.select.auto import AUTO, auto_choice
from tokensel.select.base import Selection, TokenSelector
from tokensel.select.batching import BatchConfig, Geometry, dummy_rows, forward_batches, plain_batches
from tokensel.select.keep import lengths_of, token_offsets
from tokensel.select.plan import BUNDLE_STRATEGIES, Plan, SelectorSpec, check_budgets, plan_selector
from tokensel.select.rule import select_mask
from tokensel.select.strategies import FirstK, ForwardStrategy, ItemAlign, Policy, RandomChunks, Rarity, Strategy, TopkLogits

RULES = {"policy": Policy, "item-align": ItemAlign, "topk-logits": TopkLogits}  # token scores -> chunk scores, no weights


def load(spec: SelectorSpec) -> tuple[ItemLLM, Strategy, dict, TextConfig | None]:
    """The model path in full: (item LLM, strategy, provenance for output metadata, the bundle's text config or None)."""
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
    prov = {"model": name, **llm.source, "policy": None, "policy_hash": None, "seed": spec.seed if spec.strategy == "random" else None}
    return llm, _weightless_strategy(spec.strategy, spec.seed), prov, None


def _weightless_strategy(name: str, seed: int) -> Strategy:
    """A strategy that holds no weights: first-k, random, rarity (fitted on the catalogue), topk-logits."""
    return {"first-k": FirstK, "random": lambda: RandomChunks(seed), "rarity": Rarity, "topk-logits": TopkLogits}[name]()


class Selector(TokenSelector):
    def __init__(self, spec: SelectorSpec, llm: ItemLLM, strategy: Strategy, text: TextConfig, provenance: dict, batch: BatchConfig | None = None):
        """A selector over a loaded item LLM (the model path as `load` builds it)."""
        self.plan, self.spec, self.tokenizer, self.provenance, self.text = None, spec, llm, provenance, text
        self._llm, self._strategy = llm, strategy
        self.device = llm.device
        self.dtype_name = str(next(llm.model.parameters()).dtype)
        self.batch = batch or BatchConfig.for_device(llm.device)
        llm.set_template(text.template)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, policy=None, strategy: str = "auto", model: str | None = None, *, device: str = "auto", dtype: str = "auto",
        seed: int = 0, text: TextConfig | None = None, batch: BatchConfig | None = None,
    ) -> Selector:
        """The strategy over the item LLM, each loaded when first needed (a strategy without a forward
        pass never loads the model). `policy=None` is the shipped default bundle; text settings default
        to the bundle's (as in the CLI), else to TextConfig(). strategy "auto": the one the bundle's
        downstream check chose (tokensel.select.auto), with the bundle's text settings."""
        if strategy == AUTO:
            strategy, model, auto_text, _ = auto_choice(policy, model)
            text = text or auto_text
        spec = SelectorSpec(strategy, None if policy is None else str(policy), model, seed, device, dtype)
        return cls.from_spec(spec, text=text, batch=batch)

    @classmethod
    def from_spec(cls, spec: SelectorSpec, text: TextConfig | None = None, batch: BatchConfig | None = None, rarity: tuple | None = None) -> Selector:
        return cls.from_plan(plan_selector(spec), text, batch, rarity)

    @classmethod
    def from_plan(cls, plan: Plan, text: TextConfig | None = None, batch: BatchConfig | None = None, rarity: tuple | None = None) -> Selector:
        """A selector for a plan: the model deferred where the plan has the tokenizer and provenance
        from files, else loaded now (a tokenizer only transformers reads right, a model not on disk yet)."""
        if plan.tokenizer is None or plan.provenance is None:
            llm, strategy, prov, bundle_text = load(plan.spec)
            sel = cls(plan.spec, llm, strategy, text or bundle_text or TextConfig(), prov, batch)
        else:
            sel = cls.__new__(cls)
            TokenSelector.__init__(sel, plan, text or plan.text or TextConfig(), batch)
            sel._llm, sel._strategy = None, None if plan.needs_forward else _weightless_strategy(plan.name, plan.spec.seed)
            sel.device = pick_device(plan.spec.device) if plan.needs_forward else torch.device("cpu")
            sel.dtype_name = str(pick_dtype(sel.device, plan.spec.dtype))
            sel.batch = batch or BatchConfig.for_device(sel.device)
        if rarity is not None and isinstance(sel.strategy, Rarity):
            sel.strategy.doc_freq, sel.strategy.n_docs = rarity
        return sel

    def __reduce__(self):
        rarity = (self.strategy.doc_freq, self.strategy.n_docs) if self.name == "rarity" else None
        return (Selector.from_spec, (self.spec, self.text, self.batch, rarity))

    @property
    def llm(self) -> ItemLLM:
        """The item LLM, loaded (with the bundle) on first use."""
        if self._llm is None:
            llm, strategy, _, _ = load(self.spec)
            llm.set_template(self.text.template)
            if self.plan.needs_forward:
                self._strategy = strategy
            self._llm = llm
        return self._llm

    @property
    def strategy(self) -> Strategy:
        if self._strategy is None:  # a forward strategy's weights come with the model
            self.llm  # noqa: B018
        return self._strategy

    @property
    def name(self) -> str:
        return self.plan.name if self.plan is not None else self._strategy.name

    @property
    def needs_forward(self) -> bool:
        return self.plan.needs_forward if self.plan is not None else isinstance(self._strategy, ForwardStrategy)

    @property
    def needs_fit(self) -> bool:
        return self.name == "rarity" and not self.strategy.fitted

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def identity(self) -> dict:
        """The item LLM's identity (ItemLLM.identity), from its files where it is not loaded."""
        return self.plan.identity if self.plan is not None else self._llm.identity()

    def with_text(self, **changes) -> Selector:
        out = super().with_text(**changes)
        if out._llm is not None:
            out._llm.set_template(out.text.template)
        return out

    def geometry(self):
        """What forward widths depend on (tokensel.select.batching): the loaded model's, else read from files."""
        if self._llm is not None:
            return self._llm
        tok = self.tokenizer
        template = tok.encode(self.text.template, False) if self.text.template else []
        return Geometry(len(tok.lead_ids()) + len(template), self.plan.model.max_positions, 0)

    def _check_ready(self) -> None:
        if self.needs_fit:
            raise TokenselError("strategy 'rarity' weighs tokens by their document frequency: call .fit(catalogue) first")

    # ------------------------------------------------------------------------------ the model path
    @torch.inference_mode()
    def token_scores(self, token_lists: list[list[int]], rows=None, on_batch: Callable[[list[int], dict], None] | None = None) -> dict[int, np.ndarray]:
        """float32 score of every token of the items in `rows` (default all), one forward pass each.

        They depend on the model and the text alone, not on k, prefix or chunk, which is why they are
        what the file job caches. `on_batch(indices, scores)` runs after each forward batch."""
        assert self.needs_forward, "token scores need a forward strategy"
        lengths = lengths_of(token_lists)
        rows = np.arange(len(token_lists)) if rows is None else np.asarray(rows, dtype=np.int64)
        out: dict[int, np.ndarray] = {}
        if not len(rows):
            return out  # nothing to score: the model is not loaded
        llm, strategy = self.llm, self.strategy
        for width, sub in forward_batches(lengths[rows], llm, self.batch):
            idx = rows[sub].tolist()
            toks = [token_lists[i] for i in idx]
            enc = llm.encode(toks + dummy_rows(llm, width, len(toks), self.batch), width=width)
            table = strategy.token_scores(enc)[: len(toks)].cpu().numpy()  # one device-to-host copy per batch
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
        forward = self.needs_forward
        if forward:
            if scores is None:
                scores = self.token_scores(token_lists, todo)
            plan = forward_batches(lengths[todo], self.geometry(), self.batch)
        else:
            plan = plain_batches(lengths[todo])
        for width, sub in plan:
            idx = todo[sub]
            if forward:
                table = np.zeros((len(idx), width), dtype=np.float32)
                for r, i in enumerate(idx.tolist()):
                    table[r, : lengths[i]] = scores[i]
                n = torch.from_numpy(lengths[idx])
                chunk_scores = (self._strategy or RULES[self.name]).chunk_scores_from(torch.from_numpy(table), n, min(prefix, k), chunk)
            else:
                chunk_scores = self.strategy.chunk_scores([token_lists[i] for i in idx], [keys[i] for i in idx], None, min(prefix, k), chunk)
                n = torch.from_numpy(lengths[idx])
            mask = select_mask(chunk_scores, n, k=k, prefix=prefix, chunk=chunk, width=width).numpy()
            r, c = np.nonzero(mask)
            keep[offs[idx[r]] + c] = True
        return keep

    def fit(self, data=None, *, text_cols: list[str] | None = None, batches=None) -> Selector:
        """Rarity: document frequencies over a catalogue (texts or a table), or over `batches` of token lists."""
        if self.name != "rarity":
            return self
        if batches is None:
            texts = self._texts(data, text_cols, None)[0]
            batches = [self.tokenize(texts[s : s + 4096]) for s in range(0, len(texts), 4096)]
        self.strategy.fit(batches)
        return self


__all__ = ["Selector", "SelectorSpec", "Selection", "check_budgets", "load"]
