"""Faults a new user's runs hit (issue 16): each ends in exit code 2 and one message naming the file or
option, with no traceback and nothing left behind (no temporary file, no cache file the run created,
no partial output). Faults of the machine (a full disk, a read-only folder) are injected as the
OSError the filesystem would raise, at the writer's own calls."""

from __future__ import annotations

import errno
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokensel.cli import app

from conftest import INTERACTIONS, ITEMS, write_items

runner = CliRunner()


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def flat(s: str) -> str:
    return "".join(str(s).split())


def leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def policy_cli(items, out, bundle, *extra):
    return cli("compress", items, "-o", out, "--policy", bundle, "--strategy", "policy", "--k", "16", "--chunk", "4", "--prefix", "4", *extra)


@pytest.fixture
def work(tmp_path):
    items = tmp_path / "items.parquet"
    shutil.copy(ITEMS, items)
    return tmp_path, items


def Full(real, after: int = 0, err: int = errno.ENOSPC):
    """`real`, raising the filesystem's OSError from its (after + 1)-th call on: a disk that fills up mid-run."""
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) > after:
            raise OSError(err, {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}[err])
        return real(*a, **kw)

    return failing


@pytest.mark.parametrize("after", [0, 2])
def test_disk_full_while_writing_rows(work, tiny_bundle, monkeypatch, after):
    folder, items = work
    monkeypatch.setattr(pq.ParquetWriter, "write_table", Full(pq.ParquetWriter.write_table, after))
    r = policy_cli(items, folder / "out.parquet", tiny_bundle, "--batch-rows", "8")
    assert r.exit_code == 2, r.output
    assert "out.parquet" in flat(r.output) and "diskisfull" in flat(r.output)
    assert leftovers(folder, keep={"items.parquet", "items.cache.sqlite"}) == []


def test_disk_full_while_the_footer_is_written(work, tiny_bert, monkeypatch):
    """close() itself fails: before the fix the writer's __exit__ raised before abort() and kept the temp file."""
    folder, items = work
    monkeypatch.setattr(pq.ParquetWriter, "close", Full(pq.ParquetWriter.close, 0))
    r = cli("compress", items, "-o", folder / "out.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16", "--no-cache")
    assert r.exit_code == 2, r.output
    assert "out.parquet" in flat(r.output) and "diskisfull" in flat(r.output)
    assert leftovers(folder, keep={"items.parquet"}) == []


def test_read_only_output_folder_is_named_and_not_blamed_on_the_cache(work, tiny_bundle, monkeypatch):
    folder, items = work
    monkeypatch.setattr(pq, "ParquetWriter", Full(pq.ParquetWriter, 0, errno.EROFS))
    for extra in ((), ("--no-cache",)):
        r = policy_cli(items, folder / "out.parquet", tiny_bundle, *extra)
        assert r.exit_code == 2, r.output
        assert "read-only" in r.output and "out.parquet" in flat(r.output) and "cache" not in r.output
        assert leftovers(folder, keep={"items.parquet"}) == []


@pytest.mark.parametrize("bad_row", [3, 9])
def test_a_failure_after_the_cache_opened_leaves_only_paid_for_work(work, tiny_bundle, bad_row):
    """A null id in the first window: the run fails before scoring anything, and the cache file it
    created goes too. In the second window: the first window's scores are kept for the rerun (that
    work was paid for), and no -wal / -shm / temporary file remains."""
    folder, items = work
    rows = [{"item_id": f"i{i}", "title": "solder wick " * 10, "description": "flux " * 40} for i in range(12)]
    rows[bad_row]["item_id"] = None
    write_items(items, rows)
    r = policy_cli(items, folder / "out.parquet", tiny_bundle, "--batch-rows", "8")
    assert r.exit_code == 2 and f"row{bad_row}" in flat(r.output), r.output
    assert leftovers(folder, keep={"items.parquet"}) == ([] if bad_row < 8 else ["items.cache.sqlite"])
    rows[bad_row]["item_id"] = f"i{bad_row}"
    write_items(items, rows)
    r = policy_cli(items, folder / "out.parquet", tiny_bundle, "--batch-rows", "8")
    assert r.exit_code == 0 and f"reused from the cache {8 if bad_row >= 8 else 0}" in r.output, r.output


def test_a_cache_that_holds_earlier_work_is_kept_when_a_run_fails(work, tiny_bundle):
    folder, items = work
    out = folder / "out.parquet"
    assert policy_cli(items, out, tiny_bundle).exit_code == 0
    before = (folder / "items.cache.sqlite").stat().st_size
    r = policy_cli(items, out, tiny_bundle, "--id-col", "nope")
    assert r.exit_code == 2
    assert (folder / "items.cache.sqlite").stat().st_size == before and out.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
