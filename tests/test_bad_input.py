"""Bad input is refused through sglang's real launch path, before anything is served.

`python -m sglang.launch_server` does ``load_plugins(); args = prepare_server_args(argv);
run_server(args)`` and ``run_server`` starts with ``args.resolve_once()``, where the OSCAR
check runs (plugin.py ``_check_before_launch``). The cheap check below runs exactly those
calls in this process for every case (~0.3 s each once sglang is imported); one case per
entry point (``python -m sglang.launch_server``, ``sglang serve``, ``oscar-serve``) also runs as a
real subprocess, refused before any model or server process starts. (The loader's own messages
are unit-tested in test_rotations.py, whose malformed files are reused here.)
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from oscar_sglang.launch import ENTRIES
from oscar_sglang.testing import write_rotations, write_tiny_model
from test_rotations import MALFORMED, _malformed

# name: (served-model overrides, rotations spoiler, extra CLI args, expected message regex)
MODEL_CASES = {
    "other model: KV heads": ({"num_key_value_heads": 4}, "rotations are for 2 KV heads, model has 4"),
    "other model: head_dim": ({"head_dim": 64}, "rotations are for head_dim 32, model has 64"),
    "other model: RoPE theta": ({"rope_theta": 1e6}, "rotations are for rope_theta 10000.0, model has 1000000.0"),
    "other model: RoPE scaling": ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                                  "rotations are for rope_scaling None, model has"),
    "other model: architecture": ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
                                  "rotations are for architecture 'LlamaForCausalLM', model has 'Qwen2ForCausalLM'"),
    "hybrid linear-attention model": ({"layer_types": ["full_attention", "linear_attention"]},
                                      "mixes layer types"),
    "soft-capped attention": ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    "other model: layers": ({"num_hidden_layers": 3}, "rotations are for 2 layers, model has 3"),
    "sliding window model": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16},
                             "sliding-window attention"),
    "MLA model": ({"kv_lora_rank": 64}, "multi-head latent attention"),
}
FLAG_CASES = {
    "no rotations file": (["--attention-backend", "oscar"], "needs a rotations file: pass --oscar"),
    "split prefill backend": (["--prefill-attention-backend", "torch_native"], "serve both prefill and decode"),
    "fp8 e5m2 kv cache": (["--kv-cache-dtype", "fp8_e5m2"], "drop --kv-cache-dtype fp8_e5m2"),
    "eagle speculative decoding": (["--speculative-algorithm", "EAGLE"], "does not support speculative decoding"),
    # the tiny model's head_dim 32 has no Triton attention kernel: refused on a GPU, not served by the reference
    "head_dim without GPU kernels": (["--device", "cuda"], "on a GPU needs one quantization group per row, head_dim 64 or 128"),
    # the tiny model's 12-byte K and V rows: 8 slots hold 192 bytes, a window row 2 x 32 fp32 values
    "page too small for a window row": (["--page-size", "8"], "--page-size 8 must hold one"),
    "ngram speculative decoding": (["--speculative-algorithm", "NGRAM"], "speculative decoding"),
    "fp8 e4m3 kv cache": (["--kv-cache-dtype", "fp8_e4m3"], "drop --kv-cache-dtype"),
    "split decode backend": (["--decode-attention-backend", "torch_native"], "serve both prefill and decode"),
    "host offload": (["--enable-hierarchical-cache"], "drop --enable-hierarchical-cache"),
    "PD disaggregation": (["--disaggregation-mode", "prefill"], "drop --disaggregation-mode"),
}
FILE_CASES = {f"file: {case}": pattern for case, pattern in MALFORMED.items()}
ALL = [*FILE_CASES, *MODEL_CASES, *FLAG_CASES]
# end to end through each entry point (each launch costs an sglang import): (entry, case)
SUBPROCESS_CASES = {"launch_server": "file: wrong version", "sglang serve": "file: missing file",
                    "oscar-serve": "other model: layers"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = write_tiny_model(tmp_path_factory.mktemp("calibrated"))
    return base, write_rotations(base / "rot.safetensors", base)


def _argv(name: str, tiny, tmp_path) -> tuple[list[str], str]:
    """launch_server argv and the expected message regex of one case."""
    model, rot = tiny
    extra: list[str] = []
    if name in FILE_CASES:
        rot, pattern = _malformed(tmp_path, name.removeprefix("file: ")), FILE_CASES[name]
    elif name in MODEL_CASES:
        overrides, pattern = MODEL_CASES[name]
        model = write_tiny_model(tmp_path / "served", **overrides)
    else:
        extra, pattern = FLAG_CASES[name]
    oscar = [] if "--attention-backend" in extra else ["--oscar", str(rot)]
    argv = ["--model-path", str(model), "--load-format", "dummy", "--device", "cpu", "--skip-tokenizer-init",
            "--port", "39997", *oscar, *extra]
    return argv, pattern


@pytest.fixture(scope="module")
def launch_path():
    """The first steps of `python -m sglang.launch_server` (plugins loaded once per process)."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()

    def resolve(argv: list[str]) -> None:
        prepare_server_args(argv).resolve_once()  # what run_server() does before starting anything

    return resolve


