"""Paged split-KV decode attention over quantized storage rows + a full-precision window.

Shapes (B requests, Hq query heads, Hkv KV heads, G = Hq / Hkv, D head_dim a power
of two >= 64, one quantization group per row):

- ``q``                 [B, Hq, D] fp16/bf16/fp32, already rotated by R_K; last dim contiguous.
- ``k_rows``/``v_rows`` uint8 [N, Hkv, row_bytes] codec.py storage rows (last two dims contiguous),
  of ``layout`` / ``v_layout`` (2, 3 or 4 bits each: their own row bytes and strides).
- ``packed_indptr``       int32/int64 [B + 1]; ``packed_indices`` [nnz] slot ids into the rows
  (sglang triton-backend convention: one index per token, any page size).
- ``k_win``/``v_win``   ``WindowRows`` (window.py): rotated full-precision rows of Hkv x D
  (bf16/fp16/fp32), dense or in pages; ``win_indptr`` [B + 1], ``win_indices`` row ids into them.
- returns ``out`` [B, Hq, D] (q.dtype, rotated value basis) and ``lse`` [B, Hq] fp32 (natural log);
  a request with no tokens gets out = 0, lse = -inf.

Algorithm (FlashInfer-style split-KV): stage 1 runs one program per (KV head, split,
request). Each request's tokens form a virtual sequence [packed tokens, window tokens],
the window tokens weighted ``WIN_COST`` (~ their byte cost relative to a quantized row) so
that splits carry equal bytes; each split does an online softmax over its part and
writes a partial (out, lse). Stage 2 merges the splits by LSE. All G query heads of a KV
head share every loaded row (padded to 8 for ``tl.dot``, keys being its M dimension).

The INT2 and window blocks are the tile helpers of ``tiles.py`` (shared with extend).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import check_head_dim, check_index, check_rows, check_windows, plan_splits, sm_count
from .codec import RowLayout
from .tiles import (_dense_block, _packed_block, _packed_finish, _load_q_codes, _load_q_planes, _row_offsets,
                    code_bits2)
from .window import WindowRows, _window_offset

__all__ = ["DecodeConfig", "plan_num_splits", "decode_attention", "merge_splits"]

LOG2E = 1.4426950408889634
MERGE_BLOCK_S = 8  # splits merged per step


@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes and launch knobs, chosen from the static report (``benchmarks/kernel_static.py``,
    docs/kernels.md), not from GPU timings; ``bench_decode.py --sweep`` times the alternatives."""

    block_n: int = 128  # packed rows per loop step
    block_w: int = 32  # window rows per loop step
    num_warps: int = 4
    num_stages: int = 2
    min_split_tokens: int = 256  # never split a request finer than this (merge overhead)
    programs_per_sm: int = 8  # enough loads in flight to cover HBM latency (Little's law)


def plan_num_splits(batch: int, kv_heads: int, avg_tokens: int, num_sms: int, config: DecodeConfig = DecodeConfig()) -> int:
    """Splits per request so that B * Hkv * splits fills the GPU ``programs_per_sm`` times,
    without splits shorter than ``min_split_tokens``. Host-side ints only (no sync):
    call once per batch (plan), reuse for every layer (run); fix it under CUDA graphs."""
    return plan_splits(batch * kv_heads, avg_tokens, num_sms, config.programs_per_sm, config.min_split_tokens, 256)


