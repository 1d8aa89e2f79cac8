"""Frontend-language program: several questions about ONE shared document.

`fork` runs the questions in parallel; they share the document's prefix, which the
server's radix cache keeps (with `--oscar`: as 2-bit pages), so the document is
prefilled once. Works against any sglang server:

    python examples/shared_document_qa.py --url http://127.0.0.1:30000 --document FILE
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sglang as sgl

QUESTIONS = [
    "Who is the author addressing?",
    "What is the main claim?",
    "Name one example the text gives.",
    "Summarise the text in one sentence.",
]


@sgl.function
def ask_about_document(s, document: str, questions: list[str], max_tokens: int = 24):
    s += "Read the document and answer the questions.\n\nDocument:\n" + document + "\n\n"
    forks = s.fork(len(questions))
    for f, q in zip(forks, questions):
        f += "Question: " + q + "\nAnswer:" + sgl.gen("answer", max_tokens=max_tokens, temperature=0, stop="\n")
    s["answers"] = [f["answer"] for f in forks]
    s["meta"] = [f.get_meta_info("answer") for f in forks]  # prompt_tokens, cached_tokens, ... per answer


def run(url: str, document: str, questions: list[str] = QUESTIONS, max_tokens: int = 24) -> list[str]:
    backend = sgl.RuntimeEndpoint(url)
    state = ask_about_document.run(document=document, questions=questions, max_tokens=max_tokens, backend=backend)
    return state["answers"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--document", type=Path, required=True, help="a text file")
    p.add_argument("--chars", type=int, default=4000, help="use the first N characters of the document")
    args = p.parse_args()
    for q, a in zip(QUESTIONS, run(args.url, args.document.read_text()[: args.chars])):
        print(f"Q: {q}\nA: {a.strip()}\n")


if __name__ == "__main__":
    main()
