"""The position rule through real `launch_server --oscar` processes (issue #12's defects).

A tiny random Llama with REAL weights (so logprobs mean something), small windows (sink 4,
recent 32: a 400-token document is mostly quantized) and rows of every code width (2, 3, 4 bits). Three servers, started at once, differ only in
``--chunked-prefill-size`` (64, 256, 4096); the chunk-64 one also runs 80 requests at once
(--max-running-requests 80: more than the 64 rings the old design shared).

- isolation: 80 equal-length requests at once each give the tokens and logprobs they give alone;
- warm == cold == any chunking: a question after a cached document gets the same input and
  output logprobs as without the cache, at every chunk size;
- more cached documents (40) than the retained store holds: every warm answer still equals its cold
  one (sinks and windows are never read from INT2), and nothing leaks after a flush.
"""

from __future__ import annotations

import random
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from oscar_sglang.launch import serve
from support import write_rotations, write_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import stress  # noqa: E402

CHUNKS = (64, 256, 4096)
ARGS = ["--skip-tokenizer-init", "--max-total-tokens", "40000", "--disable-overlap-schedule", "--random-seed", "0",
        "--dtype", "float32"]
DOC, QUESTION, NEW = 400, 20, 6
ATOL = 2e-3  # float arithmetic of different batch shapes / chunkings


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    model = write_tiny_model(tmp_path_factory.mktemp("tiny_windows"), torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(AutoConfig.from_pretrained(model)).save_pretrained(model, safe_serialization=True)
    # mixed code widths (issue #14): layer 0 keys 3 / values 2 bits, layer 1 keys 4 / values 3
    rot = write_rotations(model / "rot.safetensors", model, sink=4, recent=32, bits=([3, 4], [2, 3]))
    with ExitStack() as stack, ThreadPoolExecutor(len(CHUNKS)) as pool:
        def start(chunk):
            running = ["--max-running-requests", "80"] if chunk == 64 else []
            return stack.enter_context(serve(model, ["--oscar", str(rot), "--chunked-prefill-size", str(chunk),
                                                     *running, *ARGS], device="cpu", timeout=900))
        yield dict(zip(CHUNKS, pool.map(start, CHUNKS)))


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(n)]


def _ask(url, ids, start=None):
    """Greedy answer plus input logprobs from position ``start`` on (a cache hit may cover the rest)."""
    extra = {"return_logprob": True, "logprob_start_len": start} if start is not None else {"return_logprob": True}
    r = stress.generate(url, ids, NEW, **extra)
    meta = r["meta_info"]
    inputs = [lp for lp, _, _ in meta.get("input_token_logprobs") or [] if lp is not None]
    return r["output_ids"], inputs, [lp for lp, _, _ in meta["output_token_logprobs"]], meta["cached_tokens"]


def _same(a, b) -> float:
    """Same greedy tokens and logprobs within ATOL; returns the largest logprob gap (printed with -s)."""
    assert a[0] == b[0], (a[0], b[0])
    gap = 0.0
    for x, y in zip(a[1:3], b[1:3]):
        assert len(x) == len(y), (x, y)
        gap = max(gap, max((abs(p - q) for p, q in zip(x, y)), default=0.0))
    assert gap < ATOL, (a, b)
    return gap


def test_eighty_concurrent_requests_equal_their_lone_runs(servers):
    url = servers[64].url
    stress.flush(url)
    prompts = [_ids(100 + i, 200) for i in range(80)]
    alone = []
    for p in prompts:
        alone.append(_ask(url, p))
        stress.flush(url)
    with ThreadPoolExecutor(80) as pool:
        together = list(pool.map(lambda p: _ask(url, p), prompts))
    gaps = [_same(a, b) for a, b in zip(alone, together)]
    print(f"measured: 80 concurrent vs alone, same tokens, largest logprob gap {max(gaps):.2e}")
    assert not stress.leaks(stress.kv_health(url))


def test_warm_equals_cold_at_every_chunk_size(servers):
    doc, question = _ids(1, DOC), _ids(2, QUESTION)
    cold = {}
    for chunk, srv in servers.items():
        stress.flush(srv.url)
        cold[chunk] = _ask(srv.url, doc + question, start=DOC)
        assert cold[chunk][3] == 0
        stress.flush(srv.url)
        _ask(srv.url, doc)  # caches the document (its window is retained at its end)
        warm = _ask(srv.url, doc + question, start=DOC)
        assert warm[3] >= DOC - 1, warm[3]
        print(f"measured: chunk {chunk}, warm ({warm[3]} cached) vs cold, gap {_same(warm, cold[chunk]):.2e}")
    print(f"measured: cold chunk 64 vs 4096 gap {_same(cold[64], cold[4096]):.2e}, "
          f"256 vs 4096 {_same(cold[256], cold[4096]):.2e}")


def test_more_cached_documents_than_the_store_holds_never_degrade(servers):
    url = servers[256].url
    stress.flush(url)
    n = 100  # short documents (still mostly INT2: sink 4 + recent 32), so that 40 outnumber the store
    docs = [_ids(10 + d, n) for d in range(40)]
    question = _ids(3, QUESTION)
    before = stress.kv_health(url)
    sets = before["retained_rows"] // (4 + 32)
    assert len(docs) > sets, (len(docs), sets)
    cold = []
    for d in docs:
        cold.append(_ask(url, d + question, start=n))
        stress.flush(url)
    for d in docs:  # all documents cached one after another: the store evicts the oldest windows
        _ask(url, d)
    gaps = [_same(_ask(url, d + question, start=n), want) for d, want in zip(docs, cold)]
    print(f"measured: {len(docs)} documents cached ({sets} retained windows), warm vs cold gap {max(gaps):.2e}")
    health = stress.kv_health(url)
    assert health["window_fill_misses"] == 0 and not stress.leaks(health)
    stress.flush(url)
    health = stress.kv_health(url)
    assert health["retained_free"] == health["retained_rows"] and health["available_size"] == \
        health["max_total_num_tokens"], health
