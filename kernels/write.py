"""Fused quantize-on-write: rotate, clip, quantize (2, 3 or 4 bits), pack and scatter KV rows.

Inputs (T new tokens, H KV heads, D head_dim; D a power of two in [16, 128], one
quantization group per row, ``layout.bits`` in {2, 3, 4} (3 bits: D >= 32); other layouts:
use the reference, as ``ops`` does):

- ``x``          [T, H, D] fp16/bf16/fp32, post-RoPE k or v, NOT rotated; last dim contiguous.
- ``rotation``   fp32 [D, D] (per layer) or [H, D, D] (per KV head); row-vector convention x @ R;
  None: x is already in the rotated basis (V with R_V folded into the weights), no dot at all.
- ``rows_out``   uint8 [N, H, row_bytes], codec.py storage rows; last two dims contiguous.
- ``slots``      int32/int64 [T] destination row per token, -1 = padding (skipped).
- ``window_out`` optional [M, H, D] (bf16/fp16/fp32), receives the rotated full-precision row
  at ``window_slots[t]`` (int32/int64 [T], -1 skipped).

What is stored is exactly ``reference.quantize_kv_write``: the row is sanitized,
rotated in ~fp32 (``tl.dot`` with ``input_precision="tf32x3"``, in [BLOCK_T, 32] x [32, D/4]
pieces: see below), sanitized again,
clipped at ``sort(|x|)[clip_index]`` (exact rank selection, ``_kth_largest``), then quantized with IEEE
division and ``floor(y + 0.5)`` exactly like codec.py, so codes and fp16
scale/minimum are bit-identical to the reference given the same rotated row
(with a non-identity rotation the rotated rows may differ in the last fp32 bit,
hence rare code flips at rounding boundaries).

One kernel body serves K and V and every bit width: the clip index, the per-head rotation
stride and the code width (constexpr BITS: top code 2^BITS - 1, and which high plane is
packed after the 2-bit plane of the low bits, codec.py's row layout) are parameters; the
integration calls this once for k and once for v.

Shared memory: a single x @ R dot against the whole [D, D] fp32 rotation stages R (hi and
lo tf32 halves) in shared memory: 139,264 bytes at D=128 (compiled for sm_86/89/80/90,
Triton 3.8), over the 101,376-byte per-block limit of sm_86/sm_89 (RTX 3090/4090, L4,
L40S), so it could not launch there. The kernel instead produces the rotated row as its
four quarter-planes (x @ R[:, jQ:(j+1)Q], exactly the plane layout of the storage row, so
plane j is packed at bits 2j with no reshuffle), each accumulated over 32-row slices of R,
and R is re-read (L1/L2) per token block instead of being kept resident: 4,096 bytes of
shared memory and 138 (sm_86/89) / 154 (sm_90) registers at D=128, no spills
(``benchmarks/kernel_static.py``). Clip rank, min and max combine the four planes, so the
per-row quantile is still over all D values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_head_dim, check_index, check_rows, check_window, sm_count
from .codec import RowLayout, clip_index
from .tiles import _code_bytes

__all__ = ["quantize_kv_write"]


@triton.jit
def _sanitize(x):
    """NaN -> 0, clamp to +-FP16_MAX (inf included), like codec.sanitize."""
    x = tl.where(x != x, 0.0, x)
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0)


@triton.jit
def _plane_max(a, cur, PAD: tl.constexpr, pmask):
    """Row max of the entries of a [BT, PQ] below cur [BT] (-1 if none; padded columns ignored)."""
    keep = a < cur[:, None]
    if PAD:
        keep = keep & pmask[None, :]
    return tl.max(tl.where(keep, a, -1.0), axis=1)


@triton.jit
def _plane_count(a, v, PAD: tl.constexpr, pmask):
    eq = a == v[:, None]
    if PAD:
        eq = eq & pmask[None, :]
    return tl.sum(eq.to(tl.int32), axis=1)


@triton.jit
def _kth_largest(a0, a1, a2, a3, RANK: tl.constexpr, PAD: tl.constexpr, pmask):
    """Per row of the four quarter-planes a0..a3 >= 0 [BT, PQ] (together one row of D values):
    the value at descending rank RANK (0 = max), ties counted, i.e. sort(a)[D - 1 - RANK].
    Exact; RANK + 1 max/count passes over distinct values, much cheaper than a full
    tl.sort when RANK is small (clip ratios 0.9-0.99)."""
    cur = tl.full([a0.shape[0]], float("inf"), tl.float32)
    need = tl.full([a0.shape[0]], RANK, tl.int32)
    thr = tl.zeros([a0.shape[0]], tl.float32)
    found = tl.zeros([a0.shape[0]], tl.int1)
    for _ in tl.static_range(RANK + 1):
        v = tl.maximum(tl.maximum(_plane_max(a0, cur, PAD, pmask), _plane_max(a1, cur, PAD, pmask)),
                       tl.maximum(_plane_max(a2, cur, PAD, pmask), _plane_max(a3, cur, PAD, pmask)))
        c = (_plane_count(a0, v, PAD, pmask) + _plane_count(a1, v, PAD, pmask)
             + _plane_count(a2, v, PAD, pmask) + _plane_count(a3, v, PAD, pmask))
        hit = (need < c) & (found == 0)
        thr = tl.where(hit, v, thr)
        found = found | hit
        need = need - c
        cur = v
    return thr


@triton.jit
def _plane_minmax(a, PAD: tl.constexpr, pmask):
    if PAD:
        return (tl.min(tl.where(pmask[None, :], a, float("inf")), axis=1),
                tl.max(tl.where(pmask[None, :], a, float("-inf")), axis=1))
    return tl.min(a, axis=1), tl.max(a, axis=1)


@triton.jit
def _rot_block(rp, krows, pcols, pmask, K0: tl.constexpr, J: tl.constexpr, D: tl.constexpr, Q: tl.constexpr):
    """R[K0:K0+KC, J*Q:(J+1)*Q] of the [D, D] rotation as [KC, PQ] (padded columns 0)."""
    return tl.load(rp + (K0 + krows)[:, None] * D + (J * Q + pcols)[None, :], mask=pmask[None, :], other=0.0)


@triton.jit
def _store_window_plane(wp, xr, wmask, pmask, J: tl.constexpr, Q: tl.constexpr):
    tl.store(wp + J * Q, xr.to(wp.dtype.element_ty), mask=wmask[:, None] & pmask[None, :])


@triton.constexpr_function
def _top_code(bits):
    """The largest code 2^bits - 1, as the float the quantizer divides by (codec.RowLayout.top)."""
    return float((1 << bits) - 1)


@triton.jit
def _plane_code(xr, minimum, scale, pos, TOP: tl.constexpr):
    """Codes 0..TOP [BT, PQ] of one (clipped) quarter-plane, exactly like codec.quantize_groups."""
    y = tl.floor(tl.math.div_rn(xr - minimum, scale) + 0.5)
    return tl.where(pos, tl.minimum(tl.maximum(y, 0.0), TOP), 0.0).to(tl.int32)


@triton.jit
def _pack_plane2(c0, c1, c2, c3):
    """Plane layout of 2-bit values: byte j = c0[j] | c1[j] << 2 | c2[j] << 4 | c3[j] << 6."""
    return c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)


@triton.jit
def _pack_plane1(c0, c1, c2, c3):
    """1-bit plane of codec.py of bit 2 of the codes [BT, PQ] -> bytes [BT, PQ / 2]: byte k holds
    element 2k of plane p in bit p and element 2k + 1 in bit 4 + p."""
    nib = ((c0 >> 2) & 1) | (((c1 >> 2) & 1) << 1) | (((c2 >> 2) & 1) << 2) | (((c3 >> 2) & 1) << 3)
    even, odd = tl.split(tl.reshape(nib, (nib.shape[0], nib.shape[1] // 2, 2)))
    return even | (odd << 4)


@triton.jit
def _quantize_write_kernel(
    x_ptr, rot_ptr, rows_ptr, slots_ptr, win_ptr, wslots_ptr,
    T, tokens_per_prog,
    stride_xt, stride_xh, stride_rh,
    stride_on, stride_oh, stride_wn, stride_wh,
    D: tl.constexpr, CLIP_IDX: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_WINDOW: tl.constexpr, ROTATE: tl.constexpr, PRECISION: tl.constexpr, BITS: tl.constexpr,
):
    """Per token block: the rotated row as four quarter-planes x @ R[:, jQ:(j+1)Q], each
    accumulated over KC-row slices of R, so no dot operand is larger than [KC, PQ] (R is
    re-read per token block: a loop-invariant R would be hoisted and kept in shared memory).
    Clip rank, min and max combine the four planes before quantizing. For D < 64 (Q < 16,
    below tl.dot's minimum N) planes are padded to 16 columns, masked everywhere."""
    h = tl.program_id(0)
    pid = tl.program_id(1)
    Q: tl.constexpr = D // 4
    PQ: tl.constexpr = 16 if Q < 16 else Q
    PAD: tl.constexpr = PQ != Q
    KC: tl.constexpr = 32 if D > 32 else D
    cols = tl.arange(0, KC)
    pcols = tl.arange(0, PQ)
    pmask = pcols < Q
    rp = rot_ptr + h * stride_rh
    t_begin = pid * tokens_per_prog
    t_end = tl.minimum(t_begin + tokens_per_prog, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < t_end
        slot = tl.load(slots_ptr + tok, mask=tmask, other=-1).to(tl.int64)
        xrow = x_ptr + tok[:, None].to(tl.int64) * stride_xt + h * stride_xh
        if ROTATE:
            xp = xrow + cols[None, :]
            x0 = tl.zeros([BLOCK_T, PQ], tl.float32)
            x1 = tl.zeros([BLOCK_T, PQ], tl.float32)
            x2 = tl.zeros([BLOCK_T, PQ], tl.float32)
            x3 = tl.zeros([BLOCK_T, PQ], tl.float32)
            # x @ R as four quarter-planes, accumulated over KC-row slices of R (and KC-column
            # slices of x): every dot operand is at most [KC, PQ] / [BLOCK_T, KC] fp32.
            for k0 in tl.static_range(0, D, KC):
                xk = _sanitize(tl.load(xp + k0, mask=tmask[:, None], other=0.0).to(tl.float32))
                x0 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 0, D, Q), x0, input_precision=PRECISION)
                x1 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 1, D, Q), x1, input_precision=PRECISION)
                x2 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 2, D, Q), x2, input_precision=PRECISION)
                x3 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 3, D, Q), x3, input_precision=PRECISION)
        else:  # already rotated: the planes are x's own quarters
            xm = tmask[:, None] & pmask[None, :]
            xp = xrow + pcols[None, :]
            x0 = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
            x1 = tl.load(xp + Q, mask=xm, other=0.0).to(tl.float32)
            x2 = tl.load(xp + 2 * Q, mask=xm, other=0.0).to(tl.float32)
            x3 = tl.load(xp + 3 * Q, mask=xm, other=0.0).to(tl.float32)
        x0 = _sanitize(x0)
        x1 = _sanitize(x1)
        x2 = _sanitize(x2)
        x3 = _sanitize(x3)
        if HAS_WINDOW:
            wslot = tl.load(wslots_ptr + tok, mask=tmask, other=-1).to(tl.int64)
            wp = win_ptr + wslot[:, None] * stride_wn + h * stride_wh + pcols[None, :]
            wmask = wslot >= 0
            _store_window_plane(wp, x0, wmask, pmask, 0, Q)
            _store_window_plane(wp, x1, wmask, pmask, 1, Q)
            _store_window_plane(wp, x2, wmask, pmask, 2, Q)
            _store_window_plane(wp, x3, wmask, pmask, 3, Q)
        if CLIP_IDX < D:
            thr = _kth_largest(tl.abs(x0), tl.abs(x1), tl.abs(x2), tl.abs(x3), D - 1 - CLIP_IDX, PAD, pmask)[:, None]
            x0 = tl.minimum(tl.maximum(x0, -thr), thr)
            x1 = tl.minimum(tl.maximum(x1, -thr), thr)
            x2 = tl.minimum(tl.maximum(x2, -thr), thr)
            x3 = tl.minimum(tl.maximum(x3, -thr), thr)
        mn0, mx0 = _plane_minmax(x0, PAD, pmask)
        mn1, mx1 = _plane_minmax(x1, PAD, pmask)
        mn2, mx2 = _plane_minmax(x2, PAD, pmask)
        mn3, mx3 = _plane_minmax(x3, PAD, pmask)
        mn = tl.minimum(tl.minimum(mn0, mn1), tl.minimum(mn2, mn3))
        mx = tl.maximum(tl.maximum(mx0, mx1), tl.maximum(mx2, mx3))
        TOP: tl.constexpr = _top_code(BITS)
        scale = tl.math.div_rn(mx - mn, TOP).to(tl.float16)
        minimum = mn.to(tl.float16)
        s32 = scale.to(tl.float32)
        pos = (s32 > 0)[:, None]
        m32 = minimum.to(tl.float32)[:, None]
        sd = tl.where(pos, s32[:, None], 1.0)
        c0 = _plane_code(x0, m32, sd, pos, TOP)
        c1 = _plane_code(x1, m32, sd, pos, TOP)
        c2 = _plane_code(x2, m32, sd, pos, TOP)
        c3 = _plane_code(x3, m32, sd, pos, TOP)
        smask = slot >= 0
        row = rows_ptr + tl.multiple_of(slot * stride_on + h * stride_oh, 4)  # rows are 4-byte multiples
        cmask = smask[:, None] & pmask[None, :]
        # Bytes [0, Q): the plane layout of the low 2 bits, byte j = codes j | j+Q << 2 | j+2Q << 4 | j+3Q << 6.
        lo = _pack_plane2(c0 & 3, c1 & 3, c2 & 3, c3 & 3) if BITS > 2 else _pack_plane2(c0, c1, c2, c3)
        tl.store(row[:, None] + pcols[None, :], lo.to(tl.uint8), mask=cmask)
        if BITS == 4:  # bytes [Q, 2Q): the high 2 bits, plane layout again
            tl.store(row[:, None] + Q + pcols[None, :], _pack_plane2(c0 >> 2, c1 >> 2, c2 >> 2, c3 >> 2).to(tl.uint8),
                     mask=cmask)
        if BITS == 3:  # bytes [Q, Q + Q/2): the high bit, two elements per byte
            hcols = tl.arange(0, PQ // 2)
            tl.store(row[:, None] + Q + hcols[None, :], _pack_plane1(c0, c1, c2, c3).to(tl.uint8),
                     mask=smask[:, None] & (hcols < Q // 2)[None, :])
        # scale then minimum, fp16 little-endian, after the codes: one 32-bit store.
        P: tl.constexpr = _code_bytes(Q, BITS)
        s_bits = scale.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        m_bits = minimum.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        tl.store((row + P).to(tl.pointer_type(tl.int32), bitcast=True), s_bits | (m_bits << 16), mask=smask)


def _num_programs_hint(device: torch.device) -> int:
    return 4 * sm_count(device) if device.type == "cuda" else 1  # interpreter: programs buy no parallelism


def quantize_kv_write(
    x: torch.Tensor,
    rotation: torch.Tensor | None,
    clip_ratio: float,
    layout: RowLayout,
    rows_out: torch.Tensor,
    slots: torch.Tensor,
    window_out: torch.Tensor | None = None,
    window_slots: torch.Tensor | None = None,
) -> None:
    """Quantize x [T, H, D] into rows_out[slots] (and its rotated copy into window_out)."""
    t, h, d = x.shape
    check_head_dim(d, layout, attention=False)
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous in its last dim")
    check_rows("rows_out", rows_out, h, layout)
    if rotation is None:
        stride_rh = 0
    elif rotation.dtype != torch.float32 or not rotation.is_contiguous():
        raise ValueError("rotation must be contiguous fp32")
    elif rotation.shape == (d, d):
        stride_rh = 0
    elif rotation.shape == (h, d, d):
        stride_rh = d * d
    else:
        raise ValueError(f"rotation must be [{d}, {d}] or [{h}, {d}, {d}], got {tuple(rotation.shape)}")
    check_index("slots", slots, t)
    has_window = window_out is not None
    if has_window:
        if window_slots is None:
            raise ValueError("window_out given without window_slots")
        check_index("window_slots", window_slots, t)
        check_window("window_out", window_out, h, d)
    if t == 0:
        return
    # ptxas, 4 warps, no spills on sm_80..90: D=128 block 16: 138-154 regs (block 32 or 8 warps spill);
    # D=64 block 64: 168-200 regs (benchmarks/kernel_static.py).
    block_t = 16 if d == 128 else 64
    blocks = triton.cdiv(t, block_t)
    per_prog = triton.cdiv(blocks, max(1, _num_programs_hint(x.device) // h)) * block_t
    grid = (h, triton.cdiv(t, per_prog))
    win = window_out if has_window else rows_out
    wslots = window_slots if has_window else slots
    _quantize_write_kernel[grid](
        x, x if rotation is None else rotation, rows_out, slots, win, wslots,
        t, per_prog,
        x.stride(0), x.stride(1), stride_rh,
        rows_out.stride(0), rows_out.stride(1),
        win.stride(0) if has_window else 0, win.stride(1) if has_window else 0,
        D=d, CLIP_IDX=min(clip_index(clip_ratio, d), d), BLOCK_T=block_t,
        HAS_WINDOW=has_window, ROTATE=rotation is not None, PRECISION="tf32x3", BITS=layout.bits,
        num_warps=4, num_stages=1,
    )
