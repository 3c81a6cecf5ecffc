"""The selection cache: what makes `compress` resumable and incremental.

One SQLite file (default `<out>.cache.sqlite`, beside the output) maps

    (configuration hash, item key) -> (n_tokens, kept positions)

where the item key is a 128-bit hash of the item id and its built text, and the configuration hash
covers everything else the selection depends on: tokensel version, strategy, model identity and a
weight fingerprint, policy bundle hash, k, chunk, prefix, max_len, template, text columns, dtype,
device type and the forward-batch geometry. Only items that need scoring (more than k tokens) are
stored; the rest pass through without a forward pass anyway.

Each window of items is committed in one transaction as soon as it has been scored, so a run that
is interrupted keeps everything it finished, and the next run with the same configuration reuses
it. A changed text changes the key, so only changed (or new) items are scored again. After a
complete run (no --limit) entries of this configuration that the run did not use are deleted, so the
file stays about the size of one catalogue per configuration.

Lookups go to disk through SQLite's bounded page cache: memory does not grow with the catalogue.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from tokensel.errors import TokenselError

SCHEMA = """
CREATE TABLE IF NOT EXISTS selection (
    cfg TEXT NOT NULL,
    key BLOB NOT NULL,
    n_tokens INTEGER NOT NULL,
    positions BLOB NOT NULL,
    run INTEGER NOT NULL,
    PRIMARY KEY (cfg, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS config (cfg TEXT PRIMARY KEY, json TEXT NOT NULL, created REAL NOT NULL);
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


class SelectionCache:
    """Kept positions of scored items, keyed by configuration and item; see the module docstring."""

    def __init__(self, path: str | Path, config: dict):
        self.path = Path(path)
        self.config = config
        self.cfg = config_hash(config)
        self.run = time.time_ns()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self.db.execute(
                "INSERT OR IGNORE INTO config VALUES (?, ?, ?)", (self.cfg, json.dumps(config, sort_keys=True, default=str), time.time())
            )
        except sqlite3.DatabaseError as exc:
            raise TokenselError(f"{self.path}: cannot use the selection cache ({exc}); delete it or pass --no-cache") from None
        self.dtype = np.uint16 if int(config.get("max_len") or 0) < 65536 else np.int32
        self._pending: list[tuple] = []
        self._touched: list[bytes] = []

    def entries(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM selection WHERE cfg = ?", (self.cfg,)).fetchone()[0]

    def get_many(self, keys: list[bytes]) -> dict[bytes, tuple[int, np.ndarray]]:
        """Cached (n_tokens, positions) for the keys that are present."""
        found: dict[bytes, tuple[int, np.ndarray]] = {}
        for s in range(0, len(keys), _CHUNK):
            part = keys[s : s + _CHUNK]
            q = f"SELECT key, n_tokens, positions FROM selection WHERE cfg = ? AND key IN ({','.join('?' * len(part))})"
            for key, n, blob in self.db.execute(q, (self.cfg, *part)):
                found[key] = (n, np.frombuffer(blob, dtype=self.dtype))
        return found

    def put(self, key: bytes, n_tokens: int, positions: np.ndarray) -> None:
        self._pending.append((self.cfg, key, int(n_tokens), positions.astype(self.dtype).tobytes(), self.run))

    def touch(self, keys: list[bytes]) -> None:
        self._touched.extend(keys)

    def commit(self) -> None:
        """Store this window's new entries and mark its reused ones, atomically."""
        if not self._pending and not self._touched:
            return
        self.db.execute("BEGIN")
        try:
            if self._pending:
                self.db.executemany("INSERT OR REPLACE INTO selection VALUES (?, ?, ?, ?, ?)", self._pending)
            if self._touched:
                self.db.executemany("UPDATE selection SET run = ? WHERE cfg = ? AND key = ?", [(self.run, self.cfg, k) for k in self._touched])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._pending.clear()
        self._touched.clear()

    def prune(self) -> int:
        """After a complete run: drop this configuration's entries the run did not use."""
        cur = self.db.execute("DELETE FROM selection WHERE cfg = ? AND run <> ?", (self.cfg, self.run))
        return cur.rowcount

    def close(self) -> None:
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.DatabaseError:
            pass
        self.db.close()
