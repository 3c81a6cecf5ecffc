"""Bad data gets a clear error naming the file, row and column, or a reported skip; never a crash or a
silently wrong output (SPEC.md "Data contract"). Through the CLI (exit code 2, no traceback, no output
file, no temporary file left) and through the API."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokensel import api
from tokensel.cli import app
from tokensel.config import ItemModelConfig, PolicyConfig, Stage1Config, TextConfig
from tokensel.errors import TokenselError
from tokensel.evaluate.inputs import read_item_ids
from tokensel.io.interactions import read_histories
from tokensel.io.items import read_items
from tokensel.train.pipeline import train

from conftest import INTERACTIONS, ITEMS, write_items

runner = CliRunner()


def flat(s: str) -> str:
    """Whitespace removed: rich wraps long messages (and paths) at the terminal width."""
    return "".join(str(s).split())


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def compress_cli(items, out, model, *extra):
    return cli("compress", items, "-o", out, "--model", model, "--strategy", "first-k", "--k", "16", "--chunk", "4", "--prefix", "4", *extra)


def assert_failed_cleanly(result, out, *names):
    """Exit code 2, a message naming each of `names`, no traceback, and nothing written next to `out`."""
    assert result.exit_code == 2, f"exit {result.exit_code}, exception {result.exception!r}\n{result.output}"
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert "error" in result.output.lower()
    for name in names:
        assert flat(name) in flat(result.output), f"{name!r} not named in:\n{result.output}"
    assert not out.exists(), "an output file was written"
    assert not list(out.parent.glob(".*.tmp-*")), "a temporary file was left behind"


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}, exception {result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "outdir"
    d.mkdir()
    return d / "out.parquet"


def rows(n=3, **over):
    base = [
        {"item_id": f"id{i}", "title": f"Brass insert number {i} for printed parts", "description": "Heat set threaded insert, " * 8}
        for i in range(n)
    ]
    for i, patch in over.items():
        base[int(i[1:])].update(patch)
    return base


# ------------------------------------------------------------------ columns


def test_missing_text_column(tmp_path, out, tiny_bert):
    r = compress_cli(ITEMS, out, tiny_bert, "--text-cols", "title,summary")
    assert_failed_cleanly(r, out, str(ITEMS), "'summary'")


def test_misnamed_id_column(tmp_path, out, tiny_bert):
    r = compress_cli(ITEMS, out, tiny_bert, "--id-col", "itemid")
    assert_failed_cleanly(r, out, str(ITEMS), "'itemid'")


def test_missing_default_id_column(tmp_path, out, tiny_bert):
    path = write_items(tmp_path / "noid.parquet", [{"sku": "a", "title": "x", "description": "y"}])
    r = compress_cli(path, out, tiny_bert)
    assert_failed_cleanly(r, out, str(path), "'item_id'")


def test_missing_passthrough_column(tmp_path, out, tiny_bert):
    r = compress_cli(ITEMS, out, tiny_bert, "--passthrough", "brand,colour")
    assert_failed_cleanly(r, out, str(ITEMS), "'colour'")


def test_missing_columns_via_api(tmp_path, tiny_bert):
    for kw, col in ((dict(text_cols=["title", "summary"]), "summary"), (dict(id_col="itemid"), "itemid")):
        with pytest.raises(TokenselError) as err:
            api.compress(ITEMS, tmp_path / "o.parquet", strategy="first-k", model=tiny_bert, device="cpu", **kw)
        assert str(ITEMS) in str(err.value) and repr(col) in str(err.value)
    assert not (tmp_path / "o.parquet").exists()


def test_non_string_text_column(tmp_path, out, tiny_bert):
    path = write_items(tmp_path / "ints.parquet", [{"item_id": "a", "title": "x", "description": 12}, {"item_id": "b", "title": "y", "description": 7}])
    r = compress_cli(path, out, tiny_bert)
    assert_failed_cleanly(r, out, str(path), "'description'", "int64")


def test_duplicate_item_ids(tmp_path, out, tiny_bert):
    data = rows(6)
    data[4]["item_id"] = "id1"
    path = write_items(tmp_path / "dups.parquet", data)
    r = compress_cli(path, out, tiny_bert)
    assert_failed_cleanly(r, out, str(path), "'id1'", "row 4", "row 1", "duplicate")


def test_duplicate_ids_across_record_batches(tmp_path, out, tiny_bert):
    data = rows(30)
    data[27]["item_id"] = "id2"
    path = write_items(tmp_path / "dups.parquet", data)
    r = compress_cli(path, out, tiny_bert, "--batch-rows", "8")
    assert_failed_cleanly(r, out, "'id2'", "row 27", "row 2")


def test_ids_with_equal_hashes_are_not_duplicates(tmp_path, out, tiny_bert):
    """hash(-1) == hash(-2) in CPython: a hash match is only a candidate, confirmed against the file.
    Every reader shares the check: compress, the training reader, the Ray engine and evaluate's catalogue."""
    data = rows(4)
    for r, i in zip(data, [-2, -1, 7, 8]):
        r["item_id"] = i
    path = write_items(tmp_path / "hashes.parquet", data)
    ok(compress_cli(path, out, tiny_bert, "--batch-rows", "1"))
    assert pq.read_table(out).column("item_id").to_pylist() == [-2, -1, 7, 8]
    assert read_items(path, TextConfig())[0] == [-2, -1, 7, 8]
    assert read_item_ids(path, "item_id") == [-2, -1, 7, 8]
    data[3]["item_id"] = -1
    path = write_items(tmp_path / "hashes2.parquet", data)
    with pytest.raises(TokenselError, match="row 3, column 'item_id': duplicate item id -1 \\(first seen at row 1\\)"):
        read_item_ids(path, "item_id")


