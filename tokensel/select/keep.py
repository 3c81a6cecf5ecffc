"""From a flat keep mask to the output contract's arrays: kept positions, token ids, decoded text.

A window's tokens are handled as one flat array with per-item offsets, so nothing here loops over
tokens in Python; the texts are decoded in one call to the tokenizer's Rust backend.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa

from tokensel.io.arrow import int32_array, string_array


COLUMNS = ("text", "token_ids", "positions", "n_tokens", "n_kept")


def lengths_of(token_lists: list[list[int]]) -> np.ndarray:
    return np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))


def token_offsets(lengths: np.ndarray) -> np.ndarray:
    offs = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offs[1:])
    return offs


def flatten_tokens(token_lists: list[list[int]], lengths: np.ndarray) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))


def keep_to_positions(keep: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat kept positions and per-item offsets [B + 1] from a flat keep mask."""
    offs = token_offsets(lengths)
    cs = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=cs[1:])
    kept_off = cs[offs]
    kept_at = np.flatnonzero(keep)
    positions = kept_at - np.repeat(offs[:-1], np.diff(kept_off))
    return positions, kept_off


def kept_counts(keep: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    cs = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=cs[1:])
    return np.diff(cs[token_offsets(lengths)])


def output_columns(tokenizer, token_lists: list[list[int]], keep: np.ndarray) -> dict[str, pa.Array]:
    """text, token_ids, positions, n_tokens, n_kept for a batch of items, built from flat arrays + offsets.
    `tokenizer`: anything with decode_batch (the fast tokenizer, or the item LLM)."""
    lengths = lengths_of(token_lists)
    flat = flatten_tokens(token_lists, lengths)
    positions, kept_off = keep_to_positions(keep, lengths)
    kept_ids = flat[keep]
    off32 = int32_array(kept_off)
    ids_list = kept_ids.tolist()
    bounds = kept_off.tolist()
    texts = tokenizer.decode_batch([ids_list[a:b] for a, b in zip(bounds[:-1], bounds[1:])]) if len(lengths) else []
    return {
        "text": string_array(texts),
        "token_ids": pa.ListArray.from_arrays(off32, int32_array(kept_ids)),
        "positions": pa.ListArray.from_arrays(off32, int32_array(positions)),
        "n_tokens": int32_array(lengths),
        "n_kept": int32_array(np.diff(kept_off)),
    }
