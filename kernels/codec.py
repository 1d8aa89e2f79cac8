"""Reference codec and the storage row (pure torch, CPU and GPU).

This module is the specification that the Triton kernels, the KV pool and the
calibration all follow (the quantizer of docs/calibration.md); the 3- and 4-bit rows
extend the 2-bit row without changing it.

Storage row
-----------
One contiguous ``uint8`` row per (token, KV head) holds the codes AND the
quantization parameters, so that anything that copies KV rows byte for byte
(HiCache, ``move_kv_cache``, retraction, disaggregation) copies a complete
quantized vector. A row of ``bits`` = b in {2, 3, 4} holds codes c in 0..2^b - 1
as ``c = lo + 4 * hi``::

    bytes [0, D/4)                 lo: the 2 low bits of every code, "plane" layout (below)
    bytes [D/4, D/4 + H)           hi (b > 2): H = D/8 for b = 3 (one bit per code),
                                   D/4 for b = 4 (two bits per code, plane layout again)
    then per group g, at P = D/4 + H:
    bytes [P + 4g, P + 4g + 2)     group g scale, fp16 little-endian
    bytes [P + 4g + 2, P + 4g + 4) group g minimum, fp16 little-endian

Plane layout: byte ``j`` (0 <= j < D/4) holds the codes of elements
``j, j + D/4, j + D/2, j + 3D/4`` in bits 0-1, 2-3, 4-5, 6-7. Unpacking a row
therefore yields four contiguous quarter-vectors, which lets the decode kernel
compute ``q . codes`` as four dense dot products (no gather, no interleave).
The 1-bit plane follows the same quarters: byte ``k`` (0 <= k < D/8) holds the
high bits of elements ``j + p D/4`` for j = 2k in bit 2p and for j = 2k + 1 in bit
2p + 1; read as 16-bit words, word w covers the same j = 4w..4w+3 as the 32-bit word
w of the 2-bit plane, and each element's bit sits two places above where its 2-bit code
does in that word's bytes (shifted as one, both planes unpack by masks alone).

Head_dim 128, one group: 36 / 52 / 68 bytes per row at 2 / 3 / 4 bits, i.e.
2.25 / 3.25 / 4.25 physical bits per element (BF16: 256 bytes, 16 bits).

Quantizer (per row of D values, already rotated)
------------------------------------------------
1. Clip at the per-row quantile of |x|: ``t = sort(|x|)[clip_index(ratio, D)]``
   and ``x = clamp(x, -t, t)``; a ratio whose index is >= D disables clipping.
2. Per group, with ``top = 2^bits - 1``: ``scale = fp16((max - min) / top)``,
   ``minimum = fp16(min)``, ``code = clamp(floor((x - minimum) / scale + 0.5), 0, top)``
   (0 where scale == 0), all arithmetic in fp32 with IEEE division so that kernels
   can reproduce the codes bit for bit.
3. Dequantize: ``x_hat = code * scale + minimum``.

Non-finite inputs are replaced (NaN -> 0, +-inf -> +-fp16 max) before
quantization so that a poisoned row can never write NaN into a shared page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rule import PositionRule

FP16_MAX = 65504.0
BITS = (2, 3, 4)  # supported code widths


def widths_for(head_dim: int) -> tuple[int, ...]:
    """The code widths a row of ``head_dim`` values can use (3 bits needs head_dim % 32 == 0)."""
    return tuple(b for b in BITS if b != 3 or head_dim % 32 == 0)


@dataclass(frozen=True)
class RowLayout:
    """Byte layout of one storage row for a given head_dim and group size."""

    head_dim: int
    group_size: int | None = None  # None = one group per row (= head_dim)
    bits: int = 2

    def __post_init__(self) -> None:
        d, g = self.head_dim, self.group
        if d <= 0 or d % 16:
            raise ValueError(f"head_dim must be a positive multiple of 16, got {d}")
        if g <= 0 or g & (g - 1) or d % g or g < 4:
            raise ValueError(f"group_size must be a power of two >= 4 dividing head_dim={d}, got {g}")
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits}")
        if self.bits == 3 and d % 32:
            raise ValueError(f"3-bit rows need head_dim a multiple of 32 (4-byte rows), got {d}")

    def with_bits(self, bits: int) -> RowLayout:
        return RowLayout(self.head_dim, self.group_size, bits)

    @property
    def top(self) -> int:
        """The largest code, 2^bits - 1."""
        return (1 << self.bits) - 1

    @property
    def group(self) -> int:
        return self.head_dim if self.group_size is None else self.group_size

    @property
    def n_groups(self) -> int:
        return self.head_dim // self.group

    @property
    def hi_bytes(self) -> int:
        """Bytes of the high plane: 0 (2 bits), D/8 (3 bits), D/4 (4 bits)."""
        return {2: 0, 3: self.head_dim // 8, 4: self.head_dim // 4}[self.bits]

    @property
    def code_bytes(self) -> int:
        """Bytes of all codes; the scale/minimum pairs start here."""
        return self.head_dim // 4 + self.hi_bytes

    @property
    def row_bytes(self) -> int:
        return self.code_bytes + 4 * self.n_groups

    @property
    def bits_per_element(self) -> float:
        """Physical bits per element of a storage row (scale/minimum included)."""
        return 8.0 * self.row_bytes / self.head_dim


@dataclass(frozen=True)
class CacheLayout:
    """The storage-row layouts of every layer's keys and values (bit widths per layer and tensor)."""

    key: tuple[RowLayout, ...]
    value: tuple[RowLayout, ...]

    @staticmethod
    def of(head_dim: int, group_size: int | None, key_bits: Sequence[int], value_bits: Sequence[int]) -> CacheLayout:
        if len(key_bits) != len(value_bits):
            raise ValueError(f"{len(key_bits)} key bit widths but {len(value_bits)} value bit widths")
        return CacheLayout(tuple(RowLayout(head_dim, group_size, b) for b in key_bits),
                           tuple(RowLayout(head_dim, group_size, b) for b in value_bits))

    @staticmethod
    def uniform(layout: RowLayout, num_layers: int) -> CacheLayout:
        return CacheLayout((layout,) * num_layers, (layout,) * num_layers)

    @property
    def token_row_bytes(self) -> int:
        """Bytes of K+V storage rows of one token and one KV head over all layers."""
        return sum(r.row_bytes for r in self.key + self.value)

    @property
    def bits_per_element(self) -> float:
        """Average physical bits per K/V element of the storage rows (windows excluded)."""
        return 8.0 * self.token_row_bytes / (len(self.key + self.value) * self.key[0].head_dim)


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
    """fp32 rows [..., D] -> (codes uint8 [..., D] in 0..top, scale fp16 [..., G], minimum fp16 [..., G])."""
    xc = clip_rows(sanitize(x), ratio)
    g = xc.unflatten(-1, (layout.n_groups, layout.group))
    mn, mx = g.amin(-1), g.amax(-1)
    scale = ((mx - mn) / float(layout.top)).half()
    minimum = mn.half()
    s32, m32 = scale.float().unsqueeze(-1), minimum.float().unsqueeze(-1)
    y = torch.floor((g - m32) / torch.where(s32 > 0, s32, torch.ones_like(s32)) + 0.5)
    codes = torch.where(s32 > 0, y.clamp(0, layout.top), torch.zeros_like(y))
    return codes.flatten(-2).to(torch.uint8), scale, minimum