def test_empty_item_id(tmp_path, out, tiny_bert):
    data = rows(3)
    data[2]["item_id"] = None
    path = write_items(tmp_path / "noid.parquet", data)
    r = compress_cli(path, out, tiny_bert)
    assert_failed_cleanly(r, out, str(path), "row 2", "'item_id'")


# ------------------------------------------------------------------ unusual but valid texts


def test_null_and_empty_texts_are_counted_and_written_empty(tmp_path, out, tiny_bert):
    data = rows(5)
    data[1].update(title=None, description=None)
    data[3].update(title="", description="   ")
    path = write_items(tmp_path / "empty.parquet", data)
    r = compress_cli(path, out, tiny_bert)
    ok(r)
    assert "empty texts" in r.output
    table = pq.read_table(out).to_pydict()
    assert table["item_id"] == [f"id{i}" for i in range(5)]
    for i in (1, 3):
        assert table["text"][i] == "" and table["token_ids"][i] == [] and table["positions"][i] == []
        assert table["n_tokens"][i] == 0 and table["n_kept"][i] == 0
    assert all(table["n_kept"][i] == 16 for i in (0, 2, 4))
    summary = api.compress(path, tmp_path / "api.parquet", k=16, chunk=4, prefix=4, strategy="first-k", model=tiny_bert, device="cpu")
    assert summary.empty == 2 and summary.items == 5


def test_all_texts_empty(tmp_path, out, tiny_bert):
    path = write_items(tmp_path / "allempty.parquet", [{"item_id": "a", "title": None, "description": None}, {"item_id": "b", "title": "", "description": ""}])
    for strategy in ("first-k", "rarity", "random"):
        summary = api.compress(path, out, k=16, prefix=4, strategy=strategy, model=tiny_bert, device="cpu")
        assert summary.empty == 2
        assert pq.read_table(out).column("n_tokens").to_pylist() == [0, 0]


def test_all_null_text_column_of_null_type(tmp_path, out, tiny_bert):
    schema = pa.schema([("item_id", pa.string()), ("title", pa.string()), ("description", pa.null())])
    path = write_items(tmp_path / "nulltype.parquet", [{"item_id": "a", "title": "Solder wick 2 mm", "description": None}], schema=schema)
    ok(compress_cli(path, out, tiny_bert))
    assert pq.read_table(out).column("n_tokens").to_pylist()[0] > 0


def test_texts_shorter_than_k_are_kept_whole(tmp_path, out, tiny_bert):
    data = rows(4)
    data[0].update(title="Tiny", description=None)
    data[2].update(title="Short title", description="two words")
    path = write_items(tmp_path / "short.parquet", data)
    r = compress_cli(path, out, tiny_bert, "--strategy", "random", "--k", "40")
    ok(r)
    table = pq.read_table(out).to_pydict()
    for i in (0, 2):
        n = table["n_tokens"][i]
        assert 0 < n <= 40
        assert table["positions"][i] == list(range(n)) and table["n_kept"][i] == n
    assert table["n_kept"][1] == 40 and table["n_tokens"][1] > 40
    assert "kept whole" in r.output


def test_integer_item_ids_keep_their_type(tmp_path, out, tiny_bert):
    data = [{"item_id": 100 + i, "title": r["title"], "description": r["description"]} for i, r in enumerate(rows(3))]
    path = write_items(tmp_path / "intids.parquet", data)
    ok(compress_cli(path, out, tiny_bert))
    table = pq.read_table(out)
    assert table.schema.field("item_id").type == pa.int64()
    assert table.column("item_id").to_pylist() == [100, 101, 102]


# ------------------------------------------------------------------ unreadable files


