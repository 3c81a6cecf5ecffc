"""`TokenSelector`: a selection without a model, and what every selector shares.

First-k needs only the item's tokens: the fast tokenizer read from the model's files
(tokensel.models.tokenizer) and the rule, which for first-k is "the first min(n, k) tokens" (the
general rule, tokensel.select.rule, with every chunk tied). So this selector imports no torch and
reads no weights. The model path (tokensel.select.selector.Selector) subclasses it: the in-memory
API (lists of strings, tables, datasets), the output columns and the pickling are the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.arrow import string_array
from tokensel.io.fields import build_text_spans, field_columns, per_field
from tokensel.io.items import build_text
from tokensel.select import frames
from tokensel.select.batching import BatchConfig
from tokensel.select.keep import COLUMNS, lengths_of, output_columns, token_offsets
from tokensel.select.plan import Plan, SelectorSpec, check_budgets, plan_selector


@dataclass
class Selection:
    """One text's selection: the kept tokens decoded, their ids and positions, tokens in and out."""

    text: str
    token_ids: list[int]
    positions: list[int]
    n_in: int
    n_out: int


class TokenSelector:
    """First-k from the fast tokenizer alone. `tokenizer`: anything with tokenize(texts, max_len),
    decode_batch(ids) and offsets(texts): a TextTokenizer here, the item LLM in the model path."""

    needs_forward = False
    device_type = "cpu"  # where the model runs: none runs here

    def __init__(self, plan: Plan, text: TextConfig, batch: BatchConfig | None = None):
        self.plan, self.spec, self.tokenizer, self.provenance = plan, plan.spec, plan.tokenizer, plan.provenance
        self.text = text
        self.batch = batch or BatchConfig()

    @classmethod
    def from_spec(cls, spec: SelectorSpec, text: TextConfig | None = None, batch: BatchConfig | None = None) -> TokenSelector:
        plan = plan_selector(spec)
        return cls(plan, text or plan.text or TextConfig(), batch)

    def __reduce__(self):
        return (TokenSelector.from_spec, (self.spec, self.text, self.batch))

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def needs_fit(self) -> bool:
        """Whether the strategy must first see the catalogue (rarity's document frequencies)."""
        return False

    def with_text(self, **changes) -> TokenSelector:
        """The same loaded selector with other text settings (columns, labels, template, max_len, id column)."""
        out = object.__new__(type(self))  # not copy.copy: that would go through __reduce__ and rebuild
        out.__dict__.update(self.__dict__)
        out.text = replace(self.text, **{k: v for k, v in changes.items() if v is not None})
        return out

    # ------------------------------------------------------------------------------ the steps
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The items' own tokens (no specials), cut at max_len: the space positions index into."""
        return self.tokenizer.tokenize(texts, self.text.max_len)

    def keep(self, token_lists: list[list[int]], keys: list, k: int, chunk: int, prefix: int, scores=None) -> np.ndarray:
        """A flat keep mask over all tokens at budget k: each item's first min(n, k) tokens."""
        lengths = lengths_of(token_lists)
        offs = token_offsets(lengths)
        return np.arange(offs[-1]) - np.repeat(offs[:-1], lengths) < k

    def fit(self, data=None, *, text_cols: list[str] | None = None, batches=None) -> TokenSelector:
        return self

    def columns(self, token_lists: list[list[int]], keep: np.ndarray, texts: list[str] | None = None, spans=None) -> dict:
        """The output contract's arrays (text, token_ids, positions, n_tokens, n_kept) for a keep mask and,
        given the built texts and their field spans with two or more text columns, each field's
        compressed value as a column named after it (tokensel.io.fields: they re-join to `text`)."""
        cols = output_columns(self.tokenizer, token_lists, keep)
        if spans is not None and per_field(self.text.text_cols):
            tok = self.tokenizer
            values = field_columns(tok.offsets, tok.decode_batch, texts, spans, token_lists, keep, cols["text"].to_pylist())
            cols.update({c: string_array(v) for c, v in zip(self.text.text_cols, values)})
        return cols

    def _check_ready(self) -> None:
        """Raise where the strategy cannot select yet (the model path: rarity before fit)."""

    # ------------------------------------------------------------------------------ in memory
    def __call__(self, data, *, k: int = 64, chunk: int = 8, prefix: int = 16, text_cols: list[str] | None = None,
                 id_col: str | None = None, batch_rows: int = 4096, on_progress: Callable[[int], None] | None = None):
        """Select for a list of strings (-> list of Selection) or a table (pyarrow, polars, pandas: the
        same kind back, same rows and order, with text, token_ids, positions, n_tokens, n_kept)."""
        check_budgets([k], chunk, prefix, self.text.max_len, self.name)
        self._check_ready()
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


__all__ = ["TokenSelector", "Selection"]
