"""Stage 3 evaluation: the evaluate contract, the recommenders, the metrics and the paired test.

Runs on the fixtures with a tiny randomly initialised BERT built here (no network), so it is fast.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokensel.errors import TokenselError  # noqa: E402
from tokensel.train.metrics import per_user_metrics, rank_users, target_ranks, target_ranks_reference  # noqa: E402
from tokensel.evaluate.runner import METRICS, evaluate, evaluate_detailed, results_table, write_results  # noqa: E402
from tokensel.stats import paired_pvalue  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ROOT / "fixtures" / "items.parquet"
INTERACTIONS = ROOT / "fixtures" / "interactions.parquet"
KEYS = {"texts", "recommender", "seeds", "metrics", "std", "p_vs_first", "data"}  # the SPEC contract plus the data counts


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tiny_bert) -> str:
    """conftest's random BertModel (hidden 32, 2 layers) with a WordPiece tokenizer of the fixture texts."""
    return tiny_bert


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny) -> dict[str, Path]:
    from tokensel import api

    d = tmp_path_factory.mktemp("eval_texts")
    out = {}
    for name, strategy in (("first", "first-k"), ("random", "random"), ("first_again", "first-k")):
        out[name] = d / f"{name}.parquet"
        api.compress(ITEMS, out[name], k=16, chunk=4, prefix=4, strategy=strategy, model=tiny, device="cpu")
    return out


def _check_contract(rows: list[dict], files: list[Path], recommender: str, seeds: list[int]) -> None:
    assert isinstance(rows, list) and len(rows) == len(files)
    json.dumps(rows)  # plain JSON types only
    for i, (row, f) in enumerate(zip(rows, files)):
        assert set(row) == KEYS
        assert row["texts"] == str(f)
        assert row["recommender"] == recommender
        assert row["seeds"] == seeds
        assert set(row["metrics"]) == set(METRICS) and set(row["std"]) == set(METRICS)
        for m in METRICS:
            assert 0.0 <= row["metrics"][m] <= 100.0
            assert row["std"][m] >= 0.0
        met = row["metrics"]
        assert met["R@50"] >= met["R@10"] >= met["R@5"]
        assert met["N@50"] >= met["N@10"] >= met["N@5"]
        if i == 0:
            assert row["p_vs_first"] is None
        else:
            assert set(row["p_vs_first"]) == set(METRICS)
            assert all(0.0 <= p <= 1.0 for p in row["p_vs_first"].values())


# ------------------------------------------------------------------------------------------ evaluate
def test_text_sim_contract_and_identical_file(files, tiny):
    paths = [files["first"], files["random"], files["first_again"]]
    rows = evaluate(ITEMS, INTERACTIONS, paths, "text-sim", seeds=2, model=tiny, device="cpu")
    _check_contract(rows, paths, "text-sim", [0, 1])
    assert rows[2]["metrics"] == rows[0]["metrics"]
    assert rows[2]["p_vs_first"] == {m: 1.0 for m in METRICS}
    assert all(v == 0.0 for v in rows[0]["std"].values())  # deterministic: seeds do not matter


