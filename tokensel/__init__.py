"""tokensel: keep the most informative tokens of each item text (TSPORec), not just the first k.

    from tokensel import Selector                 # in memory: strings, DataFrames, datasets
    from tokensel import api                      # files: api.compress, api.train

`import tokensel` stays light (no torch): `Selector` is loaded on first use.
"""

__version__ = "0.1.0"

__all__ = ["Selector", "__version__"]


def __getattr__(name: str):
    if name == "Selector":  # lazily, so that `import tokensel` does not import torch
        from tokensel.select.selector import Selector

        return Selector
    raise AttributeError(f"module 'tokensel' has no attribute {name!r}")
