"""The selection rule: pure functions from chunk scores to kept token positions.

Given n tokens, a prefix P, a chunk size c and a budget k (SPEC.md):
- items with n <= k pass through unchanged;
- otherwise the first min(P, k) tokens are kept, the rest is cut into consecutive chunks of c
  tokens (the last may be shorter), chunks are taken best first (ties: earlier chunk first) until
  exactly k tokens are kept, the last taken chunk cut short to its first tokens if needed;
- kept tokens stay in their original order.

`select_mask` does this for a whole batch at once in torch (no per-token Python loop);
`select_positions_reference` is the same rule in plain Python, kept as the readable definition
the tests compare against.
"""

from __future__ import annotations

import math

import torch


def n_chunks(max_tokens: int, prefix: int, chunk: int) -> int:
    """How many candidate chunks an item of `max_tokens` tokens has."""
    return max(0, math.ceil((max_tokens - prefix) / chunk))


def chunk_lengths(n_tokens: torch.Tensor, n_chunk: int, prefix: int, chunk: int) -> torch.Tensor:
    """[B, C] tokens in each candidate chunk (0 for chunks past the end of an item)."""
    starts = prefix + chunk * torch.arange(n_chunk, device=n_tokens.device)
    return (n_tokens[:, None] - starts[None]).clamp(0, chunk)


def chunk_sums(token_scores: torch.Tensor, prefix: int, chunk: int) -> torch.Tensor:
    """[B, L] per-token scores -> [B, C] sum over each chunk (tokens past the end must be 0)."""
    B, L = token_scores.shape
    C = n_chunks(L, prefix, chunk)
    cand = token_scores[:, prefix:]
    pad = C * chunk - cand.shape[1]
    if pad > 0:
        cand = torch.nn.functional.pad(cand, (0, pad))
    return cand.reshape(B, C, chunk).sum(-1)


def chunk_means(token_scores: torch.Tensor, n_tokens: torch.Tensor, prefix: int, chunk: int) -> torch.Tensor:
    """[B, C] mean score of each chunk's real tokens (so a short last chunk is not penalised)."""
    L = token_scores.shape[1]
    valid = torch.arange(L, device=token_scores.device)[None] < n_tokens[:, None]
    sums = chunk_sums(token_scores.masked_fill(~valid, 0.0), prefix, chunk)
    lens = chunk_lengths(n_tokens, sums.shape[1], prefix, chunk)
    return sums / lens.clamp(min=1)


def select_mask(
    chunk_scores: torch.Tensor, n_tokens: torch.Tensor, *, k: int, prefix: int, chunk: int, width: int | None = None
) -> torch.Tensor:
    """[B, C] chunk scores, [B] token counts -> [B, width] bool mask of kept token positions.

    Deterministic: ties break toward the earlier chunk (stable sort); NaN counts as -inf.
    """
    if k < 1 or chunk < 1 or prefix < 0:
        raise ValueError(f"need k >= 1, chunk >= 1, prefix >= 0 (got k={k}, chunk={chunk}, prefix={prefix})")
    dev = chunk_scores.device
    B, C = chunk_scores.shape
    width = int(n_tokens.max().item()) if width is None and B else (width or 0)
    pos = torch.arange(width, device=dev)[None]
    n = n_tokens[:, None]
    p = min(prefix, k)
    budget = k - p
    lens = chunk_lengths(n_tokens, C, p, chunk)  # [B, C]
    # NaN ranks as -inf (ties with a real -inf go to the earlier chunk); keep infinities infinite
    scores = torch.nan_to_num(chunk_scores.float(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranked_lens = lens.gather(1, order)
    before = ranked_lens.cumsum(1) - ranked_lens
    take_ranked = (budget - before).clamp(min=0).minimum(ranked_lens)
    take = torch.zeros_like(take_ranked).scatter(1, order, take_ranked)  # [B, C] tokens taken per chunk
    # token at position q >= p sits in chunk (q-p)//chunk at offset (q-p)%chunk; kept if offset < take
    rel = (pos - p).clamp(min=0)
    ci = (rel // chunk).clamp(max=max(C - 1, 0))
    if C > 0:
        kept_chunk = (rel % chunk) < take.gather(1, ci.expand(B, -1))
    else:
        kept_chunk = torch.zeros(B, width, dtype=torch.bool, device=dev)
    mask = (pos < p) | ((pos >= p) & kept_chunk)
    mask = torch.where(n <= k, pos < n, mask & (pos < n))
    return mask


def select_positions_reference(scores: list[float], n: int, *, k: int, prefix: int, chunk: int) -> list[int]:
    """The rule above for one item, in plain Python: the definition the vectorised version must match."""
    if n <= k:
        return list(range(n))
    p = min(prefix, k)
    starts = list(range(p, n, chunk))
    cleaned = [(-math.inf if (s != s) else s) for s in scores[: len(starts)]]
    ranked = sorted(range(len(starts)), key=lambda j: (-cleaned[j], j))
    kept = list(range(p))
    left = k - p
    for j in ranked:
        if left == 0:
            break
        length = min(chunk, n - starts[j])
        take = min(length, left)
        kept.extend(range(starts[j], starts[j] + take))
        left -= take
    return sorted(kept)


def mask_to_positions(mask: torch.Tensor) -> list[list[int]]:
    """Rows of a keep mask to sorted position lists (one .tolist() per batch, not per token)."""
    rows, cols = mask.nonzero(as_tuple=True)
    counts = mask.sum(1).tolist()
    flat = cols.tolist()
    out, i = [], 0
    for c in counts:
        out.append(flat[i : i + c])
        i += c
    return out
