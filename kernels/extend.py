"""Extend (chunked prefill) attention over a quantized prefix plus the chunk's exact k/v.

Shapes (Tq chunk tokens over B requests, Hq query heads, Hkv KV heads, D head_dim a
power of two >= 64, one quantization group per row):

- ``q``               [Tq, Hq, D] fp16/bf16/fp32, rotated by R_K; last dim contiguous.
- ``k_new``/``v_new`` [Tq, Hkv, D] rotated exact k/v of the same chunk tokens.
- ``qo_indptr``       int32/int64 [B + 1], ragged chunk boundaries into q/k_new/v_new.
- request b's chunk starts at position ``prefix_lens[b]`` = a. Its keys: the quantized rows
  (``packed_indptr``/``packed_indices`` into uint8 ``k_rows``/``v_rows`` [N, Hkv, row_bytes] of
  ``layout`` / ``v_layout``: 2, 3 or 4 bits each, their own row bytes and strides) of
  positions sink, sink + 1, ... (the chunk's own rows are written before attention), the
  window rows (``win_indptr``/``win_indices``: row ids into ``k_win``/``v_win``, ``WindowRows``
  of Hkv x D, window.py): the sinks then a run of positions ending at a - 1, and the chunk's
  exact k/v (causal). The block rule (rule.py) picks one copy per key: the query at t reads
  key p exactly iff p < sink or p >= the start of t's block, else its packed row.
- returns ``out`` [Tq, Hq, D] (q.dtype, rotated value basis).

One program per (BLOCK_M chunk tokens x the G query heads of one KV head, request, split),
flash-attention style, with the same folded INT2 math as decode (``tiles._packed_block``): every
K/V block loaded serves the whole query group, and no prefix is ever dequantized to memory.
A short chunk over a long cached prefix (a question over a document) splits the packed prefix
across programs (``plan_extend_splits``) and merges the partials with decode's merge kernel.
Chunked prefill and prefix-cache hits both go through here; a plain prefill is the case with
empty prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import check_head_dim, check_index, check_rows, check_windows, plan_splits, sm_count
from .codec import RowLayout
from .decode import LOG2E, merge_splits
from .tiles import (_dense_block, _packed_block, _packed_finish, _load_q_codes, _load_q_planes, _row_offsets,
                    code_bits2)
from .rule import PositionRule
from .window import WindowRows, _window_offset

__all__ = ["ExtendConfig", "plan_extend_splits", "extend_attention"]


@dataclass(frozen=True)
class ExtendConfig:
    """Tile sizes and split-KV knobs (registers and spills: ``benchmarks/kernel_static.py``)."""

    block_rows: int = 64  # query rows per program: BLOCK_M chunk tokens x the G (padded) heads of a KV head
    block_n: int = 32  # keys per step; 64 keys or 8 warps spill on sm_90 (kernel_static.py)
    num_warps: int = 4
    num_stages: int = 2
    min_split_tokens: int = 512  # never split a prefix finer than this (merge overhead)
    programs_per_sm: int = 4
    max_splits: int = 64


def plan_extend_splits(programs: int, packed_tokens: int, num_sms: int, config: ExtendConfig = ExtendConfig()) -> int:
    """Splits of each request's packed prefix, from host-known sizes only: enough programs to fill
    the GPU ``programs_per_sm`` times, never splits shorter than ``min_split_tokens``."""
    return plan_splits(programs, packed_tokens, num_sms, config.programs_per_sm, config.min_split_tokens,
                       config.max_splits)


@triton.jit
def _block_start(t, block, first, DOUBLINGS: tl.constexpr):
    """Start of the block of position t (``rule.PositionRule.block_start``): multiples of ``block``,
    and below it, with DOUBLINGS > 0, blocks doubling from ``first`` (block = first << DOUBLINGS)."""
    start = t // block * block
    if DOUBLINGS > 0:
        small = tl.where(t >= first, first, 0)
        for i in tl.static_range(1, DOUBLINGS):
            small = tl.where(t >= (first << i), first << i, small)
        start = tl.where(t >= block, start, small)
    return start


@triton.jit
def _extend_kernel(
    q_ptr, kn_ptr, vn_ptr, qo_indptr, krow_ptr, vrow_ptr, i_indptr, i_idx,
    kw_ptr, vw_ptr, w_indptr, w_idx, prefix_ptr, o_ptr, opart_ptr, lpart_ptr,
    scale_log2, code_bits2, sink, block, first, num_splits, H,
    stride_qt, stride_qh, stride_knt, stride_knh, stride_vnt, stride_vnh,
    stride_krn, stride_krh, stride_vrn, stride_vrh, kw_page, vw_page, w_row,
    stride_ot, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, K_BITS: tl.constexpr, V_BITS: tl.constexpr, SAME_STRIDES: tl.constexpr,
    WIN_LOG2: tl.constexpr, DOUBLINGS: tl.constexpr,
):
    """Program (token block, KV head, request x split). Its rows are BLOCK_M chunk tokens x the
    G query heads of the KV head (padded to GP), so every K/V block it loads serves the whole
    group. Split sp takes one share of the packed prefix; split 0 also takes the window and the
    chunk. With SPLIT, each split writes a partial (out, log2-sum-exp) that the merge combines.
    K_BITS / V_BITS: code widths of the key / value rows; SAME_STRIDES and the window rows
    (kw_page / vw_page, w_row, WIN_LOG2) as in decode."""
    mb = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2) // num_splits
    sp = tl.program_id(2) % num_splits
    Q: tl.constexpr = D // 4
    q_beg = tl.load(qo_indptr + b).to(tl.int64)
    q_len = (tl.load(qo_indptr + b + 1) - q_beg).to(tl.int32)
    m0 = mb * BLOCK_M
    if m0 >= q_len:
        return
    r = tl.arange(0, BLOCK_M * GP)
    tok = m0 + r // GP
    hq = hk * G + r % GP
    rmask = (tok < q_len) & (r % GP < G)
    a = tl.load(prefix_ptr + b).to(tl.int32)  # the chunk's first position
    exact_from = _block_start(a + tok, block, first, DOUBLINGS)[None, :]  # key p >= sink is exact iff p >= this
    qp = q_ptr + (q_beg + tok)[None, :] * stride_qt + hq[None, :] * stride_qh
    q0, q1, q2, q3, qsum, qb = _load_q_codes(qp, rmask[None, :], Q)

    m_i = tl.full([BLOCK_M * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * GP], tl.float32)
    msum = tl.zeros([BLOCK_M * GP], tl.float32)
    ssum = tl.zeros([BLOCK_M * GP], tl.float32)
    vscale = tl.full([], 1.0, tl.float32)  # the units of the quantized blocks' value sums (tiles._packed_block)
    acc0 = tl.zeros([Q, BLOCK_M * GP], tl.float32)
    acc1 = tl.zeros([Q, BLOCK_M * GP], tl.float32)
    acc2 = tl.zeros([Q, BLOCK_M * GP], tl.float32)
    acc3 = tl.zeros([Q, BLOCK_M * GP], tl.float32)

    i_beg = tl.load(i_indptr + b).to(tl.int64)
    n_i = (tl.load(i_indptr + b + 1) - i_beg).to(tl.int32)
    share = tl.cdiv(tl.cdiv(n_i, num_splits), BLOCK_N) * BLOCK_N
    i_lo = sp * share
    i_hi = tl.minimum(i_lo + share, n_i)
    # Blocks that every row reads as INT2 (key position sink + j below the exact block of the
    # program's first token a + m0) run without masks; the rest, masked by the position rule.
    i_full = i_lo + tl.maximum(tl.minimum(i_hi, _block_start(a + m0, block, first, DOUBLINGS) - sink) - i_lo, 0) \
        // BLOCK_N * BLOCK_N
    for start in range(i_lo, i_full, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        k_off, v_off = _row_offsets(i_idx + i_beg, offs, None, hk, stride_krn, stride_krh, stride_vrn, stride_vrh,
                                    SAME_STRIDES, False)
        m_i, l_i, acc0, acc1, acc2, acc3, msum, ssum, vscale = _packed_block(
            q0, q1, q2, q3, qsum, qb, k_off, v_off, offs, krow_ptr, vrow_ptr, m_i, l_i, acc0, acc1, acc2, acc3,
            msum, ssum, vscale, scale_log2, code_bits2, Q, K_BITS, V_BITS, None, False)
    for start in range(i_full, i_hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        nmask = offs < i_hi
        k_off, v_off = _row_offsets(i_idx + i_beg, offs, nmask, hk, stride_krn, stride_krh, stride_vrn, stride_vrh,
                                    SAME_STRIDES, True)
        m_i, l_i, acc0, acc1, acc2, acc3, msum, ssum, vscale = _packed_block(
            q0, q1, q2, q3, qsum, qb, k_off, v_off, nmask, krow_ptr, vrow_ptr, m_i, l_i, acc0, acc1, acc2, acc3,
            msum, ssum, vscale, scale_log2, code_bits2, Q, K_BITS, V_BITS, (sink + offs)[:, None] < exact_from)
    acc0, acc1, acc2, acc3 = _packed_finish(acc0, acc1, acc2, acc3, msum, ssum, vscale, Q)

    if sp == 0:
        qd0, qd1, qd2, qd3 = _load_q_planes(qp + tl.arange(0, Q)[:, None], rmask[None, :], Q)
        w_beg = tl.load(w_indptr + b).to(tl.int64)
        n_w = (tl.load(w_indptr + b + 1) - w_beg).to(tl.int32)
        n_sink = tl.minimum(tl.minimum(a, sink), n_w)  # window = the sinks, then a run ending at a - 1
        for start in range(0, n_w, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            nmask = offs < n_w
            pos = tl.where(offs < n_sink, offs, a - n_w + offs)[:, None]
            wid = tl.load(w_idx + w_beg + offs, mask=nmask, other=0)
            m_i, l_i, acc0, acc1, acc2, acc3 = _dense_block(
                qd0, qd1, qd2, qd3, _window_offset(wid, kw_page, w_row, WIN_LOG2) + hk * D,
                _window_offset(wid, vw_page, w_row, WIN_LOG2) + hk * D,
                nmask, kw_ptr, vw_ptr, m_i, l_i, acc0, acc1, acc2, acc3, scale_log2, Q,
                (pos < sink) | (pos >= exact_from))
        # The chunk itself, causal: only key blocks up to this query block's last token.
        for start in range(0, tl.minimum(m0 + BLOCK_M, q_len), BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            nmask = offs < q_len
            ktok = (q_beg + offs).to(tl.int64)
            m_i, l_i, acc0, acc1, acc2, acc3 = _dense_block(
                qd0, qd1, qd2, qd3, ktok * stride_knt + hk * stride_knh, ktok * stride_vnt + hk * stride_vnh,
                nmask, kn_ptr, vn_ptr, m_i, l_i, acc0, acc1, acc2, acc3, scale_log2, Q,
                (offs[:, None] <= tok[None, :]) & (((a + offs)[:, None] < sink) | ((a + offs)[:, None] >= exact_from)))

    nonempty = l_i > 0
    inv = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)[None, :]
    oc = tl.arange(0, Q)[:, None]
    om = rmask[None, :]
    if SPLIT:  # partial [token, head, split] rows of D, as decode's merge reads them
        row = ((q_beg + tok) * H + hq) * num_splits + sp
        op = opart_ptr + row[None, :] * D + oc
        dt = opart_ptr.dtype.element_ty
        lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lpart_ptr + row, lse2, mask=rmask)
    else:
        op = o_ptr + (q_beg + tok)[None, :] * stride_ot + hq[None, :] * stride_oh + oc
        dt = o_ptr.dtype.element_ty
    tl.store(op, (acc0 * inv).to(dt), mask=om)
    tl.store(op + Q, (acc1 * inv).to(dt), mask=om)
    tl.store(op + 2 * Q, (acc2 * inv).to(dt), mask=om)
    tl.store(op + 3 * Q, (acc3 * inv).to(dt), mask=om)


def extend_attention(
    q: torch.Tensor,
    *,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    qo_indptr: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    packed_indptr: torch.Tensor,
    packed_indices: torch.Tensor,
    k_win: WindowRows,
    v_win: WindowRows,
    win_indptr: torch.Tensor,
    win_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    rule: PositionRule,
    sm_scale: float,
    layout: RowLayout,
    out: torch.Tensor | None = None,
    max_q_len: int | None = None,
    num_splits: int | None = None,
    v_layout: RowLayout | None = None,
    config: ExtendConfig = ExtendConfig(),
) -> torch.Tensor:
    """Extend attention. ``layout``: the key rows', ``v_layout``: the value rows' (None: ``layout``).
    ``max_q_len`` (longest chunk, host int) avoids a device sync; None reads it from
    ``qo_indptr``. ``num_splits`` of each packed prefix: None plans it from host-known sizes
    (``plan_extend_splits``). ``rule``: a block rule (``rule.PositionRule``; no sliding part)."""
    tq, hq, d = q.shape
    hkv = k_new.shape[1]
    v_layout = layout if v_layout is None else v_layout
    check_head_dim(d, layout)
    check_head_dim(d, v_layout)
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new)):
        if t.stride(-1) != 1 or t.shape[0] != tq or t.shape[2] != d:
            raise ValueError(f"{name} must be [{tq}, H, {d}] contiguous in its last dim")
    if v_new.shape[1] != hkv:
        raise ValueError("k_new and v_new must have the same number of heads")
    check_rows("k_rows", k_rows, hkv, layout)
    check_rows("v_rows", v_rows, hkv, v_layout)
    check_windows(k_win, v_win, hkv, d)
    if not rule.rebuildable:
        raise ValueError(f"the extend kernel applies block rules only, got {rule.name}")
    for name, t in (("qo_indptr", qo_indptr), ("packed_indptr", packed_indptr), ("packed_indices", packed_indices),
                    ("win_indptr", win_indptr), ("win_indices", win_indices), ("prefix_lens", prefix_lens)):
        check_index(name, t)
    bsz = qo_indptr.numel() - 1
    if packed_indptr.numel() != bsz + 1 or win_indptr.numel() != bsz + 1:
        raise ValueError(f"indptr tensors must have B + 1 = {bsz + 1} entries")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must have q's shape and a contiguous last dim")
    if bsz == 0 or tq == 0:
        return out
    if max_q_len is None:
        max_q_len = int((qo_indptr[1:] - qo_indptr[:-1]).max())
    if max_q_len <= 0:
        return out
    group = hq // hkv
    gp = triton.next_power_of_2(group)
    block_m = max(1, config.block_rows // gp)
    programs = triton.cdiv(max_q_len, block_m) * hkv * bsz
    if num_splits is None:
        num_splits = plan_extend_splits(programs, packed_indices.numel() // bsz, sm_count(q.device), config)
    split = num_splits > 1
    if split:  # partials in decode's layout, merged by its kernel ([token, head] as its [request, head])
        opart = torch.empty(tq, hq, num_splits, d, dtype=torch.float32, device=q.device)
        lpart = torch.empty(tq, hq, num_splits, dtype=torch.float32, device=q.device)
    else:
        opart = lpart = out
    _extend_kernel[(triton.cdiv(max_q_len, block_m), hkv, bsz * num_splits)](
        q, k_new, v_new, qo_indptr, k_rows, v_rows, packed_indptr, packed_indices,
        k_win.data, v_win.data, win_indptr, win_indices, prefix_lens, out, opart, lpart,
        sm_scale * LOG2E, code_bits2(), rule.sink, rule.block, rule.first or rule.block, num_splits, hq,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        k_rows.stride(0), k_rows.stride(1), v_rows.stride(0), v_rows.stride(1),
        k_win.page_stride, v_win.page_stride, k_win.row_stride, out.stride(0), out.stride(1),
        G=group, GP=gp, D=d, BLOCK_M=block_m, BLOCK_N=config.block_n, SPLIT=split,
        K_BITS=layout.bits, V_BITS=v_layout.bits, SAME_STRIDES=k_rows.stride() == v_rows.stride(),
        WIN_LOG2=k_win.log2_rows, DOUBLINGS=(rule.block // rule.first).bit_length() - 1 if rule.first else 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        merge_splits(opart, lpart, out)
    return out
