"""Frontend-language program: several questions about ONE shared document.

`fork` runs the questions in parallel; they share the document's prefix, which the
server's radix cache keeps (with `--oscar`: as 2-bit pages), so the document is
prefilled once. The program is `oscar_sglang.demo.ask_about_document`; it works against
any sglang server:

    python examples/shared_document_qa.py --url http://127.0.0.1:30000 --document FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sglang as sgl

from oscar_sglang.demo import QUESTIONS, ask_about_document

__all__ = ["QUESTIONS", "ask_about_document", "run"]


def run(url: str, document: str, questions: list[str] = QUESTIONS, max_tokens: int = 24) -> tuple[list[str], list[dict]]:
    """The answers, and each answer's meta info (prompt_tokens, cached_tokens, ...)."""
    state = ask_about_document.run(document=document, questions=questions, max_tokens=max_tokens,
                                   backend=sgl.RuntimeEndpoint(url))
    return state["answers"], state["meta"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--document", type=Path, required=True, help="a text file")
    p.add_argument("--chars", type=int, default=4000, help="use the first N characters of the document")
    args = p.parse_args()
    for q, a in zip(QUESTIONS, run(args.url, args.document.read_text()[: args.chars])[0]):
        print(f"Q: {q}\nA: {a.strip()}\n")


if __name__ == "__main__":
    main()
