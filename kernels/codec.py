"""Reference INT2 codec and the storage row (pure torch, CPU and GPU).

This module is the specification that the Triton kernels, the KV pool and the
calibration all follow. Everything is written from docs/method.md §3.

Storage row
-----------
One contiguous ``uint8`` row per (token, KV head) holds the codes AND the
quantization parameters, so that anything that copies KV rows byte for byte
(HiCache, ``move_kv_cache``, retraction, disaggregation) copies a complete
quantized vector::

    bytes [0, D/4)                 packed 2-bit codes, "plane" layout (below)
    bytes [D/4 + 4g, D/4 + 4g + 2) group g scale, fp16 little-endian
    bytes [D/4 + 4g + 2, D/4 + 4g + 4) group g minimum, fp16 little-endian

Plane layout: byte ``j`` (0 <= j < D/4) holds the codes of elements
``j, j + D/4, j + D/2, j + 3D/4`` in bits 0-1, 2-3, 4-5, 6-7. Unpacking a row
therefore yields four contiguous quarter-vectors, which lets the decode kernel
compute ``q . codes`` as four dense dot products (no gather, no interleave).

Head_dim 128, one group: 32 + 4 = 36 bytes per row (BF16: 256 bytes).

Quantizer (per row of D values, already rotated)
------------------------------------------------
1. Clip at the per-row quantile of |x|: ``t = sort(|x|)[clip_index(ratio, D)]``
   and ``x = clamp(x, -t, t)``; a ratio whose index is >= D disables clipping.
2. Per group: ``scale = fp16((max - min) / 3)``, ``minimum = fp16(min)``,
   ``code = clamp(floor((x - minimum) / scale + 0.5), 0, 3)`` (0 where
   scale == 0), all arithmetic in fp32 with IEEE division so that kernels can
   reproduce the codes bit for bit.
3. Dequantize: ``x_hat = code * scale + minimum``.

Non-finite inputs are replaced (NaN -> 0, +-inf -> +-fp16 max) before
quantization so that a poisoned row can never write NaN into a shared page.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MAX = 65504.0
LEVELS = 4  # 2 bits


@dataclass(frozen=True)
class RowLayout:
    """Byte layout of one storage row for a given head_dim and group size."""

    head_dim: int
    group_size: int | None = None  # None = one group per row (= head_dim)

    def __post_init__(self) -> None:
        d, g = self.head_dim, self.group
        if d <= 0 or d % 16:
            raise ValueError(f"head_dim must be a positive multiple of 16, got {d}")
        if g <= 0 or g & (g - 1) or d % g or g < 4:
            raise ValueError(f"group_size must be a power of two >= 4 dividing head_dim={d}, got {g}")

    @property
    def group(self) -> int:
        return self.head_dim if self.group_size is None else self.group_size

    @property
    def n_groups(self) -> int:
        return self.head_dim // self.group

    @property
    def code_bytes(self) -> int:
        return self.head_dim // 4

    @property
    def row_bytes(self) -> int:
        return self.code_bytes + 4 * self.n_groups


def clip_index(ratio: float, head_dim: int) -> int:
    """Index into sorted |x| that gives the clip threshold (>= head_dim: no clip)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"clip ratio must be in (0, 1], got {ratio}")
    return int(ratio * head_dim)


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Row-vector convention: ``x_rot = x @ R`` in fp32. R is [D, D] or [H, D, D]
    (per KV head, broadcast over the head axis of x[..., H, D])."""
    x32 = x.float()
    if rotation.dim() == 2:
        return x32 @ rotation.float()
    return torch.einsum("...hd,hde->...he", x32, rotation.float())


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN -> 0 and +-inf/overflow clamped to the fp16 range."""
    return torch.nan_to_num(x.float(), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clamp(-FP16_MAX, FP16_MAX)


def clip_rows(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Clamp each row (last dim) to +-(its clip_index-th smallest |x|)."""
    d = x.shape[-1]
    idx = clip_index(ratio, d)
    if idx >= d:
        return x
    t = x.abs().sort(dim=-1).values[..., idx : idx + 1]
    return torch.minimum(torch.maximum(x, -t), t)


def quantize_groups(x: torch.Tensor, layout: RowLayout, ratio: float):
    """fp32 rows [..., D] -> (codes uint8 [..., D] in 0..3, scale fp16 [..., G], minimum fp16 [..., G])."""
    xc = clip_rows(sanitize(x), ratio)
    g = xc.unflatten(-1, (layout.n_groups, layout.group))
    mn, mx = g.amin(-1), g.amax(-1)
    scale = ((mx - mn) / 3.0).half()
    minimum = mn.half()
    s32, m32 = scale.float().unsqueeze(-1), minimum.float().unsqueeze(-1)
    y = torch.floor((g - m32) / torch.where(s32 > 0, s32, torch.ones_like(s32)) + 0.5)
    codes = torch.where(s32 > 0, y.clamp(0, LEVELS - 1), torch.zeros_like(y))
    return codes.flatten(-2).to(torch.uint8), scale, minimum


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., D] in 0..3 -> [..., D/4] in plane layout."""
    planes = codes.unflatten(-1, (4, codes.shape[-1] // 4)).to(torch.uint8)
    return planes[..., 0, :] | planes[..., 1, :] << 2 | planes[..., 2, :] << 4 | planes[..., 3, :] << 6


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/4] plane layout -> uint8 codes [..., D]. Shifts run in int32: uint8 shifts
    take a slow path on CPU (~150x slower)."""
    wide = packed.to(torch.int32)
    return torch.cat([(wide >> (2 * i)) & 3 for i in range(4)], dim=-1).to(torch.uint8)


def quantize_rows(x: torch.Tensor, layout: RowLayout, clip_ratio: float) -> torch.Tensor:
    """Rotated rows [..., D] (any float dtype) -> storage rows uint8 [..., row_bytes]."""
    if x.shape[-1] != layout.head_dim:
        raise ValueError(f"last dim {x.shape[-1]} != head_dim {layout.head_dim}")
    codes, scale, minimum = quantize_groups(x, layout, clip_ratio)
    params = torch.stack([scale, minimum], dim=-1).flatten(-2).contiguous().view(torch.uint8)
    return torch.cat([pack_codes(codes), params], dim=-1)


def split_rows(rows: torch.Tensor, layout: RowLayout):
    """Storage rows -> (codes uint8 [..., D], scale fp16 [..., G], minimum fp16 [..., G])."""
    if rows.dtype != torch.uint8 or rows.shape[-1] != layout.row_bytes:
        raise ValueError(f"expected uint8 rows of {layout.row_bytes} bytes, got {rows.dtype} {tuple(rows.shape)}")
    params = rows[..., layout.code_bytes :].contiguous().view(torch.float16).unflatten(-1, (layout.n_groups, 2))
    return unpack_codes(rows[..., : layout.code_bytes]), params[..., 0], params[..., 1]


def dequantize_rows(rows: torch.Tensor, layout: RowLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Storage rows uint8 [..., row_bytes] -> rotated values [..., D]."""
    codes, scale, minimum = split_rows(rows, layout)
    g = codes.float().unflatten(-1, (layout.n_groups, layout.group))
    x = g * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return x.flatten(-2).to(dtype)


def fake_quantize(x: torch.Tensor, layout: RowLayout, clip_ratio: float) -> torch.Tensor:
    """Quantize then dequantize (fp32), for simulations and error studies."""
    return dequantize_rows(quantize_rows(x, layout, clip_ratio), layout)


def kv_bits_per_element(
    layout: RowLayout, context_len: int, sink: int = 64, recent: int = 256, window_bytes_per_elem: int = 2
) -> float:
    """Physical bits per K/V element for one sequence of ``context_len`` tokens.

    Every token has a storage row (quantize-on-write); the first ``sink`` and
    last ``recent`` tokens additionally keep a full-precision (BF16) copy.
    Counts real bytes, scale/minimum included.
    """
    if context_len <= 0:
        raise ValueError("context_len must be positive")
    windowed = min(context_len, sink + recent)
    total = context_len * layout.row_bytes + windowed * layout.head_dim * window_bytes_per_elem
    return 8.0 * total / (context_len * layout.head_dim)


def kv_bytes_per_token(layout: RowLayout, kv_heads: int, layers: int) -> int:
    """Bytes of K+V storage rows one token occupies across all layers (no windows)."""
    return 2 * layers * kv_heads * layout.row_bytes
