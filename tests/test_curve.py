"""`tokensel curve`: the verdict rules (pure), the whole command on the fixtures, its bad settings, and
the per-catalogue verdicts `compress --strategy auto` follows."""

from __future__ import annotations

import collections
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokensel import api
from tokensel.cli import app
from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.evaluate import curve_verdict as cv
from tokensel.evaluate.curve import merged_items
from tokensel.evaluate.runner import evaluate_detailed
from tokensel.policy.bundle import DEFAULT_BUNDLE, bundle_hash, read_bundle_config, read_check
from tokensel.select import verdicts
from tokensel.select.auto import resolve

from conftest import INTERACTIONS, ITEMS

runner = CliRunner()
rng = np.random.default_rng(0)


# ------------------------------------------------------------------------------ verdict rules (pure)
def users(mean: float, seeds: int = 3, n: int = 400, seed_sd: float = 0.0, seed: int = 0) -> np.ndarray:
    """[seeds, users] per-user values around `mean`, every seed shifted by its own offset."""
    r = np.random.default_rng(seed)
    base = r.normal(mean, 5.0, n)
    return np.stack([base + r.normal(0, seed_sd) + r.normal(0, 0.5, n) for _ in range(seeds)])


def cell(valid: np.ndarray, first: np.ndarray, ref: np.ndarray, cost: float | None = 1.0) -> dict:
    a, f, r = {m: valid for m in cv.METRICS}, {m: first for m in cv.METRICS}, {m: ref for m in cv.METRICS}
    return {"valid_N@10": float(valid.mean()), "valid_vs_first_k": cv.compare(a, f), "valid_vs_reference": cv.compare(a, r), "cost": cost}


def test_compare_reports_both_tests_and_whether_seeds_were_seen():
    a, b = users(10, seed=1), users(10, seed=1)
    c = cv.compare({m: a for m in cv.METRICS}, {m: b for m in cv.METRICS})
    assert c["N@10"]["ratio"] == 1.0 and c["N@10"]["p"] == 1.0 and c["N@10"]["p_paired"] == 1.0 and c["N@10"]["sees_seed_variance"]
    one = cv.compare({m: a[:1] for m in cv.METRICS}, {m: b[:1] + 1 for m in cv.METRICS})
    assert not one["N@10"]["sees_seed_variance"] and one["N@10"]["p"] == one["N@10"]["p_paired"]


def test_seed_noise_a_paired_test_calls_significant_is_not_below_here():
    """Per-seed shifts move every user at once: the paired test sees a difference, the seed-aware one does not."""
    base = rng.normal(10, 5, 2000)
    a = np.stack([base - 0.6 + rng.normal(0, 0.3, 2000) for _ in range(2)] + [base + 0.5 + rng.normal(0, 0.3, 2000)])
    b = np.stack([base + 0.4 + rng.normal(0, 0.3, 2000), base - 0.5 + rng.normal(0, 0.3, 2000), base + 0.9 + rng.normal(0, 0.3, 2000)])
    c = cv.compare({m: a for m in cv.METRICS}, {m: b for m in cv.METRICS})
    assert c["N@10"]["ratio"] < 1 and c["N@10"]["p_paired"] < 0.05 <= c["N@10"]["p"]
    assert cv.below(c) == []


def test_choose_prefers_first_k_on_ties_and_drops_losers():
    first = users(10)
    at = {"first-k": cell(first, first, first), "item-align": cell(first, first, first)}
    assert cv.choose(at) == "first-k"  # a tie goes to first-k
    better = users(10.5, seed=3)
    at["item-align"] = cell(better, first, first)
    assert cv.choose(at) == "item-align"
    lost = first - 3.0  # clearly below first-k
    at["policy"] = cell(lost, first, first)
    at["policy"]["valid_N@10"] = 99.0  # even a high mean cannot win once it is significantly below in a metric
    at["policy"]["valid_vs_first_k"]["N@10"]["ratio"] = 0.7
    assert cv.choose(at) == "item-align"