@pytest.mark.parametrize("recommender", ["hllm", "sasrec-init"])
def test_trained_recommenders(files, tiny, recommender):
    paths = [files["first"], files["random"], files["first_again"]]
    ev = evaluate_detailed(ITEMS, INTERACTIONS, paths, recommender, seeds=[3, 4], model=tiny, device="cpu", epochs=2)
    rows = ev.to_list()
    _check_contract(rows, paths, recommender, [3, 4])
    # a file with the same token lists as an earlier one is that experiment: its runs, not retrained
    assert ev.files[2].same_as == str(files["first"]) and ev.files[1].same_as is None
    assert ev.files[2].train_seconds == 0.0 and ev.files[0].train_seconds > 0.0
    assert rows[2]["metrics"] == rows[0]["metrics"] and rows[2]["p_vs_first"] == {m: 1.0 for m in METRICS}
    assert all(1 <= s["best_epoch"] <= 2 for f in ev.files for s in f.per_seed)
    assert ev.n_users == len(ev.files[0].per_user["R@10"])
    # the reuse is sound because retraining is deterministic: the twin trained on its own scores the same
    alone = evaluate_detailed(ITEMS, INTERACTIONS, [files["first_again"]], recommender, seeds=[3, 4], model=tiny, device="cpu", epochs=2)
    assert alone.files[0].same_as is None and alone.files[0].train_seconds > 0.0
    assert alone.files[0].metrics == pytest.approx(rows[0]["metrics"])
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(results_table(ev))
    assert "first_again.parquet (same token lists as first.parquet: its runs)" in console.export_text()


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_hllm_with_the_item_llm_trained(files, tiny, tuning, monkeypatch):
    """HLLM proper: f trains with g in every run, from the same pretrained weights each time."""
    from tokensel.evaluate.recommenders import TrainConfig
    from tokensel.train import loop as recs

    moved = []
    state = recs.TunedItems.state

    def spy(self):  # each new best epoch's f: its trained weights must differ from the pretrained ones
        kept = state(self)
        moved.append(any((kept[n] - p0).abs().max() > 0 for n, p0 in self.initial.items()))
        return kept

    init = recs.TunedItems.__init__

    def remember(self, *a, **kw):
        init(self, *a, **kw)
        self.initial = {n: t.clone() for n, t in state(self).items()}

    monkeypatch.setattr(recs.TunedItems, "__init__", remember)
    monkeypatch.setattr(recs.TunedItems, "state", spy)
    paths = [files["first"], files["random"], files["first_again"]]
    cfg = TrainConfig(epochs=2, item_tuning=tuning, patience=None)
    ev = evaluate_detailed(ITEMS, INTERACTIONS, paths, "hllm", seeds=[1], model=tiny, device="cpu", train=cfg)
    rows = ev.to_list()
    _check_contract(rows, paths, "hllm", [1])
    assert ev.files[2].same_as == str(files["first"])  # the same token lists: first's runs, not retrained
    later = evaluate_detailed(ITEMS, INTERACTIONS, [files["random"], files["first_again"]], "hllm", seeds=[1], model=tiny, device="cpu", train=cfg)
    assert later.files[1].metrics == pytest.approx(rows[0]["metrics"])  # fresh f per run: trained after another file, same numbers
    assert len(moved) >= 4 and all(moved), "the item LLM's trained weights never moved"  # four runs, each keeps epoch 1 at least
    frozen = evaluate_detailed(ITEMS, INTERACTIONS, paths[:1], "hllm", seeds=[1], model=tiny, device="cpu", train=TrainConfig(epochs=2, patience=None))
    assert frozen.to_list()[0]["metrics"] != rows[0]["metrics"]


