"""Capture post-RoPE q, k, v through transformers' attention-function interface.

:func:`observe_attention` registers one attention function, ``"oscar_capture"``, with
``transformers.AttentionInterface`` (and sdpa's mask builder under the same name), switches the
model to it, and runs prefill over the sequences. The function hands its inputs to an observer,
then delegates to sdpa, so the forward pass is unchanged. Any HF causal LM whose attention goes
through the interface works (Llama, Qwen2/3, Mistral, ...). The observer is passed as a forward
kwarg (``oscar_observer``), which transformers forwards to attention functions; nothing global
of ours holds it.

Observer signature: ``observer(layer, q, k, v, scaling)`` with ``q`` [B, H_q, T, D] and ``k``,
``v`` [B, H_kv, T, D] (post-RoPE, before the GQA repeat; query head i uses KV head
i // (H_q / H_kv)).

Accumulators (float64, memory independent of the token count):

- :class:`QueryMoments`  (pass 1): C_Q[l, h] = Q_gᵀ Q_g / rows over the queries of KV head h's group.
- :class:`ValueMoments`  (pass 2): C_V[l, h] = Σ_t w_t v_t v_tᵀ / Σ_t w_t with w_t = k_tᵀ C_Q[l, h] k_t
  (docs/calibration.md, "The method": w normalised to mean 1; ``logit-weighted``, the default). It needs the final C_Q,
  hence two passes. ``attention-weighted`` uses w_t = Σ_i p_it² over the queries reading t quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator, Literal, get_args

import torch
from tqdm.auto import tqdm

from .metrics import pair_masks
from .rotations import Windows

CAPTURE_IMPL = "oscar_capture"
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


class CaptureError(ValueError):
    """The model cannot be observed through the attention interface."""


def attention_scaling(module: Any, query: torch.Tensor, kwargs: dict) -> float:
    """The softmax scale an HF attention function was called with."""
    return float(kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5)


def _capture_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, oscar_observer: Observer | None = None, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if oscar_observer is not None:
        oscar_observer(module.layer_idx, query, key, value, attention_scaling(module, query, kwargs))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def custom_attention(model: Any, name: str, fn: Any) -> Iterator[None]:
    """Route ``model``'s attention through ``fn`` (registered as ``name``, sdpa masks) for the block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not getattr(model, "_supports_attention_backend", False):
        raise CaptureError(f"{type(model).__name__} does not route attention through transformers' "
                           "AttentionInterface; only standard HF attention models are supported")
    AttentionInterface.register(name, fn)  # idempotent
    AttentionMaskInterface.register(name, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention_capture(model: Any):
    """Switch ``model`` to the capturing attention function for the duration of the block."""
    return custom_attention(model, CAPTURE_IMPL, _capture_attention)


def observe_attention(model: Any, sequences: torch.Tensor, observer: Observer, desc: str = "prefill") -> None:
    """Prefill every row of ``sequences`` (int64 [N, T]) one at a time, calling ``observer`` per layer."""
    layers = model.config.get_text_config().num_hidden_layers
    device = next(model.parameters()).device
    with torch.inference_mode(), attention_capture(model):
        for row in tqdm(sequences, desc=desc, unit="seq", leave=False):
            seen: set[int] = set()

            def tracked(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: float) -> None:
                seen.add(layer)
                observer(layer, q, k, v, s)

            model(input_ids=row[None].to(device), use_cache=False, logits_to_keep=1, oscar_observer=tracked)
            if len(seen) != layers:
                raise CaptureError(f"{type(model).__name__}: only {len(seen)} of {layers} layers called the "
                                   "attention interface; this model is not supported")


def _group_rows(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [B, H_q, T, D] -> float64 [H_kv, B*G*T, D], the queries of each KV head's GQA group."""
    b, hq, t, d = q.shape
    g = hq // num_kv_heads
    return q.double().reshape(b, num_kv_heads, g, t, d).transpose(0, 1).reshape(num_kv_heads, b * g * t, d)


class QueryMoments:
    """Pass 1 observer: per (layer, KV head) uncentred query second moment, float64 [L, H_kv, D, D]."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(num_layers, num_kv_heads, head_dim, head_dim, dtype=torch.float64, device=device)
        self.rows = torch.zeros(num_layers, dtype=torch.float64, device=device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> None:
        qg = _group_rows(q, k.shape[1]).to(self.sums.device)
        self.sums[layer] += qg.transpose(1, 2) @ qg
        self.rows[layer] += qg.shape[1]

    def result(self) -> torch.Tensor:
        if (self.rows == 0).any():
            raise CaptureError("no queries were observed for some layers")
        return self.sums / self.rows[:, None, None, None]


ValueObjective = Literal["logit-weighted", "attention-weighted"]
VALUE_OBJECTIVES: tuple[str, ...] = get_args(ValueObjective)


def attention_weights(q: torch.Tensor, k: torch.Tensor, scaling: float, windows: Windows | None) -> torch.Tensor:
    """q [B, H_q, T, D], k [B, H_kv, T, D] -> float64 [H_kv, B*T]: w_t = Σ_i p_it² over the query heads of
    each KV head's group and the queries i that read key t from the INT2 cache (``windows``; None: all).

    Independent per-token errors e_t reach the output o_i = Σ_t p_it v_t as Σ_t p_it² |e_t|²: this is the
    diagonal of Sᵀ S in the paper's Vᵀ Sᵀ S V, restricted to the keys that are quantized.
    """
    b, hq, t, _ = q.shape
    hkv = k.shape[1]
    causal, quant = pair_masks(torch.arange(t, device=q.device), t, windows)
    out = torch.empty(hkv, b, t, dtype=torch.float64, device=q.device)
    for h in range(hkv):  # one KV head at a time bounds the [B, G, T, T] probabilities
        qh = q[:, h * (hq // hkv) : (h + 1) * (hq // hkv)].float()
        logits = (qh @ k[:, h, None].float().transpose(-1, -2) * scaling).masked_fill(~causal, float("-inf"))
        out[h] = (logits.softmax(-1).square() * quant).sum((1, 2)).double()
    return out.flatten(1)


class ValueMoments:
    """Pass 2 observer: weighted value covariance C_V = Σ_t w_t v_t v_tᵀ / Σ_t w_t, float64 [L, H_kv, D, D].

    ``objective``: ``logit-weighted`` (docs/calibration.md, "The method"): w_t = k_tᵀ C_Q k_t with
    ``c_q`` [L, H_kv, D, D] from :class:`QueryMoments`; ``attention-weighted``: w_t from
    :func:`attention_weights` under ``windows``.
    """

    def __init__(self, c_q: torch.Tensor, objective: ValueObjective = "logit-weighted",
                 windows: Windows | None = None):
        if objective not in VALUE_OBJECTIVES:
            raise ValueError(f"unknown value objective {objective!r}: expected one of {', '.join(VALUE_OBJECTIVES)}")
        self.c_q, self.objective, self.windows = c_q, objective, windows
        self.sums = torch.zeros_like(c_q)
        self.weights = torch.zeros(c_q.shape[:2], dtype=torch.float64, device=c_q.device)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> None:
        kd = k.to(self.c_q.device, torch.float64).transpose(0, 1).flatten(1, 2)  # [H, B*T, D]
        vd = v.to(self.c_q.device, torch.float64).transpose(0, 1).flatten(1, 2)
        if self.objective == "logit-weighted":
            w = torch.einsum("hnd,hde,hne->hn", kd, self.c_q[layer], kd)  # mean squared raw logit per token
        else:
            w = attention_weights(q, k, scaling, self.windows).to(self.c_q.device)
        self.sums[layer] += (vd * w[..., None]).transpose(1, 2) @ vd
        self.weights[layer] += w.sum(1)

    def result(self) -> torch.Tensor:
        if (self.weights <= 0).any():
            raise CaptureError("no values were observed for some layers (or none was read from the INT2 cache)")
        return self.sums / self.weights[..., None, None]


def collect_covariances(model: Any, sequences: torch.Tensor, num_kv_heads: int, head_dim: int,
                        value_objective: ValueObjective = "logit-weighted",
                        windows: Windows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prefill passes -> (C_K, C_V), each float64 [L, H_kv, D, D] on the model's device."""
    layers = model.config.get_text_config().num_hidden_layers
    device = next(model.parameters()).device
    qm = QueryMoments(layers, num_kv_heads, head_dim, device)
    observe_attention(model, sequences, qm, desc="pass 1/2: query moments")
    c_k = qm.result()
    vm = ValueMoments(c_k, value_objective, windows)
    observe_attention(model, sequences, vm, desc="pass 2/2: value moments")
    return c_k, vm.result()
