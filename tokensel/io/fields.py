"""Which text field each kept token came from, and the compressed value of every field.

The budget counts tokens of the joined text (`build_text`), so selection does not change. After it,
each token is given to a field by character offsets in the joined text: the field whose span holds
the token's last character (a byte-level BPE token such as `Ġdescription` starts on the separating
space but belongs to the field after it; a WordPiece `##` piece lies inside the word it continues).

Re-join, precisely: the per-field values are consecutive slices of `text`, so

    text == "".join(value[col] for col in text_cols)

for every item, whatever the tokenizer. The cut between field f and f + 1 is where the decoded
kept tokens of fields <= f end inside `text` (the longest common prefix of `text` and the decode of
those tokens, which for prefix-stable decoders -- byte-level BPE, WordPiece -- is that decode).
A value therefore carries what the decoder put around it: the separating space, and the label
(`title: `) when labels are on; `field_value` strips those for loaders that want the bare value.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable

import numpy as np


Span = tuple[int, int]  # [start, end) of one field's part in the joined text; (p, p) when empty


def build_text_spans(fields: dict[str, str | None], text_cols: list[str], labels: bool = True) -> tuple[str, list[Span]]:
    """The joined text (`title: A description: B`, or `A B` without labels; entities decoded,
    whitespace collapsed, empty fields left out) and each column's span in it."""
    text, spans = "", []
    for col in text_cols:
        value = fields.get(col)
        value = " ".join(html.unescape(value).split()) if value is not None else ""
        if not value:
            spans.append((len(text), len(text)))
            continue
        if text:
            text += " "
        start = len(text)
        text += f"{col}: {value}" if labels else value
        spans.append((start, len(text)))
    return text, spans


def token_fields(offsets: list[tuple[int, int]], spans: list[Span]) -> np.ndarray:
    """Field index of every token: the non-empty span holding the token's last character."""
    starts = np.array([s for s, e in spans if e > s], dtype=np.int64)
    which = np.array([i for i, (s, e) in enumerate(spans) if e > s], dtype=np.int64)
    if not len(offsets) or not len(which):
        return np.zeros(len(offsets), dtype=np.int64)
    pairs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    last = np.maximum(pairs[:, 1] - 1, pairs[:, 0])
    return which[np.clip(np.searchsorted(starts, last, side="right") - 1, 0, len(which) - 1)]


def _common_prefix(a: str, b: str) -> int:
    n = len(os.path.commonprefix([a, b]))
    return n


def field_values(
    decode_batch: Callable[[list[list[int]]], list[str]],
    texts: list[str],
    kept_ids: list[list[int]],
    kept_fields: list[np.ndarray],
    n_fields: int,
) -> list[list[str]]:
    """[n_fields][items] slices of each `texts[i]` (= decode(kept_ids[i])) that re-join to it exactly."""
    prefixes, where = [], []
    for i, (ids, fl) in enumerate(zip(kept_ids, kept_fields)):
        ends = np.searchsorted(fl, np.arange(n_fields - 1), side="right")  # fields are in order in the text
        for f, end in enumerate(ends.tolist()):
            prefixes.append(ids[:end])
            where.append((i, f))
    decoded = decode_batch(prefixes) if prefixes else []
    cuts = [[0] * (n_fields + 1) for _ in texts]
    for (i, f), d in zip(where, decoded):
        cuts[i][f + 1] = _common_prefix(texts[i], d)
    out = [[""] * len(texts) for _ in range(n_fields)]
    for i, t in enumerate(texts):
        c = cuts[i]
        c[n_fields] = len(t)
        for f in range(1, n_fields):
            c[f] = max(c[f], c[f - 1])  # never backwards: the slices tile the text
        for f in range(n_fields):
            out[f][i] = t[c[f] : c[f + 1]]
    return out


def field_value(value: str, col: str) -> str:
    """A per-field slice as a bare value: surrounding space and a leading `col:` label removed."""
    v = value.strip()
    if v.lower().startswith(f"{col.lower()}:"):
        v = v[len(col) + 1 :].strip()
    return v


def per_field(text_cols: list[str]) -> bool:
    """Per-field columns are written when there are >= 2 text columns: with one, the column would
    repeat `text` (and a column named `text` would collide with the output's own)."""
    return len(text_cols) >= 2


def field_columns(
    offsets: Callable[[list[str]], list[list[tuple[int, int]]]],
    decode_batch: Callable[[list[list[int]]], list[str]],
    texts: list[str],
    spans: list[list[Span]],
    token_lists: list[list[int]],
    keep: np.ndarray,
    out_texts: list[str],
) -> list[list[str]]:
    """Per-field values ([field][item]) of a window: `offsets(texts)` (each token's character span, from
    the fast tokenizer) gives each kept token's field."""
    kept_ids, kept_fields, at = [], [], 0
    for toks, offs, sp in zip(token_lists, offsets(texts), spans):
        k = keep[at : at + len(toks)]
        at += len(toks)
        fl = token_fields(list(offs[: len(toks)]), sp)
        kept_ids.append([t for t, m in zip(toks, k) if m])
        kept_fields.append(fl[k])
    return field_values(decode_batch, out_texts, kept_ids, kept_fields, len(spans[0]) if spans else 0)