def test_valid_configuration_resolves(launch_path, tiny, tmp_path):
    """The cheap check is not vacuous: the same argv with a good file passes it."""
    model, rot = tiny
    launch_path(["--model-path", str(model), "--load-format", "dummy", "--device", "cpu", "--oscar", str(rot)])


@pytest.mark.parametrize("name", ALL)
def test_refused_in_launch_path(launch_path, tiny, tmp_path, name):
    from oscar_sglang.settings import OscarError

    argv, pattern = _argv(name, tiny, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(OscarError) as err:
        launch_path(argv)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert re.search(pattern, msg), msg
    assert "\n" not in msg and len(msg) < 600, msg  # one line
    assert elapsed < 10, f"refusal took {elapsed:.1f} s"


@pytest.mark.parametrize("entry", SUBPROCESS_CASES)
def test_refused_by_every_entry_point_before_loading(tiny, tmp_path, entry):
    argv, pattern = _argv(SUBPROCESS_CASES[entry], tiny, tmp_path)
    t0 = time.monotonic()
    proc = subprocess.run([*ENTRIES[entry], *argv], capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - t0
    print(f"\n{entry}: refused in {elapsed:.1f} s (exit {proc.returncode})")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "OscarError: " in last and re.search(pattern, last), proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Load weight" not in out and "Uvicorn running" not in out and "KV Cache is allocated" not in out
    assert elapsed < 180  # dominated by importing sglang (~25 s on an idle 2-core machine)


def test_a_hook_sglang_failed_to_apply_stops_oscar(launch_path, tiny, monkeypatch):
    """As if sglang renamed a hooked method: apply_hooks logs and skips that hook, and --oscar
    then refuses to start with part of itself missing."""
    from collections import defaultdict

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from oscar_sglang import plugin
    from oscar_sglang.settings import OscarError

    (target, name, kind), = [h for h in plugin.HOOKS if h[0].endswith("_get_running_request_total_token_offset")]
    renamed = target + "_renamed"
    monkeypatch.setattr(plugin, "HOOKS", tuple((renamed, name, kind) if h[0] == target else h for h in plugin.HOOKS))
    hook = getattr(plugin.OscarPlugin(), name)
    monkeypatch.setattr(HookRegistry, "_hooks", defaultdict(list, {renamed: [(HookType(kind), hook, None)]}))
    HookRegistry.apply_hooks()  # logs "Failed to apply hooks to ..._renamed" and goes on, as sglang does
    model, rot = tiny
    with pytest.raises(OscarError, match=r"did not apply 1 of OSCAR's hooks .*_renamed"):
        launch_path(["--model-path", str(model), "--load-format", "dummy", "--device", "cpu", "--oscar", str(rot)])
