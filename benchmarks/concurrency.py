"""How many requests a server runs at once at the same KV budget, BF16 vs --oscar, default flags.

    python3 -m benchmarks.concurrency [--device cpu] [--requests 40] [--prompt-tokens 1024 3072]

One server per configuration (one at a time), each with ``--max-total-tokens`` from the SAME
budget (``sizing.split_budget``): the default budget is a 24 GB card's for Qwen3-8B
(``capacity.py``: 3.73 GiB) scaled to a 4-layer model with Qwen3-8B's attention geometry
(32 query / 8 KV heads, head_dim 128; dummy weights), so both hold the tokens the card would.
The OSCAR rotations are K3V2 (the default widths) under the default position rule. Nothing else
is set: sglang derives the running-request count and admits by memory, OSCAR's window rows
taking pages of the same pool.

``--requests`` requests arrive at once, prompts of uniform random length in ``--prompt-tokens``
(default: 2K tokens on average, positions spread over a block of the rule),
``--max-new-tokens`` greedy tokens each, streamed. A request runs from its first token to its
last; the peak number running at once is the concurrency the server admitted. Appends one row
per configuration to ``benchmarks/results/concurrency.csv``. CPU latencies are not the project's
speed claim.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.capacity import SHAPES, calculate
from benchmarks.common import git_commit

LAYERS = 4
MODEL = dict(SHAPES["qwen3-8b"], num_hidden_layers=LAYERS, intermediate_size=512, vocab_size=4096,
             max_position_embeddings=8192, torch_dtype="bfloat16")


def stream(url: str, ids: list[int], max_new: int) -> tuple[float, float]:
    """(first token, last token) times of one streamed greedy request."""
    body = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}}
    first = last = None
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                last = time.monotonic()
                first = first or last
    return first, last


def peak_running(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, nargs=2, default=[1024, 3072], metavar=("MIN", "MAX"))
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--budget-gib", type=float, default=None,
                   help="KV budget (default: the 24 GB card's for Qwen3-8B, scaled to this model's layers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concurrency.csv")
    args = p.parse_args(argv)

    from oscar_sglang.kernels.codec import CacheLayout
    from oscar_sglang.launch import serve
    from oscar_sglang.sizing import split_budget
    from oscar_sglang.testing import write_rotations, write_tiny_model

    card = calculate("qwen3-8b", int((0.85 * 24 - 16.4) * 1e9), bits=(3, 2))
    budget = int(args.budget_gib * 2**30) if args.budget_gib else int(card["kv_budget_gib"] * 2**30 * LAYERS / 36)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, MODEL["vocab_size"]) for _ in range(rng.randrange(*args.prompt_tokens))]
               for _ in range(args.requests)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "m", **MODEL)
        rot = write_rotations(Path(tmp) / "rot.safetensors", model, bits=([3] * LAYERS, [2] * LAYERS))
        rows_k3v2 = CacheLayout.of(128, None, [3] * LAYERS, [2] * LAYERS)
        split = split_budget(budget_bytes=budget, head_dim=128, kv_heads=8, layers=LAYERS, itemsize=2,
                             token_row_bytes=rows_k3v2.token_row_bytes)
        common = ["--skip-tokenizer-init", "--load-format", "dummy", "--dtype", "bfloat16", "--random-seed", "0"]
        if args.device == "cpu":
            common.append("--disable-overlap-schedule")
        bf16 = ["--attention-backend", "torch_native"] if args.device == "cpu" else []
        for name, extra, tokens in (("bf16", bf16, split.bf16_tokens), ("oscar", ["--oscar", str(rot)], split.oscar_tokens)):
            with serve(model, [*common, *extra, "--max-total-tokens", str(tokens)], device=args.device,
                       timeout=1800) as srv:
                info = requests.get(f"{srv.url}/get_server_info", timeout=60).json()
                t0 = time.monotonic()
                with ThreadPoolExecutor(args.requests) as pool:
                    spans = list(pool.map(lambda ids: stream(srv.url, ids, args.max_new_tokens), prompts))
                row = {"config": name, "device": args.device, "budget_gib": round(budget / 2**30, 3),
                       "capacity_tokens": info["max_total_num_tokens"], "page_size": info.get("page_size"),
                       "max_running_requests": info["internal_states"][0]["effective_max_running_requests_per_dp"],
                       "requests": args.requests, "prompt_tokens": "-".join(map(str, args.prompt_tokens)),
                       "max_new_tokens": args.max_new_tokens, "peak_running": peak_running(spans),
                       "bf16_requests_of_mean_length": split.bf16_tokens // (sum(map(len, prompts)) // len(prompts)
                                                                             + args.max_new_tokens),
                       "wall_s": round(time.monotonic() - t0, 1), "commit": git_commit()}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"peak running requests at one budget: OSCAR {rows[1]['peak_running']} vs BF16 {rows[0]['peak_running']} "
          f"({rows[1]['peak_running'] / max(rows[0]['peak_running'], 1):.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new = not args.out.exists()
    with args.out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
