"""Bundles: training writes a complete, self-describing folder that loads back to the same selection."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from tokensel import __version__, api
from tokensel.compress.local import compress_file
from tokensel.config import CompressConfig
from tokensel.select.selector import Selector, SelectorSpec
from tokensel.config import ItemModelConfig, PolicyConfig, Stage1Config, TextConfig
from tokensel.errors import TokenselError
from tokensel.io.parquet_out import read_metadata
from tokensel.policy.bundle import Bundle, bundle_hash
from tokensel.select.strategies import Policy
from tokensel.train.pipeline import train

from conftest import INTERACTIONS, ITEMS, check_contract

K, CHUNK, PREFIX = 32, 4, 8
QUIET = {"device": "cpu", "log": lambda row: None}


@pytest.fixture(scope="module")
def stage1_bundle(tmp_path_factory, tiny_bert):
    out = tmp_path_factory.mktemp("stage1") / "bundle"
    train(ITEMS, INTERACTIONS, out, stages=(1,), item_cfg=ItemModelConfig(base_model=tiny_bert),
          stage1=Stage1Config(epochs=2, negatives=8), **QUIET)
    return out


def compress_policy(tmp_path, bundle, name, **kw):
    out = tmp_path / name
    api.compress(ITEMS, out, k=K, chunk=CHUNK, prefix=PREFIX, strategy="policy", policy=bundle, device="cpu", **kw)
    return out


def test_config_records_how_the_bundle_was_made(tiny_bundle, tiny_bert):
    cfg = json.loads((tiny_bundle / "config.json").read_text())
    for key in ("identity", "text", "item", "user", "stage1", "policy", "data", "version", "logs"):
        assert key in cfg, key
    ident = cfg["identity"]
    assert ident["model_type"] == "bert" and ident["hidden_size"] == 32 and ident["num_hidden_layers"] == 2
    assert ident["name"] == tiny_bert
    assert {"class", "vocab_size", "vocab_sha"} <= set(ident["tokenizer"])
    assert isinstance(ident["item_token_id"], int)
    assert cfg["text"]["text_cols"] == ["title", "description"] and cfg["text"]["max_len"] == 256
    assert cfg["item"]["base_model"] == tiny_bert and cfg["item"]["item_token"] == "[ITEM]"
    assert cfg["stage1"]["epochs"] == 1 and cfg["stage1"]["negatives"] == 8
    assert cfg["policy"]["epochs"] == 1 and cfg["policy"]["batch_size"] == 16 and cfg["policy"]["negatives"] == 8
    assert cfg["data"]["n_items"] == 48 and cfg["data"]["n_users"] > 0
    assert len(cfg["data"]["items_sha"]) == 16 and len(cfg["data"]["interactions_sha"]) == 16
    # the data by file name, rows and content hash, never a path of the machine that trained it
    assert cfg["data"]["items"] == ITEMS.name and cfg["data"]["interactions"] == INTERACTIONS.name
    assert cfg["data"]["items_rows"] == 48 and cfg["data"]["interactions_rows"] == pq.ParquetFile(INTERACTIONS).metadata.num_rows
    assert str(ITEMS.parent) not in json.dumps(cfg)
    assert cfg["version"] == __version__
    assert "stage1" in cfg["logs"] and "stage2" in cfg["logs"]
    for f in ("item.safetensors", "user_model.safetensors", "policy.safetensors"):
        assert (tiny_bundle / f).exists(), f


def test_round_trip_gives_identical_weights(tiny_bundle_trained):
    path, trained = tiny_bundle_trained
    loaded = Bundle.from_pretrained(path)
    assert torch.equal(loaded.policy.w_q.weight, trained.policy.w_q.weight.float())
    assert torch.equal(loaded.policy.w_k.weight, trained.policy.w_k.weight.float())
    for (k1, v1), (k2, v2) in zip(sorted(loaded.user_model.state_dict().items()), sorted(trained.user_model.state_dict().items())):
        assert k1 == k2 and torch.equal(v1, v2), k1
    a = loaded.item_llm.model.get_input_embeddings().weight[loaded.item_llm.item_token_id]
    b = trained.item_llm.model.get_input_embeddings().weight[trained.item_llm.item_token_id]
    assert torch.equal(a, b)
    assert loaded.config.to_json() == json.loads((path / "config.json").read_text())


def test_resaving_a_loaded_bundle_reproduces_it(tiny_bundle, tmp_path):
    again = Bundle.from_pretrained(tiny_bundle).save_pretrained(tmp_path / "again")
    assert bundle_hash(again) == bundle_hash(tiny_bundle)


def test_round_trip_gives_identical_compress_output(tiny_bundle_trained, tmp_path):
    path, trained = tiny_bundle_trained
    from_disk = compress_policy(tmp_path, path, "disk.parquet")
    in_memory = tmp_path / "memory.parquet"
    sel = Selector(SelectorSpec(), trained.item_llm, Policy(trained.policy), TextConfig(), {"model": "x"})
    compress_file(ITEMS, {K: in_memory}, sel, CompressConfig(ks=(K,), chunk=CHUNK, prefix=PREFIX))
    a, b = pq.read_table(from_disk), pq.read_table(in_memory)
    for col in ("item_id", "text", "token_ids", "positions", "n_tokens", "n_kept"):
        assert a.column(col).equals(b.column(col)), col


def test_policy_compress_is_deterministic_and_keeps_the_contract(tiny_bundle, tiny_bert, tmp_path):
    a = compress_policy(tmp_path, tiny_bundle, "a.parquet")
    b = compress_policy(tmp_path, tiny_bundle, "b.parquet", batch_rows=7)
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.equals(tb)
    check_contract(a, ITEMS, tiny_bert, K)
    meta = read_metadata(a)
    assert meta["strategy"] == "policy"
    assert meta["policy_hash"] == bundle_hash(tiny_bundle)
    assert meta["policy"] == str(tiny_bundle)
    api.compress(ITEMS, tmp_path / "first.parquet", k=K, chunk=CHUNK, prefix=PREFIX, strategy="first-k", model=tiny_bert, device="cpu")
    first = pq.read_table(tmp_path / "first.parquet").column("positions").to_pylist()
    assert any(p != f for p, f in zip(ta.column("positions").to_pylist(), first)), "policy selected exactly first-k everywhere"


def test_bundle_for_another_model_is_refused(tiny_bundle, tiny_llama, tiny_qwen):
    with pytest.raises(TokenselError) as err:
        Bundle.from_pretrained(tiny_bundle, model=tiny_llama)
    msg = str(err.value)
    assert str(tiny_bundle) in msg and tiny_llama in msg
    assert "model_type" in msg and "'bert'" in msg and "'llama'" in msg
    assert "tokenizer vocab_size" in msg and "tokenizer vocab_sha" in msg
    with pytest.raises(TokenselError) as err:
        Bundle.from_pretrained(tiny_bundle, model=tiny_qwen)
    assert "hidden_size: bundle 32, model 48" in str(err.value)


def test_folder_without_config_is_not_a_bundle(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenselError, match="not a tokensel bundle"):
        Bundle.from_pretrained(tmp_path / "empty")
    with pytest.raises(TokenselError, match="not a tokensel bundle"):
        Bundle.from_pretrained(tmp_path / "missing")


def test_unreadable_config_is_a_clear_error(tiny_bundle, tmp_path):
    broken = shutil.copytree(tiny_bundle, tmp_path / "b")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(TokenselError, match="unreadable bundle config"):
        Bundle.from_pretrained(broken)


def test_bundle_without_policy(stage1_bundle, tiny_bundle, tmp_path):
    assert not (stage1_bundle / "policy.safetensors").exists()
    with pytest.raises(TokenselError, match="no policy yet"):
        Bundle.from_pretrained(stage1_bundle)
    partial = shutil.copytree(tiny_bundle, tmp_path / "partial")
    (partial / "policy.safetensors").unlink()
    with pytest.raises(TokenselError, match="stage 2"):
        compress_policy(tmp_path, partial, "o.parquet")
    assert not (tmp_path / "o.parquet").exists()
    # without the policy requirement it loads (as stage 2 alone does)
    b = Bundle.from_pretrained(stage1_bundle, need_policy=False)
    assert b.policy is None and b.user_model is not None


def compress_with(tmp_path, bundle, name, strategy, **kw):
    out = tmp_path / name
    summary = api.compress(ITEMS, out, k=K, chunk=CHUNK, prefix=PREFIX, strategy=strategy, policy=bundle, device="cpu", **kw)
    return pq.read_table(out), summary


def test_item_align_needs_only_stage1_and_keeps_the_contract(stage1_bundle, tiny_bert, tmp_path):
    table, _ = compress_with(tmp_path, stage1_bundle, "a.parquet", "item-align")
    check_contract(tmp_path / "a.parquet", ITEMS, tiny_bert, K)
    meta = read_metadata(tmp_path / "a.parquet")
    assert meta["strategy"] == "item-align" and meta["policy_hash"] == bundle_hash(stage1_bundle)
    again, _ = compress_with(tmp_path, stage1_bundle, "b.parquet", "item-align", batch_rows=5, cache=False)
    assert table.equals(again)


def test_item_align_is_the_policy_rule_with_identity_projections(tiny_bundle, tmp_path):
    """Same selection as the `policy` strategy over a copy of the bundle whose head is W_Q = W_K = I,
    and not the trained head's selection."""
    ident = shutil.copytree(tiny_bundle, tmp_path / "ident")
    d = load_file(tiny_bundle / "policy.safetensors")["w_q"].shape[0]
    save_file({"w_q": torch.eye(d), "w_k": torch.eye(d)}, ident / "policy.safetensors")
    aligned, _ = compress_with(tmp_path, tiny_bundle, "align.parquet", "item-align")
    identity_policy, _ = compress_with(tmp_path, ident, "ident.parquet", "policy")
    trained, _ = compress_with(tmp_path, tiny_bundle, "trained.parquet", "policy")
    assert aligned.column("positions").equals(identity_policy.column("positions"))
    assert not aligned.column("positions").equals(trained.column("positions")), "stage 2 changed no selection"


