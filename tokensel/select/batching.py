"""Forward batches for scoring: why an item's selection does not depend on the other items.

An item's model input is padded to round_up(offset + n + 1, pad_multiple) columns (capped at the
model's maximum positions): a function of the item alone. Batches hold items of one width, and
small batches are filled with dummy rows up to `min_batch_tokens`, so on the CPU an item's states,
and therefore its selection, are bit-identical whatever the batch size, the batch order or the other
items in the batch (with a data-dependent width or a very small batch the float results move in the
last bits, enough to flip a near-tie between two chunks). GPU kernels are not guaranteed
batch-invariant, so bit-identity is claimed (and tested) on the CPU only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from tokensel.errors import TokenselError


@dataclass(frozen=True)
class BatchConfig:
    """How forward passes are batched. Selections do not depend on it (on the CPU); speed does."""

    batch_tokens: int = 8192  # padded tokens per forward pass
    max_batch: int = 64  # items per forward pass
    pad_multiple: int = 8  # forward widths are rounded up to a multiple of this (a function of the item alone)
    min_batch_tokens: int = 1024  # smaller forward batches get dummy rows: tiny matmuls take other kernel paths

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise TokenselError(f"--{f.name.replace('_', '-')} must be at least 1 (got {getattr(self, f.name)})")

    @classmethod
    def for_device(cls, device, **overrides) -> BatchConfig:
        """Defaults scaled for the device (a torch.device or its name; larger on CUDA); given values (not None) win."""
        base = cls(batch_tokens=65536, max_batch=512) if str(device).split(":")[0] == "cuda" else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Geometry:
    """What an item's forward width depends on besides its length: the model-input columns before its
    text (leading specials + template), the model's maximum positions, the padding id. The item LLM
    has the same three attributes; this is them read from the model's files, before it is loaded."""

    input_offset: int
    max_positions: int | None
    pad_id: int


def forward_batches(lengths: np.ndarray, geometry, cfg: BatchConfig) -> list[tuple[int, np.ndarray]]:
    """(text width, item indices) of each forward batch: items of one width, in input order, at most
    `max_batch` rows and `batch_tokens` padded tokens; a width that needs several batches is split
    into batches of even size (no tiny remainder batch)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return []
    off = geometry.input_offset
    m = max(1, cfg.pad_multiple)
    need = off + lengths + 1
    widths = -(-need // m) * m
    max_pos = geometry.max_positions
    if max_pos:
        widths = np.where(widths > max_pos, np.maximum(need, max_pos), widths)
    order = np.lexsort((np.arange(len(lengths)), widths))
    cuts = np.flatnonzero(np.diff(widths[order])) + 1
    out = []
    for group in np.split(order, cuts):
        w = int(widths[group[0]])
        cap = max(1, min(cfg.max_batch, cfg.batch_tokens // w))
        for part in np.array_split(group, -(-len(group) // cap)):
            out.append((w - off - 1, part))
    return out


def plain_batches(lengths: np.ndarray, rows: int = 4096) -> list[tuple[int, np.ndarray]]:
    """Batches for strategies without a forward pass: consecutive items, width = the longest."""
    out = []
    for s in range(0, len(lengths), rows):
        idx = np.arange(s, min(s + rows, len(lengths)))
        out.append((int(lengths[idx].max()), idx))
    return out


def dummy_rows(geometry, width: int, rows: int, cfg: BatchConfig) -> list[list[int]]:
    """Filler rows that bring a small forward batch up to min_batch_tokens padded tokens."""
    full = width + geometry.input_offset + 1
    return [[geometry.pad_id] * width] * max(math.ceil(cfg.min_batch_tokens / full) - rows, 0)
