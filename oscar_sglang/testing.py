"""Helpers shared by the tests and the benchmarks (as `transformers.testing_utils` is): a tiny Llama
checkpoint config, rotations files with random orthogonal rotations, a CPU OSCAR pool and allocator."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 512, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def write_tiny_model(directory: Path, **overrides) -> Path:
    """A config-only checkpoint: sglang serves it with load_format='dummy' (random weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({**TINY_CONFIG, **overrides}))
    return directory


def write_tiny_real_model(directory: Path, *, seed: int = 0, edit=None, **overrides) -> Path:
    """A float32 checkpoint with real (seeded random) weights: every tensor-parallel rank and
    pipeline stage loads the same model, and logprobs mean something. ``edit(model)`` may change
    the weights before they are saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    write_tiny_model(directory, **{"torch_dtype": "float32", **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def random_orthogonal(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=g, dtype=torch.float64))
    return q.float().contiguous()


def write_rotations(path: Path, model_dir: Path, *, sink: int = 64, block: int = 1024, first: int = 128, seed: int = 0,
                    granularity: str = "layer", bits: tuple[list[int], list[int]] | None = None) -> Path:
    """A valid rotations file for the model in ``model_dir`` with random orthogonal R_K, R_V;
    ``bits``: per-layer (key, value) code widths (default: none recorded, i.e. all 2-bit)."""
    from transformers import AutoConfig

    from oscar_sglang.calib.rotations import (FORMAT_VERSION, BitAllocation, Provenance, Recipe, RotationsMeta,
                                              Windows, fingerprint_from_hf_config, save_rotations)
    from oscar_sglang.kernels.rule import PositionRule

    fp = fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))
    heads = (fp.num_kv_heads,) if granularity == "kv-head" else ()
    n = fp.num_layers * (heads[0] if heads else 1)
    key = random_orthogonal(n, fp.head_dim, seed).reshape(fp.num_layers, *heads, fp.head_dim, fp.head_dim).contiguous()
    value = random_orthogonal(n, fp.head_dim, seed + 1).reshape(key.shape).contiguous()
    meta = RotationsMeta(
        format_version=FORMAT_VERSION, model=fp, granularity=granularity,
        clip_k=[0.96] * fp.num_layers, clip_v=[0.92] * fp.num_layers,
        recipe=Recipe(name="identity"), windows=Windows(sink=sink, block=block, first=PositionRule(sink=sink, block=block, first=first).first),
        bits=BitAllocation(key_bits=bits[0], value_bits=bits[1]) if bits else None,
        provenance=Provenance(data="random orthogonal (tests)", token_sha256="0" * 64, num_tokens=0, seq_len=0,
                              tool_version="test"),
    )
    return save_rotations(path, key, value, meta)


def make_pool(size: int, head_num: int, head_dim: int, layers: int, *, sink: int, block: int, request_rows: int,
              page_size: int = 16, dtype=torch.float16, layouts=None, first: int = 0):
    """An OscarKVPool on CPU and the OSCAR allocator over it (sglang's real paged allocator; window
    pages come from it). ``layouts``: a CacheLayout (default all 2-bit)."""
    from oscar_sglang.allocator import OscarTokenToKVPoolAllocator
    from oscar_sglang.kernels.codec import CacheLayout, RowLayout
    from oscar_sglang.kernels.rule import PositionRule
    from oscar_sglang.pool import OscarKVPool

    layouts = layouts or CacheLayout.uniform(RowLayout(head_dim), layers)
    pool = OscarKVPool(size, page_size, dtype, head_num, head_dim, layers, "cpu", layouts=layouts,
                       rule=PositionRule(sink=sink, block=block, first=first), request_rows=request_rows)
    return pool, OscarTokenToKVPoolAllocator(size, page_size, torch.int64, "cpu", pool, need_sort=False)


def take_slots(allocator, n: int) -> torch.Tensor:
    """n token slots from the allocator (whole pages; the rest of the last page is unused)."""
    page = allocator.page_size
    return allocator.alloc(-(-n // page) * page)[:n]


def greedy_answers(url: str, prompts: list, max_new_tokens: int = 8) -> list[tuple[list, list, list]]:
    """A server's greedy tokens, the prompt's logprobs and the greedy tokens' logprobs for every
    prompt (token ids, or text)."""
    import requests

    out = []
    for prompt in prompts:
        body = {"input_ids" if isinstance(prompt, list) else "text": prompt, "return_logprob": True,
                "logprob_start_len": 0, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
        r = requests.post(f"{url}/generate", json=body, timeout=600)
        r.raise_for_status()
        meta = r.json()["meta_info"]
        out.append((r.json()["output_ids"], [lp for lp, _, _ in meta["input_token_logprobs"] if lp is not None],
                    [lp for lp, _, _ in meta["output_token_logprobs"]]))
    return out


def weights_by_name(url: str, name: str, rows: int) -> list[list[float]]:
    """The first ``rows`` rows of a served model's weight (sglang's /get_weights_by_name; an output
    projection is gathered over the tensor-parallel ranks)."""
    import requests

    r = requests.post(f"{url}/get_weights_by_name", json={"name": name, "truncate_size": rows}, timeout=120)
    r.raise_for_status()
    return r.json()


def logprob_gaps(a: list, b: list, same_tokens: bool = True) -> list[float]:
    """|logprob difference| of every token of two servers' answers to the same prompts (each answer
    ``(greedy tokens, prompt logprobs, greedy-token logprobs)``): the greedy tokens' too where they
    must be the same (asserted), else the prompts' only."""
    if same_tokens:
        assert [x[0] for x in a] == [y[0] for y in b], "greedy tokens differ"
    return [abs(p - q) for x, y in zip(a, b) for i in ((1, 2) if same_tokens else (1,)) for p, q in zip(x[i], y[i])]
