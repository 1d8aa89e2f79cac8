"""The README's main job, `python -m oscar_sglang.demo`, run as a new user runs it: no
environment variable set, nothing on PYTHONPATH (the CPU set-up is the project's own).

One run (two CPU server starts): it exits 0, prints its table, writes the PNG and JSON, and
what it measured holds: OSCAR holds more than 5x the tokens of BF16 in the same KV budget,
a question over the cached document reads it from the cache, perplexity stays within 15%, every
question gets an answer on both sides, and the output fits 100 columns with no CPU timing in it.
A corrupt rotations file ends it with one line, before any server starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _user_env() -> dict[str, str]:
    """This process's environment without what conftest set up for the tests."""
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "PYTHONPATH", "TORCHDYNAMO_DISABLE")}
    return env | {"PYTHONPATH": ""}


def _demo(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oscar_sglang.demo", "--device", "cpu",
                           "--cache-dir", str(ROOT / ".cache"), *args], capture_output=True, text=True,
                          timeout=timeout, env=_user_env(), cwd=ROOT)


@pytest.mark.timeout(1500)
def test_demo_prints_its_table_and_what_it_measured_holds(smollm2_dir, tmp_path):
    out = tmp_path / "demo.png"
    proc = _demo("--calib-tokens", "2048", "--passage-chars", "6000", "--max-tokens", "8", "--out", str(out),
                 timeout=1400)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("KV bytes per token") - 100:proc.stdout.index("\nwrote ")]
    assert "KV tokens in 512 MiB" in table and "tokens from cache" in table and "TTFT" not in table
    assert max(map(len, table.splitlines())) <= 100 and "(no answer)" not in table
    assert out.stat().st_size > 10_000
    got = json.loads(out.with_suffix(".json").read_text())
    bf16, oscar = got["bf16"], got["oscar"]
    # the default K3V2 rows at head_dim 64: 3.0 physical bits per element, 16 / 3 = 5.3x fewer bytes than
    # BF16 (window rows take pages of the same budget as requests need them)
    assert oscar["tokens"] > 5 * bf16["tokens"]
    assert oscar["tokens"] * oscar["cell_bytes"] <= 512 * 2**20 and bf16["tokens"] * bf16["cell_bytes"] <= 512 * 2**20
    for side, page in ((bf16, 1), (oscar, 64)):  # the cache keys whole pages (OSCAR's: 64 slots)
        assert side["cached_tokens"] >= side["prompt_tokens"] - 16 - (page - 1), side
        assert len(side["answers"]) == 4 and all(side["answers"]), side["answers"]
    assert oscar["ppl"] < 1.15 * bf16["ppl"]  # ΔNLL < 0.14 nats (the server test measured +0.044)


def test_demo_refuses_a_corrupt_rotations_file_in_one_line(smollm2_dir, tmp_path):
    bad = tmp_path / "rot.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    proc = _demo("--rotations", str(bad), "--out", str(tmp_path / "demo.png"), timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("oscar-demo: error: rotations file") and "starting" not in proc.stdout, proc.stderr
    assert not (tmp_path / "demo.png").exists()
