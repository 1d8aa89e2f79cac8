"""Calibration text: read files, tokenize into fixed-length sequences, hash the tokens.

Text files (``.txt`` or anything not ``.jsonl``) are one document each; ``.jsonl`` files hold
one document per line in the ``"text"`` field. Sequences are built round-robin over the
documents (round r takes the r-th ``body``-token piece of every document, pieces joined by EOS
and cut into sequences) so that a small token budget still samples many documents.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CHARS_PER_TOKEN_BOUND = 8  # generous: English text averages ~4 characters per token


class DataError(ValueError):
    """Calibration data is missing or unusable."""


def check_files(paths: Sequence[str | Path]) -> list[Path]:
    """Paths as ``Path``; raises DataError naming every missing file."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"data file(s) not found: {', '.join(missing)}")
    if not paths:
        raise DataError("no data files given")
    return paths


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Documents from text / JSONL files, in the order given (empty ones dropped)."""
    docs: list[str] = []
    for path in check_files(paths):
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix != ".jsonl":
            docs.append(text)
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
            docs.append(str(doc))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, paths))}")
    return docs


def _prefix(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before a text (e.g. BOS), without a trailing EOS."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    while ids and ids[-1] == tokenizer.eos_token_id:
        ids.pop()
    return ids


def build_sequences(tokenizer: Any, docs: Sequence[str], num_tokens: int, seq_len: int) -> torch.Tensor:
    """int64 [N, T] with N*T >= min(num_tokens, available), T = min(seq_len, num_tokens).

    Every sequence starts with the tokenizer's prefix (BOS if it adds one). Raises DataError
    if the documents do not fill a single sequence.
    """
    if num_tokens <= 0 or seq_len <= 1:
        raise DataError(f"need a positive token budget and seq_len > 1, got {num_tokens}, {seq_len}")
    seq_len = min(seq_len, num_tokens)
    prefix = _prefix(tokenizer)
    body = seq_len - len(prefix)
    n_seq = math.ceil(num_tokens / seq_len)
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rounds = max(1, math.ceil(n_seq / len(docs)))
    while True:
        limit = rounds * body * CHARS_PER_TOKEN_BOUND
        toks = [tokenizer(d[:limit], add_special_tokens=False)["input_ids"] for d in docs]
        stream: list[int] = []
        for r in range(rounds):
            for t in toks:
                piece = t[r * body : (r + 1) * body]
                if piece:
                    stream += piece + sep
        have = len(stream) // body
        exhausted = all(len(t) <= rounds * body for t in toks)
        if have >= n_seq or exhausted:
            break
        rounds += 1
    n = min(n_seq, have)
    if n == 0:
        raise DataError(f"the data holds {len(stream)} tokens, fewer than one sequence of {seq_len}; "
                        "give more text or a smaller --seq-len")
    rows = [prefix + stream[i * body : (i + 1) * body] for i in range(n)]
    return torch.tensor(rows, dtype=torch.int64)


def token_sha256(seqs: torch.Tensor) -> str:
    """sha256 of the token ids as int64 little-endian, row-major."""
    return hashlib.sha256(seqs.to(torch.int64).contiguous().numpy().astype("<i8").tobytes()).hexdigest()


def describe(paths: Sequence[Path], default_name: str | None = None) -> str:
    """One-line description of the corpus for the rotations file's provenance."""
    if default_name:
        return f"{default_name} ({len(paths)} files)"
    names = [p.name for p in paths]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} files)" if len(names) > 8 else "")
    return f"files: {shown}"
