"""Which strategy to run on a catalogue: verdicts recorded for the catalogue they were measured on.

A strategy verdict (a `tokensel curve` budget curve or a `tokensel check`) is a statement about one
catalogue: a check made where titles carry the facts says nothing about a catalogue whose facts sit
deep in the description. So every verdict is keyed by

- the catalogue's fingerprint: a hash of every item's id and built text (the text settings decide
  what the text is) and of the text settings themselves (id column, text columns, labels, template,
  max_len). Any edited, added or removed item, or another text layout, is another catalogue;
- the bundle's hash (tokensel.policy.bundle.bundle_hash): a retrained bundle selects other tokens.

Where it lives: a JSON file beside the items file, `<items file name>.tokensel-verdicts.json`. The
verdict is about that file, so it travels with it (a copied or shared data folder carries its
verdicts), a user sees it next to the data, and `compress` finds it with no setting. Where that
folder cannot be written (read-only shared data), the store is `<user cache>/tokensel/verdicts/`
(XDG_CACHE_HOME, else ~/.cache), one file per fingerprint; reading looks in both. The environment
variable TOKENSEL_VERDICTS names a folder to use instead of both (a team's shared folder; the tests'
temporary one). Writes are atomic (a temporary file renamed into place), so a reader never sees half
a file.

Which protocol: a verdict says whether it was measured in leave-one-out (every target also a
training item) or under the cold-start protocol (targets the recommender never trained on); the two
are kept side by side, so a cold curve never replaces a warm verdict at the same budget. auto follows
the leave-one-out verdict and, where only a cold one was measured, that one, and says so.

Which budget a verdict covers: the one it was measured at. `compress --strategy auto` at budget k
follows the verdict at k, else the one at the largest recorded budget below k, else none. Above the
largest measured budget the nearest one below is the closest evidence, and first-k only gains text
as k grows, so a verdict there errs towards first-k; below the smallest measured budget truncation
bites hardest and a selection's choices matter most, so nothing measured is stretched down to it.

Only pyarrow and hashlib: compress reads this before deciding whether it needs a model at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokensel.config import TextConfig
from tokensel.errors import TokenselError
from tokensel.io.atomic import AtomicTarget
from tokensel.io.items import iter_item_batches

SUFFIX = ".tokensel-verdicts.json"
VERSION = 1


# ------------------------------------------------------------------------------- the catalogue
def text_settings(text: TextConfig) -> dict:
    """The text settings that decide what an item's text is (all of TextConfig, in a fixed order)."""
    return {"id_col": text.id_col, "text_cols": list(text.text_cols), "labels": bool(text.labels), "template": text.template, "max_len": int(text.max_len)}


_SEEN: dict[tuple, str] = {}  # (file, its size and mtime, text settings) -> fingerprint, within one process


def catalogue_fingerprint(items: str | Path, text: TextConfig, batch_rows: int = 8192) -> str:
    """A 16-hex-digit hash of the items' built texts (streamed in batches) and the text settings."""
    items = Path(items)
    try:
        st = items.stat()
        memo = (str(items.resolve()), st.st_size, st.st_mtime_ns, json.dumps(text_settings(text), sort_keys=True))
    except OSError:
        memo = None  # a missing file: iter_item_batches names it
    if memo in _SEEN:
        return _SEEN[memo]
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(text_settings(text), sort_keys=True).encode())
    for b in iter_item_batches(items, text, batch_rows=batch_rows, check_duplicates=False):
        for i, t in zip(b.ids, b.texts):
            h.update(f"{type(i).__name__}:{i}\x00".encode())
            h.update(t.encode())
            h.update(b"\x01")
    fp = h.hexdigest()
    if memo is not None:
        _SEEN[memo] = fp
    return fp


# ------------------------------------------------------------------------------- the store
ENV = "TOKENSEL_VERDICTS"


def store_path(items: str | Path) -> Path:
    """The store beside the items file."""
    items = Path(items)
    return items.with_name(items.name + SUFFIX)


