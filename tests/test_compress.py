"""`tokensel.api.compress` with the tiny BERT: the output contract, streaming, strategies."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from tokensel import __version__, api
from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.items import read_items
from tokensel.io.parquet_out import read_metadata
from tokensel.models.item_llm import ItemLLM
from tokensel.select.batching import BatchConfig
from tokensel.select.keep import keep_to_positions, lengths_of
from tokensel.select.selector import Selector, SelectorSpec
from tokensel.select.strategies import FirstK, RandomChunks, Rarity

from conftest import ITEMS, check_contract

K, CHUNK, PREFIX = 32, 4, 8


def run(tmp_path, model, strategy, name=None, items=ITEMS, **kw):
    out = tmp_path / (name or f"{strategy}.parquet")
    kw = {"k": K, "chunk": CHUNK, "prefix": PREFIX, **kw}
    summary = api.compress(items, out, strategy=strategy, model=model, device="cpu", **kw)
    return out, summary


@pytest.fixture(scope="module")
def big_items(tmp_path_factory):
    """The fixture items repeated to 528 rows with unique ids: more than one record batch."""
    t = pq.read_table(ITEMS)
    parts = []
    for r in range(11):
        ids = pa.array([f"{i}-r{r}" for i in t.column("item_id").to_pylist()], type=t.schema.field("item_id").type)
        parts.append(t.set_column(0, "item_id", ids))
    big = pa.concat_tables(parts)
    path = tmp_path_factory.mktemp("big") / "items_big.parquet"
    pq.write_table(big, path, row_group_size=100)
    return path


def rows_of(table, col):
    return table.column(col).to_pylist()


@pytest.mark.parametrize("strategy", ["first-k", "random", "rarity"])
def test_output_contract(tmp_path, tiny_bert, strategy):
    out, summary = run(tmp_path, tiny_bert, strategy)
    table = check_contract(out, ITEMS, tiny_bert, K)
    assert table.num_rows == 48 == summary.items
    assert table.column_names == ["item_id", "text", "token_ids", "positions", "n_tokens", "n_kept", "title", "description"]
    assert ["".join(p) for p in zip(rows_of(table, "title"), rows_of(table, "description"))] == table.column("text").to_pylist()
    rows = table.to_pydict()
    assert summary.tokens_in == sum(rows["n_tokens"]) and summary.tokens_out == sum(rows["n_kept"])
    assert summary.tokens_out < summary.tokens_in
    # the prefix is kept whenever the item is longer than k
    for pos, n in zip(rows["positions"], rows["n_tokens"]):
        if n > K:
            assert pos[:PREFIX] == list(range(PREFIX))
    # `text` is the kept ids decoded with the model's tokenizer
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    for ids, text in zip(rows["token_ids"], rows["text"]):
        assert text == tok.decode(ids, clean_up_tokenization_spaces=False)
    meta = read_metadata(out)
    assert meta["version"] == __version__
    assert meta["strategy"] == strategy
    assert (meta["k"], meta["chunk"], meta["prefix"], meta["max_len"]) == (K, CHUNK, PREFIX, 256)
    assert meta["text_cols"] == ["title", "description"] and meta["template"] == ""
    assert meta["model"] == tiny_bert
    assert "policy_hash" in meta
    # the raw key-value metadata is JSON under `tokensel`
    raw = pq.read_schema(out).metadata[b"tokensel"]
    assert json.loads(raw) == meta
    assert not list(tmp_path.glob(".*.tmp-*")), "temporary file left behind"


def test_first_k_is_the_first_k_tokens(tmp_path, tiny_bert):
    out, _ = run(tmp_path, tiny_bert, "first-k")
    rows = pq.read_table(out).to_pydict()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    _, texts = read_items(ITEMS, TextConfig())
    for r, text in enumerate(texts):
        full = tok(text, add_special_tokens=False)["input_ids"]
        assert rows["positions"][r] == list(range(min(K, len(full))))
        assert rows["token_ids"][r] == full[:K]


def test_selection_strategies_differ_from_first_k(tmp_path, tiny_bert):
    firstk = pq.read_table(run(tmp_path, tiny_bert, "first-k")[0]).column("positions").to_pylist()
    for strategy in ("random", "rarity"):
        other = pq.read_table(run(tmp_path, tiny_bert, strategy)[0]).column("positions").to_pylist()
        assert sum(a != b for a, b in zip(firstk, other)) > 10, strategy


def test_small_budgets_default_to_half_the_budget_as_prefix(tmp_path, tiny_bert):
    """Without --prefix a budget under 32 keeps k // 2 leading tokens (16 would leave nothing to select at
    k = 16); each budget of one run gets its own, as if compressed alone."""
    outs = api.compress(ITEMS, tmp_path / "r{k}.parquet", k=[16, 24, 64], strategy="random", model=tiny_bert, device="cpu", cache=False)
    assert [read_metadata(o.out)["prefix"] for o in outs] == [8, 12, 16]
    alone = api.compress(ITEMS, tmp_path / "alone16.parquet", k=16, strategy="random", model=tiny_bert, device="cpu", cache=False)
    assert pq.read_table(alone.out).equals(pq.read_table(outs[0].out))
    given = api.compress(ITEMS, tmp_path / "given{k}.parquet", k=[16, 64], prefix=4, strategy="random", model=tiny_bert, device="cpu", cache=False)
    assert [read_metadata(o.out)["prefix"] for o in given] == [4, 4]


def test_random_is_reproducible_per_seed(tmp_path, tiny_bert):
    a = pq.read_table(run(tmp_path, tiny_bert, "random", "a.parquet", seed=1)[0])
    b = pq.read_table(run(tmp_path, tiny_bert, "random", "b.parquet", seed=1)[0])
    c = pq.read_table(run(tmp_path, tiny_bert, "random", "c.parquet", seed=2)[0])
    assert a.equals(b)
    assert a.column("positions").to_pylist() != c.column("positions").to_pylist()
    assert read_metadata(tmp_path / "a.parquet")["seed"] == 1


@pytest.mark.parametrize("strategy", ["random", "rarity", "first-k"])
def test_streaming_result_does_not_depend_on_batch_rows(tmp_path, tiny_bert, big_items, strategy):
    out1, s1 = run(tmp_path, tiny_bert, strategy, "small_batches.parquet", items=big_items, batch_rows=64)
    out2, s2 = run(tmp_path, tiny_bert, strategy, "one_batch.parquet", items=big_items, batch_rows=1000)
    assert s1.items == s2.items == 528
    t1, t2 = pq.read_table(out1), pq.read_table(out2)
    assert t1.num_rows == 528
    assert t1.equals(t2)
    assert pq.ParquetFile(out1).metadata.num_row_groups >= 2  # it really was written in several batches
    assert t1.column("item_id").to_pylist() == pq.read_table(big_items).column("item_id").to_pylist()


def test_streaming_file_keeps_the_contract(tmp_path, tiny_bert, big_items):
    out, _ = run(tmp_path, tiny_bert, "random", items=big_items, batch_rows=64)
    check_contract(out, big_items, tiny_bert, K)


def test_limit(tmp_path, tiny_bert, big_items):
    out, summary = run(tmp_path, tiny_bert, "first-k", items=big_items, batch_rows=64, limit=100)
    assert summary.items == 100
    check_contract(out, big_items, tiny_bert, K, limit=100)


def test_passthrough_columns_copied(tmp_path, tiny_bert):
    out, _ = run(tmp_path, tiny_bert, "first-k", passthrough=["brand", "categories"])
    table = pq.read_table(out)
    src = pq.read_table(ITEMS)
    assert table.column_names[-2:] == ["brand", "categories"]
    assert table.column("brand").to_pylist() == src.column("brand").to_pylist()
    assert table.column("categories").to_pylist() == src.column("categories").to_pylist()
    assert None in table.column("brand").to_pylist()  # the fixture's null brand survives as null


def test_text_columns_and_id_column_options(tmp_path, tiny_bert):
    out, _ = run(tmp_path, tiny_bert, "first-k", text_cols=["title"], max_len=20, k=12)
    check_contract(out, ITEMS, tiny_bert, 12, max_len=20, text_cols=("title",))
    meta = read_metadata(out)
    assert meta["text_cols"] == ["title"] and meta["max_len"] == 20


def test_template_is_not_part_of_the_output(tmp_path, tiny_bert):
    plain = pq.read_table(run(tmp_path, tiny_bert, "first-k", "plain.parquet")[0])
    templ = pq.read_table(run(tmp_path, tiny_bert, "first-k", "templ.parquet", template="Compress this item: ")[0])
    assert plain.column("token_ids").equals(templ.column("token_ids"))
    assert plain.column("positions").equals(templ.column("positions"))
    assert read_metadata(tmp_path / "templ.parquet")["template"] == "Compress this item: "


def test_default_output_lands_beside_the_input_not_in_the_current_folder(tmp_path, tiny_bert, monkeypatch):
    data, elsewhere = tmp_path / "data", tmp_path / "cwd"
    data.mkdir(), elsewhere.mkdir()
    items = data / "items.parquet"
    items.write_bytes(ITEMS.read_bytes())
    monkeypatch.chdir(elsewhere)
    summary = api.compress(items, None, k=K, strategy="first-k", model=tiny_bert, device="cpu")
    assert summary.out == str(data / f"items.k{K}-first-k.parquet") and (data / f"items.k{K}-first-k.parquet").exists()
    assert not list(elsewhere.iterdir())


def test_output_must_not_overwrite_input(tmp_path, tiny_bert):
    src = tmp_path / "items.parquet"
    src.write_bytes(ITEMS.read_bytes())
    with pytest.raises(TokenselError, match="overwrite"):
        api.compress(src, src, k=K, strategy="first-k", model=tiny_bert, device="cpu")
    assert pq.read_table(src).equals(pq.read_table(ITEMS))


@pytest.mark.parametrize("bad", [dict(k=0), dict(chunk=0), dict(prefix=-1)])
def test_bad_budget_arguments(tmp_path, tiny_bert, bad):
    with pytest.raises(TokenselError):
        api.compress(ITEMS, tmp_path / "o.parquet", strategy="first-k", model=tiny_bert, **bad)
    assert not (tmp_path / "o.parquet").exists()


def test_unknown_strategy(tmp_path, tiny_bert):
    with pytest.raises(TokenselError, match="unknown strategy"):
        api.compress(ITEMS, tmp_path / "o.parquet", strategy="best", model=tiny_bert)


# ------------------------------------------------------------------ strategies and compress_tokens


def test_rarity_prefers_rare_tokens():
    # token 1 appears everywhere, tokens 50..53 once: the chunk of rare tokens wins
    corpus = [[1] * 12, [1] * 12, [1, 1, 1, 1, 50, 51, 52, 53, 1, 1, 1, 1]]
    rar = Rarity.from_corpus(corpus)
    assert rar.n_docs == 3 and rar.doc_freq[1] == 3 and rar.doc_freq[50] == 1
    assert rar.weight(1) == pytest.approx(0.0)
    assert rar.weight(50) > rar.weight(1)
    scores = rar.chunk_scores([corpus[2]], ["x"], None, 0, 4)
    assert scores.shape == (1, 3)
    assert int(scores[0].argmax()) == 1


def test_rarity_chunk_score_is_a_mean_so_a_short_last_chunk_is_not_penalised():
    rar = Rarity.from_corpus([[1, 2], [1, 2], [3]])
    # chunks of 4 from prefix 0: [1,1,1,1], [3,3] (short): the mean of the short rare chunk is its weight
    s = rar.chunk_scores([[1, 1, 1, 1, 3, 3]], ["x"], None, 0, 4)
    assert s[0, 1].item() == pytest.approx(rar.weight(3))


def test_random_scores_depend_on_the_item_id_not_the_batch():
    rnd = RandomChunks(seed=7)
    toks = [[5] * 40, [6] * 80, [7] * 60]
    together = rnd.chunk_scores(toks, ["a", "b", "c"], None, 4, 4)
    alone = rnd.chunk_scores([toks[2]], ["c"], None, 4, 4)
    C = alone.shape[1]
    assert torch.equal(together[2, :C], alone[0])
    assert not torch.equal(rnd.chunk_scores([toks[2]], ["d"], None, 4, 4), alone)
    assert not torch.equal(RandomChunks(seed=8).chunk_scores([toks[2]], ["c"], None, 4, 4), alone)


def kept_positions(llm, strategy, toks, keys, batch: BatchConfig | None = None) -> list[list[int]]:
    """Kept positions of each item through the Selector's model path (what both engines run)."""
    sel = Selector(SelectorSpec(strategy.name), llm, strategy, TextConfig(), {}, batch)
    positions, offs = keep_to_positions(sel.keep(toks, keys, K, CHUNK, PREFIX), lengths_of(toks))
    flat = positions.tolist()
    return [flat[a:b] for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]


