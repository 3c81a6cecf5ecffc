"""How an item's text is built from its columns (HLLM style)."""

from __future__ import annotations

from tokensel.config import TextConfig
from tokensel.io.items import build_text, iter_item_batches, read_items

from conftest import ITEMS, write_items

COLS = ["title", "description"]


def test_format_title_then_description():
    assert build_text({"title": "A", "description": "B"}, COLS) == "title: A description: B"


def test_column_order_follows_text_cols():
    assert build_text({"title": "A", "description": "B"}, ["description", "title"]) == "description: B title: A"
    assert build_text({"title": "A", "brand": "X"}, ["title", "brand"]) == "title: A brand: X"
    assert build_text({"title": "A", "brand": None, "description": " B  c "}, ["title", "brand", "description"], labels=False) == "A B c"


def test_html_entities_decoded():
    assert build_text({"title": "Nuts &amp; Bolts", "description": "5 &lt; 6 &quot;ok&quot; &#39;x&#39;"}, COLS) == (
        "title: Nuts & Bolts description: 5 < 6 \"ok\" 'x'"
    )


def test_empty_and_null_fields_skipped():
    assert build_text({"title": "A", "description": ""}, COLS) == "title: A"
    assert build_text({"title": "A", "description": None}, COLS) == "title: A"
    assert build_text({"title": None, "description": "B"}, COLS) == "description: B"
    assert build_text({"title": "   ", "description": "\n\t"}, COLS) == ""
    assert build_text({"title": None, "description": None}, COLS) == ""
    assert build_text({}, COLS) == ""


def test_whitespace_folded():
    assert build_text({"title": "  A \n  big\t\tthing ", "description": "line one\r\n\r\nline  two"}, COLS) == (
        "title: A big thing description: line one line two"
    )


def test_entity_decoding_to_whitespace_is_folded():
    assert build_text({"title": "a&nbsp;&nbsp; b"}, ["title"]) == "title: a b"


def test_texts_read_from_parquet(tmp_path):
    rows = [
        {"item_id": "a", "title": "First &amp; best", "description": "  spaced   out  "},
        {"item_id": "b", "title": None, "description": "only description"},
        {"item_id": "c", "title": "only title", "description": ""},
        {"item_id": "d", "title": None, "description": None},
    ]
    path = write_items(tmp_path / "items.parquet", rows)
    ids, texts = read_items(path, TextConfig())
    assert ids == ["a", "b", "c", "d"]
    assert texts == ["First & best spaced out", "only description", "only title", ""]  # default: no field labels
    _, labelled = read_items(path, TextConfig(labels=True))
    assert labelled == ["title: First & best description: spaced out", "description: only description", "title: only title", ""]


def test_fixture_texts_have_no_raw_entities_or_double_spaces():
    ids, texts = read_items(ITEMS, TextConfig(labels=True))
    assert len(ids) == 48
    for t in texts:
        assert t.startswith("title: ")
        assert "&amp;" not in t and "  " not in t and "\n" not in t
    # the fixture has 3 empty descriptions: those items are title only
    assert sum(1 for t in texts if " description: " not in t) == 3


def test_batches_report_their_start_row(tmp_path):
    rows = [{"item_id": f"x{i}", "title": f"t{i}", "description": "d"} for i in range(10)]
    path = write_items(tmp_path / "items.parquet", rows)
    batches = list(iter_item_batches(path, TextConfig(), batch_rows=4))
    assert [b.start_row for b in batches] == [0, 4, 8]
    assert [len(b.ids) for b in batches] == [4, 4, 2]
    assert list(iter_item_batches(path, TextConfig(), batch_rows=4, limit=5))[-1].ids == ["x4"]