def pack_codes(codes: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """uint8 codes [..., D] in 0..2^bits - 1 -> [..., code bytes]: the 2-bit plane of the low
    bits, then the high plane (module docstring)."""
    wide = codes.to(torch.int32)
    out = [_pack_plane2(wide & 3)]
    if bits == 3:
        out.append(_pack_plane1(wide >> 2))
    elif bits == 4:
        out.append(_pack_plane2(wide >> 2))
    return torch.cat(out, dim=-1)


def unpack_codes(packed: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """[..., code bytes] -> uint8 codes [..., D]. Shifts run in int32: uint8 shifts take a slow
    path on CPU (~150x slower)."""
    wide = packed.to(torch.int32)
    q = {2: wide.shape[-1], 3: wide.shape[-1] * 2 // 3, 4: wide.shape[-1] // 2}[bits]  # D/4
    codes = _unpack_plane2(wide[..., :q])
    if bits == 3:
        codes = codes | _unpack_plane1(wide[..., q:]) << 2
    elif bits == 4:
        codes = codes | _unpack_plane2(wide[..., q:]) << 2
    return codes.to(torch.uint8)


def _pack_plane2(c: torch.Tensor) -> torch.Tensor:
    """int32 [..., D] in 0..3 -> uint8 [..., D/4]: byte j = elements j + p D/4 in bits 2p."""
    p = c.unflatten(-1, (4, c.shape[-1] // 4))
    return (p[..., 0, :] | p[..., 1, :] << 2 | p[..., 2, :] << 4 | p[..., 3, :] << 6).to(torch.uint8)


def _unpack_plane2(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([(w >> (2 * i)) & 3 for i in range(4)], dim=-1)


def _pack_plane1(c: torch.Tensor) -> torch.Tensor:
    """int32 [..., D] in 0..1 -> uint8 [..., D/8]: byte k = element 2k + p D/4 in bit 2p, element
    2k + 1 + p D/4 in bit 2p + 1."""
    p = c.unflatten(-1, (4, c.shape[-1] // 4))  # [..., plane, j]
    pair = p[..., 0::2] | p[..., 1::2] << 1  # [..., plane, D/8]: elements 2k, 2k + 1
    return (pair[..., 0, :] | pair[..., 1, :] << 2 | pair[..., 2, :] << 4 | pair[..., 3, :] << 6).to(torch.uint8)


def _unpack_plane1(w: torch.Tensor) -> torch.Tensor:
    pairs = [(w >> (2 * i)) & 3 for i in range(4)]  # plane i: [..., D/8] bit pairs of elements 2k, 2k + 1
    return torch.cat([torch.stack([x & 1, x >> 1], dim=-1).flatten(-2) for x in pairs], dim=-1)


def quantize_rows(x: torch.Tensor, layout: RowLayout, clip_ratio: float) -> torch.Tensor:
    """Rotated rows [..., D] (any float dtype) -> storage rows uint8 [..., row_bytes]."""
    if x.shape[-1] != layout.head_dim:
        raise ValueError(f"last dim {x.shape[-1]} != head_dim {layout.head_dim}")
    codes, scale, minimum = quantize_groups(x, layout, clip_ratio)
    params = torch.stack([scale, minimum], dim=-1).flatten(-2).contiguous().view(torch.uint8)
    return torch.cat([pack_codes(codes, layout.bits), params], dim=-1)


def split_rows(rows: torch.Tensor, layout: RowLayout):
    """Storage rows -> (codes uint8 [..., D], scale fp16 [..., G], minimum fp16 [..., G])."""
    if rows.dtype != torch.uint8 or rows.shape[-1] != layout.row_bytes:
        raise ValueError(f"expected uint8 rows of {layout.row_bytes} bytes, got {rows.dtype} {tuple(rows.shape)}")
    params = rows[..., layout.code_bytes :].contiguous().view(torch.float16).unflatten(-1, (layout.n_groups, 2))
    return unpack_codes(rows[..., : layout.code_bytes], layout.bits), params[..., 0], params[..., 1]


def dequantize_rows(rows: torch.Tensor, layout: RowLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Storage rows uint8 [..., row_bytes] -> rotated values [..., D]."""
    codes, scale, minimum = split_rows(rows, layout)
    g = codes.float().unflatten(-1, (layout.n_groups, layout.group))
    x = g * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    return x.flatten(-2).to(dtype)


def fake_quantize(x: torch.Tensor, layout: RowLayout, clip_ratio: float) -> torch.Tensor:
    """Quantize then dequantize (fp32), for simulations and error studies."""
    return dequantize_rows(quantize_rows(x, layout, clip_ratio), layout)


def kv_bits_per_element(layout: RowLayout | CacheLayout, context_len: int, rule: PositionRule = PositionRule(),
                        window_bytes_per_elem: int = 2) -> float:
    """Physical bits per K/V element of one running sequence of ``context_len`` tokens (a
    ``CacheLayout``: averaged over its layers' key and value rows).

    Every token has a storage row (quantize-on-write); the sinks and the tokens of the block the
    next query is in (``rule.window``) additionally keep a full-precision (BF16) copy.
    Counts real bytes, scale/minimum included.
    """
    if context_len <= 0:
        raise ValueError("context_len must be positive")
    windowed = sum(map(len, rule.window(context_len)))
    return layout.bits_per_element + 8.0 * windowed * window_bytes_per_elem / context_len


def kv_bytes_per_token(layout: RowLayout | CacheLayout, kv_heads: int, layers: int) -> int:
    """Bytes of K+V storage rows one token occupies across all layers (no windows)."""
    if isinstance(layout, CacheLayout):
        if len(layout.key) != layers:
            raise ValueError(f"layout has {len(layout.key)} layers, expected {layers}")
        return kv_heads * layout.token_row_bytes
    return 2 * layers * kv_heads * layout.row_bytes
