"""Verbatim recall through a shared, cached document: BF16 (torch_native) vs --oscar.

    python3 -m benchmarks.recall_probe --device cpu \\
        --model .cache/smollm2-135m-instruct --oscar ROT [--trials 8 --doc-tokens 1200]

Per trial: a document of essay text (held out from calibration) with ``len(--depths)``
records "The code for the <colour> <object> is <4 digits>." inserted at those depths.
A writer request (document + "Summarize") prefills the document first, so it sits in the
radix cache; then one question per record ("What is the code for the <colour> <object>?")
is sent concurrently, each prompt = the same document + its question through the chat
template: they hit the cached document (``cached_tokens`` checked) and read it back from
the KV cache (2-bit rows outside the 64 + 256 BF16 windows under --oscar). A hit = the
4 digits appear verbatim in the greedy answer. Both servers see identical prompts.
Appends one row per backend to benchmarks/results/recall.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden"]
OBJECTS = ["box", "door", "car", "book", "lamp", "chair", "boat", "key", "cup", "bag"]
SERVER_ARGS = ["--max-total-tokens", "16384", "--chunked-prefill-size", "256", "--max-running-requests", "8",
               "--random-seed", "0"]


def make_trial(tokenizer, filler: str, doc_tokens: int, depths: list[float], seed: int) -> dict:
    """Document ids and (question ids, code) per record; the document is a shared token prefix."""
    rng = random.Random(seed)
    names = rng.sample([(c, o) for c in COLOURS for o in OBJECTS], len(depths))
    codes = [f"{rng.randrange(1000, 10000)}" for _ in depths]
    words = filler.split()
    start = rng.randrange(0, max(1, len(words) - 2 * doc_tokens))
    words = words[start:start + int(doc_tokens * 0.75)]
    for (c, o), code, depth in sorted(zip(names, codes, depths), key=lambda x: -x[2]):
        at = int(depth * len(words))
        words.insert(at, f"\nThe code for the {c} {o} is {code}.\n")
    doc = " ".join(words)
    intro = "Read this document carefully.\n\n"

    def chat(question: str) -> list[int]:
        msgs = [{"role": "user", "content": intro + doc + "\n\n" + question}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    questions = [chat(f"What is the code for the {c} {o}? Answer with the number only.") for c, o in names]
    writer = chat("Summarize the document in one sentence.")
    return {"writer": writer, "questions": questions, "codes": codes, "depths": depths}


def _generate(url: str, ids: list[int], max_new: int) -> dict:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "temperature": 0}}
    r = requests.post(f"{url}/generate", json=body, timeout=900)
    r.raise_for_status()
    return r.json()


def probe(url: str, trials: list[dict], max_new: int = 12, uncached: bool = False) -> list[dict]:
    """Per (trial, record): hit, depth, cached_tokens, answer text. ``uncached``: control run,
    each question alone on an empty cache (no writer, no concurrency)."""
    rows = []
    for t, trial in enumerate(trials):
        requests.post(f"{url}/flush_cache", timeout=60)
        if uncached:
            outs = []
            for ids in trial["questions"]:
                requests.post(f"{url}/flush_cache", timeout=60)
                outs.append(_generate(url, ids, max_new))
        else:
            _generate(url, trial["writer"], 1)  # caches the document
            with ThreadPoolExecutor(len(trial["questions"])) as ex:
                outs = list(ex.map(lambda ids: _generate(url, ids, max_new), trial["questions"]))
        for out, code, depth in zip(outs, trial["codes"], trial["depths"]):
            rows.append({"trial": t, "depth": depth, "code": code, "answer": out["text"].strip(),
                         "hit": code in out["text"], "cached_tokens": out["meta_info"]["cached_tokens"]})
    return rows


def summarize(rows: list[dict]) -> dict:
    by_depth = {}
    for d in sorted({r["depth"] for r in rows}):
        sel = [r["hit"] for r in rows if r["depth"] == d]
        by_depth[str(d)] = round(sum(sel) / len(sel), 3)
    return {"n": len(rows), "exact_match": round(sum(r["hit"] for r in rows) / len(rows), 3), "by_depth": by_depth,
            "min_cached_tokens": min(r["cached_tokens"] for r in rows)}


def build_trials(model: str, n: int, doc_tokens: int, depths: list[float]) -> list[dict]:
    from transformers import AutoTokenizer

    from oscar_sglang.calib.assets import essay_files

    tok = AutoTokenizer.from_pretrained(model)
    filler = " ".join(p.read_text() for p in essay_files()[10:30])  # not the calibration text
    return [make_trial(tok, filler, doc_tokens, depths, seed) for seed in range(n)]


def run_backends(model: str, backends: dict[str, list[str]], trials: list[dict], device: str,
                 uncached: bool = False) -> dict[str, dict]:
    from oscar_sglang.launch import serve

    out = {}
    for name, args in backends.items():
        extra = ["--disable-overlap-schedule"] if device == "cpu" else []
        with serve(model, [*SERVER_ARGS, *extra, *args], device=device, env=os.environ, timeout=900) as s:
            rows = probe(s.url, trials, uncached=uncached)
        out[name] = {"summary": summarize(rows), "rows": rows}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--oscar", required=True, metavar="ROT")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--doc-tokens", type=int, default=1200)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--backends", nargs="+", default=["bf16", "oscar"], choices=["bf16", "oscar"])
    p.add_argument("--uncached", action="store_true", help="control: each question alone on an empty cache")
    args = p.parse_args(argv)
    trials = build_trials(args.model, args.trials, args.doc_tokens, args.depths)
    flags = {"bf16": ["--attention-backend", "torch_native"], "oscar": ["--oscar", args.oscar]}
    res = run_backends(args.model, {b: flags[b] for b in args.backends}, trials, args.device, args.uncached)
    from benchmarks.common import git_commit
    from benchmarks.stress import append_csv

    for name, r in res.items():
        row = {"commit": git_commit(), "device": args.device, "backend": name, "trials": args.trials,
               "mode": "alone-uncached" if args.uncached else "cached-by-writer, concurrent",
               "doc_tokens": args.doc_tokens, **r["summary"], "by_depth": json.dumps(r["summary"]["by_depth"])}
        print(json.dumps(row))
        append_csv(ROOT / "benchmarks" / "results" / "recall.csv", row)
    if len(res) == 2:
        both = sum(a["hit"] and b["hit"] for a, b in zip(res["bf16"]["rows"], res["oscar"]["rows"]))
        print(f"hit by both: {both} / {len(res['bf16']['rows'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
