"""The commands README.md and docs/ quote exist and parse: every `python -m MODULE` or
`python3 SCRIPT.py` command in a fenced bash block or an inline code span is run with `--help`
(subcommands included), and every `--flag` it passes must be one its help lists. README.md stays
at most 200 lines. sglang's own entry points and pytest are not run (their files must exist)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT_MODULES = ("oscar_sglang.", "benchmarks.")
SUBCOMMANDS = {"oscar_sglang.calib": {"report"}}


def _commands(text: str) -> list[str]:
    """Commands of fenced bash blocks (continuations joined, comments dropped) and of inline
    code spans that start with python."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    out += [c for c in re.findall(r"`([^`\n]+)`", prose) if re.match(r"python3? ", c)]
    return out


def _entry(cmd: str) -> tuple[list[str], list[str]] | None:
    """(the argv that prints the entry point's help, the command's arguments), or None when the
    command is not one of the project's Python entry points."""
    if "$" in cmd.split()[0]:
        return None
    try:
        words = shlex.split(cmd)
    except ValueError:
        return None
    if words[0] not in ("python", "python3") or len(words) < 2:
        return None
    if words[1] == "-m":
        module, args = words[2], words[3:]
        if module == "pytest":
            for w in args:
                if w.startswith("tests/"):
                    assert (ROOT / w.split("::")[0]).exists(), f"{cmd}: no {w}"
            return None
        if not module.startswith(PROJECT_MODULES) and module not in ("oscar_sglang",):
            return None
        head = [sys.executable, "-m", module]
    else:
        script, args = words[1], words[2:]
        assert (ROOT / script).is_file(), f"{cmd}: no {script}"
        module, head = script, [sys.executable, str(ROOT / script)]
    if args and args[0] in SUBCOMMANDS.get(module, ()):
        head, args = [*head, args[0]], args[1:]
    return [*head, "--help"], args


@cache
def _help(argv: tuple[str, ...]) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


CASES = sorted({(doc.name, cmd) for doc in DOCS for cmd in _commands(doc.read_text())
                if _entry(cmd) is not None})


def test_readme_is_short_and_docs_quote_commands():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    assert len(CASES) >= 10, CASES


@pytest.mark.parametrize("doc,cmd", CASES, ids=[f"{d}:{c[:60]}" for d, c in CASES])
def test_quoted_command_exists_and_parses(doc, cmd):
    argv, args = _entry(cmd)
    text = _help(tuple(argv))
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"{re.escape(flag)}\b", text), f"{doc}: `{cmd}` passes {flag}, which {argv[-2]} does not list"


def test_relative_links_point_to_files_that_exist():
    for doc in DOCS:
        for link in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if not link.startswith(("http://", "https://")):
                assert (doc.parent / link).exists(), f"{doc.name}: link to {link}, which does not exist"
