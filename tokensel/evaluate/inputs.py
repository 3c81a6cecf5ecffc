"""What an evaluation reads: the catalogue's item ids, the users' histories (and, under the cold
protocol, the cold split) and each compressed file's kept token ids, checked against the model.

Apart from the runner because headroom, curve and the strategy check read the split first, so that
bad interactions or too few cold users are refused before anything is compressed.
"""

from __future__ import annotations

from pathlib import Path

from tokensel.config import COLD_SHARE
from tokensel.errors import TokenselError
from tokensel.io.cold import ColdSplit, cold_split
from tokensel.io.interactions import Histories, first_users, read_histories
from tokensel.io.item_ids import IdCheck
from tokensel.io.items import open_parquet
from tokensel.io.parquet_out import read_metadata
from tokensel.io.readers import open_items  # [formats hook]
from tokensel.models.item_llm import resolve_model_path


def read_item_ids(path: str | Path, id_col: str) -> list:
    """The catalogue: every item id of the items file, in file order (nulls and duplicates are errors)."""
    path = Path(path)
    src = open_items(path)  # [formats hook] the catalogue may be Parquet, CSV or JSON Lines
    if id_col not in src.schema.names:
        raise TokenselError(f"{path}: no column {id_col!r}; the file has {src.schema.names}. Choose it with --id-col.")
    ids = [v for rb in src.iter_batches(65536, [id_col]) for v in rb.column(0).to_pylist()]
    IdCheck(path, id_col)(ids, 0)
    return ids


def read_split(
    items: str | Path,
    interactions: str | Path,
    id_col: str,
    columns: tuple[str, str, str],
    max_users: int | None = None,
    protocol: str = "loo",
    cold_share: float = COLD_SHARE,
    scored: str = "test",
) -> tuple[list, Histories, ColdSplit | None]:
    """The catalogue's ids, the users' histories and, under the cold protocol, the cold split (whose
    histories are then the ones to train on). Commands that compress before evaluating (headroom, the
    strategy check) call it first too, so that too few cold users is refused before any model runs.
    The callers have checked `protocol` and `cold_share` (config.check_protocol)."""
    item_ids = read_item_ids(items, id_col)
    index = {str(i): n for n, i in enumerate(item_ids)}
    hist = first_users(read_histories(interactions, index, *columns), max_users)
    if protocol != "cold":
        return item_ids, hist, None
    split = cold_split(hist, interactions, index, columns, cold_share, scored)
    return item_ids, split.histories, split


def load_texts(path: str | Path, item_ids: list, items_path: str | Path = "the items file", id_col: str | None = None) -> tuple[list[list[int]], dict]:
    """The kept token ids of every catalogue item, in catalogue order, and the file's tokensel metadata."""
    path = Path(path)
    pf = open_parquet(path)
    meta = read_metadata(path)
    col = id_col or meta.get("id_col") or "item_id"
    names = pf.schema_arrow.names
    for c in (col, "token_ids"):
        if c not in names:
            raise TokenselError(f"{path}: no column {c!r} (the file has {names}); is it the output of tokensel compress?")
    table = pf.read(columns=[col, "token_ids"]).to_pydict()
    by_id: dict[str, list[int]] = {}
    for row, (i, toks) in enumerate(zip(table[col], table["token_ids"])):
        by_id[str(i)] = [] if toks is None else toks
    out, missing = [], []
    for i in item_ids:
        toks = by_id.get(str(i))
        if toks is None:
            missing.append(i)
            continue
        out.append(toks)
    if missing:
        raise TokenselError(
            f"{path}: item {missing[0]!r} of {items_path} is missing ({len(missing):,} of {len(item_ids):,} items missing); "
            "compress the same items file the evaluation uses"
        )
    return out, meta


def check_model(path: Path, meta: dict, model: str) -> None:
    name = meta.get("model")
    if name and resolve_model_path(name) != resolve_model_path(model):
        raise TokenselError(
            f"{path}: its token ids come from model {name!r}, but the evaluation uses {model!r}; "
            f"token ids of one tokenizer mean nothing to another. Pass --model {name} or compress with --model {model}"
        )


def check_vocab(path: Path, model: str, vocab: int, tokens: list[list[int]]) -> None:
    top = max((max(t) for t in tokens if t), default=-1)
    if top >= vocab:
        raise TokenselError(f"{path}: token id {top} is outside the vocabulary of model {model!r} ({vocab} tokens)")
