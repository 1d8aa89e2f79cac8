"""Concurrency and eviction stress of a running sglang server (loopback only, bounded in time and requests).

    python3 -m benchmarks.stress --device cpu \\
        --model MODEL --oscar ROT [--requests 48 --concurrency 16 --max-total-tokens 512]
    # GPU (CUDA graphs on, --tp 1): --device cuda ; a running server: --url http://127.0.0.1:PORT

What it does, against one server started with a small ``--max-total-tokens`` (or ``--url``):
1. flush; read ``kv_health`` (``oscar_sglang/health.py``): the initial free size;
2. reference pass: every distinct prompt ALONE on an EMPTY cache (flush before each);
3. stress pass: ``--requests`` requests (prompt groups sharing long prefixes, unrelated
   prompts, exact duplicates) from ``--concurrency`` clients at once, shuffled; the KV
   budget is far below what the running requests need, so sglang evicts radix-cached
   prefixes and retracts running requests;
4. checks: every request completes (length or EOS, not aborted); each output
   equals the prompt's reference (``mismatches``; ``mismatches_at_near_ties`` of them leave it
   at a step where the reference's top two tokens were within TIE_NATS, which float rounding
   that depends on the batch shape may flip: those do not fail the run); between forwards
   and at idle no window row is leaked (``kv_health`` leak fields); after ``/flush_cache`` the allocator's free
   size is exactly back at its initial value and no window page is left.

Counts reported (and appended to benchmarks/results/stress.csv): requests served,
evicted tokens (counted by the radix cache hook in health.py), retractions (sum of
sglang's per-request ``meta_info.num_retractions``), cache-hit tokens, mismatches,
leaked slots, leaked window rows.

Exact equality of greedy outputs holds for torch_native (the BF16 baseline) and for --oscar:
under the position rule a query reads every key the same way cached or not, whatever the
chunking or the batch, up to float rounding that depends on the batch shape
(``mismatches_at_near_ties``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
from oscar_sglang.health import LEAK_FIELDS  # noqa: E402  (torch only: no sglang import)


# ------------------------------------------------------------------ server calls
def generate(url: str, input_ids: list[int], max_new_tokens: int, timeout: float = 600, **extra) -> dict:
    """Greedy /generate on token ids; returns sglang's JSON (output_ids, meta_info).

    No ignore_eos: sglang reserves the full max_new_tokens of ignore_eos requests at admission
    (schedule_policy), so they never overcommit the KV pool and are never retracted."""
    body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}, **extra}
    r = requests.post(f"{url}/generate", json=body, timeout=timeout)
    r.raise_for_status()
    return r.json()


def kv_health(url: str) -> dict[str, int]:
    return requests.get(f"{url}/get_server_info", timeout=60).json()["internal_states"][0]["kv_health"]


def flush(url: str, retries: int = 30) -> None:
    """/flush_cache, retried while sglang still finishes requests (it refuses unless idle)."""
    for _ in range(retries):
        r = requests.post(f"{url}/flush_cache", timeout=60)
        if r.status_code == 200:
            return
        time.sleep(1)
    raise RuntimeError(f"/flush_cache kept failing: {r.status_code} {r.text[:200]}")


def completed(r: dict) -> bool:
    """Finished normally: max_new_tokens reached or EOS (not aborted)."""
    return (r["meta_info"].get("finish_reason") or {}).get("type") in ("length", "stop")


def leaks(health: dict[str, int]) -> dict[str, int]:
    return {k: health[k] for k in LEAK_FIELDS if health.get(k)}


# -------------------------------------------------------------------- workload
def make_prompts(vocab: int, *, groups: int = 3, per_group: int = 3, prefix_len: int = 96, suffix_len: int = 12,
                 unrelated: int = 3, seed: int = 0, avoid: tuple[int, ...] = ()) -> list[list[int]]:
    """Distinct prompts: ``groups`` long shared prefixes x ``per_group`` suffixes, plus unrelated ones."""
    rng = random.Random(seed)
    ids = [t for t in range(3, vocab) if t not in avoid]  # skip bos/eos-like low ids

    def draw(n: int) -> list[int]:
        return [rng.choice(ids) for _ in range(n)]

    prompts = []
    for _ in range(groups):
        prefix = draw(prefix_len)
        prompts += [prefix + draw(suffix_len + i) for i in range(per_group)]
    prompts += [draw(prefix_len // 2 + suffix_len + i) for i in range(unrelated)]
    return prompts


TIE_NATS = 1e-4  # a reference step whose top-2 log-probabilities are this close is a float near-tie


def reference_outputs(url: str, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
    """Each prompt alone on an empty cache: its output ids and, per step, the gap (nats) between
    its two most likely tokens."""
    out = []
    for p in prompts:
        flush(url)
        r = generate(url, p, max_new, return_logprob=True, top_logprobs_num=2)
        gaps = [top[0][0] - top[1][0] for top in r["meta_info"]["output_top_logprobs"]]
        out.append((r["output_ids"], gaps))
    return out


def near_tie(output: list[int], ref: tuple[list[int], list[float]]) -> bool:
    """The output leaves the reference first at a step where the reference's top two tokens were
    within TIE_NATS: float rounding that depends on the batch shape (CPU GEMMs are not batch
    invariant) can pick either, so it is not evidence that requests read each other's K/V."""
    ids, gaps = ref
    j = next((j for j, (a, b) in enumerate(zip(output, ids)) if a != b), min(len(output), len(ids)))
    return j < len(gaps) and gaps[j] < TIE_NATS


