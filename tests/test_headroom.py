"""`tokensel headroom`: first-k against the first factor*k tokens under one recommender, paired over users."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokensel import api
from tokensel.cli import app
from tokensel.errors import TokenselError
from tokensel.evaluate.headroom import headroom, verdict
from tokensel.evaluate.recommenders import TrainConfig
from tokensel.evaluate.runner import evaluate_detailed
from tokensel.stats import paired_pvalues
from tokensel.io.parquet_out import read_metadata

from conftest import INTERACTIONS, ITEMS


# ------------------------------------------------------------------------------------------ verdict
def v(n_ratio, n_p, r_ratio, r_p, longer=0.6):
    return verdict(longer, {"N@10": n_ratio, "R@10": r_ratio}, {"N@10": n_p, "R@10": r_p}, 64, 256)


def test_verdict_cases():
    assert v(1.16, 1e-8, 1.15, 3e-7).startswith("room: the first 256 tokens beat the first 64 (N@10, R@10 up to 1.16x)")
    assert v(1.08, 0.015, 1.06, 0.06).startswith("room:") and "N@10 up to 1.08x" in v(1.08, 0.015, 1.06, 0.06)
    assert v(0.92, 5e-4, 0.99, 0.7).startswith("none: the first 256 tokens are worse than the first 64 (N@10):")
    assert v(1.001, 0.99, 1.016, 0.58).startswith("none measurable: the first 256 and the first 64 tokens do not differ significantly")
    assert v(1.10, 0.01, 0.90, 0.01).startswith("none measurable")  # one metric up, the other down: no clear room
    assert v(float("nan"), 1.0, float("nan"), 1.0).startswith("none measurable")
    assert v(1.5, 1e-9, 1.5, 1e-9, longer=0.01).startswith("nothing to select: 1.0% of the texts are longer than 64 tokens")


# ------------------------------------------------------------------------------------------ headroom
@pytest.fixture(scope="module")
def rows_and_work(tmp_path_factory, tiny_bert):
    work = tmp_path_factory.mktemp("headroom")
    rows = headroom(ITEMS, INTERACTIONS, ks=(24, 12, 24), factor=3, model=tiny_bert, device="cpu", work=work)
    return rows, work


def test_rows_pair_first_k_with_first_factor_k(rows_and_work, tiny_bert):
    rows, work = rows_and_work
    assert [(r.k, r.long_k) for r in rows] == [(12, 36), (24, 72)]  # sorted, duplicates dropped
    for r in rows:
        short, long = work / f"first-{r.k}.parquet", work / f"first-{r.long_k}.parquet"
        assert read_metadata(short)["k"] == r.k and read_metadata(short)["strategy"] == "first-k"
        assert read_metadata(long)["k"] == r.long_k
        # the same numbers evaluate gives for the two files, and the same paired test
        ev = evaluate_detailed(ITEMS, INTERACTIONS, [short, long], "text-sim", 1, model=tiny_bert, device="cpu")
        assert r.first_k == pytest.approx(ev.files[0].metrics) and r.first_long == pytest.approx(ev.files[1].metrics)
        p = paired_pvalues(ev.files[1].per_user, ev.files[0].per_user)
        assert r.p == pytest.approx({m: p[m] for m in ("N@10", "R@10")})
        assert r.ratio["N@10"] == pytest.approx(ev.files[1].metrics["N@10"] / ev.files[0].metrics["N@10"])
        # share of texts longer than k, from the file itself
        n = np.array(pq.read_table(short, columns=["n_tokens"]).column("n_tokens").to_pylist())
        assert r.longer_than_k == pytest.approx((n > r.k).sum() / (n > 0).sum())
        assert r.verdict == r.as_dict()["verdict"]
        assert r.users == ev.n_users > 0
    assert rows[0].longer_than_k >= rows[1].longer_than_k
    json.dumps([r.as_dict() for r in rows])


def test_the_long_side_is_not_cut_at_max_len(tmp_path, tiny_bert):
    rows = headroom(ITEMS, INTERACTIONS, ks=(100,), factor=3, model=tiny_bert, device="cpu", work=tmp_path, max_len=128)
    n_long = pq.read_table(tmp_path / "first-300.parquet", columns=["n_tokens"]).column("n_tokens").to_pylist()
    assert max(n_long) > 128, "texts were tokenised only to max_len"
    assert rows[0].long_k == 300


def test_a_trained_recommender_with_its_item_llm_tuned(tmp_path, tiny_bert):
    """hllm with f's last block trained: the same numbers as evaluate with the same TrainConfig."""
    cfg = TrainConfig(epochs=2, item_tuning="top")
    rows = headroom(ITEMS, INTERACTIONS, ks=(12,), factor=3, recommender="hllm", train=cfg, model=tiny_bert, device="cpu", work=tmp_path)
    ev = evaluate_detailed(ITEMS, INTERACTIONS, [tmp_path / "first-12.parquet", tmp_path / "first-36.parquet"], "hllm", 1, model=tiny_bert, device="cpu", train=cfg)
    assert rows[0].first_k == pytest.approx(ev.files[0].metrics) and rows[0].first_long == pytest.approx(ev.files[1].metrics)
    frozen = headroom(ITEMS, INTERACTIONS, ks=(12,), factor=3, recommender="hllm", train=TrainConfig(epochs=2), model=tiny_bert, device="cpu")
    assert frozen[0].first_k != rows[0].first_k


def test_bad_settings_fail_before_any_work(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.setattr(api, "compress", lambda *a, **kw: pytest.fail("compressed before checking the settings"))
    for kw, needle in (({"ks": ()}, "budgets"), ({"factor": 1}, "factor"), ({"recommender": "nope"}, "unknown recommender 'nope'"), ({"test": "z"}, "--test"), ({"seeds": 0}, "seeds"),
                       ({"train": TrainConfig(item_tuning="top")}, "item tuning 'top'.*only with --recommender hllm")):
        with pytest.raises(TokenselError, match=needle):
            headroom(ITEMS, INTERACTIONS, **{"model": tiny_bert, "device": "cpu", **kw})
    with pytest.raises(TokenselError, match="item tuning 'x'"):  # an unknown value fails as the config is built
        TrainConfig(item_tuning="x")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_table_json_and_errors(tmp_path, tiny_bert):
    runner = CliRunner()
    out = tmp_path / "hr.json"
    r = runner.invoke(app, ["headroom", str(ITEMS), str(INTERACTIONS), "--ks", "12", "--factor", "3", "--model", tiny_bert, "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "verdict" in r.output and "12" in r.output and "36" in r.output
    rows = json.loads(out.read_text())
    assert [(x["k"], x["long_k"]) for x in rows] == [(12, 36)]
    assert rows[0]["verdict"].split(":")[0] in r.output
    r = runner.invoke(app, ["headroom", str(ITEMS), str(INTERACTIONS), "--ks", "twelve"])
    assert r.exit_code == 2 and "--ks" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["headroom", str(tmp_path / "none.parquet"), str(INTERACTIONS), "--model", tiny_bert])
    assert r.exit_code == 2 and "none.parquet" in "".join(r.output.split())
