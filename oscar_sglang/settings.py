"""OSCAR serving settings: one frozen struct, validated and read once per process
(``plugin.OscarPlugin.settings``), passed explicitly.

How the user's choice travels: ``--oscar ROT`` (or ``Engine(attention_backend="oscar",
quantization_param_path=ROT)``) sets two existing sglang fields, ``attention_backend``
and ``quantization_param_path`` (documented upstream as "the KV-cache quantization
parameter file"). ServerArgs is shipped to every scheduler subprocess, so each process
rebuilds the same settings from the same file; nothing is read from the environment.
"""

from __future__ import annotations

from typing import Any

import msgspec

from oscar_sglang.calib.rotations import Rotations, RotationsError, fingerprint_from_hf_config, load_rotations
from oscar_sglang.kernels.checks import triton_supports
from oscar_sglang.kernels.codec import CacheLayout
from oscar_sglang.kernels.rule import PositionRule

BACKEND_NAME = "oscar"


class OscarError(ValueError):
    """A configuration OSCAR cannot serve; the message says what to change."""


class OscarSettings(msgspec.Struct, frozen=True, kw_only=True):
    rotations_path: str
    head_dim: int
    group_size: int | None
    sink: int
    block: int
    first_block: int
    clip_k: tuple[float, ...]
    clip_v: tuple[float, ...]
    key_bits: tuple[int, ...]
    value_bits: tuple[int, ...]
    granularity: str

    @property
    def rule(self) -> PositionRule:
        """Which keys a query reads in full precision (the rotations file's windows)."""
        return PositionRule(sink=self.sink, block=self.block, first=self.first_block)

    @property
    def layouts(self) -> CacheLayout:
        """Every layer's key and value row layouts (the rotations file's bit allocation)."""
        return CacheLayout.of(self.head_dim, self.group_size, self.key_bits, self.value_bits)


def is_enabled(server_args: Any) -> bool:
    backends = {
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "prefill_attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
    } - {None}
    if BACKEND_NAME in backends and backends != {BACKEND_NAME}:
        raise OscarError(
            f"--oscar must serve both prefill and decode; got attention backends {sorted(backends)}. "
            "Drop --prefill-attention-backend/--decode-attention-backend."
        )
    return BACKEND_NAME in backends


def _unsupported_model_reason(config: Any) -> str | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        return "it uses multi-head latent attention (MLA), which has no per-head K/V to rotate"
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - {"full_attention", "attention"}:
        return f"it mixes layer types {sorted(layer_types)}; OSCAR serves full-attention models only"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return f"it uses sliding-window attention (window {window}); OSCAR serves full-attention models only"
    if getattr(config, "attn_logit_softcapping", None):
        return "it uses attention logit soft-capping, which the OSCAR kernels do not implement"
    return None


def check_server_args(server_args: Any, hf_config: Any) -> str:
    """The rotations file's path, once the flags and the model are ones OSCAR serves; raise OscarError."""
    path = getattr(server_args, "quantization_param_path", None)
    if not path:
        raise OscarError("--attention-backend oscar needs a rotations file: pass --oscar ROT.safetensors")
    reason = _unsupported_model_reason(hf_config)
    if reason:
        raise OscarError(f"--oscar cannot serve this model: {reason}.")
    if getattr(server_args, "speculative_algorithm", None):
        raise OscarError("--oscar does not support speculative decoding: drop --speculative-algorithm.")
    kv_dtype = getattr(server_args, "kv_cache_dtype", "auto")
    if kv_dtype not in ("auto", "bf16", "bfloat16"):
        raise OscarError(f"--oscar stores its own quantized KV cache: drop --kv-cache-dtype {kv_dtype}.")
    if getattr(server_args, "enable_hierarchical_cache", False):
        raise OscarError("--oscar: host offload (--enable-hierarchical-cache) would bring cached prefixes back without "
                         "the full-precision sink rows a hit reads (they live in window pages beside the tree's "
                         "slots): drop --enable-hierarchical-cache.")
    if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
        raise OscarError("--oscar does not transfer the full-precision sink and block rows between prefill and "
                         "decode servers: drop --disaggregation-mode.")
    if getattr(server_args, "enable_page_major_kv_layout", False) or getattr(server_args, "enable_unified_memory", False):
        raise OscarError("--oscar uses sglang's per-layer MHA pool: drop --enable-page-major-kv-layout/--enable-unified-memory.")
    return str(path)


def read_settings(path: str, hf_config: Any, device: str | None) -> tuple[OscarSettings, Rotations]:
    """Read and validate the rotations file for this model and device; raise OscarError."""
    try:
        rot = load_rotations(path, expect=fingerprint_from_hf_config(hf_config))
        meta = rot.meta
        layouts = CacheLayout.of(meta.model.head_dim, meta.group_size, meta.key_bits, meta.value_bits)
    except (RotationsError, ValueError) as e:
        raise OscarError(str(e)) from None
    unsupported = [r for r in set(layouts.key + layouts.value)
                   if not (triton_supports(r) and triton_supports(r, attention=False))]
    if (device or "cuda") != "cpu" and unsupported:
        r = unsupported[0]
        raise OscarError(
            f"--oscar on a GPU needs one quantization group per row, head_dim 64 or 128 and code widths the Triton "
            f"kernels implement; this file has head_dim {r.head_dim}, group size {r.group}, {r.bits}-bit rows. "
            "Calibrate without --group-size, or serve with --device cpu (the reference path).")
    return (
        OscarSettings(
            rotations_path=path,
            head_dim=meta.model.head_dim,
            group_size=meta.group_size,
            sink=meta.windows.sink,
            block=meta.windows.block,
            first_block=meta.windows.first,
            clip_k=tuple(meta.clip_k),
            clip_v=tuple(meta.clip_v),
            key_bits=tuple(meta.key_bits),
            value_bits=tuple(meta.value_bits),
            granularity=meta.granularity,
        ),
        rot,
    )


def load_settings(server_args: Any, hf_config: Any) -> tuple[OscarSettings, Rotations]:
    """``check_server_args`` then ``read_settings``: validate the server arguments and the
    rotations file against the model; raise OscarError."""
    path = check_server_args(server_args, hf_config)
    return read_settings(path, hf_config, getattr(server_args, "device", None))
