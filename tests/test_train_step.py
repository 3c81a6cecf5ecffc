"""A training step over the step's rows alone (`step_table` with a table that computes rows per step,
as f's trained readout does) is the step over the whole item table: the same loss, the same gradients
on the rows it touches. The compact form keeps a step's cost independent of the catalogue's size."""

from __future__ import annotations

import random

import pytest
import torch

from tokensel.config import UserModelConfig
from tokensel.models.user_model import UserModel
from tokensel.train.loop import FrozenItems, ItemTable, infonce_step, step_table


class RowsItems(ItemTable):
    """Rows computed per step from a leaf table (stands in for f's readout)."""

    def __init__(self, table: torch.Tensor):
        self.table = table
        self.asked: list[list[int]] = []

    @property
    def needs_rows(self) -> bool:
        return True

    def all_rows(self) -> torch.Tensor:
        return self.table.detach()

    def step(self, need: list[int]) -> torch.Tensor:
        self.asked.append(need)
        return self.table[need]


@pytest.mark.parametrize("seed", range(5))
def test_a_step_over_its_rows_equals_the_step_over_the_whole_table(seed):
    rng = random.Random(seed)
    n, d = 300, 16
    base = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    batch = [[rng.randrange(n) for _ in range(rng.randint(2, 6))] for _ in range(8)]
    negs = torch.tensor([rng.randrange(n) for _ in range(12)] + [batch[0][1]])  # one negative is a positive
    width = max(len(w) for w in batch) - 1

    def step(items: ItemTable):
        torch.manual_seed(0)
        user = UserModel(d, UserModelConfig(layers=1, heads=2, dropout=0.0, max_history=width))
        emb, windows, negatives = step_table(items, batch, negs)
        return infonce_step(user, torch.optim.SGD(user.parameters(), lr=0.0), emb, windows, negatives, width, 0.05)

    full = base.clone().requires_grad_(True)
    full_loss = step(FrozenItems(full))
    compact = base.clone().requires_grad_(True)
    rows = RowsItems(compact)
    rows_loss = step(rows)
    (need,) = rows.asked
    assert need == sorted({i for w in batch for i in w} | set(negs.tolist()))  # the step's rows, no others
    assert rows_loss == pytest.approx(full_loss, rel=1e-6)
    torch.testing.assert_close(compact.grad, full.grad)
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[need] = False
    assert full.grad[untouched].abs().max() == 0