def cache_store_path(fingerprint: str) -> Path:
    """The fallback store in the user's cache folder (one file per catalogue)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tokensel" / "verdicts" / f"{fingerprint}.json"


def store_paths(items: str | Path, fingerprint: str) -> list[Path]:
    """Where a catalogue's verdicts are written (the first that works) and read (in this order)."""
    if os.environ.get(ENV):
        return [Path(os.environ[ENV]) / f"{fingerprint}.json"]
    return [store_path(items), cache_store_path(fingerprint)]


def _read(path: Path) -> dict:
    if not path.exists():
        return {"version": VERSION, "verdicts": {}}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("verdicts"), dict):
            raise ValueError("no verdicts")
    except (OSError, ValueError) as exc:
        raise TokenselError(f"{path}: unreadable verdict store ({exc}); delete it and run tokensel curve or tokensel check again") from None
    return data


def _write(path: Path, data: dict) -> None:
    target = AtomicTarget(path)
    try:
        target.tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    except OSError:
        target.discard()
        raise
    target.commit()


@dataclass
class Verdict:
    """One recorded decision: the strategy to run at budget k on one catalogue with one bundle."""

    k: int
    strategy: str
    source: str  # "curve" or "check"
    recommender: str
    seeds: int
    sees_seed_variance: bool
    made: str  # UTC time, ISO 8601
    detail: str = ""  # one phrase on the evidence, e.g. "1.04x first-k validation NDCG@10"
    protocol: str = "loo"  # "loo" (leave-one-out) or "cold" (cold-start targets); stores written before it: loo


PROTOCOLS = ("loo", "cold")


def key(fingerprint: str, bundle: str) -> str:
    return f"{fingerprint}:{bundle}"


def budget_key(k: int, protocol: str) -> str:
    """A verdict's place in its catalogue's `by_k`: the budget for leave-one-out (as stores have always
    had it), "cold:<k>" for the cold-start protocol."""
    return str(k) if protocol == "loo" else f"{protocol}:{k}"


def record(items: str | Path, fingerprint: str, bundle: str, text: TextConfig, verdicts: list[Verdict]) -> Path:
    """Add (or replace, per budget) these verdicts for the catalogue; returns the file written.

    Beside the items file where its folder is writable, else in the user cache folder."""
    entry_key = key(fingerprint, bundle)
    paths = store_paths(items, fingerprint)
    for path in paths:
        try:
            data = _read(path)
            entry = data["verdicts"].setdefault(
                entry_key, {"catalogue": fingerprint, "bundle_hash": bundle, "items": str(Path(items).resolve()), "text": text_settings(text), "by_k": {}}
            )
            for v in verdicts:
                entry["by_k"][budget_key(v.k, v.protocol)] = asdict(v)
            _write(path, data)
            return path
        except (OSError, TokenselError) as exc:
            last = exc
    raise TokenselError(f"cannot record the verdict in {' nor in '.join(str(p) for p in paths)} ({last})")


def recorded(items: str | Path, fingerprint: str, bundle: str, protocol: str = "loo") -> tuple[dict[int, Verdict], Path | None]:
    """Every verdict recorded for this catalogue and bundle under `protocol` (budget -> verdict), and
    the file they are in."""
    for path in store_paths(items, fingerprint):
        try:
            entry = _read(path)["verdicts"].get(key(fingerprint, bundle))
        except TokenselError:
            continue  # an unreadable store is no verdict; writing names the problem
        found = [Verdict(**v) for v in (entry or {}).get("by_k", {}).values()]
        found = {v.k: v for v in found if v.protocol == protocol}
        if found:
            return found, path
    return {}, None


def verdict_for(by_k: dict[int, Verdict], k: int) -> Verdict | None:
    """The verdict at k, else the one at the largest recorded budget below k, else None (see the module)."""
    if k in by_k:
        return by_k[k]
    below = [b for b in by_k if b < k]
    return by_k[max(below)] if below else None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
