"""`python -m tokensel`: the CLI without the console script (a machine where the package is on PYTHONPATH only)."""

from tokensel.cli import app

app(prog_name="tokensel")
