"""Fused quantize-on-write: rotate, clip, quantize (2, 3 or 4 bits), pack and scatter KV rows.

Inputs (T new tokens, H KV heads, D head_dim; D a power of two in [16, 128], one
quantization group per row, ``layout.bits`` in {2, 3, 4} (3 bits: D >= 32); other layouts:
use the reference, as ``ops`` does):

- ``x``          [T, H, D] fp16/bf16/fp32, post-RoPE k or v, NOT rotated; last dim contiguous.
- ``rotation``   fp32 [D, D] (per layer) or [H, D, D] (per KV head); row-vector convention x @ R;
  None: x is already in the rotated basis (V with R_V folded into the weights), no dot at all.
- ``rows_out``   uint8 [N, H, row_bytes], codec.py storage rows; last two dims contiguous.
- ``slots``      int32/int64 [T] destination row per token, -1 = padding (skipped).
- ``window_out`` optional ``WindowRows`` of H x D (bf16/fp16/fp32, dense or in pages: window.py),
  receives the rotated full-precision row at row id ``window_slots[t]`` (int32/int64 [T], -1 skipped).

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
packed after the 2-bit plane of the low bits, codec.py's row layout) are parameters. One
launch (``write_step``) writes a layer's k and v and rotates its queries by R_K (q @ R_K,
the same tf32x3 dots, no sanitizing: ``reference.rotate_queries``): programs [0, H) write k,
[H, 2H) write v, [2H, 2H + Hq) rotate one query head each. R_K cannot be folded into q_proj
(RoPE does not commute with a general rotation), so the queries need this every step.

Shared memory: a single x @ R dot against the whole [D, D] fp32 rotation would stage R (hi and
lo tf32 halves) in shared memory, more than the per-block limit of sm_86/sm_89 (RTX 3090/4090,
L4, L40S). The kernel instead produces the rotated row as its four quarter-planes
(x @ R[:, jQ:(j+1)Q], exactly the plane layout of the storage row, so plane j is packed at bits
2j with no reshuffle), each accumulated over 32-row slices of R, and R is re-read (L1/L2) per
token block instead of being kept resident: 4 KiB of shared memory (registers and spills per
architecture: docs/kernels.md). Clip rank, min and max combine the four planes, so the per-row
quantile is still over all D values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_head_dim, check_index, check_rows, check_window, sm_count
from .codec import RowLayout, clip_index
from .tiles import _code_bytes
from .window import WindowRows, _window_offset

__all__ = ["quantize_kv_write", "write_step", "rotate_queries"]


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
def _store_plane(wp, xr, wmask, pmask, J: tl.constexpr, Q: tl.constexpr):
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
    element 2k of plane p in bit 2p and element 2k + 1 in bit 2p + 1."""
    b = ((c0 >> 2) & 1) | (((c1 >> 2) & 1) << 2) | (((c2 >> 2) & 1) << 4) | (((c3 >> 2) & 1) << 6)
    even, odd = tl.split(tl.reshape(b, (b.shape[0], b.shape[1] // 2, 2)))
    return even | (odd << 1)


@triton.jit
def _rotated_planes(xrow, rp, tmask, D: tl.constexpr, ROTATE: tl.constexpr, SANITIZE: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Row block ``xrow`` [BLOCK_T, 1] pointers (column 0 of each row) as the four fp32 quarter-
    planes of x @ R ([BLOCK_T, PQ] each, padded columns 0). R's [D, D] block at ``rp`` is read in
    KC-row slices of plane columns, so no dot operand is larger than [KC, PQ] / [BLOCK_T, KC] fp32
    (R is re-read per token block: a loop-invariant R would be hoisted and kept in shared memory).
    ROTATE false: x is already rotated, the planes are its own quarters. SANITIZE: x before the
    dots (the k/v rows; queries are rotated as they are)."""
    Q: tl.constexpr = D // 4
    PQ: tl.constexpr = 16 if Q < 16 else Q
    KC: tl.constexpr = 32 if D > 32 else D
    cols = tl.arange(0, KC)
    pcols = tl.arange(0, PQ)
    pmask = pcols < Q
    if ROTATE:
        xp = xrow + cols[None, :]
        x0 = tl.zeros([xrow.shape[0], PQ], tl.float32)
        x1 = tl.zeros([xrow.shape[0], PQ], tl.float32)
        x2 = tl.zeros([xrow.shape[0], PQ], tl.float32)
        x3 = tl.zeros([xrow.shape[0], PQ], tl.float32)
        for k0 in tl.static_range(0, D, KC):
            xk = tl.load(xp + k0, mask=tmask[:, None], other=0.0).to(tl.float32)
            if SANITIZE:
                xk = _sanitize(xk)
            x0 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 0, D, Q), x0, input_precision=PRECISION)
            x1 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 1, D, Q), x1, input_precision=PRECISION)
            x2 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 2, D, Q), x2, input_precision=PRECISION)
            x3 = tl.dot(xk, _rot_block(rp, cols, pcols, pmask, k0, 3, D, Q), x3, input_precision=PRECISION)
    else:
        xm = tmask[:, None] & pmask[None, :]
        xp = xrow + pcols[None, :]
        x0 = tl.load(xp, mask=xm, other=0.0).to(tl.float32)
        x1 = tl.load(xp + Q, mask=xm, other=0.0).to(tl.float32)
        x2 = tl.load(xp + 2 * Q, mask=xm, other=0.0).to(tl.float32)
        x3 = tl.load(xp + 3 * Q, mask=xm, other=0.0).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def _write_rows(x_ptr, rot_ptr, rows_ptr, win_ptr, slots_ptr, wslots_ptr, h, H, t_begin, t_end,
                stride_xt, stride_xh, stride_rh, stride_on, stride_oh, win_page, win_row,
                D: tl.constexpr, CLIP_IDX: tl.constexpr, BLOCK_T: tl.constexpr, HAS_WINDOW: tl.constexpr,
                ROTATE: tl.constexpr, PRECISION: tl.constexpr, BITS: tl.constexpr, WIN_LOG2: tl.constexpr):
    """Tokens [t_begin, t_end) of KV head h (of H) of one tensor: the rotated row as four quarter-
    planes, clip rank, min and max over all four, then quantize and pack; its window copy at the
    row ids ``wslots_ptr`` (``WindowRows`` of page stride win_page, row stride win_row, log2_rows
    WIN_LOG2, heads of D per row). For D < 64 (Q < 16, below tl.dot's minimum N) planes are padded to 16 columns,
    masked everywhere."""
    Q: tl.constexpr = D // 4
    PQ: tl.constexpr = 16 if Q < 16 else Q
    PAD: tl.constexpr = PQ != Q
    pcols = tl.arange(0, PQ)
    pmask = pcols < Q
    rp = rot_ptr + h * stride_rh
    for t0 in range(t_begin, t_end, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < t_end
        slot = tl.load(slots_ptr + tok, mask=tmask, other=-1).to(tl.int64)
        xrow = x_ptr + tok[:, None].to(tl.int64) * stride_xt + h * stride_xh
        x0, x1, x2, x3 = _rotated_planes(xrow, rp, tmask, D, ROTATE, True, PRECISION)
        x0 = _sanitize(x0)
        x1 = _sanitize(x1)
        x2 = _sanitize(x2)
        x3 = _sanitize(x3)
        if HAS_WINDOW:
            wslot = tl.load(wslots_ptr + tok, mask=tmask, other=-1)
            wp = win_ptr + (_window_offset(wslot, win_page, win_row, WIN_LOG2) + h * D)[:, None] + pcols[None, :]
            wmask = wslot >= 0
            _store_plane(wp, x0, wmask, pmask, 0, Q)
            _store_plane(wp, x1, wmask, pmask, 1, Q)
            _store_plane(wp, x2, wmask, pmask, 2, Q)
            _store_plane(wp, x3, wmask, pmask, 3, Q)
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


@triton.jit
def _rotate_queries(q_ptr, qo_ptr, rot_ptr, j, h, t_begin, t_end, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_rh, D: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr):
    """Tokens [t_begin, t_end) of query head j, rotated by KV head h's R_K, stored as qo's dtype."""
    Q: tl.constexpr = D // 4
    PQ: tl.constexpr = 16 if Q < 16 else Q
    pcols = tl.arange(0, PQ)
    pmask = pcols < Q
    for t0 in range(t_begin, t_end, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < t_end
        t64 = tok[:, None].to(tl.int64)
        x0, x1, x2, x3 = _rotated_planes(q_ptr + t64 * stride_qt + j * stride_qh, rot_ptr + h * stride_rh, tmask,
                                         D, True, False, PRECISION)
        op = qo_ptr + t64 * stride_ot + j * stride_oh + pcols[None, :]
        _store_plane(op, x0, tmask, pmask, 0, Q)
        _store_plane(op, x1, tmask, pmask, 1, Q)
        _store_plane(op, x2, tmask, pmask, 2, Q)
        _store_plane(op, x3, tmask, pmask, 3, Q)


@triton.jit
def _write_step_kernel(
    k_ptr, rk_ptr, krows_ptr, kwin_ptr, v_ptr, rv_ptr, vrows_ptr, vwin_ptr, q_ptr, qo_ptr,
    slots_ptr, wslots_ptr, T, tokens_per_prog, H, G,
    stride_kt, stride_kh, stride_rkh, stride_kon, stride_koh, kw_page,
    stride_vt, stride_vh, stride_rvh, stride_von, stride_voh, vw_page, w_row,
    stride_qt, stride_qh, stride_qot, stride_qoh,
    D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_WINDOW: tl.constexpr, WIN_LOG2: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_K: tl.constexpr, K_CLIP: tl.constexpr, K_BITS: tl.constexpr, K_ROTATE: tl.constexpr,
    HAS_V: tl.constexpr, V_CLIP: tl.constexpr, V_BITS: tl.constexpr, V_ROTATE: tl.constexpr,
    HAS_Q: tl.constexpr,
):
    """Program (part, token range): part [0, H) writes KV head part of k, the next H of v, the
    next H * G rotate one query head each by R_K (parts absent from this launch take no ids)."""
    p = tl.program_id(0)
    t_begin = tl.program_id(1) * tokens_per_prog
    t_end = tl.minimum(t_begin + tokens_per_prog, T)
    v0 = H if HAS_K else 0
    q0 = v0 + H if HAS_V else v0
    if HAS_K:
        if p < v0:
            _write_rows(k_ptr, rk_ptr, krows_ptr, kwin_ptr, slots_ptr, wslots_ptr, p, H, t_begin, t_end,
                        stride_kt, stride_kh, stride_rkh, stride_kon, stride_koh, kw_page, w_row,
                        D, K_CLIP, BLOCK_T, HAS_WINDOW, K_ROTATE, PRECISION, K_BITS, WIN_LOG2)
    if HAS_V:
        if (p >= v0) & (p < q0):
            _write_rows(v_ptr, rv_ptr, vrows_ptr, vwin_ptr, slots_ptr, wslots_ptr, p - v0, H, t_begin, t_end,
                        stride_vt, stride_vh, stride_rvh, stride_von, stride_voh, vw_page, w_row,
                        D, V_CLIP, BLOCK_T, HAS_WINDOW, V_ROTATE, PRECISION, V_BITS, WIN_LOG2)
    if HAS_Q:
        if p >= q0:
            _rotate_queries(q_ptr, qo_ptr, rk_ptr, p - q0, (p - q0) // G, t_begin, t_end, stride_qt, stride_qh,
                            stride_qot, stride_qoh, stride_rkh, D, BLOCK_T, PRECISION)


def _num_programs_hint(device: torch.device) -> int:
    return 4 * sm_count(device) if device.type == "cuda" else 1  # interpreter: programs buy no parallelism


def _rotation_stride(name: str, rotation: torch.Tensor | None, h: int, d: int) -> int:
    """Per-head stride of a [D, D] (0) or [H, D, D] fp32 rotation; 0 for None (no rotation)."""
    if rotation is None:
        return 0
    if rotation.dtype != torch.float32 or not rotation.is_contiguous():
        raise ValueError(f"rotation {name} must be contiguous fp32")
    if rotation.shape == (d, d):
        return 0
    if rotation.shape == (h, d, d):
        return d * d
    raise ValueError(f"rotation {name} must be [{d}, {d}] or [{h}, {d}, {d}], got {tuple(rotation.shape)}")


def _check_part(name: str, x: torch.Tensor, t: int, h: int, d: int, layout: RowLayout, rows: torch.Tensor,
                win: WindowRows | None) -> None:
    check_head_dim(d, layout, attention=False)
    if x.shape != (t, h, d) or x.stride(-1) != 1:
        raise ValueError(f"{name} must be [{t}, {h}, {d}] with a contiguous last dim, got {tuple(x.shape)}")
    check_rows(f"{name} rows", rows, h, layout)
    if win is not None:
        check_window(f"{name} window", win, h, d)


def write_step(
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    *,
    rot_k: torch.Tensor | None,
    rot_v: torch.Tensor | None = None,
    clip_k: float,
    clip_v: float,
    k_layout: RowLayout | None = None,
    v_layout: RowLayout | None = None,
    k_rows: torch.Tensor | None = None,
    v_rows: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    k_win: WindowRows | None = None,
    v_win: WindowRows | None = None,
    window_slots: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One layer's write in one launch: k [T, H, D] rotated by ``rot_k``, quantized with
    ``k_layout`` / ``clip_k`` into k_rows[slots] (its rotated copy into window rows
    ``window_slots`` of ``k_win``);
    the same for v (``rot_v`` None: already rotated); and q [T, Hq, D] rotated by ``rot_k``
    into ``q_out`` (q's shape and dtype; allocated when None), which is returned. A part whose
    tensor is None is not written."""
    kv = k if k is not None else v
    ref = kv if kv is not None else q
    if ref is None:
        raise ValueError("write_step needs k, v or q")
    t, d = ref.shape[0], ref.shape[2]
    if kv is not None:
        h = kv.shape[1]
    else:  # queries only: the rotation's heads (one shared rotation: any head count)
        h = rot_k.shape[0] if rot_k is not None and rot_k.dim() == 3 else 1
    if k is not None:
        _check_part("k", k, t, h, d, k_layout, k_rows, k_win)
    if v is not None:
        _check_part("v", v, t, h, d, v_layout, v_rows, v_win)
    stride_rkh = _rotation_stride("rot_k", rot_k, h, d)
    stride_rvh = _rotation_stride("rot_v", rot_v, h, d)
    has_window = (k is not None and k_win is not None) or (v is not None and v_win is not None)
    if has_window:
        if window_slots is None:
            raise ValueError("a window given without window_slots")
        if (k is not None and k_win is None) or (v is not None and v_win is None):
            raise ValueError("k and v windows go together")
        if k is not None and v is not None and (k_win.log2_rows, k_win.row_stride) != (v_win.log2_rows, v_win.row_stride):
            raise ValueError(f"k and v windows must have the same log2_rows and row_stride, got "
                             f"{(k_win.log2_rows, k_win.row_stride)} and {(v_win.log2_rows, v_win.row_stride)}")
        check_index("window_slots", window_slots, t)
    if k is not None or v is not None:
        check_index("slots", slots, t)
    group = 1
    if q is not None:
        if rot_k is None:
            raise ValueError("q is rotated by rot_k: give it")
        if q.dim() != 3 or q.shape[0] != t or q.shape[2] != d or q.shape[1] % h or q.stride(-1) != 1:
            raise ValueError(f"q must be [{t}, a multiple of {h}, {d}] with a contiguous last dim, got {tuple(q.shape)}")
        check_head_dim(d, RowLayout(d), attention=False)
        group = q.shape[1] // h
        if q_out is None:
            q_out = torch.empty_like(q)
        elif q_out.shape != q.shape or q_out.stride(-1) != 1:
            raise ValueError("q_out must have q's shape and a contiguous last dim")
    if t == 0:
        return q_out
    kv_parts = (h if k is not None else 0) + (h if v is not None else 0)
    parts = kv_parts + (q.shape[1] if q is not None else 0)
    # the largest token blocks that compile without spills at 4 warps (benchmarks/kernel_static.py)
    block_t = 16 if d == 128 else 64
    blocks = triton.cdiv(t, block_t)
    # token ranges sized for the k/v parts (the clip rank passes make them the heavy ones): they
    # alone fill the GPU; the light query programs come on top
    per_prog = triton.cdiv(blocks, max(1, _num_programs_hint(ref.device) // (kv_parts or parts))) * block_t
    wslots = window_slots if has_window else slots
    dummy = ref  # stands in for absent pointers (never read: their parts are compiled out)

    def strides(x, rows, win):
        if x is None:
            return 0, 0, 0, 0, 0
        return x.stride(0), x.stride(1), rows.stride(0), rows.stride(1), win.page_stride if win is not None else 0

    ks, vs = strides(k, k_rows, k_win), strides(v, v_rows, v_win)
    win = (k_win if k is not None else v_win) if has_window else None  # k's and v's log2_rows / row_stride are equal
    win_log2, win_row = (win.log2_rows, win.row_stride) if win is not None else (0, 0)
    _write_step_kernel[(parts, triton.cdiv(t, per_prog))](
        dummy if k is None else k, dummy if rot_k is None else rot_k, dummy if k is None else k_rows,
        k_win.data if k_win is not None else dummy,
        dummy if v is None else v, dummy if rot_v is None else rot_v, dummy if v is None else v_rows,
        v_win.data if v_win is not None else dummy,
        dummy if q is None else q, dummy if q is None else q_out,
        slots, wslots, t, per_prog, h, group,
        ks[0], ks[1], stride_rkh, *ks[2:],
        vs[0], vs[1], stride_rvh, *vs[2:], win_row,
        *(q.stride()[:2] if q is not None else (0, 0)), *(q_out.stride()[:2] if q is not None else (0, 0)),
        D=d, BLOCK_T=block_t, HAS_WINDOW=has_window, WIN_LOG2=win_log2, PRECISION="tf32x3",
        HAS_K=k is not None, K_CLIP=min(clip_index(clip_k, d), d) if k is not None else d,
        K_BITS=k_layout.bits if k is not None else 2, K_ROTATE=rot_k is not None,
        HAS_V=v is not None, V_CLIP=min(clip_index(clip_v, d), d) if v is not None else d,
        V_BITS=v_layout.bits if v is not None else 2, V_ROTATE=rot_v is not None,
        HAS_Q=q is not None, num_warps=4, num_stages=1,
    )
    return q_out


def quantize_kv_write(
    x: torch.Tensor,
    *,
    rotation: torch.Tensor | None,
    clip_ratio: float,
    layout: RowLayout,
    rows_out: torch.Tensor,
    slots: torch.Tensor,
    window_out: WindowRows | None = None,
    window_slots: torch.Tensor | None = None,
) -> None:
    """Quantize x [T, H, D] into rows_out[slots] (and its rotated copy into rows ``window_slots``
    of window_out): one tensor's ``write_step``."""
    write_step(x, None, rot_k=rotation, clip_k=clip_ratio, clip_v=1.0, k_layout=layout, k_rows=rows_out, slots=slots,
               k_win=window_out, window_slots=window_slots)


def rotate_queries(q: torch.Tensor, rotation: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, Hq, D] @ R_K (``reference.rotate_queries``): the queries-only ``write_step``."""
    return write_step(None, None, rot_k=rotation, clip_k=1.0, clip_v=1.0, q=q, q_out=out)
