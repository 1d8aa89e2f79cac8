"""Every configuration --oscar cannot serve is refused at startup with one clear message
and a non-zero exit, before any model or server process starts: through
`python -m sglang.launch_server`, and (two of the cases) `sglang serve` and `oscar-serve`."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from oscar_sglang.launch import ENTRIES
from oscar_sglang.testing import write_rotations, write_tiny_model

CASES = {
    # name: (extra CLI args, model overrides, how the rotations file is spoiled, expected message part)
    "missing file": ([], {}, "missing", "not found"),
    "truncated file": ([], {}, "truncated", "truncated or corrupt"),
    "other model": ([], {"num_hidden_layers": 3}, None, "rotations are for 2 layers, model has 3"),
    "sliding window model": ([], {"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                                  "sliding_window": 16}, None, "sliding-window attention"),
    "MLA model": ([], {"kv_lora_rank": 64}, None, "multi-head latent attention"),
    "speculative decoding": (["--speculative-algorithm", "NGRAM"], {}, None, "speculative decoding"),
    "fp8 kv cache": (["--kv-cache-dtype", "fp8_e4m3"], {}, None, "drop --kv-cache-dtype"),
    "split backends": (["--decode-attention-backend", "torch_native"], {}, None, "serve both prefill and decode"),
    "host offload": (["--enable-hierarchical-cache"], {}, None, "drop --enable-hierarchical-cache"),
    "PD disaggregation": (["--disaggregation-mode", "prefill"], {}, None, "drop --disaggregation-mode"),
}
OTHER_ENTRIES = {  # name: (entry point, case)
    "missing file, sglang serve": ("sglang serve", "missing file"),
    "other model, oscar-serve": ("oscar-serve", "other model"),
}


def _case(name):
    return OTHER_ENTRIES.get(name, ("launch_server", name))


def _command(tmp_path, name):
    entry, case = _case(name)
    extra, overrides, spoil, _ = CASES[case]
    base = write_tiny_model(tmp_path / "calibrated")
    rot = write_rotations(tmp_path / "rot.safetensors", base)
    if spoil == "missing":
        rot = tmp_path / "nope.safetensors"
    elif spoil == "truncated":
        rot.write_bytes(rot.read_bytes()[:1000])
    model = write_tiny_model(tmp_path / "served", **overrides) if overrides else base
    cmd = [*ENTRIES[entry], "--model-path", str(model), "--load-format", "dummy",
           "--device", "cpu", "--skip-tokenizer-init", "--oscar", str(rot), "--port", "39999", *extra]
    return cmd


def _launch(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All launches run two at a time (each spends ~25 s importing sglang)."""
    cmds = {name: _command(tmp_path_factory.mktemp(name.replace(" ", "_").replace(",", "")), name)
            for name in [*CASES, *OTHER_ENTRIES]}
    with ThreadPoolExecutor(2) as ex:
        futures = {name: ex.submit(_launch, cmd) for name, cmd in cmds.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", [*CASES, *OTHER_ENTRIES])
def test_refused_with_clear_message(results, name):
    proc = results[name]
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "OscarError" in last and CASES[_case(name)[1]][3] in last, proc.stderr[-3000:]
    assert "Uvicorn running" not in proc.stderr and "scheduler" not in last.lower()
