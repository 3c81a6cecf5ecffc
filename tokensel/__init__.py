"""tokensel: keep the most informative tokens of each item text (TSPORec), not just the first k."""

__version__ = "0.1.0"
