"""The score cache: what makes `compress` resumable, incremental, and cheap across budgets.

It stores what the model computes, not what is selected from it. One SQLite file (default
`<items>.cache.sqlite` in the output's folder) maps

    (scorer hash, item key) -> (n_tokens, float32 score of every token)

where the item key is a 128-bit hash of the item id and its built text, and the scorer hash covers
everything the token scores depend on: tokensel version, strategy, model identity and a weight
fingerprint, the policy head's fingerprint, max_len, template, text columns, dtype, device type and
the forward-batch geometry. Budget, prefix and chunk are not in it: the selection is a pure function
of the token scores (tokensel.select), so a run with another k, prefix or chunk reuses every entry
and runs no model. Only items that need scoring (more than k tokens) are stored.

Scored items are committed after every forward batch (tokensel.compress.local), so a run that is
killed loses at most the batch in flight, and the next run with the same scorer reuses the rest. A
changed text changes the key, so only changed (or new) items are scored again. After a complete run
(no --limit) entries of this scorer that the run did not use are deleted, so the file stays about the
size of one catalogue per scorer.

Lookups go to disk through SQLite's bounded page cache: memory does not grow with the catalogue.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from tokensel.errors import TokenselError

SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    cfg TEXT NOT NULL,
    key BLOB NOT NULL,
    n_tokens INTEGER NOT NULL,
    scores BLOB NOT NULL,
    run INTEGER NOT NULL,
    PRIMARY KEY (cfg, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS config (cfg TEXT PRIMARY KEY, json TEXT NOT NULL, created REAL NOT NULL);
DROP TABLE IF EXISTS selection;
"""

_CHUNK = 900  # parameters per statement (SQLite's historic limit is 999)


def item_key(item_id, text: str) -> bytes:
    """128-bit key of an item: its id (type and value) and its built text."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{type(item_id).__name__}:{item_id}".encode())
    h.update(b"\x00")
    h.update(text.encode())
    return h.digest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights: names, shapes, dtypes and a strided sample of each tensor."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].float().cpu().numpy()
            h.update(sample.tobytes())
    return h.hexdigest()


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:24]


class ScoreCache:
    """Token scores of scored items, keyed by scorer and item; see the module docstring."""

    def __init__(self, path: str | Path, config: dict):
        self.path = Path(path)
        self.config = config
        self.cfg = config_hash(config)
        self.run = time.time_ns()
        self.created = not self.path.exists()  # a file this run made goes again if the run stores nothing
        self.stored = 0
        folder = self.path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TokenselError(
                f"{self.path}: cannot create the score cache: the folder {folder} is missing or not writable; "
                "pass --cache FILE in a writable folder, or --no-cache"
            )
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO config VALUES (?, ?, ?)", (self.cfg, json.dumps(config, sort_keys=True, default=str), time.time())
            )
        except sqlite3.DatabaseError as exc:
            self._remove_if_created()
            raise TokenselError(f"{self.path}: cannot use the score cache ({exc}); delete it or pass --no-cache") from None
        self._pending: list[tuple] = []
        self._touched: list[bytes] = []

    def entries(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM scores WHERE cfg = ?", (self.cfg,)).fetchone()[0]

    def get_many(self, keys: list[bytes]) -> dict[bytes, tuple[int, np.ndarray]]:
        """Cached (n_tokens, float32 token scores) for the keys that are present and intact."""
        found: dict[bytes, tuple[int, np.ndarray]] = {}
        for s in range(0, len(keys), _CHUNK):
            part = keys[s : s + _CHUNK]
            q = f"SELECT key, n_tokens, scores FROM scores WHERE cfg = ? AND key IN ({','.join('?' * len(part))})"
            for key, n, blob in self.db.execute(q, (self.cfg, *part)):
                if len(blob) == 4 * n:
                    found[key] = (n, np.frombuffer(blob, dtype=np.float32))
        return found

    def put(self, key: bytes, scores: np.ndarray) -> None:
        """Queue one item's token scores (float32, one per token) for the next commit."""
        scores = np.ascontiguousarray(scores, dtype=np.float32)
        self._pending.append((self.cfg, key, len(scores), scores.tobytes(), self.run))

    def touch(self, keys: list[bytes]) -> None:
        self._touched.extend(keys)

    def commit(self) -> None:
        """Store the queued entries and mark the reused ones, in one transaction."""
        if not self._pending and not self._touched:
            return
        self.db.execute("BEGIN")
        try:
            if self._pending:
                self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)", self._pending)
            if self._touched:
                self.db.executemany("UPDATE scores SET run = ? WHERE cfg = ? AND key = ?", [(self.run, self.cfg, k) for k in self._touched])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.stored += len(self._pending)
        self._pending.clear()
        self._touched.clear()

    def prune(self) -> int:
        """After a complete run: drop this scorer's entries the run did not use."""
        cur = self.db.execute("DELETE FROM scores WHERE cfg = ? AND run <> ?", (self.cfg, self.run))
        return cur.rowcount

    def close(self) -> None:
        """Commit what is queued (also after a failed run: scored items are valid) and close.

        A cache file this run created and stored nothing in (the run failed first) is removed, with
        its -wal and -shm files: a failed run leaves nothing behind that it did not pay for."""
        try:
            self.commit()
        except sqlite3.DatabaseError:
            pass
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError:
            pass
        self.db.close()
        if self.stored == 0:
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created:
            for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"), Path(f"{self.path}-journal")):
                p.unlink(missing_ok=True)
