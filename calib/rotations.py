"""The rotations file: per-layer (or per layer and KV head) key/value rotations.

File format (``.safetensors``, never pickle)
-------------------------------------------
tensors
    ``key``    float32 [L, D, D] (granularity "layer") or [L, H_kv, D, D] ("kv-head")
    ``value``  same shape as ``key``
    optional ``key_eigenvalues`` / ``value_eigenvalues`` float32 [L, D] or [L, H_kv, D]:
    the calibration spectra (descending), written by the "oscar" recipe, read by the report.
metadata
    one key, :data:`METADATA_KEY`, holding msgspec-JSON of :class:`RotationsMeta`.

Convention: row vectors, ``x_rot = x @ R`` (see ``oscar_sglang.kernels.codec.rotate``);
``R`` is orthogonal, so ``q_rot . k_rot == q . k`` and values un-rotate with ``R.T``.

:func:`load_rotations` is strict: every problem raises :class:`RotationsError` with one
message that says what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import torch

from oscar_sglang.kernels.rule import PositionRule

FORMAT_VERSION = 2  # 2: windows hold the block rule (sink, block)
METADATA_KEY = "oscar_sglang.rotations"
ORTHOGONALITY_TOL = 1e-3
TENSORS = ("key", "value")
OPTIONAL_TENSORS = ("key_eigenvalues", "value_eigenvalues")
_RECALIBRATE = "recalibrate with: python -m oscar_sglang.calib --model MODEL --out FILE"


class RotationsError(ValueError):
    """A rotations file (or the data passed to save it) is invalid."""


class ModelFingerprint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a rotations file must match in the model it is applied to."""

    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None
    rope_scaling: str | None  # canonical JSON (sorted keys), None for plain RoPE


