"""The happy paths of the `tokensel` command: compress, inspect, info, and the default bundle lookup."""

from __future__ import annotations

import json
import re
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import tokensel.policy.bundle as bundle_mod
from tokensel import inspect as ins
from tokensel.cli import app
from tokensel.io.parquet_out import read_metadata
from tokensel.policy.bundle import bundle_hash
from tokensel.select.verdicts import catalogue_fingerprint

from conftest import INTERACTIONS, ITEMS, check_contract

runner = CliRunner()


def invoke(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output
    return r


@pytest.fixture(scope="module")
def rarity_file(tmp_path_factory, tiny_bert):
    out = tmp_path_factory.mktemp("cli") / "rarity.parquet"
    r = invoke("compress", ITEMS, "-o", out, "--model", tiny_bert, "--strategy", "rarity", "--k", "24", "--chunk", "4", "--prefix", "4",
               "--passthrough", "brand", "--batch-rows", "10")
    assert r.exit_code == 0, r.output
    assert "items" in r.output and "48" in r.output
    return out


def test_cli_compress_writes_the_contract(rarity_file, tiny_bert):
    table = check_contract(rarity_file, ITEMS, tiny_bert, 24)
    assert table.column_names[-1] == "brand"
    meta = read_metadata(rarity_file)
    assert (meta["strategy"], meta["k"], meta["chunk"], meta["prefix"]) == ("rarity", 24, 4, 4)


def test_compress_with_and_without_labels(tmp_path, tiny_bert):
    """Plain `A B` texts by default; --labels builds `title: A description: B` (HLLM style)."""
    plain, labelled = tmp_path / "plain.parquet", tmp_path / "labelled.parquet"
    r = invoke("compress", ITEMS, "-o", plain, "--model", tiny_bert, "--strategy", "first-k", "--k", "24")
    assert r.exit_code == 0, r.output
    table = check_contract(plain, ITEMS, tiny_bert, 24, labels=False)
    assert read_metadata(plain)["labels"] is False
    assert not any(t.startswith("title") for t in table.column("text").to_pylist())
    r = invoke("compress", ITEMS, "-o", labelled, "--model", tiny_bert, "--strategy", "first-k", "--k", "24", "--labels")
    assert r.exit_code == 0, r.output
    table = check_contract(labelled, ITEMS, tiny_bert, 24, labels=True)
    assert read_metadata(labelled)["labels"] is True
    assert all(t.startswith("title") for t in table.column("text").to_pylist())
    for out in (plain, labelled):
        report = ins.inspect(ITEMS, out, n=1)  # inspect rebuilds the texts the way they were compressed
        assert report.compressed_items > 0 and report.overlap == 1.0


def test_inspect_report(rarity_file):
    report = ins.inspect(ITEMS, rarity_file, n=2, top=5)
    assert report.items == 48
    assert 40 <= report.compressed_items <= 48
    assert 0.0 <= report.overlap < 1.0  # rarity does not keep exactly first-k
    assert len(report.views) == 2 and all(v.kept != v.first_k for v in report.views)
    assert len(report.dropped) == 5 and len(report.added) == 5
    positions = dict(zip(*pq.read_table(rarity_file, columns=["item_id", "positions"]).to_pydict().values()))
    for v in report.views:
        assert v.kept == set(positions[v.item_id])
        assert v.first_k == set(range(24))
    # the title check, recomputed here: the title's tokens lead the text's, so the leading positions are the title
    meta = read_metadata(rarity_file)
    from tokensel.models.item_llm import ItemLLM

    llm = ItemLLM.from_pretrained(meta["model"])
    table = pq.read_table(ITEMS).to_pydict()
    titles = llm.tokenize(table["title"], 256)
    cut = tokens = first_k_cut = 0
    for item_id, title, n in zip(table["item_id"], titles, pq.read_table(rarity_file, columns=["n_tokens"]).column(0).to_pylist()):
        if n <= 24:
            continue
        missing = sum(p not in positions[item_id] for p in range(min(len(title), 24)))
        cut, tokens, first_k_cut = cut + (missing > 0), tokens + missing, first_k_cut + (len(title) > 24)
    assert report.first_field == "title"
    assert (report.field_cut, report.field_cut_tokens, report.field_cut_first_k) == (cut, tokens, first_k_cut)
    assert 0 < report.field_cut <= report.compressed_items  # prefix 4: rarity cuts titles


def test_inspect_chosen_ids_and_cli(rarity_file):
    report = ins.inspect(ITEMS, rarity_file, ids=["i001", "i002"])
    assert sorted(v.item_id for v in report.views) == ["i001", "i002"]
    r = invoke("inspect", ITEMS, rarity_file, "--ids", "i001", "--top", "3")
    assert r.exit_code == 0, r.output
    assert "i001" in r.output and "overlap" in r.output and "first text column 'title'" in r.output


def test_inspect_errors(rarity_file, tmp_path):
    r = invoke("inspect", ITEMS, ITEMS)  # not a compressed file
    assert r.exit_code == 2 and "no tokensel metadata" in r.output
    r = invoke("inspect", ITEMS, rarity_file, "--ids", "nope")
    assert r.exit_code == 2 and "nope" in r.output
    r = invoke("inspect", ITEMS, tmp_path / "missing.parquet")
    assert r.exit_code == 2 and "missing.parquet: no such file" in " ".join(r.output.split())  # rich wraps long lines
    (tmp_path / "junk.parquet").write_text("not parquet")
    r = invoke("inspect", ITEMS, tmp_path / "junk.parquet")
    assert r.exit_code == 2 and "junk.parquet: not a readable Parquet file" in " ".join(r.output.split())


@pytest.mark.parametrize("command", ["compress", "train", "inspect", "info", "evaluate"])
def test_help_shows_every_bracketed_word(command):
    """Help is rendered as rich markup: a bare `[ray]` would vanish from `pip install 'tokensel[ray]'`."""
    import re

    import typer.main

    params = typer.main.get_command(app).commands[command].params
    shown = "".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"}).output.split())
    words = [w for p in params for w in re.findall(r"\[[^\]]*\]", (getattr(p, "help", None) or "").replace("\\[", "["))]
    for w in words:
        assert "".join(w.split()) in shown, f"{command} --help lost {w!r}"
    if command == "compress":
        assert "tokensel[ray]" in shown


def test_info_is_a_short_summary_and_json_on_request(tiny_bundle):
    r = invoke("info", tiny_bundle)
    assert r.exit_code == 0, r.output
    assert bundle_hash(tiny_bundle) in r.output
    assert len(r.output.splitlines()) < 60 and '"model_type"' not in r.output
    flat_out = "".join(r.output.split())
    assert "(bert,hidden32)" in flat_out and "stage-2warnings" in flat_out and "objectivebounded" in flat_out
    r = invoke("info", tiny_bundle, "--json")
    assert r.exit_code == 0 and '"model_type": "bert"' in r.output and bundle_hash(tiny_bundle) in r.output


def test_info_on_the_shipped_bundle_shows_its_stage_2_choice_and_warnings():
    """docs/choosing.md's logs.stage2: what the shipped bundle's stage 2 kept, and the warnings it recorded."""
    r = invoke("info")
    flat_out = "".join(r.output.split())
    log = json.loads((bundle_mod.DEFAULT_BUNDLE / "config.json").read_text())["logs"]["stage2"]
    assert r.exit_code == 0 and "stage-2choice" in flat_out and f"({log['choice']['chosen']})" in flat_out
    for w in log["warnings"]:
        assert "".join(w.split()) in flat_out


def test_info_on_the_shipped_bundle_prints_nothing_of_the_machine_that_built_it():
    """Its training data by file name, rows and content hash; the bundle by name, not its install folder."""
    r = invoke("info")
    assert r.exit_code == 0, r.output
    assert str(bundle_mod.DEFAULT_BUNDLE) not in r.output and not re.search(r"(?<![\w.])/[A-Za-z]", r.output), r.output
    flat_out = "".join(r.output.split())
    assert "theshippedbundle" in flat_out and "items.parquet:4,344items,sha256" in flat_out
    for name in ("config.json", bundle_mod.CHECK_FILE):
        data = json.loads((bundle_mod.DEFAULT_BUNDLE / name).read_text())["data"]
        assert "/" not in data["items"] + data["interactions"] and data["items_rows"] > 0 and data["interactions_rows"] > 0


def test_a_bundle_that_recorded_data_paths_still_loads_and_info_shows_file_names(tmp_path, tiny_bundle):
    """Bundles written before the path-free record kept the full paths: they load, and info names the files."""
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle, bundle)
    cfg = json.loads((bundle / "config.json").read_text())
    for key in ("items", "interactions", "items_rows", "interactions_rows"):
        cfg["data"].pop(key)
    cfg["data"].update(items="/srv/someone/data/items.parquet", interactions="/srv/someone/data/interactions.parquet")
    (bundle / "config.json").write_text(json.dumps(cfg))
    assert bundle_mod.Bundle.from_pretrained(bundle, device="cpu").policy is not None
    r = invoke("info", bundle)
    assert r.exit_code == 0, r.output
    flat_out = "".join(r.output.split())
    assert "/srv/someone" not in r.output and "items.parquet:48items,sha256" in flat_out and "interactions.parquet:" in flat_out