def test_verdict_line_names_budgets_run_and_cost():
    ref = users(10, seed=5)
    low = ref - 4.0
    cells = {
        ("first-k", 16): cell(low, low, ref, 0.25), ("item-align", 16): cell(low - 0.1, low, ref, 0.25),
        ("first-k", 32): cell(low, low, ref, 0.5), ("item-align", 32): cell(ref + 0.01, low, ref, 0.5),
        ("first-k", 64): cell(ref, ref, ref, 1.0), ("item-align", 64): cell(ref, ref, ref, 1.0),
    }
    v = cv.verdict(cells, [16, 32, 64], "first-64")
    assert "first-k holds first-64 only at k=64, the reference itself" in cv.verdict(cells, [16, 32, 64], "first-64", reference_k=64)["line"]
    assert v["first_k_holds_from"] == 64 and v["selection_holds_from"] == {"k": 32, "strategy": "item-align"}
    assert v["run"] == {"16": "first-k", "32": "item-align", "64": "first-k"}
    assert v["cheapest_holding"]["k"] == 32 and v["cheapest_holding"]["cost_saved"] == pytest.approx(0.5)
    assert "first-k holds first-64 from k=64" in v["line"] and "a selection from k=32 (item-align)" in v["line"]
    assert "50% of the item-LLM cost saved" in v["line"] and "cannot see seed variance" not in v["line"]
    one = {k: cell(low[:1], low[:1], ref[:1]) for k in cells}
    assert "One seed: these verdicts cannot see seed variance" in cv.verdict(one, [16, 32, 64], "first-64")["line"]
    assert "deterministic" in cv.verdict(one, [16, 32, 64], "first-64", deterministic=True)["line"]
    nothing = {k: cell(low, low, ref) for k in cells if k[1] < 64}
    v = cv.verdict(nothing, [16, 32], "first-64")
    assert v["first_k_holds_from"] is None and v["selection_holds_from"] is None and v["cheapest_holding"] is None
    assert "first-k is below first-64 at every k" in v["line"] and "no budget saves" in v["line"]


def test_a_strategy_that_wrote_first_k_texts_is_no_selection():
    """A policy whose stage 2 kept first-k writes first-k's texts: holding the reference there is first-k holding it."""
    ref = users(10, seed=5)
    low = ref - 4.0
    cells = {("first-k", 16): cell(low, low, ref), ("policy", 16): cell(low, low, ref), ("first-k", 32): cell(ref, ref, ref), ("policy", 32): cell(ref, ref, ref)}
    assert cv.verdict(cells, [16, 32], "first-64")["selection_holds_from"] == {"k": 32, "strategy": "policy"}
    for k in (16, 32):
        cells[("policy", k)]["first_k_texts"] = True
    v = cv.verdict(cells, [16, 32], "first-64")
    assert v["selection_holds_from"] is None and "no selection holds it" in v["line"]


# ------------------------------------------------------------------------------ the verdict store
def test_fingerprint_follows_the_texts_and_the_text_settings(tmp_path):
    text = TextConfig()
    fp = verdicts.catalogue_fingerprint(ITEMS, text)
    assert fp == verdicts.catalogue_fingerprint(ITEMS, TextConfig()) and len(fp) == 16
    assert fp != verdicts.catalogue_fingerprint(ITEMS, TextConfig(labels=True))
    assert fp != verdicts.catalogue_fingerprint(ITEMS, TextConfig(max_len=128))
    copy = tmp_path / "items.parquet"
    shutil.copy(ITEMS, copy)
    assert verdicts.catalogue_fingerprint(copy, text) == fp  # the same texts wherever they live
    t = pq.read_table(ITEMS).to_pydict()
    t["title"][7] = t["title"][7] + " v2"
    pq.write_table(pa.table(t), copy)
    assert verdicts.catalogue_fingerprint(copy, text) != fp  # one changed title: another catalogue


