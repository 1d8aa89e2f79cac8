"""Run the evaluation: build the methods, score them in the simulation and (optionally) served.

Method names (``--methods``), all at 2 bits + one fp16 scale/min per group of ``head_dim`` values:

=================  ====================================================================
``bf16``           no quantization
``naive``          per-token min-max, no rotation, no clipping, no windows
``naive-win``      the same with the position rule's full-precision keys
``kivi``           KIVI-2: keys per channel over ``head_dim``-token groups, values per token,
                   full-precision residual of the last ``kivi_residual`` tokens
``hadamard``       R = H·P, clip 0.96 / 0.92, windows (same quantizer as OSCAR)
``oscar-published``  per-layer U·H·P, clip 0.96 / 0.92, windows (``calib --granularity layer ...``)
``oscar-default``  this project's calibration defaults (per-KV-head U·H·P, clip 0.96 / 0.92)
any ``--variant``  a given rotations file, quantized like the OSCAR methods (ablations)
=================  ====================================================================

Results are plain dicts (JSON-able): ``{"sim": {method: part}, "served": {method: part}}`` with
``part = {"nll": [[per position] per sequence], "kl": ..., "top1": ..., "needle": [matched, ...],
"recall": [matched, ...]}`` (probe entries: answer tokens reproduced, ``tasks.score``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oscar_sglang.calib.metrics import Candidate
from oscar_sglang.calib.rotation import hadamard_rotation
from oscar_sglang.calib.rotations import Rotations
from oscar_sglang.kernels.rule import PositionRule

from .methods import Method, chunk_starts
from .metrics import hidden, lm_scores, probe_tokens
from .tasks import Probe, score

ALL_METHODS = ("bf16", "naive", "naive-win", "kivi", "hadamard", "oscar-published", "oscar-default")
SERVED_METHODS = ("bf16", "oscar-default")
PUBLISHED_CLIPS = (0.96, 0.92)


@dataclass(frozen=True)
class Inputs:
    sequences: torch.Tensor  # int64 [N, T] for PPL / KL
    needles: list[Probe]
    recalls: list[Probe]


@dataclass
class Setup:
    model: str
    chunk: int
    rules: list[PositionRule]  # each windowed method is evaluated under each (named METHOD@RULE when several)
    kivi_residual: int
    rotations: dict[str, Rotations] = field(default_factory=dict)  # oscar-default/-published, variants
    rotation_files: dict[str, Path] = field(default_factory=dict)


def build_methods(names: list[str], setup: Setup, num_layers: int, head_dim: int) -> list[Method]:
    """The named methods for a model of ``num_layers`` layers and ``head_dim``."""
    L, D = num_layers, head_dim
    eye = torch.eye(D).expand(L, D, D)
    had = hadamard_rotation(D).float().expand(L, D, D)
    ck, cv = [PUBLISHED_CLIPS[0]] * L, [PUBLISHED_CLIPS[1]] * L
    out = []

    def windowed(n: str, cand: Candidate) -> list[Method]:
        if len(setup.rules) == 1:
            return [Method(n, "row", cand, setup.rules[0])]
        return [Method(f"{n}@{rule.name}", "row", cand, rule) for rule in setup.rules]

    for n in names:
        if n == "bf16":
            out.append(Method(n, "exact"))
        elif n == "naive":
            out.append(Method(n, "row", Candidate(n, eye, eye, [1.0] * L, [1.0] * L)))
        elif n == "naive-win":
            out += windowed(n, Candidate(n, eye, eye, [1.0] * L, [1.0] * L))
        elif n == "kivi":
            out.append(Method(n, "kivi", recent=setup.kivi_residual, group=D))
        elif n == "hadamard":
            out += windowed(n, Candidate(n, had, had, ck, cv))
        elif n in setup.rotations:  # oscar-published, oscar-default, --variant
            r = setup.rotations[n]
            m = r.meta
            out += windowed(n, Candidate(n, r.key, r.value, list(m.clip_k), list(m.clip_v), m.key_bits, m.value_bits))
        else:
            raise ValueError(f"unknown method {n!r}; choose from {', '.join(ALL_METHODS)}")
    return out


def _log(msg: str) -> None:
    print(f"[eval {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _probe_scores(probes: list[Probe], answers: list[list[int]]) -> list[int]:
    return [score(p, a) for p, a in zip(probes, answers)]


Progress = Callable[[dict[str, dict]], None]


def run_simulation(model: Any, methods: list[Method], inputs: Inputs, chunk: int,
                   progress: Progress | None = None) -> dict[str, dict]:
    """Score every method in transformers. The first method must be ``bf16`` (the KL reference).
    ``progress`` gets the results so far after each method."""
    if methods[0].kind != "exact":
        raise ValueError("the simulation needs bf16 as its first method (reference for KL / top-1)")
    seqs = inputs.sequences
    starts = chunk_starts(seqs.shape[1], seqs.shape[1], chunk)
    refs = []
    out: dict[str, dict] = {}
    for m in methods:
        t0 = time.perf_counter()
        part: dict[str, list] = {"nll": [], "kl": [], "top1": []}
        for i, row in enumerate(seqs):
            h = hidden(model, m, row, starts)
            if m.kind == "exact" and len(refs) < len(seqs):
                refs.append(h)
            s = lm_scores(model, row, h, refs[i])
            part["nll"].append(s.nll), part["kl"].append(s.kl), part["top1"].append(s.top1)
        part["needle"] = _probe_scores(inputs.needles, [probe_tokens(model, m, p, chunk) for p in inputs.needles])
        part["recall"] = _probe_scores(inputs.recalls, [probe_tokens(model, m, p, chunk) for p in inputs.recalls])
        out[m.name] = part
        _log(f"simulated {m.name} in {time.perf_counter() - t0:.0f} s")
        if progress:
            progress(out)
    return out


def run_served(setup: Setup, names: list[str], inputs: Inputs, device: str | None,
               env: Mapping[str, str] | None, progress: Progress | None = None) -> dict[str, dict]:
    """Score ``names`` (bf16 and/or oscar-default / oscar-published) through real sglang servers."""
    from oscar_sglang.launch import serve

    from .served import greedy, input_nll, server_args, top1

    longest = max([inputs.sequences.shape[1]] + [len(p.prompt) + len(p.answer) for p in inputs.needles + inputs.recalls])
    out: dict[str, dict] = {}
    for n in names:
        t0 = time.perf_counter()
        rot = None if n == "bf16" else setup.rotation_files[n]
        with serve(setup.model, server_args(setup.chunk, longest + 64, rot), device=device, env=env) as srv:
            part: dict[str, list] = {"nll": [input_nll(srv.url, row.tolist()) for row in inputs.sequences]}
            part["needle"] = _probe_scores(inputs.needles, [greedy(srv.url, p.prompt, len(p.answer))
                                                            for p in inputs.needles])
            part["recall"] = _probe_scores(inputs.recalls, [top1(srv.url, p.prompt, p.answer) for p in inputs.recalls])
        out[n] = part
        _log(f"served {n} in {time.perf_counter() - t0:.0f} s")
        if progress:
            progress(out)
    return out