def stress_pass(url: str, prompts: list[list[int]], n_requests: int, concurrency: int, max_new: int,
                seed: int = 1, deadline: float | None = None) -> list[tuple[int, dict | Exception]]:
    """n_requests requests (prompt index i cycles, order shuffled) from `concurrency` clients at once."""
    order = [i % len(prompts) for i in range(n_requests)]
    random.Random(seed).shuffle(order)
    timeout = max(30.0, deadline - time.monotonic()) if deadline else 600.0

    def one(i: int):
        try:
            return i, generate(url, prompts[i], max_new, timeout=timeout)
        except Exception as e:  # counted as an incomplete request
            return i, e

    with ThreadPoolExecutor(concurrency) as ex:
        return list(ex.map(one, order))


def run(url: str, prompts: list[list[int]], *, n_requests: int, concurrency: int, max_new: int,
        time_limit: float = 1800) -> dict:
    """The whole check on a running server; returns the counts (see the module docstring)."""
    deadline = time.monotonic() + time_limit
    flush(url)
    info = requests.get(f"{url}/get_server_info", timeout=60).json()
    initial = kv_health(url)
    t0 = time.monotonic()
    ref = reference_outputs(url, prompts, max_new)
    flush(url)
    evicted0 = kv_health(url)["evicted_tokens"]
    t1 = time.monotonic()
    results = stress_pass(url, prompts, n_requests, concurrency, max_new, deadline=deadline)
    t2 = time.monotonic()
    idle = kv_health(url)
    flush(url)
    after = kv_health(url)
    done = [(i, r) for i, r in results if isinstance(r, dict) and completed(r)]
    diverged = [(i, r["output_ids"]) for i, r in done if r["output_ids"] != ref[i][0]]
    mismatched = [i for i, _ in diverged]
    ties = [i for i, out in diverged if near_tie(out, ref[i])]
    return {
        "device": info["device"],
        "backend": info["attention_backend"],
        "rotations": Path(info["quantization_param_path"] or "-").name,
        "cuda_graph": not info.get("disable_cuda_graph", True) and info["device"] == "cuda",
        "requests": n_requests,
        "served": len(done),
        "failed": len(results) - len(done),
        "distinct_prompts": len(prompts),
        "concurrency": concurrency,
        "max_new_tokens": max_new,
        "max_total_num_tokens": initial["max_total_num_tokens"],
        "tokens_needed_if_all_ran": sum(len(prompts[i]) + max_new for i, _ in results),
        "evicted_tokens": idle["evicted_tokens"] - evicted0,
        "retractions": sum(r["meta_info"].get("num_retractions", 0) for _, r in done),
        "cached_tokens": sum(r["meta_info"]["cached_tokens"] for _, r in done),
        "mismatches": len(mismatched),
        "mismatched_prompts": sorted(set(mismatched)),
        "mismatches_at_near_ties": len(ties),
        "reference_steps_at_near_ties": sum(g < TIE_NATS for _, gaps in ref for g in gaps),
        "reference_steps": sum(len(gaps) for _, gaps in ref),
        "leaked_slots": initial["available_size"] - after["available_size"],
        "idle_accounting_gap": idle["max_total_num_tokens"] - idle["available_size"] - idle["evictable_size"]
                               - idle["protected_size"],
        "leaked_window_rows": sum(leaks(idle).values()) + sum(leaks(after).values())
                              + after.get("window_pages", 0),
        "reference_s": round(t1 - t0, 1),
        "stress_s": round(t2 - t1, 1),
    }


