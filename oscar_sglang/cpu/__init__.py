"""Serving on a machine without a GPU (used by ``oscar-serve --device cpu`` and the demo).

sglang 0.5.23 runs on CPU when ``SGLANG_USE_CPU_ENGINE=1`` is set before it is imported. Its
CPU engine imports a few names from the compiled ``sgl_kernel`` package at import time, and the
PyPI wheel of that package is built for CUDA only (it fails to import without libcuda). Where it
cannot be imported, ``STANDIN`` (a directory holding a stand-in ``sgl_kernel`` whose functions
raise if called) goes first on PYTHONPATH (:func:`environment`); sglang's CPU engine, on CPUs
without AMX, takes its torch ``forward_native`` paths and never calls them.

What this replaces: the import of ``sgl_kernel`` only. What it does not give: sglang's
AMX-optimised CPU kernels (a from-source ``sgl_kernel`` CPU build, used instead whenever it
imports), CUDA graphs, HiCache, or speed: on CPU the oscar backend runs its pure-torch
reference ops. It is for trying the project and for its tests, not for serving traffic.
``oscar_sglang.cpu.parallel`` makes sglang's parallel modes run on the CPU engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "standin"
ENGINE_VARIABLE = ("SGLANG_USE_CPU_ENGINE", "1")  # what sglang reads at import to select its CPU engine


def sgl_kernel_importable(env: Mapping[str, str]) -> bool:
    """Whether ``sgl_kernel`` imports in a process with environment ``env`` (checked in a child: a
    failed import can leave half-initialised modules behind)."""
    return subprocess.run([sys.executable, "-c", "import sgl_kernel"], capture_output=True, env=dict(env)).returncode == 0


def device_of(argv: list[str]) -> str | None:
    """The value of ``--device`` in an sglang command line, if given."""
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return None


def environment(env: Mapping[str, str], argv: Sequence[str] = ()) -> dict[str, str] | None:
    """``env`` with sglang's CPU engine selected, the stand-in first on PYTHONPATH where the
    installed ``sgl_kernel`` does not import, and, for the parallel layout of the sglang command
    line ``argv``, a thread binding and count where sglang needs them
    (:func:`oscar_sglang.cpu.parallel.binding_for`); None when ``env`` already has all of it."""
    from oscar_sglang.cpu.parallel import binding_for

    name, value = ENGINE_VARIABLE
    want = {**env, name: value}
    path = env.get("PYTHONPATH", "")
    if str(STANDIN) not in path.split(os.pathsep) and not sgl_kernel_importable(env):
        want["PYTHONPATH"] = os.pathsep.join(p for p in (str(STANDIN), path) if p)
    want.update(binding_for(argv, env))
    return None if want == dict(env) else want
