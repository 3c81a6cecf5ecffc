"""Histories held as arrays (io/interactions.py): the same sequences, splits and slices as lists of lists."""

from __future__ import annotations

import numpy as np

from tokensel.io.interactions import Histories, Labels, Sequences, first_users, read_histories

from conftest import INTERACTIONS, ITEMS


def test_splits_and_slices_read_as_the_lists_they_replace():
    lists = [[5, 1, 4, 2], [3, 3, 0], [7, 6, 5, 4, 3, 2, 1]]
    hist = Histories(["a", "b", "c"], lists, 0, 0)  # lists in: converted once
    assert isinstance(hist.sequences, Sequences) and isinstance(hist.users, Labels)
    assert hist.sequences.items.dtype == np.int32 and hist.sequences == lists and hist.users == ["a", "b", "c"]
    for part, cut in (("train", 2), ("valid", 1), ("test", 0)):
        h, t = hist.split(part)
        want = [s[: len(s) - cut] for s in lists]
        assert list(h) == [s[:-1] for s in want] and t.tolist() == [s[-1] for s in want]
        assert h.items is hist.sequences.items  # a view, not a copy
    assert list(hist.train_sequences()) == [s[:-2] for s in lists]
    assert hist.sequences[1] == [3, 3, 0] and hist.sequences[1:] == lists[1:] and hist.users[2] == "c"
    few = first_users(hist, 2)
    assert few.sequences == lists[:2] and few.users == ["a", "b"] and few.split("test")[1].tolist() == [2, 0]


def test_read_histories_holds_one_item_array():
    import pyarrow.parquet as pq

    ids = pq.read_table(ITEMS, columns=["item_id"])["item_id"].to_pylist()
    hist = read_histories(INTERACTIONS, {i: n for n, i in enumerate(ids)})
    seqs = hist.sequences
    assert int(seqs.lengths.sum()) == len(seqs.items) and (seqs.lengths >= 3).all()
    assert np.array_equal(seqs.starts[1:], seqs.ends[:-1])  # one contiguous array, user after user
    assert len(hist.users) == len(seqs) == hist.counts.users
