"""What did the selection keep? Item-level colour view and corpus-level token statistics.

Green: kept by the selection but not by first-k. Blue: kept by first-k but dropped by the
selection (paper figure 3). Over the whole file: overlap with first-k, and the frequent tokens the
selection drops most (paper figure 4). It loads only the tokenizer's model (no policy, no forward
pass): it re-tokenises the items and reads the kept positions from the compressed file, which must
have been made from the same items (same ids, same texts: checked item by item).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.items import build_text, iter_item_batches
from tokensel.io.parquet_out import read_metadata
from tokensel.models.item_llm import ItemLLM


@dataclass
class ItemView:
    item_id: str
    tokens: list[str]  # each token's surface text with its leading whitespace (token_pieces)
    kept: set[int]
    first_k: set[int]


@dataclass
class Report:
    meta: dict
    views: list[ItemView] = field(default_factory=list)
    items: int = 0
    compressed_items: int = 0
    overlap: float = 0.0  # mean |kept & first-k| / k over items longer than k
    dropped: list[tuple[str, int, int]] = field(default_factory=list)  # token, times in first-k, times kept
    added: list[tuple[str, int]] = field(default_factory=list)  # token, times kept beyond first-k
    first_field: str | None = None  # the first text column, when there are several (e.g. the title)
    field_cut: int = 0  # compressed items whose kept tokens miss part of the first field that fits in k
    field_cut_tokens: int = 0  # how many such first-field tokens are missing, summed over items
    field_cut_first_k: int = 0  # compressed items whose first field is longer than k (first-k cuts it too)


def inspect(items: str | Path, compressed: str | Path, ids: list[str] = (), n: int = 3, top: int = 15) -> Report:
    meta = read_metadata(compressed)
    if not meta:
        raise TokenselError(f"{compressed}: no tokensel metadata; is it the output of tokensel compress?")
    text = TextConfig(id_col=meta["id_col"], text_cols=meta["text_cols"], template=meta.get("template", ""), max_len=meta["max_len"], labels=meta.get("labels", True))
    model = meta.get("model") or "default"
    llm = ItemLLM.from_pretrained(model)
    k = meta["k"]
    comp = pq.read_table(compressed, columns=[text.id_col, "positions", "token_ids", "n_tokens"]).to_pydict()
    kept_by_id = dict(zip(map(str, comp[text.id_col]), comp["positions"]))
    ids_by_id = dict(zip(map(str, comp[text.id_col]), comp["token_ids"]))
    n_by_id = dict(zip(map(str, comp[text.id_col]), comp["n_tokens"]))
    wanted = set(ids)
    report = Report(meta)
    in_first, kept_of_first, added = Counter(), Counter(), Counter()
    overlap_sum = 0.0
    # the first field's own tokens lead the item's tokens (fields are joined by a space), so its length
    # says which leading positions are e.g. the title: the part a 16-token prefix may not cover
    head = text.text_cols[0] if len(text.text_cols) > 1 else None
    report.first_field = head
    for batch in iter_item_batches(items, text, passthrough=[head] if head else ()):
        toks = llm.tokenize(batch.texts, text.max_len)
        if head:
            heads = [build_text({head: v}, [head], text.labels) for v in batch.passthrough.column(head).to_pylist()]
            field_len = [len(x) for x in llm.tokenize(heads, text.max_len)]
        else:
            field_len = [0] * len(toks)
        text_of = dict(zip(map(str, batch.ids), batch.texts))
        for item_id, t, head_len in zip(batch.ids, toks, field_len):
            report.items += 1
            kept = kept_by_id.get(str(item_id))
            if kept is None:
                raise TokenselError(f"{compressed}: item {item_id!r} of {items} is missing; were they compressed from the same file?")
            if n_by_id[str(item_id)] != len(t) or [t[p] if p < len(t) else None for p in kept] != ids_by_id[str(item_id)]:
                raise TokenselError(
                    f"{compressed}: item {item_id!r} does not match its text in {items}: "
                    "it was compressed from another text (pass the items file that was compressed)"
                )
            kept = set(kept)
            if len(t) <= k:
                continue
            report.compressed_items += 1
            first = set(range(k))
            overlap_sum += len(kept & first) / k
            for p in first:
                in_first[t[p]] += 1
                if p in kept:
                    kept_of_first[t[p]] += 1
            for p in kept - first:
                added[t[p]] += 1
            missing_head = sum(p not in kept for p in range(min(head_len, k)))
            report.field_cut += missing_head > 0
            report.field_cut_tokens += missing_head
            report.field_cut_first_k += head_len > k
            show = str(item_id) in wanted if wanted else (len(report.views) < n and kept != first)
            if show:
                report.views.append(ItemView(str(item_id), token_pieces(llm.tokenizer, text_of[str(item_id)], t), kept, first))
    if report.items != len(kept_by_id):
        raise TokenselError(
            f"{compressed}: holds {len(kept_by_id):,} items but {items} has {report.items:,}: "
            "pass the items file that was compressed"
        )
    missing = wanted - {v.item_id for v in report.views}
    if missing:
        raise TokenselError(f"{items}: no item with more than k={k} tokens has id {sorted(missing)}")
    report.overlap = overlap_sum / max(report.compressed_items, 1)
    name = lambda tok: llm.tokenizer.convert_ids_to_tokens(tok)  # noqa: E731
    frequent = in_first.most_common(top * 4)
    frequent.sort(key=lambda kv: (kept_of_first[kv[0]] / kv[1], -kv[1]))
    report.dropped = [(name(t), c, kept_of_first[t]) for t, c in frequent[:top]]
    report.added = [(name(t), c) for t, c in added.most_common(top)]
    return report


def token_pieces(tokenizer, text: str, ids: list[int]) -> list[str]:
    """The span of `text` each token covers, with the whitespace before it, so that the pieces joined
    give back the text. Read from the fast tokenizer's offsets, which is right for any vocabulary
    (WordPiece `##`, byte-level BPE `Ġ`, SentencePiece `▁`); without offsets, the decoded tokens."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"][: len(ids)] == list(ids):
            spans = enc["offset_mapping"][: len(ids)]
            out, prev = [], 0
            for _, end in spans:  # tokens sharing a character (byte-level BPE) show it once
                out.append(text[prev:end] if end > prev else "")
                prev = max(prev, end)
            if out:
                out[0] = out[0].lstrip()
            return out
    return [(" " if p else "") + tokenizer.decode([i]) for p, i in enumerate(ids)]


