"""Forward batches for training and evaluation: items grouped by length, bounded in rows and padded tokens."""

from __future__ import annotations


def length_buckets(lengths: list[int], max_batch: int, batch_tokens: int) -> list[list[int]]:
    """Group row indices into forward batches of similar length (sorted), bounded in rows and padded tokens.

    Training and evaluation batch this way; compress uses `forward_batches`, whose widths depend on
    the item alone so that its selections do not depend on the other items in a batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:
        width = lengths[i] + 2
        if cur and (len(cur) >= max_batch or width * (len(cur) + 1) > batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