def test_hllm_with_the_last_block_trained(files, tiny, monkeypatch):
    """item_tuning top: f's last block trains with g over cached lower layers, fresh from f in every run."""
    from tokensel.evaluate.recommenders import TrainConfig
    from tokensel.evaluate.recommenders import hllm as hllm_file
    from tokensel.train import loop as recs

    moved, caches = [], []
    init, state, cache = recs.ReadoutItems.__init__, recs.ReadoutItems.state, hllm_file.cache_block_inputs

    def remember(self, *a, **kw):
        init(self, *a, **kw)
        self.initial = {n: t.clone() for n, t in state(self).items()}

    def spy(self):  # each new best epoch's block: its trained weights must differ from the pretrained ones
        kept = state(self)
        moved.append(any((kept[n] - p0).abs().max() > 0 for n, p0 in self.initial.items()))
        return kept

    def counted(*a, **kw):
        caches.append(1)
        return cache(*a, **kw)

    monkeypatch.setattr(recs.ReadoutItems, "__init__", remember)
    monkeypatch.setattr(recs.ReadoutItems, "state", spy)
    monkeypatch.setattr(hllm_file, "cache_block_inputs", counted)
    paths = [files["first"], files["random"], files["first_again"]]
    cfg = TrainConfig(epochs=2, item_tuning="top", patience=None)
    ev = evaluate_detailed(ITEMS, INTERACTIONS, paths, "hllm", seeds=[1, 2], model=tiny, device="cpu", train=cfg)
    rows = ev.to_list()
    _check_contract(rows, paths, "hllm", [1, 2])
    assert ev.files[2].same_as == str(files["first"])  # the same token lists: first's runs, not retrained
    assert len(caches) == 2  # the lower layers run once per file, not once per seed
    later = evaluate_detailed(ITEMS, INTERACTIONS, [files["random"], files["first_again"]], "hllm", seeds=[1, 2], model=tiny, device="cpu", train=cfg)
    assert later.files[1].metrics == pytest.approx(rows[0]["metrics"])  # fresh block per run: trained after another file, same numbers
    assert len(moved) >= 8 and all(moved), "the last block's trained weights never moved"  # eight runs, each keeps epoch 1 at least
    frozen = evaluate_detailed(ITEMS, INTERACTIONS, paths[:1], "hllm", seeds=[1, 2], model=tiny, device="cpu", train=TrainConfig(epochs=2, patience=None))
    assert frozen.to_list()[0]["metrics"] != rows[0]["metrics"]


def test_top_cache_follows_the_template(tiny, monkeypatch):
    """The lower-layer cache is reused across seeds of one input, not across a different template."""
    from tokensel.evaluate.recommenders import HLLM, TrainConfig
    from tokensel.evaluate.recommenders import hllm as recs
    from tokensel.evaluate.inputs import read_item_ids
    from tokensel.io.interactions import read_histories
    from tokensel.models.item_llm import ItemLLM

    calls = []
    cache = recs.cache_block_inputs
    monkeypatch.setattr(recs, "cache_block_inputs", lambda *a, **kw: calls.append(1) or cache(*a, **kw))
    ids = read_item_ids(ITEMS, "item_id")
    hist = read_histories(INTERACTIONS, {str(i): n for n, i in enumerate(ids)})
    base = ItemLLM.from_pretrained(tiny)
    tokens = base.tokenize([f"item {i}" for i in ids], 16)

    def make(template):
        def make_llm():
            llm = ItemLLM.from_pretrained(tiny)
            llm.set_template(template)
            return llm
        return make_llm

    rec = HLLM(TrainConfig(epochs=1, item_tuning="top"))
    for template, seed in (("", 0), ("", 1), ("item:", 0), ("item:", 1)):
        rec.run_tuned(make(template), tokens, hist, seed)
    assert len(calls) == 2


def test_item_tuning_only_with_hllm(files, tiny):
    from tokensel.evaluate.recommenders import TrainConfig

    for rec, tuning in (("sasrec-init", "lora"), ("hllm", "adapter")):
        with pytest.raises(TokenselError, match="item tuning"):
            evaluate(ITEMS, INTERACTIONS, [files["first"]], rec, seeds=1, model=tiny, device="cpu", train=TrainConfig(epochs=1, item_tuning=tuning))


def test_missing_item_is_a_clear_error(files, tiny, tmp_path):
    table = pq.read_table(files["first"])
    missing = table.column("item_id")[5].as_py()
    partial = pa.concat_tables([table.slice(0, 5), table.slice(6)])
    bad = tmp_path / "partial.parquet"
    pq.write_table(partial.replace_schema_metadata(table.schema.metadata), bad)
    with pytest.raises(TokenselError) as exc:
        evaluate(ITEMS, INTERACTIONS, [files["first"], bad], "text-sim", seeds=1, model=tiny, device="cpu")
    msg = str(exc.value)
    assert str(bad) in msg and repr(missing) in msg


