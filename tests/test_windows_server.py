"""The position rule through real `launch_server --oscar` processes.

A tiny random Llama with REAL weights (so logprobs mean something), a small rule (sink 4, blocks
of 128 doubling from 32: a 500-token document is mostly quantized), pages of 16 (so a cached prefix can end at
every eighth of a block) and rows of every code width (2, 3, 4 bits). Three servers, started at
once, differ only in ``--chunked-prefill-size`` (64, 256, 4096); the chunk-64 one also runs 80
requests at once.

- isolation: 80 equal-length requests at once each give the tokens and logprobs they give alone;
- warm == cold == any chunking: a question after a cached document gets the same input and
  output logprobs as without the cache, at every chunk size, for documents ending at every page
  offset of a block (the hit reads the document's kept tail, or starts at the block start);
- more cached documents than the pool holds tails for (its window pages are evicted before
  packed rows): every warm answer still equals its cold one and hits at least the block start,
  and nothing leaks after a flush.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from oscar_sglang.launch import serve
from oscar_sglang.testing import write_rotations, write_tiny_real_model

from benchmarks import stress

CHUNKS = (64, 256, 4096)
ARGS = ["--skip-tokenizer-init", "--disable-overlap-schedule", "--random-seed", "0", "--dtype", "float32",
        "--page-size", "16"]
SINK, BLOCK, FIRST, PAGE = 4, 128, 32, 16  # blocks [0, 32), [32, 64), [64, 128), then every 128
QUESTION, NEW = 20, 6
ATOL = 2e-3  # float arithmetic of different batch shapes / chunkings


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = write_tiny_real_model(tmp_path_factory.mktemp("tiny_windows"))
    # mixed code widths: layer 0 keys 3 / values 2 bits, layer 1 keys 4 / values 3
    rot = write_rotations(model / "rot.safetensors", model, sink=SINK, block=BLOCK, first=FIRST, bits=([3, 4], [2, 3]))
    with ExitStack() as stack, ThreadPoolExecutor(len(CHUNKS)) as pool:
        def start(chunk):  # chunk 64: 80 requests at once; chunk 256: fewer tokens than 40 cached documents need
            size = {64: ["--max-running-requests", "80", "--max-total-tokens", "200000"],
                    256: ["--max-total-tokens", "12000"]}.get(chunk, ["--max-total-tokens", "40000"])
            return stack.enter_context(serve(model, ["--oscar", str(rot), "--chunked-prefill-size", str(chunk),
                                                     *size, *ARGS], device="cpu", timeout=900))
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


def test_warm_equals_cold_at_every_chunk_size_and_offset(servers):
    docs = [_ids(1 + k, 3 * BLOCK + PAGE * k) for k in range(BLOCK // PAGE)]  # ends at every page of a block
    question = _ids(2, QUESTION)
    gaps = {}
    for chunk, srv in servers.items():
        for doc in docs:
            stress.flush(srv.url)
            cold = _ask(srv.url, doc + question, start=len(doc))
            assert cold[3] == 0
            stress.flush(srv.url)
            _ask(srv.url, doc)  # caches the document (its sinks and tail rows attach to the tree's slots)
            warm = _ask(srv.url, doc + question, start=len(doc))
            assert warm[3] == len(doc), (chunk, len(doc), warm[3])  # the whole document: its tail was kept
            gaps[chunk, len(doc)] = _same(warm, cold)
            if chunk == 4096:
                gaps["cold 64 vs 4096", len(doc)] = _same(_ask(servers[64].url, doc + question, start=len(doc)), cold)
    print(f"measured: warm vs cold at chunks {CHUNKS}, documents of {[len(d) for d in docs]} tokens: "
          f"largest logprob gap {max(v for k, v in gaps.items() if k[0] != 'cold 64 vs 4096'):.2e}; cold chunk 64 "
          f"vs 4096 {max(v for k, v in gaps.items() if k[0] == 'cold 64 vs 4096'):.2e}")


def test_more_cached_documents_than_the_pool_keeps_tails_for_never_degrade(servers):
    url = servers[256].url
    stress.flush(url)
    n = 200  # each cached document keeps 4 sink and 72 tail rows (16 slots each here) beside its 200 tokens
    docs = [_ids(100 + d, n) for d in range(40)]
    question = _ids(3, QUESTION)
    cold = []
    for d in docs:
        cold.append(_ask(url, d + question, start=n))
        stress.flush(url)
    for d in docs:  # all documents cached one after another: the oldest tails (then sinks, then rows) go
        _ask(url, d)
    hits, gaps = [], []
    for d, want in list(zip(docs, cold))[::-1]:  # most recently cached first
        got = _ask(url, d + question, start=n)
        hits.append(got[3])
        gaps.append(_same(got, want))
    health = stress.kv_health(url)
    print(f"measured: {len(docs)} documents of {n} tokens cached in {health['max_total_num_tokens']} slots, warm vs "
          f"cold gap {max(gaps):.2e}; cached tokens per question {sorted(hits)}; evicted {health['evicted_tokens']}")
    full = n // PAGE * PAGE  # the radix tree matches whole pages
    assert hits[0] == full and min(hits) < full, hits  # the most recent document kept its tail, older ones lost theirs
    assert all(h == 0 or h >= BLOCK for h in hits), hits  # a lost tail costs its recompute from the block start
    assert not stress.leaks(health)
    stress.flush(url)
    health = stress.kv_health(url)
    assert health["window_pages"] == 0 and health["available_size"] == health["max_total_num_tokens"], health
