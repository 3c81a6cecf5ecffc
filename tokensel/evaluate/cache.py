"""What an evaluation has already computed, so that re-runs and resumed runs do not compute it again.

Two things cost an evaluation its time: the item LLM's pass over a file (item vectors) and training
the recommender once per (file, seed). Both are kept here:

- item vectors, in memory per (vector kind, template, token list), so identical token lists shared by
  several files run once; with a folder also whole files on disk;
- with a folder, every finished seed run (its test and validation ranks, chosen epoch, validation
  metrics, log), written atomically as soon as the run ends. An evaluation, curve or headroom that is
  killed and started again with the same folder trains only the runs that had not finished, and one
  that adds a file, a budget or a seed trains only what is new.

A run's key holds everything its result depends on: tokensel's version (a new release trains again),
the file's template and kept token lists (what the recommender reads, not the file's bytes: a file
compressed again, whose metadata names the bundle at another path, is the same run), the model, the
item-LLM dtype, the recommender and its whole training budget, the seed, the device type and a
digest of the histories it trains and is scored on (so another split, protocol, cold share or
interactions file is another run). Where the block inputs' file lives (`CacheConfig.dir`) is left
out: it changes no number.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from tokensel import __version__
from tokensel.config import TrainConfig
from tokensel.evaluate.recommenders import Recommender
from tokensel.evaluate.recommenders.base import SeedRun
from tokensel.io.interactions import Histories
from tokensel.models.item_llm import ItemLLM


def histories_digest(hist: Histories) -> str:
    """A digest of the sequences a run trains and is scored on, and the items it may draw as negatives."""
    h = hashlib.sha256()
    seqs = hist.sequences
    for a in (seqs.items, seqs.starts, seqs.ends):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    if hist.negatives is not None:
        h.update(np.asarray(hist.negatives, dtype=np.int64).tobytes())
    return h.hexdigest()


def run_key(file_key: str, recommender: str, cfg: TrainConfig, seed: int, device: torch.device, histories: str) -> str:
    """The key of one seed run (see the module docstring for what it holds and why)."""
    train = asdict(cfg)
    train["cache"] = {"store": cfg.cache.store}  # where the file lives changes nothing; float16 or float32 does
    parts = [__version__, file_key, recommender, train, int(seed), torch.device(device).type, histories]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


class EvalCache:
    """Item vectors and finished seed runs (see the module docstring). folder None: vectors in memory only."""

    def __init__(self, folder: str | Path | None = None):
        self.items: dict[tuple, torch.Tensor] = {}
        self.folder = Path(folder) if folder else None

    def _path(self, name: str) -> Path | None:
        return self.folder / name if self.folder else None

    def vectors(self, rec: Recommender, llm: ItemLLM, tokens: list[list[int]], template: str, file_key: str | None) -> torch.Tensor:
        disk = self._path(f"vectors-{file_key}.pt") if file_key else None
        if disk is not None and disk.exists():
            return torch.load(disk)
        kind = (rec.vector_kind, template)
        keys = [(kind, tuple(t)) for t in tokens]
        todo = sorted({k for k in keys if k not in self.items}, key=lambda k: len(k[1]))
        if todo:
            vec = rec.prepare(llm, [list(k[1]) for k in todo])
            for k, v in zip(todo, vec):
                self.items[k] = v.clone()
        out = torch.stack([self.items[k] for k in keys]) if keys else torch.zeros(0, llm.hidden_size)
        if disk is not None:
            _save(out, disk)
        return out

    def load_run(self, key: str) -> SeedRun | None:
        """The finished run kept under `key`; None when there is none (or no folder), or when its file
        cannot be read (it is removed, and the run trains again)."""
        path = self._path(f"runs/run-{key}.pt")
        if path is None or not path.exists():
            return None
        try:
            saved = torch.load(path)
            return SeedRun(saved["seed"], saved["test_ranks"], saved["best_epoch"], saved["valid"], saved["seconds"], json.loads(saved["log"]), saved["valid_ranks"])
        except Exception:  # not a result this version can read
            path.unlink(missing_ok=True)
            return None

    def save_run(self, key: str, run: SeedRun) -> SeedRun:
        """Keep `run` under `key` at once (with a folder); returns it."""
        path = self._path(f"runs/run-{key}.pt")
        if path is not None:
            _save({
                "seed": run.seed, "test_ranks": run.test_ranks, "best_epoch": run.best_epoch, "valid": run.valid,
                "seconds": run.seconds, "log": json.dumps(run.log, default=str), "valid_ranks": run.valid_ranks,
            }, path)
        return run


def _save(obj, path: Path) -> None:
    """Write atomically: a killed run leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