def test_missing_file(tmp_path, out, tiny_bert):
    r = compress_cli(tmp_path / "nope.parquet", out, tiny_bert)
    assert_failed_cleanly(r, out, str(tmp_path / "nope.parquet"))


def test_messages_are_printed_verbatim_not_as_markup(tmp_path, out, tiny_bert):
    """Rich would read `[v2]` in a path, or `[notes]` in a column name, as a style tag and drop it."""
    missing = tmp_path / "items[v2].parquet"
    assert_failed_cleanly(compress_cli(missing, out, tiny_bert), out, str(missing))
    path = write_items(tmp_path / "items.parquet", rows())
    r = compress_cli(path, out, tiny_bert, "--text-cols", "title,[notes]")
    assert_failed_cleanly(r, out, "[notes]")


def test_random_bytes_file(tmp_path, out, tiny_bert):
    path = tmp_path / "noise.parquet"
    path.write_bytes(random.Random(0).randbytes(4096))
    r = compress_cli(path, out, tiny_bert)
    assert_failed_cleanly(r, out, str(path))


def test_empty_file(tmp_path, out, tiny_bert):
    path = tmp_path / "zero.parquet"
    path.write_bytes(b"")
    assert_failed_cleanly(compress_cli(path, out, tiny_bert), out, str(path))


