"""Scores of one method in the transformers simulation, and paired statistics.

- :func:`lm_scores`: per predicted position (int64 tokens [T] -> float lists of length T-1) the
  negative log-likelihood, the KL divergence KL(P_ref || P_method) of the next-token distributions and
  whether the top-1 tokens agree. The reference is the BF16 run's final hidden state [T, hidden]
  (kept instead of [T, vocab] logits: 8K x 49K floats would not fit), both go through the LM head in
  slices of :data:`SLICE` positions.
- :func:`probe_tokens`: the argmax tokens at the answer positions of a :class:`~.tasks.Probe`.
- :func:`paired`: mean and standard error of per-unit differences (paired per unit); :func:`windowed`
  turns per-position differences into per-window means first (tokens of one window are correlated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .methods import Method, SimSpec, chunk_starts, simulate
from .tasks import Probe

SLICE = 1024
WINDOW = 256  # tokens per unit of the paired NLL / KL statistics


@dataclass
class LMScores:
    nll: list[float]  # per predicted position (position i predicts token i + 1)
    kl: list[float]
    top1: list[float]  # 1.0 where argmax agrees with the reference


def hidden(model: Any, method: Method, ids: list[int] | torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [T, hidden] of one sequence under ``method``."""
    ids = torch.as_tensor(ids, dtype=torch.int64)[None].to(next(model.parameters()).device)
    with torch.inference_mode(), simulate(model):
        return model.model(input_ids=ids, use_cache=False, oscar_sim=SimSpec(method, starts)).last_hidden_state[0]


def lm_scores(model: Any, tokens: torch.Tensor, h: torch.Tensor, h_ref: torch.Tensor) -> LMScores:
    """Per-position NLL of ``tokens[1:]``, KL to the reference and top-1 agreement."""
    nll, kl, top1 = [], [], []
    target = tokens[1:].to(h.device)
    with torch.inference_mode():
        for a in range(0, len(target), SLICE):
            b = min(a + SLICE, len(target))
            lp = model.lm_head(h[a:b]).float().log_softmax(-1)
            lr = model.lm_head(h_ref[a:b]).float().log_softmax(-1)
            nll += (-lp.gather(1, target[a:b, None])[:, 0]).tolist()
            kl += (lr.exp() * (lr - lp)).sum(-1).clamp_min(0).tolist()
            top1 += (lp.argmax(-1) == lr.argmax(-1)).float().tolist()
    return LMScores(nll, kl, top1)


def probe_tokens(model: Any, method: Method, probe: Probe, chunk: int) -> list[int]:
    """Argmax tokens at the answer positions, teacher-forced (tasks.py): needle answers are decode
    steps (so this is the greedy answer), recall answers are prefilled with their prompt."""
    ids = probe.prompt + probe.answer
    n = len(probe.prompt)
    h = hidden(model, method, ids, chunk_starts(n if probe.kind == "needle" else len(ids), len(ids), chunk))
    with torch.inference_mode():
        return model.lm_head(h[n - 1 : len(ids) - 1]).argmax(-1).tolist()


def paired(diffs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan with fewer than two units)."""
    n = len(diffs)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)


def windowed(values: list[float], window: int = WINDOW) -> list[float]:
    """Means over consecutive windows of ``window`` positions (the last may be shorter)."""
    return [sum(values[a : a + window]) / len(values[a : a + window]) for a in range(0, len(values), window)]