def test_a_head_that_keeps_the_first_tokens_round_trips_and_compresses_as_first_k(tiny_bundle, tiny_bert, tmp_path):
    """Stage 2's choice "first-k" travels in policy.safetensors; the policy strategy then writes exactly
    first-k's tokens (no forward, no cache) and the summary says why. Bundles saved before the choice
    existed load with it off."""
    b = Bundle.from_pretrained(tiny_bundle)
    assert not b.policy.keeps_first_k
    b.policy.keeps_first_k = True
    first = b.save_pretrained(tmp_path / "first")
    assert Bundle.from_pretrained(first).policy.keeps_first_k
    assert bundle_hash(first) != bundle_hash(tiny_bundle)
    old = shutil.copytree(tiny_bundle, tmp_path / "old")
    save_file({k: v for k, v in load_file(tiny_bundle / "policy.safetensors").items() if k != "keeps_first_k"}, old / "policy.safetensors")
    assert not Bundle.from_pretrained(old).policy.keeps_first_k
    kept, summary = compress_with(tmp_path, first, "policy.parquet", "policy")
    api.compress(ITEMS, tmp_path / "fk.parquet", k=K, chunk=CHUNK, prefix=PREFIX, strategy="first-k", model=tiny_bert, device="cpu")
    plain = pq.read_table(tmp_path / "fk.parquet")
    for col in ("item_id", "text", "token_ids", "positions", "n_kept"):
        assert kept.column(col).equals(plain.column(col)), col
    assert any("kept the first tokens" in n for n in summary.notes)
    meta = read_metadata(tmp_path / "policy.parquet")
    assert meta["strategy"] == "first-k" and meta["policy_hash"] == bundle_hash(first)
    assert not list(tmp_path.glob("*.sqlite")), "first-k runs no model, so it caches nothing"


