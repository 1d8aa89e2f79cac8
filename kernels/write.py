"""Fused quantize-on-write: rotate, clip, INT2-quantize, pack and scatter KV rows.

Inputs (T new tokens, H KV heads, D head_dim; D a power of two in [16, 128], one
quantization group per row; other layouts: use the reference, as ``ops`` does):

- ``x``          [T, H, D] fp16/bf16/fp32, post-RoPE k or v, NOT rotated; last dim contiguous.
- ``rotation``   fp32 [D, D] (per layer) or [H, D, D] (per KV head); row-vector convention x @ R.
- ``rows_out``   uint8 [N, H, row_bytes], codec.py storage rows; last two dims contiguous.
- ``slots``      int32/int64 [T] destination row per token, -1 = padding (skipped).
- ``window_out`` optional [M, H, D] (bf16/fp16/fp32), receives the rotated full-precision row
  at ``window_slots[t]`` (int32/int64 [T], -1 skipped).

What is stored is exactly ``reference.quantize_kv_write``: the row is sanitized,
rotated in ~fp32 (``tl.dot`` with ``input_precision="tf32x3"``), sanitized again,
clipped at ``sort(|x|)[clip_index]`` (exact rank selection, ``_kth_largest``), then quantized with IEEE
division and ``floor(y + 0.5)`` exactly like codec.py, so codes and fp16
scale/minimum are bit-identical to the reference given the same rotated row
(with a non-identity rotation the rotated rows may differ in the last fp32 bit,
hence rare code flips at rounding boundaries).

One kernel body serves K and V: the clip index and the per-head rotation stride
are parameters; the integration calls this once for k and once for v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import RowLayout, clip_index

__all__ = ["quantize_kv_write"]


@triton.jit
def _sanitize(x):
    """NaN -> 0, clamp to +-FP16_MAX (inf included), like codec.sanitize."""
    x = tl.where(x != x, 0.0, x)
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0)


@triton.jit
def _kth_largest(a, RANK: tl.constexpr):
    """Per row of a >= 0 [BT, D]: the value at descending rank RANK (0 = max), ties counted,
    i.e. sort(a)[D - 1 - RANK]. Exact; RANK + 1 max/count passes over distinct values,
    much cheaper than a full tl.sort when RANK is small (clip ratios 0.9-0.99)."""
    cur = tl.full([a.shape[0]], float("inf"), tl.float32)
    need = tl.full([a.shape[0]], RANK, tl.int32)
    thr = tl.zeros([a.shape[0]], tl.float32)
    found = tl.zeros([a.shape[0]], tl.int1)
    for _ in tl.static_range(RANK + 1):
        v = tl.max(tl.where(a < cur[:, None], a, -1.0), axis=1)
        c = tl.sum((a == v[:, None]).to(tl.int32), axis=1)
        hit = (need < c) & (found == 0)
        thr = tl.where(hit, v, thr)
        found = found | hit
        need = need - c
        cur = v
    return thr


@triton.jit
def _quantize_write_kernel(
    x_ptr, rot_ptr, rows_ptr, slots_ptr, win_ptr, wslots_ptr,
    T, tokens_per_prog,
    stride_xt, stride_xh, stride_rh,
    stride_on, stride_oh, stride_wn, stride_wh,
    D: tl.constexpr, CLIP_IDX: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    h = tl.program_id(0)
    pid = tl.program_id(1)
    Q: tl.constexpr = D // 4
    cols = tl.arange(0, D)
    # The rotation is loaded once per program and reused for tokens_per_prog tokens.
    rot = tl.load(rot_ptr + h * stride_rh + cols[:, None] * D + cols[None, :])
    plane_shift = (2 * tl.arange(0, 4))[None, :, None]
    qcols = tl.arange(0, Q)
    t_begin = pid * tokens_per_prog
    t_end = tl.minimum(t_begin + tokens_per_prog, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < t_end
        slot = tl.load(slots_ptr + tok, mask=tmask, other=-1).to(tl.int64)
        x = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xt + h * stride_xh + cols[None, :],
                    mask=tmask[:, None], other=0.0).to(tl.float32)
        xr = _sanitize(tl.dot(_sanitize(x), rot, input_precision=PRECISION))
        if HAS_WINDOW:
            wslot = tl.load(wslots_ptr + tok, mask=tmask, other=-1).to(tl.int64)
            wp = win_ptr + wslot[:, None] * stride_wn + h * stride_wh + cols[None, :]
            tl.store(wp, xr.to(win_ptr.dtype.element_ty), mask=(wslot >= 0)[:, None])
        if CLIP_IDX < D:
            thr = _kth_largest(tl.abs(xr), D - 1 - CLIP_IDX)[:, None]
            xr = tl.minimum(tl.maximum(xr, -thr), thr)
        mn = tl.min(xr, axis=1)
        mx = tl.max(xr, axis=1)
        scale = tl.math.div_rn(mx - mn, 3.0).to(tl.float16)
        minimum = mn.to(tl.float16)
        s32 = scale.to(tl.float32)
        pos = s32 > 0
        y = tl.floor(tl.math.div_rn(xr - minimum.to(tl.float32)[:, None], tl.where(pos, s32, 1.0)[:, None]) + 0.5)
        code = tl.where(pos[:, None], tl.minimum(tl.maximum(y, 0.0), 3.0), 0.0).to(tl.int32)
        # Plane layout: byte j = codes j | j+Q << 2 | j+2Q << 4 | j+3Q << 6 (disjoint bits: sum == or).
        packed = tl.sum(tl.reshape(code, (BLOCK_T, 4, Q)) << plane_shift, axis=1)
        smask = slot >= 0
        row = rows_ptr + tl.multiple_of(slot * stride_on + h * stride_oh, 4)  # rows are 4-byte multiples
        tl.store(row[:, None] + qcols[None, :], packed.to(tl.uint8), mask=smask[:, None])
        # scale then minimum, fp16 little-endian, at byte Q: one 32-bit store.
        s_bits = scale.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        m_bits = minimum.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store((row + Q).to(tl.pointer_type(tl.int32), bitcast=True), s_bits | (m_bits << 16), mask=smask)


def _num_programs_hint(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: program count does not buy parallelism


def _check_index(name: str, idx: torch.Tensor, t: int) -> None:
    if idx.dtype not in (torch.int32, torch.int64) or idx.shape != (t,) or not idx.is_contiguous():
        raise ValueError(f"{name} must be contiguous int32/int64 [{t}], got {idx.dtype} {tuple(idx.shape)}")


def quantize_kv_write(
    x: torch.Tensor,
    rotation: torch.Tensor,
    clip_ratio: float,
    layout: RowLayout,
    rows_out: torch.Tensor,
    slots: torch.Tensor,
    window_out: torch.Tensor | None = None,
    window_slots: torch.Tensor | None = None,
) -> None:
    """Quantize x [T, H, D] into rows_out[slots] (and its rotated copy into window_out)."""
    t, h, d = x.shape
    if layout.n_groups != 1:
        raise ValueError("Triton write kernel supports group_size == head_dim only; use the reference")
    if d != layout.head_dim or not 16 <= d <= 128 or d & (d - 1):
        # D = 256 would need a 256 KiB fp32 rotation operand: more than an SM's shared memory.
        raise ValueError(f"head_dim {d} must equal layout.head_dim {layout.head_dim}, a power of two in [16, 128]")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dim")
    if rows_out.dtype != torch.uint8 or rows_out.dim() != 3 or rows_out.shape[1:] != (h, layout.row_bytes):
        raise ValueError(f"rows_out must be uint8 [N, {h}, {layout.row_bytes}], got {rows_out.dtype} {tuple(rows_out.shape)}")
    if rows_out.stride(2) != 1 or rows_out.stride(1) != layout.row_bytes or rows_out.stride(0) % 4 \
            or rows_out.data_ptr() % 4:
        raise ValueError("rows_out must be 4-byte aligned and contiguous in its last two dims")
    if rotation.dtype != torch.float32 or not rotation.is_contiguous():
        raise ValueError("rotation must be contiguous fp32")
    if rotation.shape == (d, d):
        stride_rh = 0
    elif rotation.shape == (h, d, d):
        stride_rh = d * d
    else:
        raise ValueError(f"rotation must be [{d}, {d}] or [{h}, {d}, {d}], got {tuple(rotation.shape)}")
    _check_index("slots", slots, t)
    has_window = window_out is not None
    if has_window:
        if window_slots is None:
            raise ValueError("window_out given without window_slots")
        _check_index("window_slots", window_slots, t)
        if window_out.dim() != 3 or window_out.shape[1:] != (h, d) or window_out.stride(-1) != 1:
            raise ValueError(f"window_out must be [M, {h}, {d}] contiguous in its last dim")
    if t == 0:
        return
    block_t = 16 if d == 128 else 64  # D=128: 255 regs at 8 warps, no spill (ptxas, sm_90a); 32 spills
    blocks = triton.cdiv(t, block_t)
    per_prog = triton.cdiv(blocks, max(1, _num_programs_hint(x.device) // h)) * block_t
    grid = (h, triton.cdiv(t, per_prog))
    win = window_out if has_window else rows_out
    wslots = window_slots if has_window else slots
    _quantize_write_kernel[grid](
        x, rotation, rows_out, slots, win, wslots,
        t, per_prog,
        x.stride(0), x.stride(1), stride_rh,
        rows_out.stride(0), rows_out.stride(1),
        win.stride(0) if has_window else 0, win.stride(1) if has_window else 0,
        D=d, CLIP_IDX=min(clip_index(clip_ratio, d), d), BLOCK_T=block_t,
        HAS_WINDOW=has_window, PRECISION="tf32x3",
        num_warps=8 if d == 128 else 4, num_stages=1,  # R (64 KiB fp32 at D=128) dominates registers/smem
    )