class Windows(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The position rule served with these rotations (``kernels.rule.PositionRule``): the first
    ``sink`` tokens and the query's own block are read in full precision; blocks are ``block``
    long, and below ``block``, with ``first`` > 0, they double from ``first``."""

    sink: int = PositionRule.sink
    block: int = PositionRule.block
    first: int = PositionRule.first

    @property
    def rule(self) -> PositionRule:
        return PositionRule(sink=self.sink, block=self.block, first=self.first)


class Recipe(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How the rotations were made."""

    name: Literal["oscar", "hadamard", "identity"]
    key_objective: str = "query-second-moment"  # C_K = Q_g^T Q_g / rows (docs/calibration.md)
    value_objective: str = "logit-weighted"  # C_V = V^T diag(w) V, w_t = k_t^T C_Q k_t (§2.3)
    bit_reversal: bool = True  # R = U·H·P (P only matters for sub-row quant groups)
    clip_search: bool = False  # per-layer clip ratios searched on held-out calibration tokens


class Provenance(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the calibration statistics came from."""

    data: str  # human-readable description of the corpus
    token_sha256: str  # sha256 of the int64 little-endian token ids, sequences concatenated
    num_tokens: int
    seq_len: int
    tool_version: str


BIT_WIDTHS = (2, 3, 4)  # kernels/codec.py BITS


class BitAllocation(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Code bit widths per layer for keys and values, and how they were chosen.

    ``budget``: the requested average physical bits per K/V element of the storage rows
    (``--kv-bits``; windows excluded), None when the widths were set by hand.
    ``key_error``/``value_error``: per layer, the attention-output error (relative MSE on
    held-out calibration tokens, the other tensor exact) at each width of ``widths``;
    empty when not measured.
    """

    key_bits: list[int]
    value_bits: list[int]
    budget: float | None = None
    objective: str = "attention-output"
    widths: list[int] = []
    key_error: list[list[float]] = []
    value_error: list[list[float]] = []


class RotationsMeta(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Typed metadata stored under :data:`METADATA_KEY`."""

    format_version: int
    model: ModelFingerprint
    granularity: Literal["layer", "kv-head"]
    clip_k: list[float]  # per layer, quantile ratio of |x| (codec.clip_rows)
    clip_v: list[float]
    recipe: Recipe
    provenance: Provenance
    windows: Windows = Windows()
    group_size: int | None = None  # quant group the clips were chosen for (None = head_dim)
    bits: BitAllocation | None = None  # None: every layer's keys and values at 2 bits (files written before widths were recorded)

    @property
    def key_bits(self) -> list[int]:
        return list(self.bits.key_bits) if self.bits else [2] * self.model.num_layers

    @property
    def value_bits(self) -> list[int]:
        return list(self.bits.value_bits) if self.bits else [2] * self.model.num_layers

    def expected_shape(self) -> tuple[int, ...]:
        m = self.model
        heads = (m.num_kv_heads,) if self.granularity == "kv-head" else ()
        return (m.num_layers, *heads, m.head_dim, m.head_dim)


@dataclass(frozen=True)
class Rotations:
    """A validated rotations file. ``key``/``value``: float32 [L, D, D] or [L, H_kv, D, D]."""

    key: torch.Tensor
    value: torch.Tensor
    meta: RotationsMeta
    key_eigenvalues: torch.Tensor | None = None
    value_eigenvalues: torch.Tensor | None = None

    def for_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(R_K, R_V) of one layer: [D, D] or [H_kv, D, D] (codec.rotate accepts both)."""
        return self.key[layer], self.value[layer]


# ---------------------------------------------------------------------------- fingerprint
def _rope(config: Any) -> tuple[float | None, str | None]:
    params = getattr(config, "rope_parameters", None)
    theta = getattr(config, "rope_theta", None)
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):  # per layer type (e.g. Gemma 3)
            params = params.get("full_attention") or next(iter(params.values()))
        theta = params.get("rope_theta", theta)
        scaling = params
    if isinstance(scaling, dict):
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        if set(scaling) <= {"rope_type", "type"} and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
    canon = json.dumps(scaling, sort_keys=True, separators=(",", ":")) if scaling else None
    return (float(theta) if theta is not None else None), canon


def fingerprint_from_hf_config(config: Any) -> ModelFingerprint:
    """Fingerprint of a transformers ``PretrainedConfig`` (text config of multimodal models)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    # sglang's CPU engine pads the head counts of a config whose heads --tp does not divide, and keeps
    # the checkpoint's counts as original_*: the fingerprint is the checkpoint's
    heads = getattr(config, "original_num_attention_heads", None) or getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        raise RotationsError(f"config of model_type {getattr(config, 'model_type', '?')!r} has no "
                             "num_attention_heads/num_hidden_layers: not a standard decoder-only attention model")
    kv_heads = (getattr(config, "original_total_num_kv_heads", None) or getattr(config, "num_key_value_heads", None)
                or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    archs = getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")]
    theta, scaling = _rope(config)
    return ModelFingerprint(architecture=str(archs[0]), num_layers=int(layers), num_attention_heads=int(heads),
                            num_kv_heads=int(kv_heads), head_dim=int(head_dim), rope_theta=theta, rope_scaling=scaling)


_FIELD_WORDS = {"num_layers": "layers", "num_attention_heads": "query heads", "num_kv_heads": "KV heads",
                "head_dim": "head_dim", "architecture": "architecture", "rope_theta": "rope_theta",
                "rope_scaling": "rope_scaling"}


def fingerprint_mismatch(have: ModelFingerprint, expect: ModelFingerprint) -> list[str]:
    """Human-readable differences, e.g. ``"rotations are for 30 layers, model has 24"``."""
    out = []
    for f in have.__struct_fields__:
        a, b = getattr(have, f), getattr(expect, f)
        if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9)):
            w = _FIELD_WORDS[f]
            counted = f in ("num_layers", "num_attention_heads", "num_kv_heads")
            out.append(f"rotations are for {a} {w}, model has {b}" if counted
                       else f"rotations are for {w} {a!r}, model has {b!r}")
    return out


# ---------------------------------------------------------------------------- validation
def _check_tensors(tensors: dict[str, torch.Tensor], meta: RotationsMeta, where: str) -> None:
    m = meta.model
    if meta.format_version != FORMAT_VERSION:
        raise RotationsError(f"{where}: format_version {meta.format_version} is not supported (this oscar-sglang "
                             f"reads version {FORMAT_VERSION}); {_RECALIBRATE}")
    try:
        meta.windows.rule  # noqa: B018 (validates sink and block)
    except ValueError as e:
        raise RotationsError(f"{where}: windows {e}; {_RECALIBRATE}") from None
    for name in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim"):
        if getattr(m, name) <= 0:
            raise RotationsError(f"{where}: metadata model.{name} must be positive, got {getattr(m, name)}")
    if m.num_attention_heads % m.num_kv_heads:
        raise RotationsError(f"{where}: {m.num_attention_heads} query heads are not a multiple of "
                             f"{m.num_kv_heads} KV heads")
    for name in ("clip_k", "clip_v"):
        ratios = getattr(meta, name)
        if len(ratios) != m.num_layers:
            raise RotationsError(f"{where}: metadata {name} has {len(ratios)} entries, expected one per layer "
                                 f"({m.num_layers})")
        bad = [r for r in ratios if not 0.0 < r <= 1.0]
        if bad:
            raise RotationsError(f"{where}: metadata {name} has ratios outside (0, 1]: {bad[:4]}")
    if meta.bits is not None:
        _check_bits(meta.bits, m.num_layers, m.head_dim, where)
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        raise RotationsError(f"{where}: missing tensor(s) {missing}; a rotations file holds 'key' and 'value'; "
                             + _RECALIBRATE)
    extra = sorted(set(tensors) - set(TENSORS) - set(OPTIONAL_TENSORS))
    if extra:
        raise RotationsError(f"{where}: unexpected tensor(s) {extra}; allowed: {list(TENSORS + OPTIONAL_TENSORS)}")
    shape = meta.expected_shape()
    for name, t in tensors.items():
        want = shape if name in TENSORS else shape[:-1]
        if t.dtype != torch.float32:
            raise RotationsError(f"{where}: tensor {name!r} has dtype {t.dtype}, expected torch.float32")
        if tuple(t.shape) != want:
            raise RotationsError(
                f"{where}: tensor {name!r} has shape {list(t.shape)} but the metadata (granularity "
                f"{meta.granularity!r}, {m.num_layers} layers, {m.num_kv_heads} KV heads, head_dim {m.head_dim}) "
                f"requires {list(want)}")
        if not torch.isfinite(t).all():
            layer = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])
            raise RotationsError(f"{where}: tensor {name!r} has non-finite values (first in layer {layer})")
    for name in TENSORS:
        r = tensors[name].double().reshape(-1, m.head_dim, m.head_dim)
        err = (r.transpose(1, 2) @ r - torch.eye(m.head_dim, dtype=torch.float64)).abs().amax(dim=(1, 2))
        worst = int(err.argmax())
        if err[worst] > ORTHOGONALITY_TOL:
            per = m.num_kv_heads if meta.granularity == "kv-head" else 1
            loc = f"layer {worst // per}" + (f" KV head {worst % per}" if per > 1 else "")
            raise RotationsError(f"{where}: tensor {name!r} {loc} is not orthogonal: max|R^T R - I| = "
                                 f"{float(err[worst]):.3g} > {ORTHOGONALITY_TOL}; {_RECALIBRATE}")


def _check_bits(bits: BitAllocation, num_layers: int, head_dim: int, where: str) -> None:
    for name in ("key_bits", "value_bits"):
        widths = getattr(bits, name)
        if len(widths) != num_layers:
            raise RotationsError(f"{where}: metadata bits.{name} has {len(widths)} entries, expected one per layer "
                                 f"({num_layers})")
        bad = sorted(set(widths) - set(BIT_WIDTHS))
        if bad:
            raise RotationsError(f"{where}: metadata bits.{name} has widths {bad}; supported: {list(BIT_WIDTHS)}")
        if 3 in widths and head_dim % 32:
            raise RotationsError(f"{where}: 3-bit rows need head_dim a multiple of 32, the model has {head_dim}")
    for name in ("key_error", "value_error"):
        err = getattr(bits, name)
        if err and (len(err) != num_layers or any(len(e) != len(bits.widths) for e in err)):
            raise RotationsError(f"{where}: metadata bits.{name} must be [layers][len(bits.widths)] or empty")


def _check_model(meta: RotationsMeta, expect: ModelFingerprint | None, where: str) -> None:
    if expect is None:
        return
    diff = fingerprint_mismatch(meta.model, expect)
    if diff:
        raise RotationsError(f"{where} was calibrated for a different model: " + "; ".join(diff)
                             + f"; calibrate this model: python -m oscar_sglang.calib --model MODEL --out FILE")


# ---------------------------------------------------------------------------- save / load
def save_rotations(path: str | Path, key: torch.Tensor, value: torch.Tensor, meta: RotationsMeta,
                   key_eigenvalues: torch.Tensor | None = None,
                   value_eigenvalues: torch.Tensor | None = None) -> Path:
    """Validate and write a rotations file (float32; see the module docstring for shapes)."""
    from safetensors.torch import save_file

    tensors = {"key": key, "value": value, "key_eigenvalues": key_eigenvalues, "value_eigenvalues": value_eigenvalues}
    tensors = {k: v.detach().to("cpu", torch.float32).clone() for k, v in tensors.items() if v is not None}
    path = Path(path)
    _check_tensors(tensors, meta, f"rotations for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: msgspec.json.encode(meta).decode()})
    tmp.replace(path)  # atomic: a reader never sees a half-written file
    return path


class _Version(msgspec.Struct):
    format_version: int


def _read_header(data: bytes, where: str) -> dict[str, Any]:
    if len(data) < 8:
        raise RotationsError(f"{where} is not a safetensors file: only {len(data)} bytes (truncated or empty)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise RotationsError(f"{where} is truncated or not a safetensors file: header claims {n} bytes but the "
                             f"file has {len(data) - 8} after the size field")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RotationsError(f"{where} is not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise RotationsError(f"{where} is not a safetensors file (header is not a JSON object)")
    return header


def _decode_meta(header: dict[str, Any], where: str) -> RotationsMeta:
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise RotationsError(f"{where} has no {METADATA_KEY!r} metadata: it was not written by "
                             f"oscar_sglang.calib; {_RECALIBRATE}")
    try:
        version = msgspec.json.decode(raw, type=_Version).format_version
    except msgspec.DecodeError as e:
        raise RotationsError(f"{where}: metadata {METADATA_KEY!r} is garbled ({e}); {_RECALIBRATE}") from None
    if version != FORMAT_VERSION:
        raise RotationsError(f"{where}: format_version {version} is not supported (this oscar-sglang reads "
                             f"version {FORMAT_VERSION}); {_RECALIBRATE} or use a matching oscar-sglang")
    try:
        return msgspec.json.decode(raw, type=RotationsMeta)
    except msgspec.DecodeError as e:
        raise RotationsError(f"{where}: metadata {METADATA_KEY!r} is garbled ({e}); {_RECALIBRATE}") from None


def load_rotations(path: str | Path, expect: ModelFingerprint | None = None) -> Rotations:
    """Read and validate a rotations file; with ``expect``, also check it fits that model."""
    from safetensors.torch import load as st_load

    path = Path(path)
    where = f"rotations file {path}"
    if not path.is_file():
        raise RotationsError(f"{where} not found; create it with: python -m oscar_sglang.calib --model MODEL "
                             f"--out {path}")
    data = path.read_bytes()
    meta = _decode_meta(_read_header(data, where), where)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt/truncated data
        raise RotationsError(f"{where} is truncated or corrupt ({e}); {_RECALIBRATE}") from None
    _check_tensors(tensors, meta, where)
    _check_model(meta, expect, where)
    return Rotations(key=tensors["key"], value=tensors["value"], meta=meta,
                     key_eigenvalues=tensors.get("key_eigenvalues"), value_eigenvalues=tensors.get("value_eigenvalues"))
