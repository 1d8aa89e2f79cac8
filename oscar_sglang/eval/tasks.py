"""Evaluation inputs, built as token ids (so the simulation and the server see identical tokens).

- :func:`lm_sequences`: int64 [N, T] held-out text (the essays by default) for perplexity / KL. The
  model is causal and chunk boundaries depend only on the position, so the first ``n`` positions of
  a T-token row score exactly like an ``n``-token sequence: one row gives PPL at every context <= T.
- :class:`Probe`: ``prompt`` ids, then ``answer`` ids. Both kinds are scored from one teacher-forced
  forward over ``prompt + answer`` (the argmax at each answer position given the true text before it):
- :func:`needle_probes`: a random 5-digit code sentence inserted at a relative depth of an essay
  haystack of ``length`` tokens, then the question; exact match of the code, greedily. A greedy
  generation equals the answer iff the argmax after ``prompt + answer[:j]`` is ``answer[j]`` for every
  j, so the answer positions are decode steps (chunk size 1) and the score is :func:`matched_prefix`.
- :func:`recall_probes`: an essay context of ``length`` tokens; after it, the first ``cue`` tokens of
  a passage taken from the context at a relative depth; the answer is the next ``span`` tokens of the
  passage. Verbatim recall = copy accuracy: the number of answer tokens that are the top-1 prediction
  given the true text before them (:func:`matched_tokens`; ``prompt + answer`` is one prefill, as the
  server's input top-logprobs see it). An exact-prefix score would hinge on the first token: SmolLM2
  copies ~85% of a passage's tokens in BF16, yet often opens with a space where the text has a newline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from oscar_sglang.calib.data import build_sequences

NEEDLE = "The secret code is"
QUESTION = "\n\nQuestion: what is the secret code mentioned in the text above?\nAnswer: " + NEEDLE


@dataclass(frozen=True)
class Probe:
    kind: str  # "needle" or "recall"
    length: int  # requested context length (tokens)
    depth: float
    prompt: list[int]
    answer: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


def lm_sequences(tokenizer: Any, docs: list[str], num: int, length: int) -> torch.Tensor:
    """int64 [num, length] rows of held-out text (round-robin over the documents)."""
    seqs = build_sequences(tokenizer, docs, num * length, length)
    if len(seqs) < num or seqs.shape[1] < length:
        raise ValueError(f"the evaluation text holds fewer than {num} x {length} tokens")
    return seqs[:num]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_stream(tokenizer: Any, docs: list[str]) -> list[int]:
    """All documents tokenized once, joined by EOS: the source of haystacks and recall contexts."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [t for d in docs for t in _ids(tokenizer, d) + sep]


def _haystack(stream: list[int], length: int, index: int) -> list[int]:
    """``length`` tokens of the stream; ``index`` picks a different stretch of text per trial."""
    if length <= 0 or len(stream) <= length:
        raise ValueError(f"cannot cut a {length}-token context from {len(stream)} tokens of text")
    start = index * 7919 % (len(stream) - length)  # a prime stride spreads the trials over the corpus
    return stream[start : start + length]


def needle_probes(tokenizer: Any, stream: list[int], lengths: list[int], depths: list[float],
                  seed: int = 0) -> list[Probe]:
    """One probe per (length, depth): a fresh random code and a different haystack each."""
    rng = random.Random(seed)
    question = _ids(tokenizer, QUESTION)
    out = []
    for i, (length, depth) in enumerate((n, d) for n in lengths for d in depths):
        code = f"{rng.randrange(10**4, 10**5)}"
        answer = _ids(tokenizer, f" {code}.")
        needle = _ids(tokenizer, f"\n{NEEDLE}") + answer + _ids(tokenizer, " Remember it.\n")
        hay = _haystack(stream, length - len(needle) - len(question), i)
        cut = int(depth * len(hay))
        out.append(Probe("needle", length, depth, hay[:cut] + needle + hay[cut:] + question, answer,
                         {"code": code}))
    return out


def recall_probes(tokenizer: Any, stream: list[int], lengths: list[int], depths: list[float], cue: int = 16,
                  span: int = 32) -> list[Probe]:
    """One probe per (length, depth); the context comes from a different stretch than the needles'."""
    sep = _ids(tokenizer, "\n\nRepeat the passage that begins:\n")
    out = []
    for i, (length, depth) in enumerate((n, d) for n in lengths for d in depths):
        ctx = _haystack(stream, length - len(sep) - cue, 1000 + i)
        p = min(int(depth * len(ctx)), len(ctx) - cue - span)
        passage = ctx[p : p + cue + span]
        out.append(Probe("recall", length, depth, ctx + sep + passage[:cue], passage[cue:], {"offset": p}))
    return out


def matched_tokens(got: list[int], want: list[int]) -> int:
    """Number of positions where ``got`` equals ``want``."""
    return sum(a == b for a, b in zip(got, want))


def score(probe: Probe, got: list[int]) -> int:
    """Answer tokens reproduced: exact prefix for needles (greedy), per position for recall (copying)."""
    return (matched_prefix if probe.kind == "needle" else matched_tokens)(got, probe.answer)


def matched_prefix(got: list[int], want: list[int]) -> int:
    """Number of leading tokens of ``want`` reproduced exactly by ``got``."""
    n = 0
    for a, b in zip(got, want):
        if a != b:
            break
        n += 1
    return n
