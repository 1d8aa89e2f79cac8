"""Frontend-language RAG workload: several documents, several questions about each.

Each document is one ``ask_about_document`` program (examples/shared_document_qa.py): the
document is sent once and ``fork`` asks its questions in parallel, all on its cached prefix
(with ``--oscar``: 2-bit pages). ``run_batch`` runs the documents concurrently. Question
counts follow a Zipf-like popularity (D * Q questions, document d's share proportional to
1 / (d + 1)^s, as in benchmarks/rag_prefix.py), so popular documents get more questions. Prints the answers and
the prefix-cache hit rate of the answers (sum of ``cached_tokens`` / sum of ``prompt_tokens``
from each answer's meta_info). Observed on sglang 0.5.23: fork's prefix commit
(``max_new_tokens=0``) does not leave the document in the cache, so the first question
about a document computes it and the others reuse it (with ``--oscar``, the second one up to the
start of the position rule's block the questions diverge in, the later ones all of it). Works against
any sglang server:

    python examples/rag_questions.py --url http://127.0.0.1:30000 --docs 4 --questions 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sglang as sgl

from oscar_sglang.demo import ask_about_document

QUESTIONS = (
    "Who speaks first in this passage?",
    "What is the main conflict here?",
    "Which characters are mentioned?",
    "Where does the scene take place?",
)


def question_counts(num_docs: int, questions_per_doc: int, zipf_s: float) -> list[int]:
    """Questions per document: about ``num_docs * questions_per_doc`` in all, document d's share
    proportional to 1 / (d + 1)^zipf_s, at least one each."""
    weights = [1 / (d + 1) ** zipf_s for d in range(num_docs)]
    return [max(1, round(num_docs * questions_per_doc * w / sum(weights))) for w in weights]


def shakespeare_documents(num_docs: int, chars: int) -> list[str]:
    """``num_docs`` consecutive ``chars``-character slices of the public-domain Shakespeare corpus."""
    from oscar_sglang.calib.assets import shakespeare_files

    text = ""
    for path in shakespeare_files():
        text += path.read_text()
        if len(text) >= num_docs * chars:
            break
    return [text[d * chars:(d + 1) * chars] for d in range(num_docs)]


def run(url: str, documents: list[str], *, questions_per_doc: int = 4, zipf_s: float = 0.5,
        concurrency: int = 4, max_tokens: int = 16) -> tuple[list[list[str]], list[list[dict]]]:
    """(answers, meta_info of each answer) per document."""
    counts = question_counts(len(documents), questions_per_doc, zipf_s)
    batch = [{"document": doc, "max_tokens": max_tokens,
              "questions": [f"({j + 1}) {QUESTIONS[j % len(QUESTIONS)]}" for j in range(n)]}
             for doc, n in zip(documents, counts)]
    states = ask_about_document.run_batch(batch, backend=sgl.RuntimeEndpoint(url), num_threads=concurrency,
                                          progress_bar=True)
    return [st["answers"] for st in states], [st["meta"] for st in states]


def hit_rate(metas: list[list[dict]]) -> float:
    """Sum of cached_tokens / sum of prompt_tokens over every answer."""
    flat = [m for ms in metas for m in ms]
    return sum(m["cached_tokens"] for m in flat) / max(1, sum(m["prompt_tokens"] for m in flat))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--documents", type=Path, nargs="*", help="text files (default: Shakespeare slices)")
    p.add_argument("--docs", type=int, default=4, help="number of Shakespeare slices when --documents is not given")
    p.add_argument("--chars", type=int, default=3000, help="characters per document")
    p.add_argument("--questions", type=int, default=4, help="questions per document on average (Zipf)")
    p.add_argument("--zipf", type=float, default=0.5)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    docs = ([f.read_text()[: args.chars] for f in args.documents] if args.documents
            else shakespeare_documents(args.docs, args.chars))
    answers, metas = run(args.url, docs, questions_per_doc=args.questions, zipf_s=args.zipf,
                         concurrency=args.concurrency, max_tokens=args.max_tokens)
    for d, ans in enumerate(answers):
        print(f"--- document {d} ({len(ans)} questions)")
        for a in ans:
            print(f"  A: {a.strip()}")
    print(f"prefix-cache hit rate of the answers: {hit_rate(metas):.3f}")


if __name__ == "__main__":
    main()