def colour_item(view: ItemView) -> Text:
    out = Text()
    for p, word in enumerate(view.tokens):
        if p in view.kept and p in view.first_k:
            out.append(word)
        elif p in view.kept:
            out.append(word, style="bold green")
        elif p in view.first_k:
            out.append(word, style="bold blue strike")
        else:
            out.append(word, style="dim")
    return out


def render(report: Report, console: Console) -> None:
    m = report.meta
    console.print(f"[bold]{m.get('strategy')}[/] " + escape(f"k={m['k']} chunk={m['chunk']} prefix={m['prefix']} model={m.get('model')} policy={m.get('policy_hash')}"))
    console.print("[bold green]green[/]: kept only by the selection   [bold blue]blue[/]: kept only by first-k   plain: both   [dim]dim[/]: neither")
    for v in report.views:
        console.rule(escape(f"item {v.item_id}: {len(v.kept & v.first_k)}/{len(v.first_k)} tokens shared with first-k"))
        console.print(colour_item(v))
    console.rule("whole file")
    console.print(f"items {report.items:,}; longer than k: {report.compressed_items:,}; mean overlap with first-k: {100 * report.overlap:.1f}%")
    if report.first_field and report.compressed_items:
        c = report.compressed_items
        console.print(
            escape(f"first text column {report.first_field!r}: the selection drops part of it for {report.field_cut:,} of these items "
            f"({100 * report.field_cut / c:.1f}%, {report.field_cut_tokens / c:.1f} tokens per item); first-k cuts it for "
            f"{report.field_cut_first_k:,} ({100 * report.field_cut_first_k / c:.1f}%, where it is longer than k)")
        )
    t = Table(title="frequent first-k tokens the selection drops most (figure 4)")
    t.add_column("token")
    t.add_column("in first-k", justify="right")
    t.add_column("kept", justify="right")
    t.add_column("kept %", justify="right")
    for tok, c, kept in report.dropped:
        t.add_row(escape(tok), str(c), str(kept), f"{100 * kept / c:.0f}%")
    console.print(t)
    t2 = Table(title="tokens the selection adds beyond first-k")
    t2.add_column("token")
    t2.add_column("times", justify="right")
    for tok, c in report.added:
        t2.add_row(escape(tok), str(c))
    console.print(t2)
