"""The GPU benchmarks of benchmarks/gpu_check.sh in their --quick mode (CPU, Triton interpreter:
each kernel against its reference at every model shape, no timing), so that a launcher change
cannot break them unnoticed before a GPU runs them (~25 s)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bench", ["bench_decode", "bench_extend", "bench_write"])
def test_benchmark_quick_mode_matches_reference(bench):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{bench}", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("quick ") == 3, proc.stdout  # one line per model shape
