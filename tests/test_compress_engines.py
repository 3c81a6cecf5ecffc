"""compress engines: selection independent of batching, resumable/incremental runs, Ray equals local.

Fixtures are local to this file: a tiny random BERT with a WordPiece tokenizer trained on generated
item texts of very different lengths (so many forward widths occur), and a policy bundle with a
random (not identity) policy head, so chunk scores are varied and near-ties are possible.
"""

from __future__ import annotations

import random
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tokensel import api
from tokensel.config import TextConfig
from tokensel.select.batching import BatchConfig, dummy_rows, forward_batches
from tokensel.select.selector import Selector, SelectorSpec
from tokensel.errors import TokenselError
from tokensel.io.item_ids import IdSet
from tokensel.io.parquet_out import read_metadata
from tokensel.models.item_llm import ItemLLM
from tokensel.select.strategies import BUNDLE_STRATEGIES, Policy

K, CHUNK, PREFIX = 24, 4, 6
N_ITEMS = 120
WORDS = (
    "sensor probe digital analog meter gauge valve pump filter relay switch cable adapter battery motor "
    "steel brass copper nylon rubber plastic glass ceramic silicone thermal pressure flow level voltage "
    "current resistance frequency torque speed precision industrial laboratory scientific safety tool kit "
    "pack set pair replacement compatible heavy duty waterproof portable compact wireless inch mm lb oz"
).split()


def make_texts(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(N_ITEMS):
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
        n_desc = rng.choice([0, rng.randint(1, 10), rng.randint(10, 60), rng.randint(60, 200)])
        desc = " ".join(rng.choice(WORDS) for _ in range(n_desc)) if n_desc else None
        rows.append((f"{title} {i}", desc))
    return rows


def write_items(path, rows, ids=None):
    ids = ids or [f"it{i:04d}" for i in range(len(rows))]
    table = pa.table({
        "item_id": ids,
        "title": [r[0] for r in rows],
        "description": [r[1] for r in rows],
        "price": [float(i) for i in range(len(rows))],
    })
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    texts = [f"title: {t} description: {d}" for t, d in make_texts()]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("engines") / "bert"
    BertModel(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, model_dir):
    from tokensel.config import PolicyConfig
    from tokensel.policy.bundle import Bundle, BundleConfig
    from tokensel.policy.head import PolicyHead

    llm = ItemLLM.from_pretrained(model_dir)
    head = PolicyHead(llm.hidden_size)
    torch.manual_seed(1)
    with torch.no_grad():
        head.w_q.weight.normal_()
        head.w_k.weight.normal_()
    cfg = BundleConfig(identity=llm.identity(), policy=PolicyConfig(prefix=PREFIX, k=K))
    cfg.item.base_model = model_dir
    return Bundle(cfg, llm, None, head).save_pretrained(tmp_path_factory.mktemp("engines") / "bundle")


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("engines") / "items.parquet", make_texts())


def compress(items, out, bundle, **kw):
    kw = {"k": K, "chunk": CHUNK, "prefix": PREFIX, "strategy": "policy", "device": "cpu", "cache": False, **kw}
    if kw["strategy"] in BUNDLE_STRATEGIES:
        kw["policy"] = bundle
    else:
        kw["model"] = str(bundle) if kw.get("model") is None else kw["model"]
    return api.compress(items, out, **kw)


def rows_by_id(path) -> dict:
    d = pq.read_table(path).to_pydict()
    cols = [c for c in d if c != "item_id"]
    return {i: tuple(tuple(d[c][r]) if isinstance(d[c][r], list) else d[c][r] for c in cols) for r, i in enumerate(d["item_id"])}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, items, bundle_dir):
    out = tmp_path_factory.mktemp("engines") / "reference.parquet"
    s = compress(items, out, bundle_dir)
    assert s.scored > 40 and s.shorter_than_k > 5, "the fixture should have items on both sides of k"
    return out