def test_truncated_parquet(tmp_path, out, tiny_bert):
    raw = ITEMS.read_bytes()
    path = tmp_path / "half.parquet"
    path.write_bytes(raw[: len(raw) // 2])
    r = compress_cli(path, out, tiny_bert)
    assert_failed_cleanly(r, out, str(path))


def test_damaged_data_pages(tmp_path, out, tiny_bert):
    """Footer intact, column data overwritten: the failure comes while streaming, after the writer opened."""
    big = pa.concat_tables([pq.read_table(ITEMS)] * 4)
    big = big.set_column(0, "item_id", pa.array([f"x{i}" for i in range(big.num_rows)]))
    good = tmp_path / "good.parquet"
    pq.write_table(big, good, row_group_size=48, compression="zstd")
    raw = bytearray(good.read_bytes())
    meta = pq.ParquetFile(good).metadata
    rg = meta.row_group(2).column(2)  # the description column of the third row group
    start = rg.data_page_offset
    raw[start + 8 : start + rg.total_compressed_size - 8] = random.Random(1).randbytes(rg.total_compressed_size - 16)
    path = tmp_path / "damaged.parquet"
    path.write_bytes(bytes(raw))
    r = compress_cli(path, out, tiny_bert, "--batch-rows", "48")
    assert_failed_cleanly(r, out, str(path))


def test_unreadable_file_via_api(tmp_path, tiny_bert):
    path = tmp_path / "noise.parquet"
    path.write_bytes(b"PAR1" + bytes(100))
    with pytest.raises(TokenselError, match="noise.parquet"):
        api.compress(path, tmp_path / "o.parquet", strategy="first-k", model=tiny_bert)


# ------------------------------------------------------------------ bundles and models


def test_bundle_for_another_model(tmp_path, out, tiny_bundle, tiny_llama):
    r = cli("compress", ITEMS, "-o", out, "--policy", tiny_bundle, "--strategy", "policy", "--model", tiny_llama, "--k", "16")
    assert_failed_cleanly(r, out, str(tiny_bundle), "model_type", "'bert'", "'llama'", "tokenizer")


def test_not_a_bundle(tmp_path, out):
    (tmp_path / "folder").mkdir()
    r = cli("compress", ITEMS, "-o", out, "--policy", tmp_path / "folder")
    assert_failed_cleanly(r, out, str(tmp_path / "folder"), "config.json")


def test_missing_model_folder(tmp_path, out):
    r = compress_cli(ITEMS, out, str(tmp_path / "no-model"))
    assert_failed_cleanly(r, out, str(tmp_path / "no-model"))


def test_topk_logits_without_lm_head(tmp_path, out, tiny_bert):
    r = compress_cli(ITEMS, out, tiny_bert, "--strategy", "topk-logits")
    assert_failed_cleanly(r, out, "head")


def test_bad_numbers(tmp_path, out, tiny_bert):
    assert_failed_cleanly(compress_cli(ITEMS, out, tiny_bert, "--k", "0"), out, "k")
    assert_failed_cleanly(compress_cli(ITEMS, out, tiny_bert, "--chunk", "0"), out, "chunk")
    assert_failed_cleanly(compress_cli(ITEMS, out, tiny_bert, "--strategy", "magic"), out, "magic")


# ------------------------------------------------------------------ interactions and training


def test_unknown_items_in_interactions_are_counted_and_skipped(tmp_path):
    ids, _ = read_items(ITEMS, TextConfig())
    index = {i: n for n, i in enumerate(ids)}
    inter = pq.read_table(INTERACTIONS).to_pylist()
    extra = [{"user_id": inter[0]["user_id"], "item_id": "ghost-1", "timestamp": 999}, {"user_id": "u-new", "item_id": "ghost-2", "timestamp": 0}]
    path = tmp_path / "inter.parquet"
    pq.write_table(pa.Table.from_pylist(inter + extra, schema=pq.read_schema(INTERACTIONS)), path)
    clean = read_histories(INTERACTIONS, index)
    hist = read_histories(path, index)
    assert clean.skipped_unknown == 0
    assert hist.skipped_unknown == 2
    assert hist.sequences == clean.sequences and hist.users == clean.users
    assert all(0 <= i < len(ids) for s in hist.sequences for i in s)


def test_interaction_order_follows_the_order_column(tmp_path):
    items = write_items(tmp_path / "items.parquet", rows(4))
    index = {f"id{i}": i for i in range(4)}
    data = [{"user_id": "u", "item_id": f"id{i}", "timestamp": t} for i, t in ((0, 30), (1, 10), (2, 20), (3, 0))]
    path = tmp_path / "inter.parquet"
    pq.write_table(pa.Table.from_pylist(data), path)
    hist = read_histories(path, index)
    assert hist.sequences == [[3, 1, 2, 0]]
    assert items.exists()


def test_training_reports_skipped_unknown_items(tmp_path, tiny_bert):
    inter = pq.read_table(INTERACTIONS).to_pylist()
    inter.append({"user_id": inter[0]["user_id"], "item_id": "ghost", "timestamp": 12345})
    path = tmp_path / "inter.parquet"
    pq.write_table(pa.Table.from_pylist(inter, schema=pq.read_schema(INTERACTIONS)), path)
    logs = []
    train(ITEMS, path, tmp_path / "b", stages=(1,), item_cfg=ItemModelConfig(base_model=tiny_bert), stage1=Stage1Config(epochs=1, negatives=8), device="cpu", log=logs.append)
    assert logs[0]["skipped interactions with unknown items"] == 1


def test_missing_interaction_column(tmp_path, tiny_bert):
    data = pq.read_table(INTERACTIONS).rename_columns(["user_id", "item_id", "time"])
    path = tmp_path / "inter.parquet"
    pq.write_table(data, path)
    bundle = tmp_path / "bundle"
    r = cli("train", ITEMS, path, "-o", bundle, "--model", tiny_bert, "--epochs1", "1", "--epochs2", "1", "--negatives", "8")
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output
    assert flat(str(path)) in flat(r.output) and "'timestamp'" in r.output
    assert not bundle.exists()
    # with the right option it trains
    r = cli("train", ITEMS, path, "-o", bundle, "--model", tiny_bert, "--order-col", "time", "--epochs1", "1", "--epochs2", "1", "--negatives", "8")
    ok(r)
    assert (bundle / "policy.safetensors").exists()


def test_null_in_interactions(tmp_path):
    data = pq.read_table(INTERACTIONS).to_pylist()
    data[5]["item_id"] = None
    path = tmp_path / "inter.parquet"
    pq.write_table(pa.Table.from_pylist(data, schema=pq.read_schema(INTERACTIONS)), path)
    with pytest.raises(TokenselError) as err:
        read_histories(path, {"x": 0})
    assert "row 5" in str(err.value) and "'item_id'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("args, needle", [
    (("--samples", "1"), "samples"),
    (("--objective", "greedy"), "greedy"),
    (("--tuning", "half"), "half"),
    (("--stage", "3"), "stage"),
    (("--objective", "e2e", "--mask-layers", "top", "--grad-chunks", "2"), "grad chunks"),  # needs --mask-layers exact
    (("--objective", "e2e", "--mask-layers", "exact", "--surrogate-mix", "1"), "mix"),
    (("--objective", "e2e", "--warmup-epochs", "2"), "warm-up"),  # more than --epochs2 1
    (("--check-seeds", "0"), "check seeds must be at least 1"),
])
def test_bad_training_settings(tmp_path, tiny_bert, args, needle):
    bundle = tmp_path / "bundle"
    r = cli("train", ITEMS, INTERACTIONS, "-o", bundle, "--model", tiny_bert, "--epochs1", "1", "--epochs2", "1", "--negatives", "8", *args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), f"{r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output and needle in r.output
    assert not bundle.exists(), "settings must be checked before anything is trained or written"


def test_stage2_with_bad_settings_via_api(tmp_path, tiny_bert):
    with pytest.raises(TokenselError, match="samples"):
        train(ITEMS, INTERACTIONS, tmp_path / "b", policy=PolicyConfig(samples=1), item_cfg=ItemModelConfig(base_model=tiny_bert), device="cpu", log=lambda r: None)
    assert not (tmp_path / "b").exists()