def test_store_records_per_budget_and_picks_exact_then_nearest_below(tmp_path, monkeypatch):
    monkeypatch.delenv(verdicts.ENV)
    items = tmp_path / "items.parquet"
    shutil.copy(ITEMS, items)
    v = lambda k, s: verdicts.Verdict(k, s, "curve", "text-sim", 1, True, verdicts.now())  # noqa: E731
    path = verdicts.record(items, "f" * 16, "b" * 16, TextConfig(), [v(32, "item-align"), v(64, "first-k")])
    assert path == tmp_path / "items.parquet.tokensel-verdicts.json" and not list(tmp_path.glob(".*tmp*"))
    by_k, where = verdicts.recorded(items, "f" * 16, "b" * 16)
    assert where == path and set(by_k) == {32, 64}
    assert verdicts.verdict_for(by_k, 32).strategy == "item-align"
    assert verdicts.verdict_for(by_k, 48).strategy == "item-align" and verdicts.verdict_for(by_k, 128).strategy == "first-k"
    assert verdicts.verdict_for(by_k, 16) is None
    assert verdicts.recorded(items, "f" * 16, "c" * 16)[0] == {}  # another bundle: no verdict
    verdicts.record(items, "f" * 16, "b" * 16, TextConfig(), [v(32, "policy")])  # a later verdict replaces the one at its budget
    assert verdicts.recorded(items, "f" * 16, "b" * 16)[0][32].strategy == "policy"
    # a folder that cannot be written: the user cache folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(verdicts, "store_path", lambda items: Path("/proc/tokensel-nowhere/x.json"))
    path = verdicts.record(items, "e" * 16, "b" * 16, TextConfig(), [v(32, "first-k")])
    assert path == tmp_path / "cache" / "tokensel" / "verdicts" / f"{'e' * 16}.json"
    assert verdicts.recorded(items, "e" * 16, "b" * 16)[1] == path


def test_store_keeps_warm_and_cold_verdicts_apart_and_reads_stores_written_before_protocols(tmp_path, monkeypatch):
    monkeypatch.delenv(verdicts.ENV)
    items = tmp_path / "items.parquet"
    shutil.copy(ITEMS, items)
    v = lambda k, s, p: verdicts.Verdict(k, s, "curve", "hllm", 3, True, verdicts.now(), protocol=p)  # noqa: E731
    verdicts.record(items, "f" * 16, "b" * 16, TextConfig(), [v(32, "first-k", "loo")])
    verdicts.record(items, "f" * 16, "b" * 16, TextConfig(), [v(32, "item-align", "cold")])  # the same budget, the other protocol
    assert verdicts.recorded(items, "f" * 16, "b" * 16)[0][32].strategy == "first-k"
    assert verdicts.recorded(items, "f" * 16, "b" * 16, "cold")[0][32].strategy == "item-align"
    # a store written before verdicts named their protocol: its verdicts are leave-one-out ones
    store = verdicts.store_path(items)
    data = json.loads(store.read_text())
    entry = data["verdicts"][verdicts.key("f" * 16, "b" * 16)]
    old = {k: {f: x for f, x in e.items() if f != "protocol"} for k, e in entry["by_k"].items() if ":" not in k}
    entry["by_k"] = {"64": {**old["32"], "k": 64}}
    store.write_text(json.dumps(data))
    assert verdicts.recorded(items, "f" * 16, "b" * 16)[0][64].protocol == "loo"
    assert verdicts.recorded(items, "f" * 16, "b" * 16, "cold")[0] == {}


# ------------------------------------------------------------------------------ auto follows this catalogue's verdict
def _record(items: Path, k: int, strategy: str, bundle=DEFAULT_BUNDLE, protocol: str = "loo") -> None:
    text = read_bundle_config(bundle).text
    fp = verdicts.catalogue_fingerprint(items, text)
    verdict = verdicts.Verdict(k, strategy, "curve", "hllm, item tuning top", 3, True, verdicts.now(), protocol=protocol)
    verdicts.record(items, fp, bundle_hash(bundle), text, [verdict])


def test_auto_follows_the_warm_verdict_and_a_cold_one_only_where_no_warm_one_was_measured(tmp_path):
    items = tmp_path / "items.parquet"
    shutil.copy(ITEMS, items)
    _record(items, 32, "item-align", protocol="cold")
    strategy, why = resolve(None, items, 32)
    assert strategy == "item-align" and why.startswith("auto: item-align (this catalogue's curve verdict under the cold-start protocol at k=32")
    _record(items, 32, "first-k")  # a leave-one-out verdict at the same budget: the one auto follows, the cold one kept
    strategy, why = resolve(None, items, 32)
    assert strategy == "first-k" and why.startswith("auto: first-k (this catalogue's curve verdict at k=32") and "cold" not in why
    assert resolve(None, items, 64)[0] == "first-k"  # the nearest warm budget below comes before any cold one


