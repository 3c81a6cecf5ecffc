"""inspect shows each token as the text it covers, for WordPiece and byte-level BPE vocabularies alike."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tokensel.inspect import ItemView, colour_item, token_pieces

TEXTS = [
    "title: Stainless Steel Lab Tongs, 10-inch description: Heavy-duty   tongs for crucibles & beakers.",
    "title: Ünïcode café thermometer (−40 °C) description: reads fast",
]


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama", "tiny_qwen"])
def test_pieces_join_back_to_the_text(request, model):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = token_pieces(tok, text, ids)
        assert len(pieces) == len(ids)
        assert "".join(pieces) == text.strip()
        assert not any(p.startswith("##") or "Ġ" in p for p in pieces)
        # a cut token list (max_len) covers a prefix of the text
        cut = token_pieces(tok, text, ids[:7])
        assert len(cut) == 7 and text.startswith("".join(cut))


def test_colour_view_marks_kept_and_dropped_tokens(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    text = TEXTS[0]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    view = ItemView("x", token_pieces(tok, text, ids), kept={0, 1, 5}, first_k={0, 1, 2})
    rendered = colour_item(view)
    assert rendered.plain == text
    styles = {str(span.style) for span in rendered.spans}
    assert "bold green" in styles and "bold blue strike" in styles
