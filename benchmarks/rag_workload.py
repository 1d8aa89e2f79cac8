"""Shared-prefix RAG workload and its HTTP driver (used by rag_prefix.py and tests/test_rag.py).

Workload: D documents of L tokens each (consecutive slices of one tokenized corpus), and
D * Q questions. Request i asks question i about document ``doc[i]``; ``doc`` is drawn
from a Zipf-like popularity (weight of the k-th most popular document ~ 1 / k**s, the
ranking a seeded permutation), so arrivals interleave across documents. A prompt is
token ids ``header + document + question``: every question about a document shares its
``header + document`` prefix exactly, which is what sglang's radix cache can reuse.

Driver: a closed loop of ``concurrency`` clients; each streams one ``/generate`` request
(``input_ids``, greedy, ``ignore_eos`` so every request decodes the same number of
tokens) and records prompt/cached/completion tokens (``meta_info``), time to first
token and the gaps between streamed tokens.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

QUESTIONS = (
    "Who speaks first in this passage?",
    "What is the main conflict here?",
    "Quote one line that shows a strong emotion.",
    "Which characters are mentioned?",
    "Where does the scene take place?",
    "Summarise the passage in one sentence.",
)
HEADER = "Read the document and answer the question.\n\nDocument:\n"


@dataclass(frozen=True)
class Workload:
    prompts: tuple[tuple[int, ...], ...]  # input_ids per request, in arrival order
    doc_of: tuple[int, ...]  # document index per request
    doc_tokens: int  # L
    prefix_tokens: int  # header + L: what every question about one document shares
    num_docs: int


@dataclass
class RequestStats:
    doc: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = float("nan")
    itl_s: list[float] = field(default_factory=list)  # one entry per token after the first
    e2e_s: float = float("nan")


def zipf_order(num_docs: int, num_requests: int, s: float, seed: int) -> list[int]:
    """Document index of each arrival: Zipf(s) popularity over a seeded ranking of the documents."""
    rng = random.Random(seed)
    ranking = list(range(num_docs))
    rng.shuffle(ranking)
    weights = [1.0 / (rank + 1) ** s for rank in range(num_docs)]
    return [ranking[r] for r in rng.choices(range(num_docs), weights=weights, k=num_requests)]


def build_workload(corpus: Sequence[int], header: Sequence[int], questions: Sequence[Sequence[int]], *,
                   num_docs: int, doc_tokens: int, questions_per_doc: int, zipf_s: float, seed: int,
                   vocab_size: int | None = None) -> Workload:
    """Token-id prompts. ``vocab_size`` folds ids into a smaller vocabulary (dummy-weight models)."""
    need = num_docs * doc_tokens
    if len(corpus) < need:
        raise ValueError(f"corpus has {len(corpus)} tokens, {num_docs} x {doc_tokens} = {need} needed")
    fold = (lambda ids: tuple(t % vocab_size for t in ids)) if vocab_size else tuple
    docs = [fold(corpus[d * doc_tokens:(d + 1) * doc_tokens]) for d in range(num_docs)]
    head, qs = fold(header), [fold(q) for q in questions]
    order = zipf_order(num_docs, num_docs * questions_per_doc, zipf_s, seed)
    prompts = tuple(head + docs[d] + qs[i % len(qs)] for i, d in enumerate(order))
    return Workload(prompts=prompts, doc_of=tuple(order), doc_tokens=doc_tokens,
                    prefix_tokens=len(head) + doc_tokens, num_docs=num_docs)


def question_texts(n: int) -> list[str]:
    """n distinct question suffixes (numbered, so no two requests share their whole prompt)."""
    return [f"\n\nQuestion {i + 1}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:" for i in range(n)]


def stream_request(url: str, input_ids: Sequence[int], max_new_tokens: int, doc: int,
                   timeout: float = 1800) -> RequestStats:
    """One streamed /generate call; token times are taken when each chunk arrives."""
    import requests

    stats = RequestStats(doc=doc)
    body = {"input_ids": list(input_ids), "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    start = last = time.perf_counter()
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            meta = json.loads(line[5:])["meta_info"]
            now, new = time.perf_counter(), meta["completion_tokens"] - stats.completion_tokens
            if new > 0:
                if stats.completion_tokens == 0:
                    stats.ttft_s = now - start
                    new -= 1
                stats.itl_s += [(now - last) / new] * new if new else []
                last = now
            stats.prompt_tokens, stats.cached_tokens = meta["prompt_tokens"], meta["cached_tokens"]
            stats.completion_tokens = meta["completion_tokens"]
    stats.e2e_s = time.perf_counter() - start
    return stats


def drive(url: str, workload: Workload, *, concurrency: int, max_new_tokens: int, desc: str = "",
          progress: bool = True) -> tuple[list[RequestStats], float]:
    """Send every request, ``concurrency`` in flight, in arrival order; (stats in order, wall s)."""
    from tqdm import tqdm

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool, tqdm(total=len(workload.prompts), desc=desc,
                                                       disable=not progress, unit="req") as bar:
        futures = {pool.submit(stream_request, url, p, max_new_tokens, d): i
                   for i, (p, d) in enumerate(zip(workload.prompts, workload.doc_of))}
        stats: list[RequestStats | None] = [None] * len(futures)
        for fut in as_completed(futures):
            stats[futures[fut]] = fut.result()
            bar.update()
    return stats, time.perf_counter() - start


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def ideal_hit_rate(wl: Workload, page_size: int) -> float:
    """The hit rate of a cache that never forgets: every question after its document's first one
    reads the whole shared prefix (page-aligned, as sglang's radix cache keys whole pages)."""
    seen, cached = set(), 0
    for d in wl.doc_of:
        cached += wl.prefix_tokens // page_size * page_size if d in seen else 0
        seen.add(d)
    return round(cached / sum(map(len, wl.prompts)), 4)


def summarize(stats: Sequence[RequestStats], wall_s: float) -> dict:
    """Hit rate, prefill tokens computed, throughput and latency percentiles (ms) of one run."""
    prompt = sum(s.prompt_tokens for s in stats)
    cached = sum(s.cached_tokens for s in stats)
    ttft = [s.ttft_s for s in stats]
    itl = [x for s in stats for x in s.itl_s]
    return {
        "requests": len(stats),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": round(cached / prompt, 4) if prompt else float("nan"),
        "prefill_tokens_computed": prompt - cached,
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(stats) / wall_s, 4),
        "output_tokens_per_s": round(sum(s.completion_tokens for s in stats) / wall_s, 2),
        "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1),
        "ttft_p90_ms": round(1e3 * _pct(ttft, 90), 1),
        "ttft_p99_ms": round(1e3 * _pct(ttft, 99), 1),
        "itl_p50_ms": round(1e3 * _pct(itl, 50), 1),
        "itl_p90_ms": round(1e3 * _pct(itl, 90), 1),
        "itl_p99_ms": round(1e3 * _pct(itl, 99), 1),
    }