def test_other_model_tokens_are_refused(files, tiny, tmp_path):
    table = pq.read_table(files["first"])
    meta = json.loads(table.schema.metadata[b"tokensel"])
    meta["model"] = str(tmp_path / "some-other-model")
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata({b"tokensel": json.dumps(meta).encode()}), other)
    with pytest.raises(TokenselError, match="token ids"):
        evaluate(ITEMS, INTERACTIONS, [files["first"], other], "text-sim", seeds=1, model=tiny, device="cpu")


def test_cli_json_and_parquet(files, tiny, tmp_path):
    from typer.testing import CliRunner

    from tokensel.cli import app

    runner = CliRunner()
    for out in (tmp_path / "r.json", tmp_path / "r.parquet"):
        res = runner.invoke(app, ["evaluate", str(ITEMS), str(INTERACTIONS), "--texts", str(files["first"]), "--texts", str(files["random"]),
                                  "--recommender", "text-sim", "--seeds", "1", "--model", tiny, "--device", "cpu", "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert out.exists()
        # not a terminal: the table is printed wide, one line per file with its name and its p-values
        row = next(line for line in res.output.splitlines() if line.startswith("│") and files["random"].name in line)
        assert row.count("│") == 10 and row.rstrip().endswith("│"), row
    rows = json.loads((tmp_path / "r.json").read_text())
    _check_contract(rows, [files["first"], files["random"]], "text-sim", [0])
    t = pq.read_table(tmp_path / "r.parquet").to_pydict()
    assert t["texts"] == [str(files["first"]), str(files["random"])]
    assert t["N@10"] == pytest.approx([r["metrics"]["N@10"] for r in rows])
    assert t["N@10 p_vs_first"][0] is None
    res = runner.invoke(app, ["evaluate", str(ITEMS), str(INTERACTIONS), "--texts", str(files["first"]), "--recommender", "nope"])
    assert res.exit_code == 2 and "recommender" in res.output


# ------------------------------------------------------------------------------------------ metrics
def test_perfect_scorer_gets_100():
    n_users, n_items = 7, 20
    targets = torch.arange(n_users) + 3
    scores = torch.zeros(n_users, n_items)
    scores[torch.arange(n_users), targets] = 1.0
    m = per_user_metrics(target_ranks(scores, targets))
    for k, v in m.items():
        assert torch.all(v == 100.0), k


@pytest.mark.parametrize("seed", range(20))
def test_ranks_by_counting_equal_ranks_by_masking(seed):
    """target_ranks counts instead of writing -inf over a copy; on random scores with many ties and
    histories with repeats, the target among them, or empty, it must give the reference's ranks."""
    g = torch.Generator().manual_seed(seed)
    users, n = 17, 30
    scores = torch.randint(0, 6, (users, n), generator=g).float()  # few values: ties everywhere
    targets = torch.randint(0, n, (users,), generator=g)
    hist = [torch.randint(0, n, (int(torch.randint(0, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(users)]
    hist[0] = hist[0] + [int(targets[0])] * 2  # the target repeated in the history is never masked
    hist[1] = []
    assert target_ranks(scores, targets, hist).tolist() == target_ranks_reference(scores, targets, hist).tolist()
    assert target_ranks(scores, targets).tolist() == target_ranks_reference(scores, targets).tolist()


def test_history_is_masked_but_a_repeated_target_is_not():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    target = torch.tensor([2])
    assert int(target_ranks(scores, target)[0]) == 2  # items 0 and 1 score higher
    assert int(target_ranks(scores, target, [[0, 1]])[0]) == 0  # ...but they are in the history
    assert int(target_ranks(scores, target, [[0, 2]])[0]) == 1  # the target itself is never masked
    # a constant scorer gets no credit (ties count against the target)
    assert int(target_ranks(torch.zeros(1, 5), target)[0]) == 4
    # rank_users: dot products, in batches, same answer
    users = torch.eye(3)
    items = torch.eye(3)
    assert rank_users(users, items, [0, 1, 2], [[], [], []], batch=2).tolist() == [0, 0, 0]


def test_ndcg_values():
    ranks = torch.tensor([0, 1, 4, 9, 49, 50])
    m = per_user_metrics(ranks)
    assert m["R@5"].tolist() == [100, 100, 100, 0, 0, 0]
    assert m["R@50"].tolist() == [100, 100, 100, 100, 100, 0]
    assert m["N@10"][1].item() == pytest.approx(100 / math.log2(3))


def test_paired_test():
    rng = np.random.default_rng(0)
    a = rng.random(500)
    assert paired_pvalue(a, a.copy()) == 1.0
    assert paired_pvalue(a, a.copy(), "wilcoxon") == 1.0
    assert paired_pvalue(a + 0.2 + 0.01 * rng.random(500), a) < 1e-6
    assert paired_pvalue(a + 0.2 + 0.01 * rng.random(500), a, "wilcoxon") < 1e-6
    noise = rng.normal(0, 1, 500)
    assert paired_pvalue(a + noise, a - noise[::-1]) > 1e-3


def test_write_results_parquet_metadata(files, tiny, tmp_path):
    ev = evaluate_detailed(ITEMS, INTERACTIONS, [files["first"]], "text-sim", seeds=1, model=tiny, device="cpu")
    out = write_results(ev, tmp_path / "x.parquet")
    meta = json.loads(pq.read_schema(out).metadata[b"tokensel_evaluate"])
    assert "history masked" in meta["protocol"]


def test_a_recommender_added_in_one_file_runs_through_evaluate(files, tiny):
    """One new file registering a Recommender subclass (tests/recommender_plugin.py) and evaluate runs it:
    no edit to tokensel. Popularity ranks the most-seen items first, so it differs from text-sim."""
    from typer.testing import CliRunner

    from tokensel.cli import app
    from tokensel.evaluate.recommenders import REGISTRY, names
    import recommender_plugin  # noqa: F401  (registers "test-popularity")

    try:
        assert "test-popularity" in names()
        paths = [files["first"], files["random"]]
        rows = evaluate(ITEMS, INTERACTIONS, paths, "test-popularity", seeds=2, model=tiny, device="cpu")
        _check_contract(rows, paths, "test-popularity", [0, 1])
        assert rows[0]["metrics"] == rows[1]["metrics"]  # it ignores the text
        sim = evaluate(ITEMS, INTERACTIONS, paths[:1], "text-sim", seeds=1, model=tiny, device="cpu")
        assert sim[0]["metrics"] != rows[0]["metrics"]
        r = CliRunner().invoke(app, ["evaluate", str(ITEMS), str(INTERACTIONS), "--texts", str(paths[0]), "--recommender", "test-popularity", "--model", tiny, "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert "test-popularity" in r.output
    finally:
        REGISTRY.pop("test-popularity", None)


def test_text_sim_table_says_it_is_one_deterministic_pass(files, tiny):
    """text-sim is untrained and deterministic: its table names no seeds and no best epoch; hllm's does."""
    from rich.console import Console

    from tokensel.evaluate.runner import results_table

    def shown(rec, **kw):
        ev = evaluate_detailed(ITEMS, INTERACTIONS, [files["first"]], rec, seeds=3, model=tiny, device="cpu", **kw)
        con = Console(width=400, record=True)
        con.print(results_table(ev))
        return con.export_text()

    sim = shown("text-sim")
    assert "deterministic" in sim and "seeds [" not in sim and "best epoch" not in sim
    from tokensel.evaluate.recommenders import TrainConfig

    hllm = shown("hllm", train=TrainConfig(epochs=1))
    assert "seeds [0, 1, 2]" in hllm and "best epoch" in hllm