# --------------------------------------------------------------------- output
def append_csv(path: Path, row: dict) -> None:
    """Appends ``row``; a file with other columns is rewritten under the union of both headers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = []
    if path.exists():
        with path.open(newline="") as f:
            old = list(csv.DictReader(f))
    fields = list(dict.fromkeys([*(old[0] if old else {}), *row]))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows([*old, row])


def server_args(args: argparse.Namespace) -> list[str]:
    backend = ["--oscar", args.oscar] if args.oscar else ["--attention-backend", args.backend]
    out = [*backend, "--skip-tokenizer-init", "--max-total-tokens", str(args.max_total_tokens),
           "--max-running-requests", str(args.concurrency), "--random-seed", "0", "--tp", "1",
           "--schedule-conservativeness", "0.05"]  # admit optimistically: decode runs out of KV and retracts
    if args.device == "cpu":
        out.append("--disable-overlap-schedule")  # CUDA graphs stay on for --device cuda (sglang's default)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint dir (served with --skip-tokenizer-init)")
    p.add_argument("--url", help="use this running server instead of starting one")
    p.add_argument("--oscar", metavar="ROT", help="rotations file (omit for --backend)")
    p.add_argument("--backend", default="torch_native", help="baseline attention backend without --oscar")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-total-tokens", type=int, default=512)
    p.add_argument("--prefix-len", type=int, default=96)
    p.add_argument("--vocab", type=int, help="token ids drawn below this (default: the model's vocab_size)")
    p.add_argument("--avoid", type=int, nargs="*", default=[], help="token ids never drawn into prompts")
    p.add_argument("--time-limit", type=float, default=1800, help="seconds for the stress pass")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    if not (args.url or args.model):
        p.error("give --model (start a server) or --url")
    vocab = args.vocab or json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(vocab, prefix_len=args.prefix_len, avoid=tuple(args.avoid))
    if args.url:
        ctx = nullcontext(argparse.Namespace(url=args.url))
    else:
        from oscar_sglang.launch import serve

        ctx = serve(args.model, server_args(args), device=args.device, env=os.environ)
    with ctx as server:
        res = run(server.url, prompts, n_requests=args.requests, concurrency=args.concurrency,
                  max_new=args.max_new_tokens, time_limit=args.time_limit)
    from benchmarks.common import git_commit

    row = {"commit": git_commit(), "label": args.label, **res}
    print(json.dumps(row))
    append_csv(RESULTS / "stress.csv", row)
    ok = (res["failed"] == 0 and res["leaked_slots"] == 0 and res["leaked_window_rows"] == 0
          and res["idle_accounting_gap"] == 0
          and res["mismatches"] == res["mismatches_at_near_ties"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