# ---------------------------------------------------------------------------------------- pieces
def test_fast_tokenize_decode_and_inputs_match_the_reference_implementations(model_dir):
    llm = ItemLLM.from_pretrained(model_dir)
    texts = [f"title: {t} description: {d}" for t, d in make_texts()[:30]] + ["", "x"]
    toks = llm.tokenize(texts, 50)
    assert toks == llm.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=50)["input_ids"]
    assert llm.decode_batch([t[:7] for t in toks]) == [llm.decode(t[:7]) for t in toks]
    llm.set_template("item :")
    ids, mask, off = llm.build_inputs(toks[:5] + [[]])
    wide, wide_mask, _ = llm.build_inputs(toks[:5] + [[]], width=60)
    assert wide.shape[1] == off + 61 and torch.equal(wide[:, : ids.shape[1]], ids) and torch.equal(wide_mask[:, : ids.shape[1]], mask)
    assert (wide[:, ids.shape[1]:] == llm.pad_id).all() and not wide_mask[:, ids.shape[1]:].any()
    lead = llm.lead_ids + llm.template_ids
    assert off == len(lead)
    for r, t in enumerate(toks[:5] + [[]]):
        seq = lead + t + [llm.item_token_id]
        assert ids[r, : len(seq)].tolist() == seq and mask[r].sum() == len(seq)
        assert (ids[r, len(seq):] == llm.pad_id).all()


def test_id_set_finds_duplicates_within_and_across_batches_and_only_those():
    s = IdSet()
    assert s.add(["a", "b", "c"]).tolist() == []
    assert s.add(["d", "a", "e", "d"]).tolist() == [1, 3]
    for i in range(20):
        assert s.add([f"x{i}-{j}" for j in range(50)]).tolist() == []
    assert len(s.runs) <= 8, "runs are merged"
    assert s.add(["x3-7", "new"]).tolist() == [0]
    assert s.nbytes() <= 8 * 1010


def test_an_items_scores_are_bit_identical_alone_or_in_any_batch(model_dir, bundle_dir):
    """The reason selection does not depend on batching: the forward width and filler rows depend on the item alone."""
    from tokensel.policy.bundle import Bundle

    b = Bundle.from_pretrained(bundle_dir)
    llm = b.item_llm
    sel = Selector(SelectorSpec(), llm, Policy(b.policy), TextConfig(), {})
    toks = llm.tokenize([f"title: {t} description: {d}" for t, d in make_texts()], 256)
    lengths = np.array([len(t) for t in toks])
    long_ = np.flatnonzero(lengths > K)
    by_width: dict[int, list[int]] = {}
    for width, idx in forward_batches(lengths[long_], llm, BatchConfig(max_batch=1)):
        by_width.setdefault(width, []).append(int(long_[idx[0]]))
    checked = 0
    for width, members in by_width.items():
        if len(members) < 2:
            continue
        i = members[0]
        alone = sel.token_scores([toks[i]])[0]
        together = sel.token_scores([toks[j] for j in members[::-1]])[len(members) - 1]
        assert np.array_equal(alone, together)  # every token's score, bit for bit
        checked += 1
    assert checked >= 3
    # filler rows bring a small batch up to min_batch_tokens, and only a small one
    cfg = BatchConfig()
    assert len(dummy_rows(llm, 40, 1, cfg)) == -(-cfg.min_batch_tokens // (40 + 2)) - 1
    assert dummy_rows(llm, 40, 1000, cfg) == []


# ---------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("kw", [
    {"batch_rows": 7},
    {"batch_rows": 33, "batch_tokens": 300, "pipeline": True},
    {"batch_rows": 5000, "batch_tokens": 100_000},
])
def test_selection_is_identical_whatever_the_batch_size(tmp_path, items, bundle_dir, reference, kw):
    out = tmp_path / "o.parquet"
    compress(items, out, bundle_dir, **kw)
    assert pq.read_table(out).equals(pq.read_table(reference))


