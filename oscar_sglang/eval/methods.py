"""KV-cache methods and their simulation inside transformers (post-RoPE K/V, chunked prefill semantics).

A :class:`Method` says which cached keys/values a query sees quantized and how they are quantized:

- ``row``: every (token, KV head) row of D values is rotated by R (``Candidate.key/value``, [L, D, D]
  or [L, H_kv, D, D]), clipped at the per-layer ratio and fake-quantized with the project's reference
  codec at the layer's bit widths (``calib.metrics.quantize_through`` -> ``kernels.codec.fake_quantize``),
  then rotated back. Which keys a query reads in full precision: the method's ``rule``
  (``kernels.rule.PositionRule``; None: every key quantized).
- ``kivi``: KIVI-2, no rotation, no clipping: keys per channel over groups of ``group`` tokens (one
  fp16 scale/min per group, the same overhead as one per row when ``group == head_dim``), values per
  token; only whole key groups older than the full-precision residual of ``recent`` tokens are
  quantized (values over the same span).
- ``exact``: BF16 (nothing quantized).

Serving semantics (the backend's position rule): the query at position t reads key j exactly iff
``rule.exact(t, j)``, and from the quantized cache otherwise, whatever the prefill chunking and the
cache history. KIVI keeps chunk semantics: its residual is counted from the start ``c0`` of
the query's chunk (``starts[i]``; a decode step counts as a chunk starting at ``i + 1``;
:func:`chunk_starts` describes any schedule).

:func:`simulate` switches a model to the ``"oscar_eval"`` attention function for a block; the
method and ``starts`` travel as the forward kwarg ``oscar_sim`` (a :class:`SimSpec`), so nothing
global of ours holds them. Queries are processed in blocks of whole chunks; each block builds one key
list ``[exact sinks | quantized middle | exact tail]`` (the part where the boundary moves inside the
block appears both quantized and exact) and a boolean mask, and calls torch's SDPA once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from oscar_sglang.calib.capture import attention_scaling, custom_attention
from oscar_sglang.calib.metrics import Candidate, quantize_through
from oscar_sglang.kernels.codec import RowLayout, fake_quantize
from oscar_sglang.kernels.rule import PositionRule

SIM_IMPL = "oscar_eval"
BLOCK = 256  # queries per SDPA call (whole chunks are kept together)


@dataclass(frozen=True)
class Method:
    """One KV-cache method. ``rot`` is None for ``exact`` and ``kivi``."""

    name: str
    kind: Literal["exact", "row", "kivi"]
    rot: Candidate | None = None
    rule: PositionRule | None = None  # row methods: the position rule (None: no full-precision keys)
    recent: int = 0  # kivi: the full-precision residual
    group: int | None = None  # kivi key token-group (default: head_dim)

    def quant_end(self, starts: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """int64 [n]: keys in [lo, end) are read quantized by the query at ``pos`` whose chunk starts
        at ``starts``. Rotated rows follow the server's position rule (``rule.exact_from``, whatever
        the chunking); KIVI's residual is chunk-aligned groups."""
        if self.kind == "exact":
            return torch.zeros_like(starts)
        if self.kind == "row":
            return pos + 1 if self.rule is None else self.rule.exact_from(pos)
        end = (starts - self.recent).clamp_min(0)
        return end // self.group * self.group

    @property
    def lo(self) -> int:
        return self.rule.sink if self.kind == "row" and self.rule is not None else 0

    def quantize(self, layer: int, k: torch.Tensor, v: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [H_kv, T, D] -> fake-quantized (fp32) keys/values for positions [0, end)."""
        k, v = k[:, :end], v[:, :end]
        if self.kind == "row":
            lk, lv = self.rot.layouts(RowLayout(k.shape[-1]), layer)  # the candidate's bit widths
            return (quantize_through(k, self.rot.key[layer], self.rot.clip_k[layer], lk),
                    quantize_through(v, self.rot.value[layer], self.rot.clip_v[layer], lv))
        g = self.group
        n = end // g  # only whole groups are ever quantized (quant_end is group-aligned)
        kg = k[:, : n * g].float().unflatten(1, (n, g)).transpose(2, 3)  # [H, n, D, g]: one row per channel
        kq = fake_quantize(kg, RowLayout(g), 1.0).transpose(2, 3).flatten(1, 2)
        return kq, fake_quantize(v.float(), RowLayout(v.shape[-1]), 1.0)


@dataclass(frozen=True)
class SimSpec:
    """What the attention function needs: the method and the chunk start of every query position."""

    method: Method
    starts: torch.Tensor  # int64 [T]


def chunk_starts(prompt_len: int, total_len: int, chunk: int) -> torch.Tensor:
    """int64 [total_len]: prompt positions are prefilled in chunks of ``chunk``; later ones are decode steps."""
    pos = torch.arange(total_len)
    return torch.where(pos < prompt_len, pos // chunk * chunk, pos + 1)


def _blocks(starts: torch.Tensor) -> list[tuple[int, int]]:
    """Query blocks [b0, b1) made of whole chunks, at most BLOCK queries unless one chunk is longer."""
    bounds = torch.nonzero(torch.diff(starts, prepend=starts[:1] - 1)).flatten().tolist() + [len(starts)]
    out, b0 = [], 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - b0 > BLOCK and a > b0:
            out.append((b0, a))
            b0 = a
    return out + [(b0, len(starts))] if b0 < len(starts) else out


def attend(method: Method, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           starts: torch.Tensor) -> torch.Tensor:
    """q [H_q, T, D], k/v [H_kv, T, D] -> attention output [H_q, T, D] (fp32) under ``method``."""
    t = q.shape[1]
    lo = method.lo
    pos = torch.arange(t, device=q.device)
    end = torch.maximum(method.quant_end(starts.to(q.device), pos), torch.tensor(lo))  # [T]; quant region [lo, end)
    qmax = int(end.max())
    kq, vq = method.quantize(layer, k, v, qmax) if qmax > lo else (k, v)
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for b0, b1 in _blocks(starts):
        e = end[b0:b1, None]
        h0, h1 = int(e.min()), int(e.max())
        qi = pos[b0:b1, None]
        sink_pos, mid_pos, tail_pos = pos[:lo], pos[lo:h1], pos[h0:b1]
        keys = torch.cat([kf[:, :lo], kq[:, lo:h1], kf[:, h0:b1]], 1)
        vals = torch.cat([vf[:, :lo], vq[:, lo:h1], vf[:, h0:b1]], 1)
        mask = torch.cat([sink_pos[None] <= qi, mid_pos[None] < e, (tail_pos[None] >= e) & (tail_pos[None] <= qi)], 1)
        out[:, b0:b1] = F.scaled_dot_product_attention(q[:, b0:b1].float(), keys, vals, attn_mask=mask,
                                                       scale=scaling, enable_gqa=True)
    return out


def _sim_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, oscar_sim: SimSpec | None = None, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if oscar_sim is None or oscar_sim.method.kind == "exact":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scaling = attention_scaling(module, query, kwargs)
    outs = [attend(oscar_sim.method, module.layer_idx, query[b], key[b], value[b], scaling, oscar_sim.starts)
            for b in range(query.shape[0])]
    return torch.stack(outs).to(query.dtype).transpose(1, 2).contiguous(), None


def simulate(model: Any):
    """Switch ``model`` to the simulating attention function (pass ``oscar_sim=SimSpec`` to forward)."""
    return custom_attention(model, SIM_IMPL, _sim_attention)
