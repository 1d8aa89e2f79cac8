"""Offline OSCAR calibration and the rotations file (torch, transformers, safetensors, msgspec;
never sglang).

Importing this package is light: the public names below load their module on first use.

- :func:`load_rotations`, :func:`save_rotations`, :func:`fingerprint_from_hf_config`,
  :class:`Rotations`, :class:`RotationsMeta`, :class:`ModelFingerprint`, :class:`RotationsError`
  (``oscar_sglang.calib.rotations``): the ``.safetensors`` rotations file.
- ``python -m oscar_sglang.calib --model M --out ROT.safetensors``: calibrate (``cli``);
  ``python -m oscar_sglang.calib report ROT.safetensors --model M``: measure (``report``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {name: "rotations" for name in (
    "FORMAT_VERSION", "METADATA_KEY", "ModelFingerprint", "Provenance", "Recipe", "Rotations", "RotationsError",
    "RotationsMeta", "Windows", "fingerprint_from_hf_config", "load_rotations", "save_rotations")}
_LAZY["export_smollm2"] = "assets"

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