def test_selection_is_independent_of_batching(tiny_bert):
    llm = ItemLLM.from_pretrained(tiny_bert)
    _, texts = read_items(ITEMS, TextConfig())
    toks = llm.tokenize(texts, 256)
    keys = list(range(len(toks)))
    rnd = RandomChunks(3)
    whole = kept_positions(llm, rnd, toks, keys)
    small = kept_positions(llm, rnd, toks, keys, BatchConfig(max_batch=3, batch_tokens=600))
    assert whole == small
    reversed_ = kept_positions(llm, rnd, toks[::-1], keys[::-1])
    assert reversed_[::-1] == whole
    first = kept_positions(llm, FirstK(), toks, keys)
    assert first == [list(range(min(K, len(t)))) for t in toks]


def test_rarity_document_frequencies_come_from_the_whole_file(tmp_path, tiny_bert, big_items):
    out, _ = run(tmp_path, tiny_bert, "rarity", items=big_items, batch_rows=64)
    llm = ItemLLM.from_pretrained(tiny_bert)
    _, texts = read_items(big_items, TextConfig())
    toks = llm.tokenize(texts, 256)
    rar = Rarity.from_corpus(toks)
    assert rar.n_docs == 528
    expect = kept_positions(llm, rar, toks, list(range(len(toks))))
    assert pq.read_table(out).column("positions").to_pylist() == expect
    assert Counter(len(p) for p in expect)[K] > 400