def test_auto_follows_the_verdict_for_the_catalogue_it_compresses(tmp_path):
    items = tmp_path / "items.parquet"
    shutil.copy(ITEMS, items)
    other = tmp_path / "other.parquet"
    t = pq.read_table(ITEMS)
    pq.write_table(t.slice(0, 40), other)  # another catalogue
    _record(items, 32, "item-align")
    _record(other, 32, "policy")
    s = api.compress(items, tmp_path / "auto.parquet", k=32, strategy="auto", cache=False, device="cpu")
    api.compress(items, tmp_path / "ia.parquet", k=32, strategy="item-align", cache=False, device="cpu")
    assert pq.read_table(tmp_path / "auto.parquet").equals(pq.read_table(tmp_path / "ia.parquet"))
    assert len(s.notes) == 1 and s.notes[0].startswith("auto: item-align (this catalogue's curve verdict at k=32")
    assert resolve(None, items, 48)[1].startswith("auto: item-align (this catalogue's curve verdict at k=32, the largest recorded budget below 48")
    # below every recorded budget: no verdict for this catalogue, and the shipped bundle's check was made on another one
    strategy, why = resolve(None, items, 16)
    assert strategy == "first-k" and why.startswith("auto: first-k (no verdict for this catalogue")
    # several budgets whose verdicts differ: one run per strategy, each file what its verdict says
    both = api.compress(items, tmp_path / "b{k}.parquet", k=[16, 32], strategy="auto", cache=False, device="cpu")
    assert [b.notes[0].split(" (")[0] for b in both] == ["auto: first-k", "auto: item-align"]
    assert pq.read_table(tmp_path / "b32.parquet").equals(pq.read_table(tmp_path / "ia.parquet"))
    # a changed catalogue is a new catalogue: the verdict recorded for the old texts is not followed
    d = t.to_pydict()
    d["description"][3] = "changed " + (d["description"][3] or "")
    pq.write_table(pa.table(d), items)
    assert resolve(None, items, 32)[1].startswith("auto: first-k (no verdict for this catalogue")
    # the CLI prints the one line
    r = runner.invoke(app, ["compress", str(other), "-o", str(tmp_path / "o.parquet"), "--k", "32", "--no-cache", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "auto: policy (this catalogue's curve verdict at k=32" in " ".join(r.output.split()) and r.output.count("auto:") == 1


def test_auto_follows_the_bundles_check_only_on_its_catalogue(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    check = read_check(bundle)
    text = read_bundle_config(bundle).text
    check["chosen"], check["catalogue"] = "item-align", verdicts.catalogue_fingerprint(ITEMS, text)
    (bundle / "check.json").write_text(json.dumps(check))
    assert resolve(bundle, ITEMS, 64)[0] == "item-align"
    assert "the bundle's downstream check" in resolve(bundle, ITEMS, 64)[1]
    check["catalogue"] = "0" * 16
    (bundle / "check.json").write_text(json.dumps(check))
    strategy, why = resolve(bundle, ITEMS, 64)
    assert strategy == "first-k" and "made on another catalogue" in why


# ------------------------------------------------------------------------------ the command on the fixtures
@pytest.fixture(scope="module")
def fixture_curve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curve")
    out, png = tmp / "curve.json", tmp / "curve.png"
    r = runner.invoke(app, [
        "curve", str(ITEMS), str(INTERACTIONS), "--ks", "16,32,64", "--recommender", "text-sim", "--seeds", "2", "--device", "cpu",
        "--cost-items", "8", "--work", str(tmp / "work"), "-o", str(out), "--plot", str(png),
    ])
    return r, json.loads(out.read_text()) if out.exists() else None, png, tmp


def test_curve_prints_table_and_verdict_line(fixture_curve):
    r, result, _, _ = fixture_curve
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "tokensel curve: items.parquet, text-sim" in text and "vs reference" in text
    assert "verdict (validation, seed-aware test):" in text and f"run {result['verdict']['run']['16']} at 16" in text
    assert result["verdict"]["line"].split(";")[0] in text
    assert "deterministic: there is no seed variance to see" in text


def test_curve_json_schema(fixture_curve):
    _, result, _, tmp = fixture_curve
    assert result["ks"] == [16, 32, 64] and result["strategies"] == ["first-k", "item-align", "policy"]
    assert {"items", "interactions", "recommender", "seeds", "protocol", "model", "bundle_hash", "text", "reference", "users", "cells",
            "verdict", "catalogue", "verdict_store", "cost", "runs_shared", "data"} <= set(result)
    assert len(result["cells"]) == 9
    for c in result["cells"]:
        assert {"strategy", "k", "tokens_per_item", "test", "test_std", "valid", "vs_first_k", "vs_reference", "valid_vs_first_k",
                "valid_vs_reference", "cost_ms_per_item", "cost_vs_reference", "same_as", "prefix"} <= set(c)
        for key in ("vs_first_k", "vs_reference", "valid_vs_first_k", "valid_vs_reference"):
            assert set(c[key]) == {"N@10", "R@10"} and set(c[key]["N@10"]) == {"ratio", "p", "p_paired", "sees_seed_variance"}
        assert c["tokens_per_item"] <= c["k"]
    ref = result["reference"]
    assert ref["name"] == "first-64" and ref["k"] == 64
    top = next(c for c in result["cells"] if c["strategy"] == "first-k" and c["k"] == 64)
    assert top["vs_reference"]["N@10"]["ratio"] == 1.0 and top["vs_reference"]["N@10"]["p"] == 1.0 and top["cost_vs_reference"] == 1.0
    assert next(c for c in result["cells"] if c["strategy"] == "item-align" and c["k"] == 16)["prefix"] == 8  # half the smallest budget
    assert set(result["verdict"]["run"]) == {"16", "32", "64"}
    # the numbers are evaluate's for the same files
    ev = evaluate_detailed(ITEMS, INTERACTIONS, [tmp / "work" / "first-32.parquet"], "text-sim", 1, device="cpu")
    assert next(c for c in result["cells"] if c["strategy"] == "first-k" and c["k"] == 32)["test"] == pytest.approx(ev.files[0].metrics)


def test_curve_shares_runs_between_equal_files(fixture_curve):
    r, result, _, _ = fixture_curve
    from tokensel.policy.bundle import Bundle

    if Bundle.from_pretrained(DEFAULT_BUNDLE).policy.keeps_first_k:  # its policy writes first-k's very texts, and reuses their runs
        assert {t: s for t, s in result["runs_shared"].items() if t.startswith("policy")} == {f"policy-{k}.parquet": f"first-{k}.parquet" for k in (16, 32, 64)}
    assert result["runs_shared"] or pytest.skip("no two files of this grid have equal token lists")
    for texts, twin in result["runs_shared"].items():
        a = next(c for c in result["cells"] if c["texts"] == texts)
        b = next(c for c in result["cells"] if c["texts"] == twin)
        assert a["test"] == b["test"] and a["k"] == b["k"]
    assert '"stage": "reused"' in r.output


def test_curve_started_again_on_its_work_folder_trains_nothing(fixture_curve):
    """A curve killed (or extended) and started again with the same --work keeps every finished run."""
    _, result, _, tmp = fixture_curve
    out = tmp / "again.json"
    r = runner.invoke(app, [
        "curve", str(ITEMS), str(INTERACTIONS), "--ks", "16,32,64", "--recommender", "text-sim", "--seeds", "2", "--device", "cpu",
        "--cost-items", "8", "--work", str(tmp / "work"), "-o", str(out),
    ])
    assert r.exit_code == 0, r.output
    again = json.loads(out.read_text())
    assert [c["test"] for c in again["cells"]] == [c["test"] for c in result["cells"]]
    trained = len({c["texts"] for c in result["cells"]} - set(result["runs_shared"]))
    assert r.output.count('"stage": "runs reused"') == trained  # every file that trained before, none trained again


def test_curve_draws_the_picture_and_records_the_verdict(fixture_curve):
    _, result, png, _ = fixture_curve
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    store = Path(result["verdict_store"])
    entry = json.loads(store.read_text())["verdicts"][f"{result['catalogue']}:{result['bundle_hash']}"]
    assert {int(k): v["strategy"] for k, v in entry["by_k"].items()} == {int(k): s for k, s in result["verdict"]["run"].items()}


def test_curve_svg_from_the_json(fixture_curve, tmp_path):
    from tokensel.evaluate.plot import plot_curve

    _, result, _, _ = fixture_curve
    svg = plot_curve(result, tmp_path / "c.svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


# ------------------------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    "args, needle",
    [
        (["--ks", "32,16"], "increasing order"),
        (["--ks", "16,16,32"], "a budget is repeated"),
        (["--ks", "16,4096", "--strategies", "first-k"], "k=4096 is over the item LLM's max length"),
        (["--strategies", "first-k,magic"], "unknown strategy 'magic'"),
        (["--ks", "sixteen"], "--ks must be comma-separated"),
        (["--plot", "c.gif"], "must end in .png or .svg"),
        (["--reference", "half"], "--reference must be one of"),
    ],
)
def test_bad_settings_exit_2_with_one_message(args, needle, tmp_path):
    work = tmp_path / "work"
    r = runner.invoke(app, ["curve", str(ITEMS), str(INTERACTIONS), "--recommender", "text-sim", "--device", "cpu", "--work", str(work), *args])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert needle in text and text.count("error:") == 1 and "Traceback" not in r.output
    assert not work.exists() or not any(work.iterdir())  # nothing compressed


def test_plot_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    work = tmp_path / "work"
    r = runner.invoke(app, ["curve", str(ITEMS), str(INTERACTIONS), "--recommender", "text-sim", "--work", str(work), "--plot", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "pip install 'tokensel[plot]'" in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not work.exists()


def test_cold_curve_refuses_too_few_cold_users_before_compressing(tmp_path):
    work = tmp_path / "work"
    r = runner.invoke(app, ["curve", str(ITEMS), str(INTERACTIONS), "--recommender", "text-sim", "--protocol", "cold", "--work", str(work)])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "--cold-share" in out and "Traceback" not in r.output
    assert not work.exists() or not any(work.iterdir())


def test_cold_curve_scores_the_cold_target_users(tmp_path, monkeypatch):
    import tokensel.io.cold as cold

    monkeypatch.setattr(cold, "MIN_COLD_USERS", 5)
    out = tmp_path / "cold.json"
    r = runner.invoke(app, ["curve", str(ITEMS), str(INTERACTIONS), "--ks", "16,32", "--strategies", "first-k", "--recommender", "text-sim",
                            "--protocol", "cold", "--cold-share", "0.2", "--device", "cpu", "-o", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["protocol"] == "cold" and data["cold_share"] == 0.2
    assert 5 <= data["users"] < 60  # the cold-target users only, not every test user
    # its validation targets are warm (cold items are test targets only): the line and the record say what decided
    assert "validation targets are warm items" in data["verdict"]["line"] and data["verdict"]["decided_on"] == "warm validation targets"
    entry = json.loads(Path(data["verdict_store"]).read_text())["verdicts"][f"{data['catalogue']}:{data['bundle_hash']}"]
    assert all("warm validation targets" in v["detail"] for key, v in entry["by_k"].items() if key.startswith("cold:"))


def test_api_refuses_the_same_settings():
    from tokensel.evaluate.curve import curve

    with pytest.raises(TokenselError, match="increasing order"):
        curve(ITEMS, INTERACTIONS, [64, 32], recommender="text-sim")
    with pytest.raises(TokenselError, match="unknown recommender"):
        curve(ITEMS, INTERACTIONS, [16, 32], recommender="nope")


def test_merged_items_counts_every_item_whose_kept_tokens_another_item_has(tmp_path):
    path = tmp_path / "t.parquet"
    rows = [[1, 2], [1, 2], [2, 1], None, [], [3], [1, 2], [3, 4]]  # three of [1, 2]; None and [] are one empty text
    pq.write_table(pa.table({"token_ids": pa.array(rows, pa.list_(pa.int32()))}), path)
    assert merged_items(path) == 5
    assert merged_items(path, batch_rows=3) == 5  # across batches
    pq.write_table(pa.table({"token_ids": pa.array([[1], [2], [1, 2]], pa.list_(pa.int32()))}), path)
    assert merged_items(path) == 0


def test_curve_counts_merged_items_per_file(fixture_curve):
    _, result, _, tmp = fixture_curve
    for c in result["cells"] + [result["reference"]]:
        lists = pq.read_table(tmp / "work" / c["texts"], columns=["token_ids"]).column(0).to_pylist()
        counts = collections.Counter(tuple(t or ()) for t in lists)
        assert c["merged_items"] == sum(n for n in counts.values() if n > 1)
