"""tokensel.Selector (issue 20): in memory, on strings and tables, equal to what `tokensel compress` writes."""

from __future__ import annotations

import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tokensel
from tokensel import api
from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.items import read_items

from conftest import ITEMS

COLS = ["text", "token_ids", "positions", "n_tokens", "n_kept"]
REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "amazon-scientific" / "items.parquet"


def selector(strategy, bundle, model):
    if strategy in ("policy", "item-align"):
        return tokensel.Selector.from_pretrained(bundle, strategy=strategy, device="cpu")
    return tokensel.Selector.from_pretrained(strategy=strategy, model=model, device="cpu")


def compressed(tmp_path, items, strategy, bundle, model, k, **kw):
    out = tmp_path / f"{strategy}-{k}.parquet"
    extra = {"policy": bundle} if strategy in ("policy", "item-align") else {"model": model}
    api.compress(items, out, k=k, chunk=4, prefix=4, strategy=strategy, device="cpu", cache=False, **extra, **kw)
    return pq.read_table(out)


@pytest.mark.parametrize("strategy", ["first-k", "item-align", "policy"])
def test_a_table_gives_what_compress_writes_row_for_row_at_any_batch_size(tmp_path, tiny_bundle, tiny_bert, strategy):
    sel = selector(strategy, tiny_bundle, tiny_bert)
    table = pq.read_table(ITEMS)
    for k in (16, 32):
        want = compressed(tmp_path, ITEMS, strategy, tiny_bundle, tiny_bert, k)
        for batch_rows in (7, 4096):
            got = sel(table, k=k, chunk=4, prefix=4, batch_rows=batch_rows)
            assert got.column_names == table.column_names + COLS
            others = [c for c in table.column_names if c not in ("title", "description")]
            assert got.select(others).equals(table.select(others))
            # the text columns hold their compressed values, as in the file (per-field columns)
            for c in ["item_id", *COLS, "title", "description"]:
                assert got.column(c).to_pylist() == want.column(c).to_pylist(), (k, batch_rows, c)


def test_strings_polars_pandas_and_pickle(tmp_path, tiny_bundle):
    pl = pytest.importorskip("polars")
    pd = pytest.importorskip("pandas")
    sel = tokensel.Selector.from_pretrained(tiny_bundle, device="cpu")
    table = pq.read_table(ITEMS)
    want = sel(table, k=24, chunk=4, prefix=4)
    _, texts = read_items(ITEMS, TextConfig())
    results = sel(texts, k=24, chunk=4, prefix=4)
    assert [r.token_ids for r in results] == want.column("token_ids").to_pylist()
    assert [r.text for r in results] == want.column("text").to_pylist()
    assert [(r.n_in, r.n_out) for r in results] == list(zip(want.column("n_tokens").to_pylist(), want.column("n_kept").to_pylist()))
    frame = pl.from_arrow(table)
    out = sel(frame, k=24, chunk=4, prefix=4)
    assert isinstance(out, pl.DataFrame) and out["positions"].to_list() == want.column("positions").to_pylist()
    df = table.to_pandas()
    df.index = [f"r{i}" for i in range(len(df))]
    out = sel(df, k=24, chunk=4, prefix=4)
    assert isinstance(out, pd.DataFrame) and list(out.index) == list(df.index)
    assert [list(p) for p in out["positions"]] == want.column("positions").to_pylist()
    again = pickle.loads(pickle.dumps(sel))
    assert len(pickle.dumps(sel)) < 10_000, "pickled by its spec, not its tensors"
    assert again(table, k=24, chunk=4, prefix=4).equals(want)


def test_hugging_face_dataset_map(tiny_bundle):
    datasets = pytest.importorskip("datasets")
    sel = tokensel.Selector.from_pretrained(tiny_bundle, device="cpu")
    table = pq.read_table(ITEMS)
    want = sel(table, k=24, chunk=4, prefix=4)
    ds = datasets.Dataset(table)
    mapped = ds.map(sel.map_fn(k=24, chunk=4, prefix=4), batched=True, batch_size=10)
    for c in COLS:
        assert mapped[c] == want.column(c).to_pylist(), c


def test_rarity_needs_a_fit_and_then_equals_compress(tmp_path, tiny_bert):
    sel = tokensel.Selector.from_pretrained(strategy="rarity", model=tiny_bert, device="cpu")
    table = pq.read_table(ITEMS)
    with pytest.raises(TokenselError, match=r"\.fit"):
        sel(table, k=16, chunk=4, prefix=4)
    got = sel.fit(table)(table, k=16, chunk=4, prefix=4)
    want = compressed(tmp_path, ITEMS, "rarity", None, tiny_bert, 16)
    assert got.column("positions").equals(want.column("positions"))
    assert pickle.loads(pickle.dumps(sel))(table, k=16, chunk=4, prefix=4).equals(got)


@pytest.mark.parametrize("bad, says", [
    (dict(data=["fine", 3]), "text 1 is int"),
    (dict(data="one string"), "list of strings"),
    (dict(data=pa.table({"item_id": ["a"], "title": ["x"]}), text_cols=["title", "nope"]), "no column 'nope'"),
    (dict(data=pa.table({"item_id": ["a"], "title": [3]}), text_cols=["title"]), "text column 'title' has type int64"),
    (dict(data=["fine"], k=0), "--k >= 1"),
    (dict(data=["fine"], prefix=40, k=16), "--prefix 40 >= --k 16"),
])
def test_bad_input_raises_one_clear_error_and_prints_nothing(tiny_bundle, capsys, bad, says):
    sel = tokensel.Selector.from_pretrained(tiny_bundle, strategy="policy", device="cpu")
    kw = {"k": 16, "chunk": 4, "prefix": 4, **bad}
    data = kw.pop("data")
    with pytest.raises(TokenselError, match=says):
        sel(data, **kw)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_import_tokensel_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, tokensel; assert 'torch' not in sys.modules, 'torch imported'; tokensel.Selector; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.integration
@pytest.mark.skipif(not REAL.exists(), reason="amazon-scientific is not in ../shared/data (real-data check skipped)")
@pytest.mark.parametrize("strategy", ["first-k", "item-align", "policy"])
def test_500_real_items_equal_compress_with_the_default_model(tmp_path, strategy):
    items = tmp_path / "real500.parquet"
    pq.write_table(pq.read_table(REAL).slice(0, 500), items)
    sel = tokensel.Selector.from_pretrained(strategy=strategy, device="cpu")
    table = pq.read_table(items)
    api.compress(items, str(tmp_path / "out.k{k}.parquet"), k=[32, 64], strategy=strategy, device="cpu", cache=False)
    for k, batch_rows in ((32, 100), (64, 4096)):  # two budgets, two batch sizes (the fixture test crosses them all)
        want = pq.read_table(tmp_path / f"out.k{k}.parquet")
        got = sel(table, k=k, batch_rows=batch_rows)
        for c in ["item_id", *COLS, "title", "description"]:
            assert got.column(c).to_pylist() == want.column(c).to_pylist(), (k, batch_rows, c)
