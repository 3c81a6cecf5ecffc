"""Input formats (CSV, JSON Lines), per-field output columns, RecBole / HLLM exports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tokensel import api
from tokensel.io.fields import build_text_spans, field_columns, field_value
from tokensel.io.writers import read_hllm_items, read_recbole_item

from conftest import ITEMS
from test_bad_input import assert_failed_cleanly, cli, compress_cli, ok, out, rows  # noqa: F401 (out: a fixture)

COLS = ["title", "description", "brand", "categories"]


def write_csv(path, records, cols=None):
    cols = cols or list(records[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in records:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def compress(items, out, model, strategy="random", **kw):
    api.compress(items, out, strategy=strategy, model=model, device="cpu", k=24, chunk=4, prefix=4, text_cols=COLS, **kw)
    return pq.read_table(out)


# ------------------------------------------------------------------ formats in


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
def test_csv_and_jsonl_give_the_parquet_output(tmp_path, model, request):
    model = request.getfixturevalue(model)
    records = pq.read_table(ITEMS).to_pylist()
    want = compress(ITEMS, tmp_path / "p.parquet", model).to_pydict()
    for src in (write_csv(tmp_path / "items.csv", records), write_jsonl(tmp_path / "items.jsonl", records)):
        got = compress(src, tmp_path / f"{src.suffix[1:]}.parquet", model, batch_rows=7).to_pydict()
        assert got == want, src


def csv_and_jsonl(tmp_path, records, name="bad"):
    return [write_csv(tmp_path / f"{name}.csv", records), write_jsonl(tmp_path / f"{name}.jsonl", records)]


def test_missing_column_in_csv_and_jsonl(tmp_path, out, tiny_bert):
    for path in csv_and_jsonl(tmp_path, rows(3)):
        assert_failed_cleanly(compress_cli(path, out, tiny_bert, "--text-cols", "title,summary"), out, str(path), "'summary'")


def test_duplicate_and_empty_ids_in_csv_and_jsonl(tmp_path, out, tiny_bert):
    data = rows(30)
    data[27]["item_id"] = "id2"
    for path in csv_and_jsonl(tmp_path, data):
        r = compress_cli(path, out, tiny_bert, "--batch-rows", "8")
        assert_failed_cleanly(r, out, str(path), "'id2'", "row 27", "row 2", "duplicate")
    data = rows(5)
    data[3]["item_id"] = ""
    for path in csv_and_jsonl(tmp_path, data, "empty"):
        assert_failed_cleanly(compress_cli(path, out, tiny_bert), out, str(path), "row 3", "'item_id'", "empty")


def test_non_string_text_in_jsonl(tmp_path, out, tiny_bert):
    data = rows(6)
    data[4]["description"] = 12
    path = write_jsonl(tmp_path / "ints.jsonl", data)
    assert_failed_cleanly(compress_cli(path, out, tiny_bert), out, str(path), "row 4", "'description'", "string")


def test_damaged_csv_and_jsonl(tmp_path, out, tiny_bert):
    path = write_csv(tmp_path / "short.csv", rows(20))
    lines = path.read_text().splitlines()
    lines[12] = lines[12].split(",")[0]  # one cell where the header has three
    path.write_text("\n".join(lines) + "\n")
    assert_failed_cleanly(compress_cli(path, out, tiny_bert), out, str(path))
    path = write_jsonl(tmp_path / "cut.jsonl", rows(20))
    lines = path.read_text().splitlines()
    lines[9] = lines[9][:25]
    path.write_text("\n".join(lines) + "\n")
    assert_failed_cleanly(compress_cli(path, out, tiny_bert), out, str(path), "row 9", "line 10", "JSON")


# ------------------------------------------------------------------ per-field output

ALPHABETS = ["abcdef", "ghijkl", "mnopqr", "stuvwx"]  # disjoint letters: a kept piece shows its field


def words(alphabet):
    return st.lists(st.text(alphabet=alphabet, min_size=1, max_size=9), max_size=12).map(" ".join)


@st.composite
def items(draw):
    n = draw(st.integers(2, 4))
    values = [draw(st.one_of(st.none(), st.just(""), words(ALPHABETS[i]))) for i in range(n)]
    return [f"f{i}" for i in range(n)], values, draw(st.booleans()), draw(st.integers(1, 60)), draw(st.integers(0, 2**31))


@pytest.fixture(scope="module")
def tokenizers(tiny_bert, tiny_llama, tiny_qwen):
    return [AutoTokenizer.from_pretrained(m) for m in (tiny_bert, tiny_llama, tiny_qwen)]


@settings(max_examples=150, deadline=None)
@given(item=items())
def test_field_values_rejoin_to_text(tokenizers, item):
    cols, values, labels, k, seed = item
    text, spans = build_text_spans(dict(zip(cols, values)), cols, labels)
    for tok in tokenizers:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rng = np.random.default_rng(seed)
        keep = np.zeros(len(ids), dtype=bool)
        keep[rng.permutation(len(ids))[:k] if seed % 2 else slice(0, k)] = True  # a random subset or the first k
        decode = lambda seqs: tok.backend_tokenizer.decode_batch(seqs, skip_special_tokens=False)  # noqa: E731
        out_text = decode([[t for t, m in zip(ids, keep) if m]])[0]
        offsets = lambda texts: tok(texts, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]  # noqa: E731
        per_field = field_columns(offsets, decode, [text], [spans], [ids], keep, [out_text])
        got = [v[0] for v in per_field]
        assert "".join(got) == out_text
        for i, (col, v) in enumerate(zip(cols, got)):
            letters = set(field_value(v.replace("[UNK]", ""), col).replace(" ", "").lower()) - set(":#")  # a lone WordPiece piece decodes as `##a`
            allowed = set(ALPHABETS[i]) | (set(col) if labels else set())  # a label can be kept in part
            assert letters <= allowed, (type(tok).__name__, col, v, got)
            if not values[i]:
                assert field_value(v, col) == ""


def test_per_field_columns_only_with_two_text_columns(tmp_path, tiny_bert):
    one = api.compress(ITEMS, tmp_path / "one.parquet", strategy="first-k", model=tiny_bert, device="cpu", k=16, text_cols=["title"])
    assert pq.read_schema(one.out).names == ["item_id", "text", "token_ids", "positions", "n_tokens", "n_kept"]


def test_text_column_named_like_an_output_column(tmp_path, out, tiny_bert):
    path = write_jsonl(tmp_path / "t.jsonl", [{"item_id": "a", "text": "x y", "title": "z"}])
    assert_failed_cleanly(compress_cli(path, out, tiny_bert, "--text-cols", "title,text"), out, str(path), "'text'", "collide")


# ------------------------------------------------------------------ formats out


@pytest.fixture
def compressed(tmp_path, tiny_llama):
    return compress(ITEMS, tmp_path / "c.parquet", tiny_llama, strategy="first-k").to_pydict()


def test_recbole_export_round_trips(tmp_path, tiny_llama, compressed):
    out = tmp_path / "o" / "items.item"

    ok(cli("compress", ITEMS, "-o", out, "--model", tiny_llama, "--strategy", "first-k", "--k", "24", "--chunk", "4", "--prefix", "4",
           "--text-cols", ",".join(COLS), "--format", "recbole", "--no-cache"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["items.item"]  # no hidden Parquet left
    assert out.read_text().split("\n")[0] == "item_id:token\ttext:token_seq\t" + "\t".join(f"{c}:token_seq" for c in COLS)
    got = read_recbole_item(out)
    assert got["item_id"] == compressed["item_id"]
    assert [" ".join(t) for t in got["text"]] == [" ".join(t.split()) for t in compressed["text"]]
    for c in COLS:
        assert got[c] == [field_value(v, c).split() for v in compressed[c]]


def test_hllm_export_round_trips(tmp_path, tiny_llama, compressed):

    out = tmp_path / "items.csv"
    ok(cli("compress", ITEMS, "-o", out, "--model", tiny_llama, "--strategy", "first-k", "--k", "24", "--chunk", "4", "--prefix", "4",
           "--text-cols", ",".join(COLS), "--format", "hllm", "--no-cache"))
    got = read_hllm_items(out)
    assert list(got) == ["item_id", "title", "tag", "description"]
    assert got["item_id"] == compressed["item_id"]
    clean = lambda v, c: " ".join(field_value(v, c).split())  # noqa: E731
    assert got["title"] == [clean(v, "title") for v in compressed["title"]]
    assert got["description"] == [clean(v, "description") for v in compressed["description"]]
    assert got["tag"] == [" ".join(x for x in (clean(b, "brand"), clean(c, "categories")) if x) for b, c in zip(compressed["brand"], compressed["categories"])]
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)  # how HLLM loads its item file
    assert frame.to_dict("list") == got