def test_selection_is_identical_whatever_the_row_order(tmp_path, items, bundle_dir, reference):
    t = pq.read_table(items)
    perm = np.random.default_rng(3).permutation(t.num_rows)
    shuffled = tmp_path / "shuffled.parquet"
    pq.write_table(t.take(pa.array(perm)), shuffled)
    out = tmp_path / "o.parquet"
    compress(shuffled, out, bundle_dir, batch_rows=16, passthrough=["price"])
    assert pq.read_table(out).column("item_id").to_pylist() == t.take(pa.array(perm)).column("item_id").to_pylist()
    got, want = rows_by_id(out), rows_by_id(reference)
    assert {i: v[:-1] for i, v in got.items()} == want  # all but the passthrough price


def test_output_rows_follow_the_contract(reference, model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    t = pq.read_table(reference).to_pydict()
    src = pq.read_table(reference.parent / "items.parquet") if (reference.parent / "items.parquet").exists() else None
    for r in range(len(t["item_id"])):
        pos, ids, n = t["positions"][r], t["token_ids"][r], t["n_tokens"][r]
        assert t["n_kept"][r] == len(pos) == len(ids) == min(K, n)
        assert pos == sorted(set(pos)) and (not pos or pos[-1] < n)
        if n > K:
            assert pos[:PREFIX] == list(range(PREFIX))
        assert t["text"][r] == tok.decode(ids, clean_up_tokenization_spaces=False)
    assert src is None or src.num_rows == len(t["item_id"])
    meta = read_metadata(reference)
    assert meta["k"] == K and meta["strategy"] == "policy" and meta["policy_hash"]


@pytest.mark.parametrize("strategy", ["first-k", "random", "rarity"])
def test_strategies_without_a_forward_pass_are_batch_independent_too(tmp_path, items, model_dir, strategy):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    compress(items, a, None, strategy=strategy, model=model_dir, batch_rows=9)
    compress(items, b, None, strategy=strategy, model=model_dir)
    assert pq.read_table(a).equals(pq.read_table(b))


def test_duplicate_ids_far_apart_are_still_reported_with_both_rows(tmp_path, model_dir):
    rows = make_texts()[:40]
    ids = [f"id{i}" for i in range(40)]
    ids[37] = "id3"
    path = write_items(tmp_path / "dup.parquet", rows, ids)
    with pytest.raises(TokenselError, match=r"row 37, column 'item_id': duplicate item id 'id3' \(first seen at row 3\)"):
        compress(path, tmp_path / "o.parquet", None, strategy="first-k", model=model_dir, batch_rows=8)
    assert not (tmp_path / "o.parquet").exists()


def test_ids_with_equal_hashes_are_not_duplicates(tmp_path, model_dir):
    assert hash(-1) == hash(-2)  # CPython: the 64-bit hashes collide, the ids differ
    table = pa.table({"item_id": [-1, -2, 5], "title": ["a b", "c d", "e f"], "description": [None, None, None]})
    pq.write_table(table, tmp_path / "ints.parquet")
    s = compress(tmp_path / "ints.parquet", tmp_path / "o.parquet", None, strategy="first-k", model=model_dir)
    assert s.items == 3


# ---------------------------------------------------------------------------------------- cache
class Stop(Exception):
    pass


def test_an_interrupted_run_resumes_and_gives_the_same_output(tmp_path, items, bundle_dir, reference):
    out, cache = tmp_path / "o.parquet", tmp_path / "sel.sqlite"
    windows = []

    def interrupt(n):
        windows.append(n)
        if len(windows) == 3:
            raise Stop()

    with pytest.raises(Stop):
        compress(items, out, bundle_dir, cache=cache, batch_rows=20, on_progress=interrupt, pipeline=True)
    assert not out.exists(), "no partial output"
    s = compress(items, out, bundle_dir, cache=cache, batch_rows=20)
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert s.reused > 0 and s.reused + s.computed == s.scored and s.computed < s.scored
    # a third run reuses everything
    s3 = compress(items, out, bundle_dir, cache=cache, batch_rows=64)
    assert (s3.reused, s3.computed) == (s3.scored, 0)
    assert pq.read_table(out).equals(pq.read_table(reference))


def test_a_changed_catalogue_recomputes_only_the_changed_items(tmp_path, items, bundle_dir):
    out, cache = tmp_path / "o.parquet", tmp_path / "sel.sqlite"
    first = compress(items, out, bundle_dir, cache=cache)
    assert (first.reused, first.computed) == (0, first.scored)
    t = pq.read_table(items)
    n_tok = pq.read_table(out).column("n_tokens").to_pylist()
    changed = [i for i, n in enumerate(n_tok) if n > K][:3]
    desc = t.column("description").to_pylist()
    for i in changed:
        desc[i] = desc[i] + " replacement sensor"
    edited = tmp_path / "edited.parquet"
    pq.write_table(t.set_column(2, "description", pa.array(desc)), edited)
    s = compress(edited, out, bundle_dir, cache=cache)
    assert (s.computed, s.reused) == (3, first.scored - 3)
    fresh = tmp_path / "fresh.parquet"
    compress(edited, fresh, bundle_dir)
    assert pq.read_table(out).equals(pq.read_table(fresh))
    with sqlite3.connect(cache) as db:  # pruned: this scorer keeps only what the last run used
        assert db.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == first.scored


def test_another_budget_prefix_or_chunk_runs_no_model_and_equals_a_fresh_run(tmp_path, items, bundle_dir):
    """The cache holds token scores, not selections: k, prefix and chunk are chosen after the model."""
    cache = tmp_path / "scores.sqlite"
    first = compress(items, tmp_path / "o.parquet", bundle_dir, cache=cache, k=K - 8)  # scores every item any later k needs
    assert first.forward_batches > 0
    for change in ({"k": K}, {"k": K + 4, "prefix": PREFIX // 2}, {"chunk": CHUNK * 2}, {"k": K, "chunk": 1}):
        out, fresh = tmp_path / "again.parquet", tmp_path / "fresh.parquet"
        s = compress(items, out, bundle_dir, cache=cache, **change)
        assert (s.forward_batches, s.computed) == (0, 0) and s.reused == s.scored > 0, change
        compress(items, fresh, bundle_dir, cache=False, **change)
        assert pq.read_table(out).equals(pq.read_table(fresh)), change


def test_the_cache_is_keyed_by_the_scorer(tmp_path, items, bundle_dir):
    out, cache = tmp_path / "o.parquet", tmp_path / "sel.sqlite"
    compress(items, out, bundle_dir, cache=cache)
    s = compress(items, out, bundle_dir, cache=cache, max_len=48)
    assert s.reused == 0 and s.computed == s.scored > 0
    s = compress(items, out, bundle_dir, cache=cache, strategy="item-align")
    assert s.reused == 0 and s.computed == s.scored > 0


def test_several_budgets_from_one_model_pass_equal_single_budget_runs(tmp_path, items, bundle_dir):
    ks = [K - 8, K, K + 16]
    summaries = compress(items, str(tmp_path / "multi.k{k}.parquet"), bundle_dir, k=ks, cache=False)
    assert [s.k for s in summaries] == ks
    longest = summaries[0]
    assert longest.computed == longest.scored and all(s.forward_batches == longest.forward_batches for s in summaries)
    for k in ks:
        single = tmp_path / f"single{k}.parquet"
        compress(items, single, bundle_dir, k=k, cache=False)
        assert pq.read_table(tmp_path / f"multi.k{k}.parquet").equals(pq.read_table(single)), k
        assert read_metadata(tmp_path / f"multi.k{k}.parquet") == read_metadata(single)


def test_several_budgets_need_a_k_placeholder_in_the_output_name(tmp_path, items, bundle_dir):
    with pytest.raises(TokenselError, match=r"must contain \{k\}"):
        compress(items, tmp_path / "o.parquet", bundle_dir, k=[K, K + 8])
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- ray
def test_ray_engine_output_equals_the_local_engine_row_for_row(tmp_path, items, bundle_dir, model_dir, reference):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tokensel[ray]'); the ray engine is not tested")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "ray.parquet"
        s = compress(items, out, bundle_dir, engine="ray", workers=2, batch_rows=16)
        assert s.engine == "ray" and s.items == N_ITEMS
        got, want = pq.read_table(out), pq.read_table(reference)
        assert got.equals(want)
        meta = read_metadata(out)
        assert meta.pop("engine") == "ray" and meta == read_metadata(reference)
        # a strategy whose scores depend on the item id, with a pass-through column and a limit
        a, b = tmp_path / "ray_random.parquet", tmp_path / "local_random.parquet"
        compress(items, a, None, strategy="random", model=model_dir, engine="ray", passthrough=["price"], limit=77, batch_rows=10)
        compress(items, b, None, strategy="random", model=model_dir, passthrough=["price"], limit=77)
        assert pq.read_table(a).equals(pq.read_table(b))
        # item-align: the actors rebuild the identity head from the strategy name alone
        a, b = tmp_path / "ray_align.parquet", tmp_path / "local_align.parquet"
        compress(items, a, bundle_dir, strategy="item-align", engine="ray", workers=2, batch_rows=16)
        compress(items, b, bundle_dir, strategy="item-align")
        assert pq.read_table(a).equals(pq.read_table(b))
        assert not pq.read_table(a).column("positions").equals(got.column("positions"))
    finally:
        ray.shutdown()


KILLER = """
import os, signal, sys
from tokensel import api
ticks = []
def tick(n):
    ticks.append(n)
    if len(ticks) == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)
api.compress(sys.argv[1], sys.argv[2], strategy="policy", policy=sys.argv[3], k={k}, chunk={chunk}, prefix={prefix}, device="cpu",
             batch_rows=1000, pipeline=False, on_progress=tick)
"""


@pytest.mark.parametrize("after_ticks", [2, 5])
def test_a_kill_9_loses_at_most_the_forward_batch_in_flight(tmp_path, items, bundle_dir, reference, after_ticks):
    """SIGKILL mid-window (one window holds the whole catalogue here, as any catalogue under
    --batch-rows does at the defaults): the rerun reuses every committed batch, writes the same file
    and leaves no temporary file of the killed run behind."""
    import subprocess
    import sys

    out = tmp_path / "o.parquet"
    script = KILLER.format(k=K, chunk=CHUNK, prefix=PREFIX)
    proc = subprocess.run([sys.executable, "-c", script, str(items), str(out), str(bundle_dir), str(after_ticks)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    s = compress(items, out, bundle_dir, cache=True, batch_rows=1000)
    assert s.reused > 0 and s.reused + s.computed == s.scored
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert pq.read_schema(out).metadata == pq.read_schema(reference).metadata
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "o.parquet" and not p.name.startswith("items.cache.sqlite"))
    assert left == [], left


def test_free_heap_pages_go_back_after_every_forward_batch(tmp_path, items, bundle_dir, model_dir, monkeypatch):
    """A long run's resident memory stays flat: the heap is trimmed once per forward batch (compress/trim.py),
    and never on a run that loads no model."""
    from tokensel.compress import local, trim

    calls = []
    monkeypatch.setattr(local, "release_free_memory", lambda: calls.append(1) or trim.release_free_memory())
    s = compress(items, tmp_path / "o.parquet", bundle_dir)
    assert s.forward_batches > 0 and len(calls) == s.forward_batches
    compress(items, tmp_path / "f.parquet", bundle_dir, strategy="first-k", model=str(model_dir))
    assert len(calls) == s.forward_batches