@triton.jit
def _decode_split_kernel(
    q_ptr, krow_ptr, vrow_ptr, i_indptr, i_idx, kw_ptr, vw_ptr, w_indptr, w_idx,
    opart_ptr, lpart_ptr, scale_log2, code_bits2, num_splits,
    stride_qb, stride_qh, stride_krn, stride_krh, stride_vrn, stride_vrh, kw_page, vw_page, w_row,
    G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, WIN_COST: tl.constexpr,
    K_BITS: tl.constexpr, V_BITS: tl.constexpr, SAME_STRIDES: tl.constexpr, WIN_LOG2: tl.constexpr,
):
    """SAME_STRIDES: k_rows and v_rows have equal strides (the launcher compares them), so one
    byte offset serves both (the V strides are then not read). Window rows: ``WindowRows`` of
    page strides kw_page / vw_page, row stride w_row and log2_rows WIN_LOG2, Hkv heads of D per row."""
    hk = tl.program_id(0)
    sp = tl.program_id(1)
    b = tl.program_id(2)
    Q: tl.constexpr = D // 4
    i_beg = tl.load(i_indptr + b).to(tl.int64)
    n_i = (tl.load(i_indptr + b + 1) - i_beg).to(tl.int32)
    w_beg = tl.load(w_indptr + b).to(tl.int64)
    n_w = (tl.load(w_indptr + b + 1) - w_beg).to(tl.int32)
    total = n_i + WIN_COST * n_w
    chunk = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, total)
    # Window token j sits at virtual position n_i + WIN_COST * j: exact partition.
    w_lo = tl.minimum(tl.cdiv(tl.maximum(lo - n_i, 0), WIN_COST), n_w)
    w_hi = tl.minimum(tl.cdiv(tl.maximum(hi - n_i, 0), WIN_COST), n_w)
    i_hi = tl.minimum(hi, n_i)

    hrow = tl.arange(0, BLOCK_H)
    hmask = hrow < G
    qh = q_ptr + b * stride_qb + (hk * G + hrow)[None, :] * stride_qh
    q0, q1, q2, q3, qsum, qb = _load_q_codes(qh, hmask[None, :], Q)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    msum = tl.zeros([BLOCK_H], tl.float32)
    ssum = tl.zeros([BLOCK_H], tl.float32)
    vscale = tl.full([], 1.0, tl.float32)  # the units of the quantized blocks' value sums (tiles._packed_block)
    acc0 = tl.zeros([Q, BLOCK_H], tl.float32)
    acc1 = tl.zeros([Q, BLOCK_H], tl.float32)
    acc2 = tl.zeros([Q, BLOCK_H], tl.float32)
    acc3 = tl.zeros([Q, BLOCK_H], tl.float32)
    i_full = lo + tl.maximum(i_hi - lo, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, i_full, BLOCK_N):  # full blocks: no masks
        offs = start + tl.arange(0, BLOCK_N)
        k_off, v_off = _row_offsets(i_idx + i_beg, offs, None, hk, stride_krn, stride_krh, stride_vrn, stride_vrh,
                                    SAME_STRIDES, False)
        m_i, l_i, acc0, acc1, acc2, acc3, msum, ssum, vscale = _packed_block(
            q0, q1, q2, q3, qsum, qb, k_off, v_off, offs, krow_ptr, vrow_ptr, m_i, l_i, acc0, acc1, acc2, acc3,
            msum, ssum, vscale, scale_log2, code_bits2, Q, K_BITS, V_BITS, None, False)
    if i_full < i_hi:
        offs = i_full + tl.arange(0, BLOCK_N)
        nmask = offs < i_hi
        k_off, v_off = _row_offsets(i_idx + i_beg, offs, nmask, hk, stride_krn, stride_krh, stride_vrn, stride_vrh,
                                    SAME_STRIDES, True)
        m_i, l_i, acc0, acc1, acc2, acc3, msum, ssum, vscale = _packed_block(
            q0, q1, q2, q3, qsum, qb, k_off, v_off, nmask, krow_ptr, vrow_ptr, m_i, l_i, acc0, acc1, acc2, acc3,
            msum, ssum, vscale, scale_log2, code_bits2, Q, K_BITS, V_BITS, nmask[:, None])
    acc0, acc1, acc2, acc3 = _packed_finish(acc0, acc1, acc2, acc3, msum, ssum, vscale, Q)
    qd0, qd1, qd2, qd3 = _load_q_planes(qh + tl.arange(0, Q)[:, None], hmask[None, :], Q)
    for start in range(w_lo, w_hi, BLOCK_W):
        offs = start + tl.arange(0, BLOCK_W)
        nmask = offs < w_hi
        wid = tl.load(w_idx + w_beg + offs, mask=nmask, other=0)
        m_i, l_i, acc0, acc1, acc2, acc3 = _dense_block(
            qd0, qd1, qd2, qd3, _window_offset(wid, kw_page, w_row, WIN_LOG2) + hk * D,
            _window_offset(wid, vw_page, w_row, WIN_LOG2) + hk * D,
            nmask, kw_ptr, vw_ptr, m_i, l_i, acc0, acc1, acc2, acc3, scale_log2, Q, nmask[:, None])

    # Partial result of this split (lse = -inf and out = 0 when it saw no token).
    nonempty = l_i > 0
    inv = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)[None, :]
    hq = hk * G + hrow
    obase = opart_ptr + ((b * (G * tl.num_programs(0)) + hq) * num_splits + sp).to(tl.int64)[None, :] * D
    oc = tl.arange(0, Q)[:, None]
    om = hmask[None, :]
    tl.store(obase + oc, acc0 * inv, mask=om)
    tl.store(obase + Q + oc, acc1 * inv, mask=om)
    tl.store(obase + 2 * Q + oc, acc2 * inv, mask=om)
    tl.store(obase + 3 * Q + oc, acc3 * inv, mask=om)
    lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    lbase = (b * (G * tl.num_programs(0)) + hq) * num_splits + sp
    tl.store(lpart_ptr + lbase, lse2, mask=hmask)


