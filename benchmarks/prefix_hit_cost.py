"""What a prefix hit costs under the position rule: a short question over a cached long document.

    python3 -m benchmarks.prefix_hit_cost [--doc-tokens 4096 4000 --question-tokens 64 --device cpu]

One BF16 server (torch_native on CPU) and one ``--oscar`` server (SmolLM2-135M, the demo's
calibration), the same flags otherwise. For each, two request orders over one document:

- ``committed``: the document alone first (as sglang's frontend ``fork`` does), then three
  document + question requests;
- ``stream``: three document + question requests straight away (a RAG stream with no commit).

Under --oscar a hit reads the cached document's quantized rows, its sinks and the full-precision
rows of the block it ends in (kept as long as memory allows, after the request that cached it);
without them it recomputes from that block's start. So every question after the first prefills
at most its own tokens + (block - 1) + (page - 1) (``bound``: the rule's, sglang's radix cache
keys whole pages of ``page`` slots).

Reported per request: prompt tokens, ``cached_tokens``, tokens prefilled (prompt − cached), the
bound and the request's latency with one new token (≈ time to first token). Written to
``benchmarks/results/prefix_hit_cost.csv``. CPU latencies are not the project's speed claim.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
from benchmarks import stress

from oscar_sglang import demo
from oscar_sglang.launch import serve


def token_ids(model: Path, n_doc: int, n_q: int, n_questions: int) -> tuple[list[int], list[list[int]]]:
    from transformers import AutoTokenizer

    from oscar_sglang.calib.assets import essay_files

    text = "\n\n".join(f.read_text() for f in essay_files())
    ids = AutoTokenizer.from_pretrained(model)(text)["input_ids"]
    if len(ids) < n_doc + n_q * n_questions:
        raise SystemExit(f"the essays have {len(ids)} tokens, fewer than {n_doc + n_q * n_questions}")
    doc = ids[:n_doc]
    rest = ids[n_doc:]
    return doc, [rest[i * n_q:(i + 1) * n_q] for i in range(n_questions)]


def drive(url: str, doc: list[int], questions: list[list[int]], order: str, side: str, bound: int) -> list[dict]:
    """``bound``: what the rule lets a question after the first prefill beyond its own tokens."""
    stress.flush(url)
    rows = []
    if order == "committed":
        stress.generate(url, doc, 1)
    for i, q in enumerate(questions):
        t0 = time.perf_counter()
        meta = stress.generate(url, doc + q, 1)["meta_info"]
        seconds = time.perf_counter() - t0
        prompt = len(doc) + len(q)
        rows.append(dict(side=side, doc_tokens=len(doc), order=order, request=i + 1, prompt=prompt,
                         cached=meta["cached_tokens"], prefilled=prompt - meta["cached_tokens"],
                         bound=len(q) + bound if i or order == "committed" else prompt, seconds=round(seconds, 3)))
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc-tokens", type=int, nargs="+", default=[4096, 4000])
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".cache")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prefix_hit_cost.csv")
    args = p.parse_args(argv)
    args.rotations = None
    model, _, rotations, _ = demo.prepare(args)
    docs = [token_ids(model, n, args.question_tokens, 3) for n in args.doc_tokens]
    common = ["--skip-tokenizer-init", "--max-total-tokens", str(4 * (max(args.doc_tokens) + 256)),
              "--random-seed", "0"]
    bf16 = ["--attention-backend", "torch_native"] if args.device == "cpu" else []
    rows = []
    from oscar_sglang.calib.rotations import load_rotations

    rule = load_rotations(rotations).meta.windows.rule
    for side, extra in (("bf16", bf16), ("oscar", ["--oscar", str(rotations)])):
        with serve(model, [*common, *extra], device=args.device, timeout=900) as srv:
            page = int(requests.get(f"{srv.url}/get_server_info", timeout=60).json().get("page_size") or 1)
            bound = (rule.block - 1 if side == "oscar" else 0) + page - 1
            for doc, questions in docs:
                for order in ("committed", "stream"):
                    rows += drive(srv.url, doc, questions, order, side, bound)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    over = [r for r in rows if r["prefilled"] > r["bound"]]
    print(f"wrote {args.out}; {len(over)} requests prefilled more than the bound{': ' + str(over) if over else ''}")
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