@pytest.mark.parametrize("file", ["policy.safetensors", "item.safetensors", "user_model.safetensors"])
def test_a_damaged_bundle_file_is_named(work, tiny_bundle, damage, file):
    folder, items = work
    bundle = folder / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    target = bundle / file
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:40])
    elif damage == "garbage":
        target.write_bytes(b"not a safetensors file at all" * 3)
    else:
        target.unlink()
    r = policy_cli(items, folder / "out.parquet", bundle)
    if damage == "missing" and file == "user_model.safetensors":  # compress does not need g
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 2, r.output
    if damage == "missing" and file == "policy.safetensors":
        assert "nopolicyyet" in flat(r.output)  # a stage-1 bundle: says what to run
    else:
        assert file in flat(r.output)
    assert leftovers(folder, keep={"items.parquet", "bundle", "out.parquet", "items.cache.sqlite"}) == []


@pytest.mark.parametrize("option, value, says", [
    ("--device", "tpu", "--devicetpu"),
    ("--device", "cuda", "--devicecuda"),
    ("--device", "cuda:7", "--devicecuda:7"),
    ("--dtype", "int8", "--dtypeint8"),
])
def test_a_device_or_dtype_this_machine_cannot_use_is_named(work, tiny_llama, option, value, says):
    """A name tokensel does not know fails whatever the strategy; a device this machine lacks fails
    where a model would run on it (first-k runs none: tests/test_startup.py)."""
    folder, items = work
    torch = pytest.importorskip("torch")
    if value.startswith("cuda") and torch.cuda.is_available() and value == "cuda":
        pytest.skip("this machine has a CUDA GPU: --device cuda is valid here")
    strategy = "topk-logits" if value.startswith("cuda") else "first-k"
    r = cli("compress", items, "-o", folder / "out.parquet", "--model", tiny_llama, "--strategy", strategy, option, value)
    assert r.exit_code == 2, r.output
    assert says in flat(r.output)
    assert leftovers(folder, keep={"items.parquet"}) == []


def test_version():
    from tokensel import __version__

    r = cli("--version")
    assert r.exit_code == 0 and __version__ in r.output


# ------------------------------------------------------------------------------------- interactions
def item_index():
    from tokensel.config import TextConfig
    from tokensel.io.items import read_items

    ids, _ = read_items(ITEMS, TextConfig())
    return {i: n for n, i in enumerate(ids)}


def test_interactions_concatenated_with_themselves_give_the_same_histories(tmp_path):
    """Before: no warning, more users (short histories doubled past 3) and inflated metrics."""
    from tokensel.io.interactions import read_histories

    t = pq.read_table(INTERACTIONS)
    doubled = tmp_path / "doubled.parquet"
    pq.write_table(pa.concat_tables([t, t]), doubled)
    once, twice = read_histories(INTERACTIONS, item_index()), read_histories(doubled, item_index())
    assert (twice.users, twice.sequences) == (once.users, once.sequences)
    assert twice.counts.duplicate_rows == t.num_rows and once.counts.duplicate_rows == 0
    assert twice.counts.rows == 2 * t.num_rows and twice.counts.users == len(once.users)


def test_a_text_order_column_is_refused(tmp_path):
    """Text sorts '10' before '2': the order (and every metric) would silently change."""
    from tokensel.errors import TokenselError
    from tokensel.io.interactions import read_histories

    t = pq.read_table(INTERACTIONS)
    as_text = tmp_path / "text_ts.parquet"
    pq.write_table(t.set_column(2, "timestamp", pa.array([str(v) for v in t.column("timestamp").to_pylist()])), as_text)
    with pytest.raises(TokenselError, match=r"column 'timestamp' is .*text.*'10' sorts before '2'"):
        read_histories(as_text, item_index())


def test_ties_in_the_order_column_keep_file_order_and_are_counted(tmp_path):
    from tokensel.io.interactions import read_histories

    index = {f"id{i}": i for i in range(5)}
    data = [{"user_id": "u", "item_id": f"id{i}", "timestamp": t} for i, t in ((3, 1), (1, 0), (4, 1), (0, 2), (2, 1))]
    path = tmp_path / "ties.parquet"
    pq.write_table(pa.Table.from_pylist(data), path)
    hist = read_histories(path, index)
    assert hist.sequences == [[1, 3, 4, 2, 0]] and hist.counts.order_ties == 3


