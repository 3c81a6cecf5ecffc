"""The selection rule (SPEC.md "Decisions where the paper is loose"): property tests over random inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensel.select.rule import mask_to_positions, n_chunks, select_mask, select_positions_reference

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# a small palette of values so that ties are frequent, plus NaN and infinities
SCORE = st.one_of(
    st.sampled_from([0.0, 1.0, -1.0, 2.5, float("nan"), float("-inf"), float("inf")]),
    st.floats(min_value=-5, max_value=5, allow_nan=False, width=32),
)


@st.composite
def item(draw, max_n: int = 60):
    n = draw(st.integers(0, max_n))
    k = draw(st.integers(1, 40))
    prefix = draw(st.integers(0, 24))
    chunk = draw(st.integers(1, 12))
    C = n_chunks(n, min(prefix, k), chunk)
    scores = draw(st.lists(SCORE, min_size=C, max_size=C))
    return n, k, prefix, chunk, scores


@st.composite
def batch(draw):
    """Rows sharing k, prefix and chunk (as in one compress call), with different lengths and scores."""
    k = draw(st.integers(1, 40))
    prefix = draw(st.integers(0, 24))
    chunk = draw(st.integers(1, 12))
    ns = draw(st.lists(st.integers(0, 70), min_size=1, max_size=8))
    C = n_chunks(max(ns), min(prefix, k), chunk)
    rows = [draw(st.lists(SCORE, min_size=C, max_size=C)) for _ in ns]
    return k, prefix, chunk, ns, rows


def vec_positions(scores: list[float], n: int, k: int, prefix: int, chunk: int) -> list[int]:
    C = n_chunks(n, min(prefix, k), chunk)
    t = torch.tensor([scores[:C]], dtype=torch.float32).reshape(1, C)
    mask = select_mask(t, torch.tensor([n]), k=k, prefix=prefix, chunk=chunk, width=n)
    return mask_to_positions(mask)[0]


def clean(s: float) -> float:
    return -math.inf if s != s else s


def rank_key(scores: list[float], j: int) -> tuple[float, int]:
    """Sort key of chunk j: best score first, ties toward the earlier chunk."""
    return (-clean(scores[j]), j)


@SETTINGS
@given(item())
def test_reference_rule_properties(case):
    n, k, prefix, chunk, scores = case
    pos = select_positions_reference(scores, n, k=k, prefix=prefix, chunk=chunk)
    assert len(pos) == min(k, n)
    assert all(a < b for a, b in zip(pos, pos[1:])), "positions strictly increasing"
    assert all(0 <= p < n for p in pos)
    if n <= k:
        assert pos == list(range(n)), "items with n <= k pass through unchanged"
    else:
        p = min(prefix, k)
        assert pos[:p] == list(range(p)), "the prefix is always kept"
    # deterministic
    assert pos == select_positions_reference(list(scores), n, k=k, prefix=prefix, chunk=chunk)


@SETTINGS
@given(item())
def test_vectorised_rule_properties(case):
    n, k, prefix, chunk, scores = case
    pos = vec_positions(scores, n, k, prefix, chunk)
    assert len(pos) == min(k, n)
    assert all(a < b for a, b in zip(pos, pos[1:]))
    if n <= k:
        assert pos == list(range(n))
    else:
        p = min(prefix, k)
        assert pos[:p] == list(range(p))
    assert pos == vec_positions(scores, n, k, prefix, chunk), "deterministic"


@SETTINGS
@given(item())
def test_chunks_taken_best_first_and_cut_short_from_their_start(case):
    n, k, prefix, chunk, scores = case
    if n <= k:
        return
    pos = set(vec_positions(scores, n, k, prefix, chunk))
    p = min(prefix, k)
    starts = list(range(p, n, chunk))
    taken = []
    for j, s in enumerate(starts):
        span = list(range(s, min(s + chunk, n)))
        kept = [q for q in span if q in pos]
        # a chunk that is cut short keeps its FIRST tokens
        assert kept == span[: len(kept)], f"chunk {j} kept {kept} of {span}"
        taken.append(len(kept))
    # at most one chunk is partially taken
    partial = [j for j, s in enumerate(starts) if 0 < taken[j] < min(chunk, n - s)]
    assert len(partial) <= 1
    # any chunk ranked ahead (better score, or equal score and earlier) of a chunk with kept tokens is fully kept
    for j in range(len(starts)):
        if taken[j] == 0:
            continue
        for i in range(len(starts)):
            if rank_key(scores, i) < rank_key(scores, j):
                assert taken[i] == min(chunk, n - starts[i]), f"chunk {i} outranks kept chunk {j} but is not fully kept"


@SETTINGS
@given(batch())
def test_vectorised_batch_equals_reference_row_by_row(case):
    k, prefix, chunk, ns, rows = case
    scores = torch.tensor(rows, dtype=torch.float32).reshape(len(ns), -1)
    mask = select_mask(scores, torch.tensor(ns), k=k, prefix=prefix, chunk=chunk)
    got = mask_to_positions(mask)
    for r, n in enumerate(ns):
        assert got[r] == select_positions_reference(rows[r], n, k=k, prefix=prefix, chunk=chunk), f"row {r}"


@SETTINGS
@given(batch(), st.randoms(use_true_random=False))
def test_batch_composition_and_order_do_not_change_a_row(case, rnd):
    k, prefix, chunk, ns, rows = case
    full = mask_to_positions(select_mask(torch.tensor(rows, dtype=torch.float32).reshape(len(ns), -1), torch.tensor(ns), k=k, prefix=prefix, chunk=chunk))
    order = list(range(len(ns)))
    rnd.shuffle(order)
    sub = order[: rnd.randint(1, len(order))]
    # a sub-batch in another order, with score columns trimmed to the sub-batch's own width
    C = n_chunks(max(ns[i] for i in sub), min(prefix, k), chunk)
    t = torch.tensor([rows[i][:C] for i in sub], dtype=torch.float32).reshape(len(sub), C)
    part = mask_to_positions(select_mask(t, torch.tensor([ns[i] for i in sub]), k=k, prefix=prefix, chunk=chunk))
    for j, i in enumerate(sub):
        assert part[j] == full[i]
    # each row alone
    for i in sub:
        alone = vec_positions(rows[i], ns[i], k, prefix, chunk)
        assert alone == full[i]


def test_all_ties_give_the_first_k_tokens():
    n, k, prefix, chunk = 100, 30, 5, 4
    C = n_chunks(n, prefix, chunk)
    for value in (0.0, 3.0, float("nan"), float("-inf")):
        pos = vec_positions([value] * C, n, k, prefix, chunk)
        assert pos == list(range(k)), value


def test_ties_break_toward_the_earlier_chunk():
    # prefix 2, chunk 4, k 10: budget 8 = two chunks; chunks 1, 3, 5 tie for best
    n, k, prefix, chunk = 40, 10, 2, 4
    scores = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    expect = [0, 1] + list(range(6, 10)) + list(range(14, 18))
    assert select_positions_reference(scores, n, k=k, prefix=prefix, chunk=chunk) == expect
    assert vec_positions(scores, n, k, prefix, chunk) == expect


def test_nan_ranks_last():
    n, k, prefix, chunk = 20, 8, 0, 4
    scores = [float("nan"), -100.0, float("nan"), -50.0, 1.0]  # chunks start at 0, 4, 8, 12, 16
    expect = list(range(12, 20))  # chunk 3 (-50) and chunk 4 (1.0), not the NaN chunks
    assert vec_positions(scores, n, k, prefix, chunk) == expect
    assert select_positions_reference(scores, n, k=k, prefix=prefix, chunk=chunk) == expect


def test_remainder_fills_with_the_next_best_chunk_cut_short():
    # prefix 3, chunk 5, k 10: budget 7 = one full chunk + 2 tokens of the next best
    n, k, prefix, chunk = 30, 10, 3, 5
    scores = [0.0, 5.0, 1.0, 4.0, 2.0, 0.0]  # chunks start at 3, 8, 13, 18, 23, 28
    expect = [0, 1, 2, 8, 9, 10, 11, 12, 18, 19]
    assert select_positions_reference(scores, n, k=k, prefix=prefix, chunk=chunk) == expect
    assert vec_positions(scores, n, k, prefix, chunk) == expect


def test_short_last_chunk_counts_only_its_real_tokens():
    # n 22, prefix 0, chunk 8, k 10: chunks [0,8) [8,16) [16,22) (6 tokens); best is the short last one
    n, k, prefix, chunk = 22, 10, 0, 8
    scores = [0.0, 1.0, 9.0]
    expect = list(range(8, 12)) + list(range(16, 22))
    assert vec_positions(scores, n, k, prefix, chunk) == expect
    assert select_positions_reference(scores, n, k=k, prefix=prefix, chunk=chunk) == expect


def test_prefix_larger_than_k_keeps_first_k():
    assert vec_positions([9.0] * 12, 50, 5, 20, 4) == list(range(5))
    assert select_positions_reference([9.0] * 12, 50, k=5, prefix=20, chunk=4) == list(range(5))


@pytest.mark.parametrize("bad", [dict(k=0, prefix=0, chunk=1), dict(k=1, prefix=0, chunk=0), dict(k=1, prefix=-1, chunk=1)])
def test_invalid_arguments_raise(bad):
    with pytest.raises(ValueError):
        select_mask(torch.zeros(1, 3), torch.tensor([10]), **bad)


def test_nan_and_minus_inf_tie_toward_the_earlier_chunk():
    n, k, prefix, chunk = 20, 4, 0, 4
    scores = [float("nan"), float("-inf"), float("nan"), float("-inf"), float("nan")]
    assert vec_positions(scores, n, k, prefix, chunk) == [0, 1, 2, 3]
    assert select_positions_reference(scores, n, k=k, prefix=prefix, chunk=chunk) == [0, 1, 2, 3]
    scores = [float("-inf"), float("nan"), 0.0, float("nan"), float("-inf")]
    assert vec_positions(scores, n, 8, prefix, chunk) == [0, 1, 2, 3, 8, 9, 10, 11]


def test_infinity_beats_the_largest_finite_score():
    big = float(torch.finfo(torch.float32).max)
    scores = [big, float("inf"), 0.0]
    assert vec_positions(scores, 12, 4, 0, 4) == [4, 5, 6, 7]
    assert select_positions_reference(scores, 12, k=4, prefix=0, chunk=4) == [4, 5, 6, 7]