@pytest.mark.parametrize("strategy", ["rarity", "random"])
def test_settings_under_which_a_selection_selects_nothing_are_refused(tmp_path, tiny_bert, strategy):
    """--prefix >= k would write first-k labelled with the strategy; k >= max_len keeps every text whole."""
    with pytest.raises(TokenselError, match=r"--prefix 32 >= --k 16"):
        api.compress(ITEMS, tmp_path / "a.parquet", k=16, prefix=32, strategy=strategy, model=tiny_bert, device="cpu")
    with pytest.raises(TokenselError, match=r"--k 300 >= --max-len 256"):
        api.compress(ITEMS, tmp_path / "b.parquet", k=300, strategy=strategy, model=tiny_bert, device="cpu")
    assert not list(tmp_path.iterdir())
    # first-k has nothing to select: the same settings are its whole-text baseline
    s = api.compress(ITEMS, tmp_path / "c.parquet", k=300, prefix=32, strategy="first-k", model=tiny_bert, device="cpu")
    assert s.tokens_out == s.tokens_in


def test_metadata_names_the_model_and_its_revision(tmp_path, tiny_bert):
    out, _ = run(tmp_path, tiny_bert, "first-k")
    meta = read_metadata(out)
    assert meta["model"] == tiny_bert and meta["model_name"] == tiny_bert
    assert meta["model_revision"].startswith("weights:")  # a local folder: a fingerprint of its weights
    again, _ = run(tmp_path, tiny_bert, "first-k", name="again.parquet")
    assert read_metadata(again)["model_revision"] == meta["model_revision"]
