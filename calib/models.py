"""Resolve, check and load the model to calibrate, with clear errors before any heavy work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .rotation import check_head_dim
from .rotations import ModelFingerprint, RotationsError, fingerprint_from_hf_config


class ModelError(ValueError):
    """The model cannot be found or is not supported."""


def resolve_model(spec: str) -> str:
    """A local checkpoint directory (must hold config.json) or a hub id ``org/name``."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model path {spec} is not a Hugging Face checkpoint directory (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ModelError(f"model path not found: {spec}")
    return spec


def load_config(spec: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model(spec))
    except ModelError:
        raise
    except Exception as e:  # hub/network/parse errors: one message, the cause attached
        raise ModelError(f"cannot load the config of {spec!r} ({type(e).__name__}: {e}); give a local "
                         "HF checkpoint directory or a hub id reachable from this machine") from None


def check_supported(config: Any) -> ModelFingerprint:
    """Fingerprint of a supported model; ModelError if its attention cannot be captured or rotated."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        fp = fingerprint_from_hf_config(config)
        check_head_dim(fp.head_dim)
    except (RotationsError, ValueError) as e:
        raise ModelError(f"unsupported model: {e}") from None
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelError(f"unsupported model: no causal-LM class for model_type "
                         f"{getattr(config, 'model_type', '?')!r} in transformers") from None
    if not getattr(cls, "_supports_attention_backend", False):
        raise ModelError(f"unsupported model: {cls.__name__} does not use transformers' AttentionInterface "
                         "(standard attention), so its post-RoPE q/k/v cannot be captured")
    return fp


def pick_dtype(device: str, dtype: str) -> torch.dtype:
    """'auto' = float32 on CPU (exact statistics), bfloat16 on CUDA."""
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(spec: str, device: str = "cpu", dtype: str = "auto") -> Any:
    """The causal LM in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA device is available")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=pick_dtype(device, dtype))
    return model.to(device).eval()


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(spec))
