"""Layout contract: kernels import torch/triton only, only the integration imports sglang,
and `import oscar_sglang` imports nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_kernels_import_torch_and_triton_only():
    allowed = {"torch", "triton", "__future__", "collections", "dataclasses", "math", "typing", "functools"}
    for path in (ROOT / "kernels").glob("*.py"):
        assert _imports(path) <= allowed, (path.name, _imports(path) - allowed)


def test_only_the_integration_imports_sglang():
    for folder in ("kernels", "calib"):
        for path in (ROOT / folder).glob("*.py"):
            assert "sglang" not in _imports(path), path


def test_import_oscar_sglang_is_light():
    code = "import sys, oscar_sglang; print(sorted(m for m in ('torch', 'sglang', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_eval_talks_to_servers_over_http_only():
    for path in (ROOT / "oscar_sglang" / "eval").glob("*.py"):
        assert "sglang" not in _imports(path), path


def test_benchmarks_and_examples_import_the_installed_project_only():
    """Benchmarks reach the project as `oscar_sglang` and each other as `benchmarks.*` (run with
    `python -m benchmarks.NAME`); examples depend on nothing but the installed package."""
    project = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} | {"support", "tests", "examples", "kernels", "calib"}
    for folder, banned in (("benchmarks", project), ("examples", project | {"benchmarks"})):
        for path in (ROOT / folder).glob("*.py"):
            assert not _imports(path) & banned, (path.name, _imports(path) & banned)
