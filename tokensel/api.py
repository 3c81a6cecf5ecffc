"""The Python API the CLI wraps, callable from a notebook:

    from tokensel import api
    api.compress("items.parquet", "out.parquet", k=64, chunk=8)
    api.compress("items.parquet", "items.k{k}.parquet", k=[32, 64, 128])   # one model pass, three files
    api.train("items.parquet", "interactions.parquet", "my_bundle")

In memory (lists of strings, DataFrames, datasets) use `tokensel.Selector`: `compress` is the file job
around it.
"""

from __future__ import annotations

from tokensel.compress.run import compress
from tokensel.models.bundle import DEFAULT_BUNDLE
from tokensel.select.selector import Selector
from tokensel.train.pipeline import train

__all__ = ["compress", "train", "Selector", "DEFAULT_BUNDLE"]
