"""Loading only what a run needs: first-k on the fast tokenizer alone (no torch, no transformers, no
weights), the model loaded on the first cache miss, bundles verified from their manifest, and the
same bytes as the model path (the item LLM's own tokenizer and the torch rule) on both tokenizer kinds.
Timings are not asserted here: bench/startup measures them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import tokensel.policy.files as files_mod
import tokensel.select.selector as selector_mod
from tokensel import api
from tokensel.cli import app
from tokensel.compress.local import compress_file
from tokensel.config import CompressConfig, TextConfig
from tokensel.errors import TokenselError
from tokensel.io.parquet_out import read_metadata
from tokensel.models.item_llm import ItemLLM
from tokensel.models.tokenizer import TextTokenizer, local_folder, read_model
from tokensel.policy.files import DEFAULT_BUNDLE, bundle_hash, verify_bundle
from tokensel.select.base import TokenSelector
from tokensel.select.build import build_selector
from tokensel.select.plan import SelectorSpec, plan_selector
from tokensel.select.selector import Selector, load

from conftest import ITEMS, ROOT, record_manifest

REAL_ITEMS = Path("/work/shared/data/amazon-scientific/items.parquet")
runner = CliRunner()

PROBE = """
import json, runpy, sys
sys.argv = ["tokensel", *json.loads(sys.argv[1])]
try:
    runpy.run_module("tokensel", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print(json.dumps({"code": code, "loaded": sorted(m for m in ("torch", "transformers", "scipy") if m in sys.modules)}))
"""


def probe(*args, cwd: Path) -> dict:
    """Run the CLI in a fresh interpreter and report its exit code and which heavy modules it imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_main_job_version_help_and_info_import_no_torch(tmp_path):
    """The README's main job (auto -> first-k with the shipped bundle) and the light commands: no torch,
    no transformers (so no weights), and scipy neither."""
    shutil.copy(ITEMS, tmp_path / "items.parquet")
    for args in (["compress", "items.parquet", "--k", "64", "--chunk", "8"], ["--version"], ["--help"], ["info"], ["compress", "--help"]):
        got = probe(*args, cwd=tmp_path)
        assert got == {"code": 0, "loaded": []}, (args, got)
    assert pq.read_table(tmp_path / "items.k64-first-k.parquet").num_rows == 48
    # the probe sees a heavy import: the model path does import torch
    got = probe("compress", "items.parquet", "--k", "64", "--strategy", "random", "-o", "r.parquet", cwd=tmp_path)
    assert got["code"] == 0 and "torch" in got["loaded"] and "transformers" not in got["loaded"]  # the rule, not the model


# ------------------------------------------------------------------------------- the same bytes
def model_path_file(out: Path, items: Path, spec: SelectorSpec, cfg: CompressConfig, limit_text: TextConfig | None = None) -> bytes:
    """The file the model path writes: the item LLM loaded, its own tokenizer, the strategy's torch rule."""
    llm, strategy, prov, bundle_text = load(spec)
    sel = Selector(spec, llm, strategy, limit_text or bundle_text or TextConfig(), prov)
    compress_file(items, {cfg.ks[0]: out}, sel, cfg)
    return out.read_bytes()


def new_path_file(out: Path, items: Path, spec: SelectorSpec, cfg: CompressConfig, text: TextConfig | None = None) -> tuple[bytes, object]:
    sel = build_selector(spec, text=text)
    compress_file(items, {cfg.ks[0]: out}, sel, cfg)
    return out.read_bytes(), sel


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])  # WordPiece, byte-level BPE with a BOS
@pytest.mark.parametrize("strategy", ["first-k", "random", "rarity"])
def test_tokenizer_only_strategies_write_the_model_paths_bytes(tmp_path, request, model, strategy):
    path = request.getfixturevalue(model)
    spec = SelectorSpec(strategy, model=path, seed=3, device="cpu")
    cfg = CompressConfig(ks=(24,), chunk=4, prefix=4, batch_rows=16)  # several windows
    new, sel = new_path_file(tmp_path / "new.parquet", ITEMS, spec, cfg)
    assert sel._llm is None if isinstance(sel, Selector) else isinstance(sel, TokenSelector)  # nothing loaded
    assert (strategy == "first-k") == (type(sel) is TokenSelector)
    old = model_path_file(tmp_path / "old.parquet", ITEMS, spec, cfg)
    assert new == old
    assert read_metadata(tmp_path / "new.parquet")["model"] == path


