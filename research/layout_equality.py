#!/usr/bin/env python
"""Before/after check for refactors that must not change behaviour (issue 15): compress outputs.

    research/layout_equality.py MANIFEST.json [--real ../shared/data/amazon-scientific/items.parquet]

Compresses with first-k, random, rarity, policy and item-align (the shipped bundle, the default
model) at k = 32 and 64 on fixtures/items.parquet and on the first 300 real items, with the local
engine (cache off, and cache on twice: fresh and fully reused) and with the Ray engine on the
fixtures (first-k and policy; skipped without Ray), and writes the sha256 of every output's table
and of its tokensel metadata to MANIFEST.json. Run it before and after a change and diff the two
manifests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokensel import api  # noqa: E402


CONTRACT = ("text", "token_ids", "positions", "n_tokens", "n_kept")


def digest(path: Path) -> dict:
    """sha256 of the id and output-contract columns (and pass-through ones), and of the metadata. The
    per-field columns (named after the text columns, added with the formats issue) are listed apart,
    so a manifest from before they existed still compares."""
    t = pq.read_table(path)
    meta_cols = json.loads((t.schema.metadata or {}).get(b"tokensel", b"{}")).get("text_cols", [])
    sink = hashlib.sha256()
    for name in [c for c in t.column_names if c not in meta_cols]:
        sink.update(name.encode())
        sink.update(json.dumps(t.column(name).to_pylist()).encode())
    meta = json.loads((t.schema.metadata or {}).get(b"tokensel", b"{}"))
    meta.pop("policy", None)  # the bundle's path depends on where the checkout lives
    return {"table": sink.hexdigest()[:24], "meta": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", type=Path)
    p.add_argument("--real", type=Path, default=ROOT / ".." / "shared" / "data" / "amazon-scientific" / "items.parquet")
    p.add_argument("--no-ray", action="store_true")
    a = p.parse_args()
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        inputs = {"fixtures": ROOT / "fixtures" / "items.parquet"}
        if a.real.exists():
            inputs["real300"] = d / "real300.parquet"
            pq.write_table(pq.read_table(a.real).slice(0, 300), inputs["real300"])
        for name, items in inputs.items():
            for strategy in ("first-k", "random", "rarity", "policy", "item-align"):
                for k in (32, 64):
                    f = d / f"{name}-{strategy}-{k}.parquet"
                    api.compress(items, f, k=k, strategy=strategy, cache=False)
                    out[f.stem] = digest(f)
                    if strategy in ("policy", "item-align"):
                        for run in ("fresh", "reused"):
                            g = d / f"{name}-{strategy}-{k}-cache-{run}.parquet"
                            api.compress(items, g, k=k, strategy=strategy, cache=d / f"{name}-{strategy}.sqlite")
                            out[g.stem] = digest(g)
        if not a.no_ray:
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray not installed: the Ray engine is not checked")
            else:
                for strategy in ("first-k", "policy"):
                    f = d / f"fixtures-{strategy}-64-ray.parquet"
                    api.compress(inputs["fixtures"], f, k=64, strategy=strategy, engine="ray", workers=2, cache=False)
                    out[f.stem] = {**digest(f), "equals_local": digest(f)["table"] == out[f"fixtures-{strategy}-64"]["table"]}
    a.manifest.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} outputs -> {a.manifest}")


if __name__ == "__main__":
    main()
