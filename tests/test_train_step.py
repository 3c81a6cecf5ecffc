"""A training step over the step's rows alone (`step_table` with a table that computes rows per step,
as f's trained readout does) is the step over the whole item table: the same loss, the same gradients
on the rows it touches. The compact form keeps a step's cost independent of the catalogue's size."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tokensel.config import TrainConfig, UserModelConfig
from tokensel.io.interactions import Histories
from tokensel.models.user_model import UserModel
from tokensel.train import loop
from tokensel.train.loop import FrozenItems, IdItems, ItemTable, infonce_step, step_table


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


class CountingItems(IdItems):
    """An ID table that counts how often a saved state is loaded back (for a readout, each load is
    one more pass of the trained block over every item)."""

    def __init__(self, emb: torch.nn.Embedding):
        super().__init__(emb)
        self.loads = 0

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.loads += 1
        super().load(state)


@pytest.mark.parametrize("valid_n10, best", [([0.3, 0.5], 2), ([0.5, 0.3], 1)])
def test_the_best_epoch_is_loaded_back_only_when_it_is_not_the_last(monkeypatch, valid_n10, best):
    rng = random.Random(0)
    n, d = 40, 8
    hist = Histories(users=[f"u{u}" for u in range(12)], sequences=[[rng.randrange(n) for _ in range(6)] for _ in range(12)], skipped_unknown=0, skipped_short=0)
    scripted = iter(valid_n10)
    states: dict[int, dict[str, torch.Tensor]] = {}
    real_mean_metrics = loop.mean_metrics

    def scripted_metrics(ranks):  # the validation NDCG@10 of each epoch, in turn; the test metrics as they are
        m = real_mean_metrics(ranks)
        return m if len(states) == len(valid_n10) else {**m, "N@10": next(scripted)}

    def remember(row):
        states[row["epoch"]] = copy.deepcopy(user.state_dict())

    monkeypatch.setattr(loop, "mean_metrics", scripted_metrics)
    torch.manual_seed(0)
    user = UserModel(d, UserModelConfig(layers=1, heads=2, dropout=0.0, max_history=5))
    items = CountingItems(torch.nn.Embedding(n, d))
    run = loop.fit(user, items, hist, 0, TrainConfig(epochs=2, batch_size=4, negatives=8, history=5, patience=None), 1e-2, 2, torch.device("cpu"), remember)
    assert run.best_epoch == best
    assert items.loads == (0 if best == 2 else 1)
    for name, value in user.state_dict().items():  # the user model ranks the test targets in the best epoch's state
        torch.testing.assert_close(value, states[best][name])


def test_stage_1_over_the_steps_rows_trains_as_over_the_whole_table(tiny_bert, items_path, interactions_path, monkeypatch):
    """Stage 1 with f's last block trained: each step encodes only the items it touches and indexes
    them by position; the run equals the one whose every step encodes the whole catalogue."""
    from tokensel.config import CacheConfig, ItemModelConfig, Stage1Config, TextConfig
    from tokensel.io.interactions import read_histories
    from tokensel.io.items import read_items
    from tokensel.models.item_llm import ItemLLM
    from tokensel.train import stage1

    ids, texts = read_items(items_path, TextConfig())
    hist = read_histories(interactions_path, {i: n for n, i in enumerate(ids)}, "user_id", "item_id", "timestamp")

    def run() -> list[dict]:
        llm = ItemLLM.from_pretrained(tiny_bert)
        for m in llm.model.modules():  # no dropout: its random draws would follow how many rows a step encodes
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            if hasattr(m, "dropout_prob"):
                m.dropout_prob = 0.0
        tokens = llm.tokenize(texts, 32)
        torch.manual_seed(0)
        user = UserModel(llm.hidden_size, UserModelConfig(layers=1, heads=2, dropout=0.0))
        logs: list[dict] = []
        stage1.train_stage1(llm, user, tokens, hist, Stage1Config(epochs=2, batch_size=4, negatives=4), ItemModelConfig(tuning="top"), logs.append, CacheConfig("ram"))
        return [{k: v for k, v in r.items() if k != "seconds"} for r in logs]

    asked: list[int] = []
    rows = loop.step_rows

    def spy(batch, negs):
        need, *rest = rows(batch, negs)
        asked.append(len(need))
        return (need, *rest)

    monkeypatch.setattr(stage1, "step_rows", spy)
    compact = run()
    assert asked and max(asked) < len(ids)  # the steps read some of the catalogue, never all of it
    monkeypatch.setattr(stage1, "step_rows", lambda batch, negs: (list(range(len(ids))), batch, negs))  # every item, ids as positions
    whole = run()
    # the same training: equal losses epoch by epoch (f's block run over other batch compositions may
    # differ in the last float bits, which can swap near-tied ranks in the validation metrics)
    assert [r.get("loss") for r in whole] == pytest.approx([r.get("loss") for r in compact], abs=2e-4)
    assert whole[0] == compact[0]