@pytest.mark.skipif(not REAL_ITEMS.exists(), reason=f"real items not found at {REAL_ITEMS}")
@pytest.mark.parametrize("model", ["default", "tiny_llama"])  # all-MiniLM-L6-v2's WordPiece (BertTokenizer), byte-level BPE
def test_first_k_on_real_items_is_the_model_paths_bytes(tmp_path, request, model):
    path = model if model == "default" else request.getfixturevalue(model)
    items = tmp_path / "items.parquet"
    pq.write_table(pq.read_table(REAL_ITEMS).slice(0, 500), items)
    spec = SelectorSpec("first-k", model=None if model == "default" else path, device="cpu")
    cfg = CompressConfig(ks=(64,), chunk=8, prefix=16)
    new, sel = new_path_file(tmp_path / "new.parquet", items, spec, cfg)
    assert type(sel) is TokenSelector
    assert new == model_path_file(tmp_path / "old.parquet", items, spec, cfg)


def test_the_fast_tokenizer_is_the_item_llms(tiny_bert, tiny_llama, texts):
    """Same ids, text, offsets, identity, lead specials and [ITEM] id as the transformers tokenizer of the
    item LLM, also for text that spells special tokens."""
    tricky = [*texts[:20], "a [ITEM] b [SEP] <s> </s> [CLS]", "Café  naïve 中文 ﬁ", ""]
    for path in (tiny_bert, tiny_llama, "default"):
        llm = ItemLLM.from_pretrained(path)
        tok = TextTokenizer.from_folder(local_folder(path))
        assert tok is not None, path
        assert tok.tokenize(tricky, 40) == llm.tokenize(tricky, 40)
        ids = llm.tokenize(tricky, 1000)
        assert tok.decode_batch(ids) == llm.decode_batch(ids)
        assert tok.offsets(tricky) == llm.offsets(tricky)
        assert tok.lead_ids() == llm.lead_ids and tok.item_token_id == llm.item_token_id
        assert read_model(path).identity(tok) == llm.identity()
        assert read_model(path).source == llm.source


def test_a_bert_tokenizer_whose_settings_disagree_with_its_file_goes_to_transformers(tmp_path):
    """transformers rebuilds BertTokenizer from tokenizer_config.json: where that differs from
    tokenizer.json, only transformers tokenises as the model path does."""
    folder = shutil.copytree(local_folder("default"), tmp_path / "m")
    assert TextTokenizer.from_folder(folder) is not None
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": False}))
    assert TextTokenizer.from_folder(folder) is None
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "SomeOtherTokenizer"}))
    assert TextTokenizer.from_folder(folder) is None


def test_selector_from_pretrained_first_k_loads_no_model(tiny_bert, monkeypatch):
    monkeypatch.setattr(selector_mod, "load", lambda spec: pytest.fail("the model was loaded"))
    sel = Selector.from_pretrained(strategy="first-k", model=tiny_bert)
    out = sel(["one two three four five six seven eight nine ten eleven"], k=4)
    assert out[0].n_out == 4 and out[0].positions == [0, 1, 2, 3]
    auto = Selector.from_pretrained()  # the shipped bundle's check chose first-k
    assert auto.name == "first-k" and auto._llm is None


# ------------------------------------------------------------------------------- the cache
def test_a_run_whose_scores_are_all_cached_loads_no_model(tmp_path, tiny_bundle, monkeypatch):
    items = tmp_path / "items.parquet"
    shutil.copy(ITEMS, items)
    kw = dict(strategy="item-align", policy=tiny_bundle, chunk=4, prefix=4, device="cpu")
    first = api.compress(items, tmp_path / "a.k{k}.parquet", k=[16, 24], **kw)
    assert first[0].forward_batches > 0
    monkeypatch.setattr(selector_mod, "load", lambda spec: pytest.fail("the model was loaded"))
    again = api.compress(items, tmp_path / "b.parquet", k=24, **kw)
    assert again.forward_batches == 0 and again.reused == again.scored > 0
    assert pq.read_table(tmp_path / "b.parquet").equals(pq.read_table(tmp_path / "a.k24.parquet"))
    assert read_metadata(tmp_path / "b.parquet") == read_metadata(tmp_path / "a.k24.parquet")