def test_evaluate_and_headroom_report_what_they_skipped_and_dropped(tmp_path, tiny_bert):
    import json

    t = pq.read_table(INTERACTIONS)
    ghost = pa.table({"user_id": [t.column("user_id")[0].as_py()], "item_id": ["ghost"], "timestamp": pa.array([10**6], t.schema.field("timestamp").type)})
    inter = tmp_path / "inter.parquet"
    pq.write_table(pa.concat_tables([t, t.slice(0, 5), ghost.cast(t.schema)]), inter)
    texts = tmp_path / "first.parquet"
    assert cli("compress", ITEMS, "-o", texts, "--model", tiny_bert, "--strategy", "first-k", "--k", "16").exit_code == 0
    out = tmp_path / "ev.json"
    r = cli("evaluate", ITEMS, inter, "--texts", texts, "--recommender", "text-sim", "--model", tiny_bert, "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())[0]["data"]
    assert (data["duplicate_rows"], data["unknown_item_rows"]) == (5, 1)
    screen = flat(r.output)
    assert "dropped5duplicaterows" in screen and "skipped1withunknownitems" in screen
    assert "bestepoch" not in screen and "seeds[" not in screen  # text-sim: untrained, deterministic, one run
    hout = tmp_path / "head.json"
    r = cli("headroom", ITEMS, inter, "--ks", "8", "--model", tiny_bert, "--device", "cpu", "-o", hout)
    assert r.exit_code == 0, r.output
    assert json.loads(hout.read_text())[0]["data"]["duplicate_rows"] == 5 and "dropped5duplicaterows" in flat(r.output)


def test_a_nan_item_id_is_refused_naming_the_row(work, tiny_bert):
    folder, items = work
    write_items(items, [{"item_id": 1.0, "title": "a", "description": "b"}, {"item_id": float("nan"), "title": "c", "description": "d"}])
    r = cli("compress", items, "-o", folder / "out.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16")
    assert r.exit_code == 2 and "row1" in flat(r.output) and "NaN" in r.output, r.output
    assert leftovers(folder, keep={"items.parquet"}) == []


def test_an_all_null_text_column_is_warned_about(work, tiny_bert):
    folder, items = work
    write_items(items, [{"item_id": f"i{i}", "title": f"probe {i}", "notes": None} for i in range(5)],
                schema=pa.schema([("item_id", pa.string()), ("title", pa.string()), ("notes", pa.string())]))
    r = cli("compress", items, "-o", folder / "out.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16", "--text-cols", "title,notes")
    assert r.exit_code == 0 and "textcolumn'notes'isnullorblankineveryrow" in flat(r.output), r.output
    r = cli("compress", items, "-o", folder / "out.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16", "--text-cols", "title")
    assert r.exit_code == 0 and "warning" not in r.output


def test_inspect_with_another_items_file_than_the_one_compressed_is_refused(work, tiny_bert):
    """Before: it silently used the ids the two files share."""
    folder, items = work
    out = folder / "out.parquet"
    assert cli("compress", items, "-o", out, "--model", tiny_bert, "--strategy", "random", "--k", "16", "--prefix", "4").exit_code == 0
    assert cli("inspect", items, out).exit_code == 0
    t = pq.read_table(items)
    fewer, edited = folder / "fewer.parquet", folder / "edited.parquet"
    pq.write_table(t.slice(0, 30), fewer)
    desc = t.column("description").to_pylist()
    desc[2] = "Revised: " + (desc[2] or "")
    pq.write_table(t.set_column(t.schema.get_field_index("description"), "description", pa.array(desc)), edited)
    for other, says in ((fewer, "holds48itemsbut"), (edited, "itwascompressedfromanothertext")):
        r = cli("inspect", other, out)
        assert r.exit_code == 2 and says in flat(r.output), r.output


def test_stale_temp_files_of_dead_runs_are_removed_and_only_those(work, tiny_bert):
    """A killed run leaves `.<out>.tmp-<pid>`; the next run of the same output removes it, but not the
    temporary file of a run still alive, nor another output's."""
    import os
    import subprocess
    import sys

    folder, items = work
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale, live, other = folder / f".out.parquet.tmp-{dead}", folder / f".out.parquet.tmp-{os.getppid()}", folder / f".other.parquet.tmp-{dead}"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    r = cli("compress", items, "-o", folder / "out.parquet", "--model", tiny_bert, "--strategy", "first-k", "--k", "16")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists() and other.exists()