@triton.jit
def _merge_splits_kernel(opart_ptr, lpart_ptr, out_ptr, lse_ptr, num_splits, stride_ob, stride_oh, H,
                         D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (request, query head): LSE-weighted merge of the split partials, BLOCK_S
    splits per step with a running max (any split count in the same registers: no spills)."""
    hq = tl.program_id(0)
    b = tl.program_id(1)
    base = (b * H + hq).to(tl.int64) * num_splits
    cols = tl.arange(0, D)
    mx = float("-inf")
    wsum = 0.0
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        smask = s < num_splits
        lse2 = tl.load(lpart_ptr + base + s, mask=smask, other=float("-inf"))
        mx_new = tl.maximum(mx, tl.max(lse2, axis=0))
        ref = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        w = tl.exp2(lse2 - ref)
        keep = tl.exp2(mx - ref)
        part = tl.load(opart_ptr + (base + s)[:, None] * D + cols[None, :], mask=smask[:, None], other=0.0)
        acc = acc * keep + tl.sum(part * w[:, None], axis=0)
        wsum = wsum * keep + tl.sum(w, axis=0)
        mx = mx_new
    o = acc / tl.where(wsum > 0, wsum, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + cols, o.to(out_ptr.dtype.element_ty))
    ref = tl.where(mx == float("-inf"), 0.0, mx)
    lse = tl.where(wsum > 0, (ref + tl.log2(tl.where(wsum > 0, wsum, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + b * H + hq, lse)


def win_cost(layout: RowLayout, v_layout: RowLayout, win: WindowRows) -> int:
    """Bytes of one token's K+V window rows relative to its K+V storage rows (split balancing weight)."""
    return max(1, round(2 * layout.head_dim * win.data.element_size() / (layout.row_bytes + v_layout.row_bytes)))


def decode_attention(
    q: torch.Tensor,
    *,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    packed_indptr: torch.Tensor,
    packed_indices: torch.Tensor,
    k_win: WindowRows,
    v_win: WindowRows,
    win_indptr: torch.Tensor,
    win_indices: torch.Tensor,
    sm_scale: float,
    layout: RowLayout,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    v_layout: RowLayout | None = None,
    config: DecodeConfig = DecodeConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode. ``layout``: the key rows', ``v_layout``: the value rows' (None: ``layout``).
    ``num_splits`` None = ``plan_num_splits`` from the average length (host-known tensor sizes,
    no sync); pass a fixed value under CUDA graphs."""
    bsz, hq, d = q.shape
    hkv = k_rows.shape[1]
    v_layout = layout if v_layout is None else v_layout
    check_head_dim(d, layout)
    check_head_dim(d, v_layout)
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last dim")
    check_rows("k_rows", k_rows, hkv, layout)
    check_rows("v_rows", v_rows, hkv, v_layout)
    check_windows(k_win, v_win, hkv, d)
    for name, t in (("packed_indptr", packed_indptr), ("packed_indices", packed_indices),
                    ("win_indptr", win_indptr), ("win_indices", win_indices)):
        check_index(name, t)
    if packed_indptr.numel() != bsz + 1 or win_indptr.numel() != bsz + 1:
        raise ValueError(f"indptr tensors must have B + 1 = {bsz + 1} entries")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must have q's shape and a contiguous last dim")
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=q.device)
    if bsz == 0:
        return out, lse
    if num_splits is None:
        avg = (packed_indices.numel() + win_indices.numel()) // bsz
        num_splits = plan_num_splits(bsz, hkv, avg, sm_count(q.device), config)
    group = hq // hkv
    opart = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=q.device)
    lpart = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(hkv, num_splits, bsz)](
        q, k_rows, v_rows, packed_indptr, packed_indices, k_win.data, v_win.data, win_indptr, win_indices,
        opart, lpart, sm_scale * LOG2E, code_bits2(), num_splits,
        q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1), v_rows.stride(0), v_rows.stride(1),
        k_win.page_stride, v_win.page_stride, k_win.row_stride,
        G=group, BLOCK_H=max(8, triton.next_power_of_2(group)), D=d,
        BLOCK_N=config.block_n, BLOCK_W=config.block_w, WIN_COST=win_cost(layout, v_layout, k_win),
        K_BITS=layout.bits, V_BITS=v_layout.bits, SAME_STRIDES=k_rows.stride() == v_rows.stride(),
        WIN_LOG2=k_win.log2_rows, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    merge_splits(opart, lpart, out, lse)
    return out, lse


def merge_splits(opart: torch.Tensor, lpart: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None = None) -> None:
    """out [R, H, D] (and lse [R, H], natural log) from split partials opart [R, H, S, D] and
    their log2-sum-exps lpart [R, H, S] (R: decode requests or extend tokens)."""
    rows, h, splits, d = opart.shape
    if lse is None:
        lse = torch.empty(rows, h, dtype=torch.float32, device=out.device)
    _merge_splits_kernel[(h, rows)](
        opart, lpart, out, lse, splits, out.stride(0), out.stride(1), h, D=d, BLOCK_S=MERGE_BLOCK_S)