# ------------------------------------------------------------------------------- bundles
def damage(file: Path) -> None:
    """Flip one byte in the middle: same length, a valid header, a different hash."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def test_the_shipped_bundle_records_its_files_and_keeps_its_hash():
    cfg = json.loads((DEFAULT_BUNDLE / "config.json").read_text())
    assert set(cfg["files"]) == {"item.safetensors", "policy.safetensors", "user_model.safetensors"}
    verify_bundle(DEFAULT_BUNDLE)
    check = json.loads((DEFAULT_BUNDLE / "check.json").read_text())
    assert bundle_hash(DEFAULT_BUNDLE) == check["bundle_hash"]  # the manifest left the hash as the check recorded it


@pytest.mark.parametrize("named", [True, False])
def test_a_damaged_bundle_with_the_default_strategy_exits_2_naming_the_file(tmp_path, named, monkeypatch):
    """auto resolves to first-k, which reads none of the bundle's weights: the damage is still named."""
    bundle = shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle")
    shutil.copy(ITEMS, tmp_path / "items.parquet")
    extra = ["--policy", bundle] if named else []
    if not named:
        monkeypatch.setattr(files_mod, "DEFAULT_BUNDLE", bundle)
    ok = runner.invoke(app, [str(a) for a in ("compress", tmp_path / "items.parquet", "-o", tmp_path / "ok.parquet", *extra)])
    assert ok.exit_code == 0 and "auto: first-k" in ok.output, ok.output
    damage(bundle / "user_model.safetensors")
    r = runner.invoke(app, [str(a) for a in ("compress", tmp_path / "items.parquet", "-o", tmp_path / "out.parquet", *extra)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "user_model.safetensors" in "".join(r.output.split()) and "damaged" in r.output
    assert not (tmp_path / "out.parquet").exists()


def test_a_damaged_bundle_saved_before_manifests_is_named_by_its_structure(tmp_path):
    bundle = shutil.copytree(DEFAULT_BUNDLE, tmp_path / "bundle")
    cfg = json.loads((bundle / "config.json").read_text())
    cfg.pop("files")
    (bundle / "config.json").write_text(json.dumps(cfg))
    verify_bundle(bundle)
    f = bundle / "policy.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(TokenselError, match="policy.safetensors: damaged"):
        verify_bundle(bundle)


def test_a_deliberately_edited_bundle_verifies_once_its_manifest_is_recorded(tmp_path, tiny_bundle):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    damage(bundle / "item.safetensors")
    with pytest.raises(TokenselError, match="item.safetensors: damaged"):
        plan_selector(SelectorSpec("item-align", str(bundle)))
    record_manifest(bundle)
    verify_bundle(bundle)


# ------------------------------------------------------------------------------- ignored options
def test_options_first_k_ignores_get_one_warning_line(tmp_path, tiny_bert):
    shutil.copy(ITEMS, tmp_path / "items.parquet")
    base = ["compress", tmp_path / "items.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16"]
    r = runner.invoke(app, [str(a) for a in (*base, "-o", tmp_path / "a.parquet", "--prefix", "32", "--chunk", "4", "--device", "cuda")])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: --prefix 32, --chunk 4, --device cuda are ignored: first-k keeps each item's first k tokens and runs no model"]
    meta = read_metadata(tmp_path / "a.parquet")
    assert (meta["prefix"], meta["chunk"]) == (32, 4)  # recorded as given
    r = runner.invoke(app, [str(a) for a in (*base, "-o", tmp_path / "b.parquet")])
    assert r.exit_code == 0 and "warning:" not in r.output, r.output
    assert pq.read_table(tmp_path / "a.parquet").column("token_ids").equals(pq.read_table(tmp_path / "b.parquet").column("token_ids"))
    r = runner.invoke(app, [str(a) for a in ("compress", tmp_path / "items.parquet", "--model", tiny_bert, "--strategy", "random", "--k", "16", "--prefix", "4", "-o", tmp_path / "c.parquet")])
    assert r.exit_code == 0 and "warning:" not in r.output, r.output  # random reads --prefix


def test_pickled_selectors_come_back_without_a_model(tiny_bert):
    import pickle

    for strategy in ("first-k", "random"):
        sel = build_selector(SelectorSpec(strategy, model=tiny_bert, device="cpu"))
        back = pickle.loads(pickle.dumps(sel))
        assert type(back) is type(sel) and back.name == strategy
        texts = ["a b c d e f g h i j k l m n o p q r s t u v w x y z"]
        assert back(texts, k=8, chunk=2, prefix=2)[0].positions == sel(texts, k=8, chunk=2, prefix=2)[0].positions


def test_per_field_columns_match_on_the_new_path(tmp_path, tiny_llama):
    """Two text columns: the per-field columns come from the fast tokenizer's offsets on both paths."""
    rows = pq.read_table(ITEMS).slice(0, 12)
    items = tmp_path / "items.parquet"
    pq.write_table(rows, items)
    spec = SelectorSpec("first-k", model=tiny_llama, device="cpu")
    cfg = CompressConfig(ks=(10,), chunk=2, prefix=2)
    new, _ = new_path_file(tmp_path / "new.parquet", items, spec, cfg)
    assert new == model_path_file(tmp_path / "old.parquet", items, spec, cfg)
    assert {"title", "description"} <= set(pq.read_schema(tmp_path / "new.parquet").names)
    assert isinstance(pq.read_table(tmp_path / "new.parquet").column("title"), pa.ChunkedArray)


def test_a_model_that_does_not_match_the_bundle_is_named_before_anything_loads(tiny_bundle, tiny_llama, monkeypatch):
    monkeypatch.setattr(selector_mod, "load", lambda spec: pytest.fail("the model was loaded"))
    with pytest.raises(TokenselError, match="does not match model"):
        build_selector(SelectorSpec("item-align", str(tiny_bundle), model=tiny_llama, device="cpu"))
