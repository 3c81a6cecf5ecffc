"""The README cannot drift from the CLI.

Every `tokensel` command and option in a bash block, or in an inline `tokensel ...` code span, of
README.md or docs/ must exist (read from the Typer app, no subprocess), and every README block marked
cheap (`<!-- test: cheap -->` on the line before it) runs, as written, on a copy of fixtures/ in a
temporary folder and exits 0. The set-up blocks (`python3 -m venv ...`) are CI's job (.ci/run runs
the test one verbatim), never run here; this file checks that they are still in the README exactly
as CI runs them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer

from tokensel.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CHEAP = "<!-- test: cheap -->"
SETUP = "python3 -m venv"
BLOCK = re.compile(r"^(" + re.escape(CHEAP) + r"[ \t]*\n)?```bash\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(tokensel [^`\n]+)`")
SEPARATORS = {"&&", "||", ";", "|"}


def bash_blocks(path: Path) -> list[tuple[bool, str]]:
    """(marked cheap, code) of each ```bash block of a Markdown file, in order."""
    return [(m.group(1) is not None, m.group(2)) for m in BLOCK.finditer(path.read_text())]


def tokensel_calls(code: str) -> list[tuple[str, list[str]]]:
    """(subcommand, options) of each `tokensel ...` call in a bash block; usage-style brackets
    (`[--seeds N]`) are read as options, values and comments are ignored."""
    calls = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            if Path(word).name != "tokensel" or i + 1 >= len(words):
                continue
            rest = []
            for w in words[i + 1:]:
                if w in SEPARATORS:
                    break
                rest.append(w.strip("[]"))
            sub = rest[0] if not rest[0].startswith("-") else ""
            calls.append((sub, [w.split("=")[0] for w in rest if re.fullmatch(r"--?[a-zA-Z][\w-]*(=.*)?", w)]))
    return calls


def options(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"--help"}


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_tokensel_option_exists(doc):
    cli = typer.main.get_command(app)
    inline = "\n".join(INLINE.findall(doc.read_text()))  # `tokensel train ... --stage 1` in the prose
    calls = [call for _, code in bash_blocks(doc) for call in tokensel_calls(code)] + tokensel_calls(inline)
    if doc == README:
        assert len(calls) >= 10, "the README documents fewer tokensel calls than expected: is the block parser broken?"
    for sub, opts in calls:
        if not sub:  # `tokensel --version`
            known = options(cli)
        else:
            assert sub in cli.commands, f"{doc.name}: `tokensel {sub}` is not a command ({', '.join(cli.commands)})"
            known = options(cli.commands[sub])
        unknown = [o for o in opts if o not in known]
        assert not unknown, f"{doc.name}: `tokensel {sub}` has no option {', '.join(unknown)}"


def cheap_blocks() -> list[str]:
    return [code for cheap, code in bash_blocks(README) if cheap and SETUP not in code]


def test_the_readme_marks_cheap_blocks_and_keeps_ci_set_up_commands_verbatim():
    assert cheap_blocks(), f"no README block is marked {CHEAP}"
    setup = [code.strip() for _, code in bash_blocks(README) if SETUP in code]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_test = ci[ci.index("# --- the README's test command, verbatim ---") + 1]
    assert len(setup) == 2 and ci_test in setup, "the README's two set-up commands must hold .ci/run's test command verbatim"


@pytest.mark.parametrize("n", range(len(cheap_blocks())), ids=lambda n: f"block{n + 1}")
def test_cheap_readme_block_runs_on_the_fixtures(n, tmp_path):
    """`tokensel` is this interpreter's (`python -m tokensel`, the code under test), the folder a temporary
    one holding a copy of fixtures/, so nothing is written into the repository."""
    code = cheap_blocks()[n]
    shutil.copytree(ROOT / "fixtures", tmp_path / "fixtures")
    script = f'set -euo pipefail\ntokensel() {{ {shlex.quote(sys.executable)} -m tokensel "$@"; }}\n{code}'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"README block failed (exit {r.returncode}):\n{code}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stdout + r.stderr


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    links = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()) if not re.match(r"[a-z]+:|#", t)]
    missing = [t for t in links if not (doc.parent / t).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"