def test_info_on_a_folder_that_is_not_a_bundle(tmp_path):
    r = invoke("info", tmp_path)
    assert r.exit_code == 2 and "notatokenselbundle" in "".join(r.output.split())


def test_auto_is_the_default_strategy_and_follows_the_default_bundles_check(tmp_path, tiny_bundle, tiny_bert, monkeypatch):
    """`tokensel compress items` with no options: what the shipped bundle's check chose, its base model
    and text settings; without a check for its weights, first-k (and the summary says so)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    monkeypatch.setattr(bundle_mod, "DEFAULT_BUNDLE", bundle)
    cfg = json.loads((bundle / "config.json").read_text())
    out = tmp_path / "o.parquet"
    r = invoke("compress", ITEMS, "-o", out, "--k", "32", "--chunk", "4", "--prefix", "8")
    assert r.exit_code == 0, r.output
    meta = read_metadata(out)
    assert meta["strategy"] == "first-k" and meta["model"] == tiny_bert
    assert meta["max_len"] == cfg["text"]["max_len"] and meta["text_cols"] == cfg["text"]["text_cols"]
    assert "auto: first-k" in r.output and "no strategy check" in " ".join(r.output.split())
    rows = [{"strategy": s, "N@10": n, "R@10": n, "ratio_N@10": n / 5, "p_N@10": p, "ratio_R@10": n / 5, "p_R@10": p}
            for s, n, p in (("first-k", 5.0, None), ("item-align", 5.1, 0.7), ("policy", 5.5, 0.04))]
    check = {"k": 32, "rows": rows, "chosen": "policy", "bundle_hash": bundle_hash(bundle), "data": {"items": str(ITEMS)}, "catalogue": "0" * 16}
    bundle_mod.write_check(bundle, check)  # a check made on another catalogue is not followed
    r = invoke("compress", ITEMS, "-o", out, "--k", "32", "--chunk", "4", "--prefix", "8")
    assert r.exit_code == 0, r.output
    assert read_metadata(out)["strategy"] == "first-k" and "made on another catalogue" in " ".join(r.output.split())
    bundle_mod.write_check(bundle, {**check, "catalogue": catalogue_fingerprint(ITEMS, bundle_mod.read_bundle_config(bundle).text)})
    r = invoke("compress", ITEMS, "-o", out, "--k", "32", "--chunk", "4", "--prefix", "8")
    assert r.exit_code == 0, r.output
    meta = read_metadata(out)
    assert meta["strategy"] == "policy" and meta["policy_hash"] == bundle_hash(bundle) and meta["model"] == tiny_bert
    assert "auto: policy" in r.output
    check_contract(out, ITEMS, tiny_bert, 32)


def test_cli_train_prints_stage2_warnings_then_item_align_uses_the_bundle(tmp_path, tiny_bert):
    out = tmp_path / "bundle"
    r = invoke("train", ITEMS, INTERACTIONS, "-o", out, "--model", tiny_bert, "--epochs1", "1", "--epochs2", "1", "--negatives", "8")
    assert r.exit_code == 0, r.output
    warnings = json.loads((out / "config.json").read_text())["logs"]["stage2"]["warnings"]
    flat = "".join(r.output.split())
    for w in warnings:
        assert "stage2:" + "".join(w.split()) in flat
    r = invoke("compress", ITEMS, "-o", tmp_path / "a.parquet", "--strategy", "item-align", "--policy", out, "--k", "24", "--chunk", "4", "--prefix", "4")
    assert r.exit_code == 0, r.output
    assert read_metadata(tmp_path / "a.parquet")["strategy"] == "item-align"


def test_cli_several_budgets_write_one_file_each_and_a_column_each(tmp_path, tiny_bert):
    pattern = tmp_path / "items.k{k}.parquet"
    r = invoke("compress", ITEMS, "-o", pattern, "--model", tiny_bert, "--strategy", "first-k", "--k", "16,32", "--chunk", "4")
    assert r.exit_code == 0, r.output
    assert "k = 16" in r.output and "k = 32" in r.output
    for k in (16, 32):
        check_contract(tmp_path / f"items.k{k}.parquet", ITEMS, tiny_bert, k)
        assert f"wrote {tmp_path / f'items.k{k}.parquet'}" in r.output.replace("\n", "")
    bad = invoke("compress", ITEMS, "-o", tmp_path / "x.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16,x")
    assert bad.exit_code == 2 and "--k 16,x" in bad.output
    bad = invoke("compress", ITEMS, "-o", tmp_path / "x.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16,32")
    assert bad.exit_code == 2 and "{k}" in bad.output and not (tmp_path / "x.parquet").exists()


def test_info_says_what_an_e2e_stage_2_kept(tiny_bundle, tmp_path):
    """The e2e objective's choice (logs.stage2.choice) is one row of `info`, in words, with the scores it read."""
    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    cfg = json.loads((b / "config.json").read_text())
    rows = [{"strategy": "policy", "N@10": 5.17}, {"strategy": "item-align", "N@10": 5.5}, {"strategy": "first-k", "N@10": 5.72}]
    cfg["logs"]["stage2"]["choice"] = {"chosen": "first-k", "rows": rows}
    (b / "config.json").write_text(json.dumps(cfg))
    r = invoke("info", b)
    flat_out = "".join(r.output.split())
    assert r.exit_code == 0 and "stage-2choice" in flat_out and "thefirsttokens(first-k)" in flat_out and "first-k5.720" in flat_out
    assert "epochswiththeheadheld" not in flat_out  # a bundle from before the settle epochs: one epoch judged
    cfg["logs"]["stage2"]["choice"]["epochs_pooled"] = 2
    (b / "config.json").write_text(json.dumps(cfg))
    assert "themeanof2epochswiththeheadheld" in "".join(invoke("info", b).output.split())
    assert "stage-2choice" not in "".join(invoke("info", tiny_bundle).output.split())  # the paper's objective chooses nothing
