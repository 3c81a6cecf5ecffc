"""The evaluation cache: finished seed runs kept in a folder, so a re-run, a resumed run (after a kill)
or one with more seeds trains only what is missing, and anything that changes a result trains again.
Tiny random BERT from conftest, hllm on the fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tokensel import api
from tokensel.config import CacheConfig
from tokensel.evaluate.cache import EvalCache
from tokensel.evaluate.recommenders import TrainConfig
from tokensel.evaluate.recommenders import hllm as hllm_file
from tokensel.evaluate.recommenders.hllm import HLLM
from tokensel.evaluate.runner import evaluate_detailed

from conftest import INTERACTIONS, ITEMS

CFG = TrainConfig(epochs=2, patience=None)


@pytest.fixture(scope="module")
def first_texts(tmp_path_factory, tiny_bert) -> Path:
    out = tmp_path_factory.mktemp("cache_texts") / "first.parquet"
    api.compress(ITEMS, out, k=16, chunk=4, prefix=4, strategy="first-k", model=tiny_bert, device="cpu")
    return out


@pytest.fixture
def counted(monkeypatch) -> list[int]:
    """Seeds HLLM actually trained (frozen item LLM), in order."""
    trained: list[int] = []
    run = HLLM.run

    def spy(self, vectors, hist, seed):
        trained.append(seed)
        return run(self, vectors, hist, seed)

    monkeypatch.setattr(HLLM, "run", spy)
    return trained


def _eval(first_texts, tiny, folder, seeds=(1, 2), cfg=CFG, **kw):
    rows: list[dict] = []
    ev = evaluate_detailed(ITEMS, INTERACTIONS, [first_texts], "hllm", list(seeds), model=tiny, device="cpu", train=cfg,
                           cache=EvalCache(folder), log=rows.append, **kw)
    return ev, rows


def test_a_rerun_trains_nothing_and_gives_the_same_numbers(first_texts, tiny_bert, tmp_path, counted, monkeypatch):
    first, _ = _eval(first_texts, tiny_bert, tmp_path)
    assert counted == [1, 2]
    prepared = []
    monkeypatch.setattr(HLLM, "prepare", lambda *a: prepared.append(1))  # every run finished: no item vectors needed
    again, rows = _eval(first_texts, tiny_bert, tmp_path)
    assert counted == [1, 2] and not prepared
    assert again.files[0].metrics == first.files[0].metrics
    for m, a in first.files[0].per_seed_user.items():
        np.testing.assert_array_equal(again.files[0].per_seed_user[m], a)
        np.testing.assert_array_equal(again.files[0].per_seed_valid_user[m], first.files[0].per_seed_valid_user[m])
    assert [r["best_epoch"] for r in again.files[0].per_seed] == [r["best_epoch"] for r in first.files[0].per_seed]
    assert {"texts": str(first_texts), "stage": "runs reused", "seeds": [1, 2]} in rows


def test_more_seeds_train_only_the_new_ones(first_texts, tiny_bert, tmp_path, counted):
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1, 2))
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1, 2, 3))
    assert counted == [1, 2, 3]


def test_what_changes_a_result_trains_again(first_texts, tiny_bert, tmp_path, counted):
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1,))
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1,), cfg=TrainConfig(epochs=3, patience=None))  # another budget
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1,), max_users=20)  # other histories
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1,), cfg=TrainConfig(epochs=2, patience=None, cache=CacheConfig("disk", str(tmp_path))))
    assert counted == [1, 1, 1]  # where the block-input file lives changes no number: reused


def test_a_killed_evaluation_resumes_at_the_run_it_was_in(first_texts, tiny_bert, tmp_path, counted, monkeypatch):
    run = HLLM.run

    def killed_on_seed_2(self, vectors, hist, seed):
        if seed == 2:
            raise KeyboardInterrupt
        return run(self, vectors, hist, seed)

    with monkeypatch.context() as m:
        m.setattr(HLLM, "run", killed_on_seed_2)
        with pytest.raises(KeyboardInterrupt):
            _eval(first_texts, tiny_bert, tmp_path, seeds=(1, 2, 3))
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1, 2, 3))
    assert counted == [1, 2, 3]  # seed 1 trained once, before the kill; the resumed run trained 2 and 3
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_item_tuning_top_skips_the_lower_layers_when_every_run_is_kept(first_texts, tiny_bert, tmp_path, monkeypatch):
    cfg = TrainConfig(epochs=1, patience=None, item_tuning="top")
    first, _ = _eval(first_texts, tiny_bert, tmp_path, cfg=cfg)
    monkeypatch.setattr(hllm_file, "cache_block_inputs", lambda *a, **k: pytest.fail("the lower layers ran again"))
    again, rows = _eval(first_texts, tiny_bert, tmp_path, cfg=cfg)
    assert again.files[0].metrics == first.files[0].metrics
    assert any(r.get("stage") == "runs reused" for r in rows)


def test_an_unreadable_run_file_is_trained_again(first_texts, tiny_bert, tmp_path, counted):
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1,))
    (saved,) = (tmp_path / "runs").glob("run-*.pt")
    saved.write_bytes(b"not a run")
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1,))
    assert counted == [1, 1]


def test_a_file_compressed_again_with_other_metadata_is_the_same_run(first_texts, tiny_bert, tmp_path, counted):
    """The key is what the recommender reads (template and kept tokens), not the file's bytes: the same
    selection written by a bundle at another path (a moved install, another work tree) trains nothing."""
    table = pq.read_table(first_texts)
    meta = dict(table.schema.metadata)
    meta[b"tokensel"] = meta[b"tokensel"].replace(b'"strategy"', b'"moved": "/elsewhere", "strategy"')
    moved = tmp_path / "moved.parquet"
    pq.write_table(table.replace_schema_metadata(meta), moved)
    assert moved.read_bytes() != first_texts.read_bytes()
    _eval(first_texts, tiny_bert, tmp_path, seeds=(1,))
    _, rows = _eval(moved, tiny_bert, tmp_path, seeds=(1,))
    assert counted == [1] and {"texts": str(moved), "stage": "runs reused", "seeds": [1]} in rows
