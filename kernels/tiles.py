"""Triton tile helpers shared by the decode and extend kernels (no launchers here).

A program holds a block of query rows (decode: the G query heads of one KV head, padded to
8; extend: BLOCK_M chunk tokens x the G heads of one KV head) as four D/4 quarter-planes (the
storage row's plane layout), transposed to [D/4, rows] so that keys are the dots' M dimension,
and folds blocks of keys into an online softmax: ``_packed_block`` over quantized storage rows
(2, 3 or 4 bits per code: the constexprs K_BITS and V_BITS, each tensor its own row layout),
``_dense_block`` over full-precision rows (windows, a chunk's own k/v).

Quantized rows are never dequantized element by element: with codes c in 0..2^bits - 1, per-row
scale s and minimum m (fp16), the plane layout gives four dense quarter dots and

    logit = s * (q . c) + m * sum(q)
    sum_t p_t v_t = sum_t (p_t s_t) c_t + (sum_t p_t m_t) * 1

(p_t s_t is normalized by the block's max scale before the cast to fp16 so that small scales
do not underflow). The code dots are fp16 whatever the query dtype (bf16 queries are rounded
to fp16 for them: exact for |q| in [2^-14, 65504]). Plane p's codes enter them as the fp16
numbers B_p + c, B_p = 2^(10 - 2p), built from the row's 32-bit words by one mask-or per two
codes (``_plane``: the code already sits at mantissa bits 2p.. of its byte, so no shift per
plane; the high bits of 3 and 4 bits are or-ed in above it). The B_p terms are removed per
row and per key, never per element: sum_p B_p sum(q_p) from the logits, sum_t p_t s_t B_p
from the values once at the end (``_packed_finish``). The two halves of a masked word stay one
register, so the unpacked planes hold their columns in a fixed permutation (``_plane_cols``):
the code dots read q in that order, and the value accumulators are put back in natural order
after the quantized loop.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _online_update(m_i, l_i, logit):
    """Online softmax step in log2 units over logit [keys, rows]: returns (m_new, alpha, p, l_new)."""
    m_new = tl.maximum(m_i, tl.max(logit, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays empty
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(logit - m_ref[None, :])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=0)


@triton.jit
def _row_params(row_ptr, row_off, nmask, P: tl.constexpr):
    """fp32 (scale, minimum) of each row from one 32-bit load at byte P (fp16 LE pair)."""
    word = tl.load((row_ptr + row_off + P).to(tl.pointer_type(tl.int32), bitcast=True), mask=nmask,
                   other=None if nmask is None else 0)
    scale = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    minimum = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _load_q_planes(qp, mask, Q: tl.constexpr):
    """The four D/4 quarter-planes of a block of query rows in natural column order, transposed:
    [Q, rows] each (``qp`` points at column 0 of each plane as [Q, rows]): the dense blocks' q."""
    return (tl.load(qp, mask=mask, other=0.0), tl.load(qp + Q, mask=mask, other=0.0),
            tl.load(qp + 2 * Q, mask=mask, other=0.0), tl.load(qp + 3 * Q, mask=mask, other=0.0))