def test_item_align_and_policy_do_not_share_cache_entries(tiny_bundle, tmp_path):
    cache = tmp_path / "shared.sqlite"
    compress_with(tmp_path, tiny_bundle, "p.parquet", "policy", cache=cache)
    cached, summary = compress_with(tmp_path, tiny_bundle, "a.parquet", "item-align", cache=cache)
    fresh, _ = compress_with(tmp_path, tiny_bundle, "b.parquet", "item-align", cache=False)
    assert summary.reused == 0 and summary.computed > 0
    assert cached.column("positions").equals(fresh.column("positions"))


def test_stage2_alone_continues_a_stage1_bundle(stage1_bundle, tmp_path):
    out = shutil.copytree(stage1_bundle, tmp_path / "b")
    before = load_file(out / "user_model.safetensors")
    item_before = load_file(out / "item.safetensors")
    stage1_cfg = json.loads((out / "config.json").read_text())
    b = train(ITEMS, INTERACTIONS, out, stages=(2,), policy=PolicyConfig(epochs=1, negatives=8, batch_size=16), **QUIET)
    assert (out / "policy.safetensors").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["policy"]["epochs"] == 1
    assert cfg["stage1"] == stage1_cfg["stage1"] and cfg["identity"] == stage1_cfg["identity"]
    assert cfg["logs"]["stage1"] == stage1_cfg["logs"]["stage1"], "stage 1 logs lost when stage 2 ran alone"
    assert "stage2" in cfg["logs"]
    # the stage-1 recommender is reused unchanged
    after = load_file(out / "user_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(item_before["item_embedding"], load_file(out / "item.safetensors")["item_embedding"])
    loaded = Bundle.from_pretrained(out)
    assert torch.equal(loaded.policy.w_q.weight, b.policy.w_q.weight)
    # the default stage 2 is e2e: it ends by choosing, and the saved head does what it chose
    assert cfg["policy"]["objective"] == "e2e" and cfg["policy"]["warmup_epochs"] == 0
    chosen = cfg["logs"]["stage2"]["choice"]["chosen"]
    assert loaded.policy.keeps_first_k == (chosen == "first-k")
    assert torch.equal(loaded.policy.w_q.weight, torch.eye(32)) == (chosen == "item-align")


def test_the_default_objective_resolves_by_model_and_then_sets_its_epochs(tiny_bert, tiny_llama, stage1_bundle):
    from tokensel.train.pipeline import resolve_objective, stage1_model

    auto = PolicyConfig()
    assert auto.objective == "auto" and auto.epochs is None
    e2e = resolve_objective(auto, tiny_bert)
    assert (e2e.objective, e2e.epochs, e2e.warmup_epochs, e2e.mask_layers) == ("e2e", 12, 10, "exact")
    pair = resolve_objective(auto, tiny_llama)
    assert (pair.objective, pair.epochs, pair.warmup_epochs) == ("bounded", 2, 0)
    assert resolve_objective(PolicyConfig(objective="paper"), tiny_bert).objective == "paper"  # named: kept
    assert stage1_model(stage1_bundle) == tiny_bert


def test_stage2_alone_needs_a_stage1_bundle(tmp_path):
    with pytest.raises(TokenselError, match="stage-1 bundle"):
        train(ITEMS, INTERACTIONS, tmp_path / "nothing", stages=(2,), **QUIET)


# ------------------------------------------------------------------ training behaviour


def assert_policy_learned(cfg: dict, dim: int, path) -> None:
    w = load_file(path / "policy.safetensors")
    eye = torch.eye(dim)
    assert w["w_q"].shape == (dim, dim)
    assert (w["w_q"] - eye).abs().max() > 1e-5, "W_Q never moved from its identity init"
    assert (w["w_k"] - eye).abs().max() > 1e-5, "W_K never moved from its identity init"
    epochs = cfg["logs"]["stage2"]["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(len(epochs)))
    for e in epochs[1:]:
        assert isinstance(e["objective"], float) and isinstance(e["reward_rate"], float)
        assert 0.0 <= e["reward_rate"] <= 1.0
        assert "policy" in e and "first_k" in e
        ag = e["agreement"]
        assert ag["pairs"] > 0 and 0.0 <= ag["rate"] <= 1.0 and 0.0 <= ag["p"] <= 1.0
        assert abs(ag["rate"] - e["reward_rate"]) < 0.1  # the same agreement, counted per pair instead of per batch
    assert isinstance(cfg["logs"]["stage2"]["warnings"], list)


def test_stage2_moves_the_policy_and_logs_each_epoch(tiny_bundle_trained):
    path, bundle = tiny_bundle_trained
    cfg = json.loads((path / "config.json").read_text())
    assert_policy_learned(cfg, 32, path)
    assert len(cfg["logs"]["stage2"]["epochs"]) == 2  # epoch 0 (start) + 1 trained epoch
    assert cfg["policy"]["objective"] == "bounded"
    # the bounded objective is a mean of log-sigmoids: never positive
    assert cfg["logs"]["stage2"]["epochs"][1]["objective"] <= 0
    assert any("reward_rate" in row for row in bundle.train_log)


@pytest.mark.parametrize("policy", [
    PolicyConfig(epochs=2, negatives=8, batch_size=16, objective="paper"),
    PolicyConfig(epochs=1, negatives=8, batch_size=16, samples=3, objective="bounded"),
], ids=["paper-objective", "three-samples"])
def test_stage2_variants(stage1_bundle, tmp_path, policy):
    out = shutil.copytree(stage1_bundle, tmp_path / "b")
    train(ITEMS, INTERACTIONS, out, stages=(2,), policy=policy, **QUIET)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["policy"]["objective"] == policy.objective and cfg["policy"]["samples"] == policy.samples
    assert cfg["policy"]["reward"] == policy.reward
    assert len(cfg["logs"]["stage2"]["epochs"]) == policy.epochs + 1
    assert_policy_learned(cfg, 32, out)
    assert Bundle.from_pretrained(out).policy is not None


def test_stage2_training_is_reproducible(stage1_bundle, tmp_path):
    pol = PolicyConfig(epochs=1, negatives=8, batch_size=16, seed=3)
    a = shutil.copytree(stage1_bundle, tmp_path / "a")
    b = shutil.copytree(stage1_bundle, tmp_path / "b")
    train(ITEMS, INTERACTIONS, a, stages=(2,), policy=pol, **QUIET)
    train(ITEMS, INTERACTIONS, b, stages=(2,), policy=pol, **QUIET)
    wa, wb = load_file(a / "policy.safetensors"), load_file(b / "policy.safetensors")
    assert torch.equal(wa["w_q"], wb["w_q"]) and torch.equal(wa["w_k"], wb["w_k"])


def test_stage1_training_is_reproducible(tiny_bert, tmp_path):
    """The same seed gives the same bundle whatever the process's global RNG state (g is built seeded)."""
    weights = []
    for name in ("a", "b"):
        torch.rand(17)  # move the global generator between the runs, as other code in a process would
        train(ITEMS, INTERACTIONS, tmp_path / name, stages=(1,), item_cfg=ItemModelConfig(base_model=tiny_bert),
              stage1=Stage1Config(epochs=1, negatives=8, seed=5), **QUIET)
        weights.append(load_file(tmp_path / name / "user_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_stage1_with_lora_writes_an_adapter_that_loads_back(tiny_bert, tmp_path):
    out = tmp_path / "lora"
    trained = train(ITEMS, INTERACTIONS, out, stages=(1,), item_cfg=ItemModelConfig(base_model=tiny_bert, tuning="lora", lora_layers=1),
                    stage1=Stage1Config(epochs=1, negatives=8, item_lr=1e-2), **QUIET)
    assert (out / "item_adapter" / "adapter_config.json").exists()
    assert any((out / "item_adapter").glob("adapter_model.*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["item"]["tuning"] == "lora"
    loaded = Bundle.from_pretrained(out, need_policy=False)
    from tokensel.io.items import read_items

    _, texts = read_items(ITEMS, TextConfig())
    toks = loaded.item_llm.tokenize(texts[:6], 256)
    trained.item_llm.model.eval()
    with torch.no_grad():
        a = loaded.item_llm.encode(toks).item
        b = trained.item_llm.encode(toks).item
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # and stage 2 can continue it
    train(ITEMS, INTERACTIONS, out, stages=(2,), policy=PolicyConfig(epochs=1, negatives=8, batch_size=16), **QUIET)
    again = Bundle.from_pretrained(out)
    with torch.no_grad():
        c = again.item_llm.encode(toks).item
    assert torch.allclose(a, c, atol=1e-5), "stage 2 changed the stage-1 item LLM"
    # stage 2 alone keeps the adapter folder an adapter (no full model copied into it)
    assert sorted(p.name for p in (out / "item_adapter").iterdir() if p.suffix != ".md") == ["adapter_config.json", "adapter_model.safetensors"]
    # a loaded (merged) LoRA bundle saved elsewhere still carries its adapter and loads to the same model
    copy = again.save_pretrained(tmp_path / "copy")
    with torch.no_grad():
        d = Bundle.from_pretrained(copy).item_llm.encode(toks).item
    assert torch.allclose(a, d, atol=1e-5)


def test_stage1_with_top_trains_the_last_block_into_f_and_loads_back(tiny_bert, tmp_path, monkeypatch):
    """tuning top: only f's last block changes, f carries it after stage 1, and the bundle restores it."""
    import tokensel.train.stage1 as stage1
    from tokensel.io.items import read_items
    from tokensel.models.item_llm import ItemLLM

    scores = iter([0.1, 0.2, 0.9])  # the last epoch validates best, so the trained block is the one kept
    monkeypatch.setattr(stage1, "validate", lambda *a, **k: {"N@10": next(scores), "R@10": 0.0})

    out = tmp_path / "top"
    trained = train(ITEMS, INTERACTIONS, out, stages=(1,), item_cfg=ItemModelConfig(base_model=tiny_bert, tuning="top"),
                    stage1=Stage1Config(epochs=2, negatives=8, item_lr=1e-2), **QUIET)
    assert json.loads((out / "config.json").read_text())["item"]["tuning"] == "top"
    base = ItemLLM.from_pretrained(tiny_bert)
    mine = dict(trained.item_llm.model.named_parameters())
    n_layers = base.model.config.num_hidden_layers
    changed = {n for n, p in base.model.named_parameters() if not torch.equal(p, mine[n].to(p.dtype))}
    assert changed and all(n.startswith(f"encoder.layer.{n_layers - 1}.") for n in changed), changed
    _, texts = read_items(ITEMS, TextConfig())
    toks = base.tokenize(texts[:6], 256)
    loaded = Bundle.from_pretrained(out, need_policy=False)
    with torch.no_grad():
        a = trained.item_llm.encode(toks).item
        b = loaded.item_llm.encode(toks).item
        c = base.encode(toks).item
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert not torch.allclose(a, c, atol=1e-3)  # the readout did train
    # stage 2 continues from it without touching f
    train(ITEMS, INTERACTIONS, out, stages=(2,), policy=PolicyConfig(epochs=1, negatives=8, batch_size=16), **QUIET)
    with torch.no_grad():
        d = Bundle.from_pretrained(out).item_llm.encode(toks).item
    assert torch.allclose(a, d, atol=1e-5), "stage 2 changed the stage-1 item LLM"


@pytest.mark.parametrize("tuning", ["lora", "top"])
def test_stage1_keeps_the_item_llm_of_the_best_epoch(tiny_bert, tmp_path, monkeypatch, tuning):
    """When epoch 0 validates best, both g and the tuned f are rolled back to epoch 0."""
    import tokensel.train.stage1 as stage1
    from tokensel.io.items import read_items
    from tokensel.models.item_llm import ItemLLM

    scores = iter([0.9, 0.1, 0.2])  # epoch 0 best

    def fake_validate(*args, **kwargs):
        return {"N@10": next(scores), "R@10": 0.0}

    monkeypatch.setattr(stage1, "validate", fake_validate)
    out = tmp_path / tuning
    trained = train(ITEMS, INTERACTIONS, out, stages=(1,), item_cfg=ItemModelConfig(base_model=tiny_bert, tuning=tuning, lora_layers=1),
                    stage1=Stage1Config(epochs=2, negatives=8, item_lr=1e-2), **QUIET)
    _, texts = read_items(ITEMS, TextConfig())
    base = ItemLLM.from_pretrained(tiny_bert)
    toks = base.tokenize(texts[:5], 256)
    with torch.no_grad():
        a = trained.item_llm.encode(toks).item
        b = base.encode(toks).item
        c = Bundle.from_pretrained(out, need_policy=False).item_llm.encode(toks).item
    # LoRA B starts at zero and the top readout starts as f's block, so the epoch-0 item LLM is the base model
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert torch.allclose(c, b, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["logs"]["stage1"]["best_valid_N@10"] == 0.9


def test_bundles_from_before_labels_keep_them(tiny_bundle):
    """`labels` defaults to off now; a bundle whose config predates the field was trained with labels."""
    from tokensel.policy.bundle import BundleConfig

    d = json.loads((tiny_bundle / "config.json").read_text())
    assert BundleConfig.from_json(d).text.labels is d["text"]["labels"]
    del d["text"]["labels"]
    assert BundleConfig.from_json(d).text.labels is True