@triton.jit
def _plane_cols(Q: tl.constexpr):
    """[Q] plane columns in the order ``_plane`` unpacks them (``plane_order``): position
    k = b * Q/2 + 2i + a holds column 4i + 2a + b."""
    k = tl.arange(0, Q)
    return 4 * ((k % (Q // 2)) // 2) + 2 * (k % 2) + k // (Q // 2)


def plane_order(q: int) -> torch.Tensor:
    """``_plane_cols`` on the host: the plane columns of the unpacked code order."""
    k = torch.arange(q)
    return 4 * ((k % (q // 2)) // 2) + 2 * (k % 2) + k // (q // 2)


@triton.jit
def _load_q_codes(qp, mask, Q: tl.constexpr):
    """The query planes of the code dots: ``qp`` points at column 0 of each plane as [Q, rows];
    the columns are read in ``_plane_cols`` order and rounded to fp16. Also returns, per row,
    sum(q) and sum_p B_p * sum(q_p) over the rounded values (the code planes' base terms)."""
    qc = qp + _plane_cols(Q)[:, None]
    q0 = tl.load(qc, mask=mask, other=0.0).to(tl.float16)
    q1 = tl.load(qc + Q, mask=mask, other=0.0).to(tl.float16)
    q2 = tl.load(qc + 2 * Q, mask=mask, other=0.0).to(tl.float16)
    q3 = tl.load(qc + 3 * Q, mask=mask, other=0.0).to(tl.float16)
    s0 = tl.sum(q0.to(tl.float32), axis=0)
    s1 = tl.sum(q1.to(tl.float32), axis=0)
    s2 = tl.sum(q2.to(tl.float32), axis=0)
    s3 = tl.sum(q3.to(tl.float32), axis=0)
    qb = s0 * _plane_base(0) + s1 * _plane_base(1) + s2 * _plane_base(2) + s3 * _plane_base(3)
    return q0, q1, q2, q3, s0 + s1 + s2 + s3, qb


@triton.constexpr_function
def _plane_base(p):
    """B_p = 2^(10 - 2p): the fp16 number of ``_plane`` whose low mantissa bits are 0 and in
    which the code of plane p, at mantissa bits 2p.., has weight 1 (B_p + c exactly)."""
    return 1024.0 / 4 ** p


def code_bits2() -> int:
    """Launcher argument ``code_bits2``: the bits of B_0 = 1024 in fp16 in both 16-bit halves of
    a 32-bit word (``_plane`` derives B_1..B_3 from it). A runtime argument on purpose: held in
    a register, the mask-and-or of ``_plane`` is one LOP3 (two immediates take two)."""
    return 0x6400 | 0x6400 << 16


@triton.constexpr_function
def _code_bytes(q, bits):
    """Byte offset of the scale/minimum pair in a row of ``bits`` (codec.RowLayout.code_bytes; q = D/4)."""
    return q + {2: 0, 3: q // 2, 4: q}[bits]


@triton.jit
def _load_rows(row_ptr, row_off, nmask, base2, Q: tl.constexpr, BITS: tl.constexpr, MASKED: tl.constexpr = True):
    """A block of storage rows (byte offsets [BN], 4-byte aligned) of ``BITS`` per code: the four
    [BN, Q] planes as fp16 numbers B_p + c in ``_plane_cols`` order (``_plane``), and the fp32
    (scale, minimum) [BN]."""
    row_off = tl.multiple_of(row_off, 4)
    wc = tl.arange(0, Q // 4)[None, :]
    m2 = nmask[:, None] if MASKED else None
    wp = (row_ptr + row_off[:, None]).to(tl.pointer_type(tl.int32), bitcast=True) + wc
    words = tl.load(wp, mask=m2, other=0 if MASKED else None)
    hi = words  # unused at 2 bits
    if BITS == 4:  # the high plane: Q/4 more int32 words in the same layout
        hi = tl.load(wp + Q // 4, mask=m2, other=0 if MASKED else None)
    if BITS == 3:  # the 1-bit plane: one 16-bit word per int32 word of the 2-bit plane
        hp = (row_ptr + row_off[:, None] + Q).to(tl.pointer_type(tl.uint16), bitcast=True) + wc
        hi = tl.load(hp, mask=m2, other=0 if MASKED else None).to(tl.int32)
        hi = (hi | (hi << 8)) << 2
    w13 = words >> 8
    scale, minimum = _row_params(row_ptr, row_off, nmask if MASKED else None, _code_bytes(Q, BITS))
    return (_plane(words, w13, hi, 0, base2, BITS), _plane(words, w13, hi, 1, base2, BITS),
            _plane(words, w13, hi, 2, base2, BITS), _plane(words, w13, hi, 3, base2, BITS), scale, minimum)


@triton.jit
def _plane(words, w13, hi, p: tl.constexpr, base2, BITS: tl.constexpr):
    """Plane p of [BN, Q/4] int32 words of plane-layout codes (``w13`` = words >> 8; ``hi``:
    their high bits) as [BN, Q] fp16 numbers B_p + c, by masks alone (no shift per plane).

    A word holds bytes 4i..4i+3; bits 2p..2p+1 of byte j are element j of plane p. Masking
    the word (bytes 0, 2) or w13 (bytes 1, 3) with 0x00030003 << 2p leaves two codes at
    mantissa bits 2p.. of the two 16-bit halves; or-ing B_p's bits (exponent 10 - 2p, from
    ``base2`` = B_0's) makes them the fp16 numbers B_p + c. High bits go to mantissa bits
    2p + 2.. (the code is at most 15 * 4^3 < 1024 mantissa units: exact), from ``hi``:

    - 4 bits: the int32 word of the high plane (same layout) shifted left by 2 (bytes 0, 2) or
      right by 6 (bytes 1, 3), masked with 0x000C000C << 2p.
    - 3 bits: ``hi`` = (h | h << 8) << 2 of the 16-bit word h of the 1-bit plane, whose bits
      2p + m (m = 0, 1) and 8 + 2p + m hold plane p of bytes m and 2 + m of the int32 word: hi
      has the bits of bytes 0 and 2 at 2p + 2 and 18 + 2p (bits 10-17 are never read), of bytes
      1 and 3 one above; masked with 0x00040004 << 2p (bytes 0, 2) or shifted right by 1 first
      (bytes 1, 3).

    The two halves of one masked word stay one register: the plane's columns come out in
    ``_plane_cols`` order (k = b * Q/2 + 2i + a: word i, half a, b = 0 for bytes 0/2 and 1 for
    bytes 1/3), which the launch-time q load and the final accumulator order undo."""
    m: tl.constexpr = 0x00030003 << (2 * p)
    base = base2 - p * 0x08000800  # B_p: exponent 2p lower in both halves
    e02 = (words & m) | base
    e13 = (w13 & m) | base
    if BITS == 4:
        h: tl.constexpr = 0x000C000C << (2 * p)
        e02 = e02 | ((hi << 2) & h)
        e13 = e13 | ((hi >> 6) & h)
    if BITS == 3:
        h1: tl.constexpr = 0x00040004 << (2 * p)
        e02 = e02 | (hi & h1)
        e13 = e13 | ((hi >> 1) & h1)
    x0 = e02.to(tl.int16).to(tl.float16, bitcast=True)
    x2 = (e02 >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    x1 = e13.to(tl.int16).to(tl.float16, bitcast=True)
    x3 = (e13 >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    both = tl.permute(tl.join(tl.join(x0, x2), tl.join(x1, x3)), (0, 3, 1, 2))  # [BN, b, i, a]
    return tl.reshape(both, (words.shape[0], 4 * words.shape[1]))


@triton.jit
def _row_offsets(idx_ptr, offs, nmask, hk, stride_krn, stride_krh, stride_vrn, stride_vrh,
                 SAME_STRIDES: tl.constexpr, MASKED: tl.constexpr):
    """Byte offsets [BN] of KV head hk's key and value rows of tokens ``offs`` (slot ids read at
    ``idx_ptr + offs``; SAME_STRIDES: one offset serves both, the V strides are not read)."""
    if MASKED:
        slot = tl.load(idx_ptr + offs, mask=nmask, other=0).to(tl.int64)
    else:
        slot = tl.load(idx_ptr + offs).to(tl.int64)
    k_off = slot * stride_krn + hk * stride_krh
    v_off = k_off if SAME_STRIDES else slot * stride_vrn + hk * stride_vrh
    return k_off, v_off


@triton.jit
def _packed_block(q0, q1, q2, q3, qsum, qb, k_off, v_off, nmask, krow_ptr, vrow_ptr, m_i, l_i,
                acc0, acc1, acc2, acc3, msum, ssum, vscale, scale_log2, code_bits2, Q: tl.constexpr,
                K_BITS: tl.constexpr, V_BITS: tl.constexpr, extra_mask, MASKED: tl.constexpr = True):
    """One block of quantized rows (k_off / v_off: byte offsets [BN] of the key / value rows, of
    K_BITS / V_BITS per code) and an extra [BN, rows or 1] visibility mask (the position rule in
    extend), folded into the running state; q0..q3, qsum, qb from ``_load_q_codes``.

    Keys are the dots' M dimension (logits [BN, rows]), so a few query rows (decode: G heads)
    pad to 8 columns, not 16 rows. The dots read plane p's codes as B_p + c (``_plane``):
    sum_p q_p . (B_p + c) = q . c + qb for keys. Values: acc_p (in ``_plane_cols`` order)
    gathers sum_t p_t s_t (B_p + c_t) in units of ``vscale`` (the last block's max scale: the
    dots accumulate in place, one multiply per element and step), ``msum`` sum_t p_t m_t and
    ``ssum`` sum_t p_t s_t (the rounded weights the dots saw); ``_packed_finish`` puts acc_p back
    in value units and removes the B_p terms once."""
    k0, k1, k2, k3, ks, km = _load_rows(krow_ptr, k_off, nmask, code_bits2, Q, K_BITS, MASKED)
    qk = tl.dot(k0, q0)
    qk = tl.dot(k1, q1, qk)
    qk = tl.dot(k2, q2, qk)
    qk = tl.dot(k3, q3, qk)
    a = (ks * scale_log2)[:, None]
    logit = (qk - qb[None, :]) * a + (km * scale_log2)[:, None] * qsum[None, :]
    if MASKED:
        logit = tl.where(nmask[:, None] & extra_mask, logit, float("-inf"))
    m_new, alpha, p, l_i = _online_update(m_i, l_i, logit)
    v0, v1, v2, v3, vs, vm = _load_rows(vrow_ptr, v_off, nmask, code_bits2, Q, V_BITS, MASKED)
    smax = tl.max(vs, axis=0)
    smax = tl.where(smax > 0, smax, 1.0)
    ps = (p * (vs / smax)[:, None]).to(tl.float16)
    r = (alpha * (vscale / smax))[None, :]
    acc0 = tl.dot(tl.trans(v0), ps, acc0 * r)
    acc1 = tl.dot(tl.trans(v1), ps, acc1 * r)
    acc2 = tl.dot(tl.trans(v2), ps, acc2 * r)
    acc3 = tl.dot(tl.trans(v3), ps, acc3 * r)
    msum = msum * alpha + tl.sum(p * vm[:, None], axis=0)
    ssum = ssum * alpha + tl.sum(ps.to(tl.float32), axis=0) * smax
    return m_new, l_i, acc0, acc1, acc2, acc3, msum, ssum, smax


@triton.jit
def _unpermute(acc, Q: tl.constexpr):
    """[Q, rows] in ``_plane_cols`` order -> natural column order."""
    x = tl.reshape(acc, (2, Q // 4, 2, acc.shape[1]))  # [b, i, a, rows]
    return tl.reshape(tl.permute(x, (1, 2, 0, 3)), (Q, acc.shape[1]))


@triton.jit
def _packed_finish(acc0, acc1, acc2, acc3, msum, ssum, vscale, Q: tl.constexpr):
    """The quantized blocks' accumulators in value units and natural column order with the
    minimums added and the base terms B_p * ssum removed: the dense blocks' (and the output's)
    running sums."""
    ms = msum[None, :]
    ss = ssum[None, :]
    return (_unpermute(acc0 * vscale + ms - _plane_base(0) * ss, Q),
            _unpermute(acc1 * vscale + ms - _plane_base(1) * ss, Q),
            _unpermute(acc2 * vscale + ms - _plane_base(2) * ss, Q),
            _unpermute(acc3 * vscale + ms - _plane_base(3) * ss, Q))


@triton.jit
def _dense_block(q0, q1, q2, q3, k_off, v_off, nmask, kw_ptr, vw_ptr, m_i, l_i,
                 acc0, acc1, acc2, acc3, scale_log2, Q: tl.constexpr, extra_mask):
    """One block of full-precision rows (element offsets [BN] of column 0) and an extra
    [BN, rows or 1] visibility mask (causal in extend), folded into the running state."""
    dt = q0.dtype
    qc = tl.arange(0, Q)[None, :]
    kp = kw_ptr + k_off[:, None] + qc
    m2 = nmask[:, None]
    qk = tl.dot(tl.load(kp, mask=m2, other=0.0).to(dt), q0)
    qk = tl.dot(tl.load(kp + Q, mask=m2, other=0.0).to(dt), q1, qk)
    qk = tl.dot(tl.load(kp + 2 * Q, mask=m2, other=0.0).to(dt), q2, qk)
    qk = tl.dot(tl.load(kp + 3 * Q, mask=m2, other=0.0).to(dt), q3, qk)
    logit = tl.where(nmask[:, None] & extra_mask, qk * scale_log2, float("-inf"))
    m_new, alpha, p, l_i = _online_update(m_i, l_i, logit)
    vp = vw_ptr + v_off[None, :] + tl.arange(0, Q)[:, None]  # [Q, BN]: V rows loaded transposed
    mt = nmask[None, :]
    pd = p.to(dt)
    a = alpha[None, :]
    acc0 = acc0 * a + tl.dot(tl.load(vp, mask=mt, other=0.0).to(dt), pd)
    acc1 = acc1 * a + tl.dot(tl.load(vp + Q, mask=mt, other=0.0).to(dt), pd)
    acc2 = acc2 * a + tl.dot(tl.load(vp + 2 * Q, mask=mt, other=0.0).to(dt), pd)
    acc3 = acc3 * a + tl.dot(tl.load(vp + 3 * Q, mask=mt, other=0.0).to(dt), pd)
    return m_new, l_i, acc0, acc1, acc2, acc3
