"""Triton tile helpers shared by the decode and extend kernels (no launchers here).

A program holds a block of query rows (decode: the G query heads of one KV head, padded to
8; extend: BLOCK_M chunk tokens x the G heads of one KV head) as four D/4 quarter-planes (the
storage row's plane layout), transposed to [D/4, rows] so that keys are the dots' M dimension,
and folds blocks of keys into an online softmax: ``_int2_block`` over INT2
storage rows, ``_dense_block`` over full-precision rows (windows, a chunk's own k/v).

INT2 rows are never dequantized element by element: with codes c in 0..3, per-row scale
s and minimum m (fp16), the plane layout gives four dense quarter dots and

    logit = s * (q . c) + m * sum(q)
    sum_t p_t v_t = sum_t (p_t s_t) c_t + (sum_t p_t m_t) * 1

(p_t s_t is normalized by the block's max scale before the cast to the dot dtype so that
small scales do not underflow). The codes enter the dots as the numbers B + c, built from the
32-bit words of the row with the exponent trick (``_code_planes``); the B terms are subtracted
per row and per key, never per element.
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
def _row_params(row_ptr, row_off, nmask, Q: tl.constexpr):
    """fp32 (scale, minimum) of each row from one 32-bit load at byte Q (fp16 LE pair)."""
    word = tl.load((row_ptr + row_off + Q).to(tl.pointer_type(tl.int32), bitcast=True), mask=nmask, other=0)
    scale = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    minimum = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _load_q_planes(qp, mask, Q: tl.constexpr):
    """The four D/4 quarter-planes of a block of query rows, transposed: [Q, rows] each (``qp``
    points at column 0 of each plane as [Q, rows]), and the row sums of their INT2-dot copies
    (``_code_dtype``: fp32 queries are rounded to fp16 there)."""
    q0 = tl.load(qp, mask=mask, other=0.0)
    q1 = tl.load(qp + Q, mask=mask, other=0.0)
    q2 = tl.load(qp + 2 * Q, mask=mask, other=0.0)
    q3 = tl.load(qp + 3 * Q, mask=mask, other=0.0)
    cdt: tl.constexpr = _code_dtype(q0.dtype)
    qsum = tl.sum(q0.to(cdt).to(tl.float32) + q1.to(cdt).to(tl.float32) + q2.to(cdt).to(tl.float32)
                  + q3.to(cdt).to(tl.float32), axis=0)
    return q0, q1, q2, q3, qsum


@triton.constexpr_function
def _code_dtype(dt):
    """The dtype of the INT2 dots: bf16 for bf16 queries, else fp16."""
    return tl.bfloat16 if dt == tl.bfloat16 else tl.float16


@triton.constexpr_function
def _code_value(dt):
    """B: the ``_code_dtype`` number whose ulp is 1 and whose low mantissa bits are 0, so that
    its bits or-ed with a code c in 0..3 are the number B + c (bf16 128.0, fp16 1024.0)."""
    return 128.0 if dt == tl.bfloat16 else 1024.0


def code_bits2(dtype: torch.dtype) -> int:
    """Launcher argument ``code_bits2``: the bits of B (``_code_value``) in both 16-bit halves of
    a 32-bit word, for queries of ``dtype``. A runtime argument on purpose: held in a register,
    the mask-and-or of ``_plane`` is one LOP3 (two immediates take two: 9% more SASS in the
    INT2 loop, ``benchmarks/kernel_static.py``)."""
    bits = 0x4300 if dtype == torch.bfloat16 else 0x6400
    return bits | bits << 16


@triton.jit
def _code_planes(words, cdt: tl.constexpr, base2):
    """[BN, Q/4] int32 words of plane-layout codes -> the four [BN, Q] planes as ``cdt`` values
    B + c (exponent trick: one shift and one mask-or per two codes, no int->float conversion).

    A word holds bytes 4i..4i+3; bits 2p..2p+1 of byte j are element j of plane p. Shifting the
    word right by 2p (bytes 0, 2) or 8 + 2p (bytes 1, 3) and masking with 0x00030003 leaves two
    codes in the two 16-bit halves, and or-ing the base's bits into both makes them two numbers."""
    return (_plane(words, 0, base2, cdt), _plane(words, 2, base2, cdt), _plane(words, 4, base2, cdt),
            _plane(words, 6, base2, cdt))


@triton.jit
def _plane(words, shift: tl.constexpr, base2, cdt: tl.constexpr):
    e02 = ((words >> shift) & 0x00030003) | base2  # halves: bytes 0 and 2 of each word
    e13 = ((words >> (shift + 8)) & 0x00030003) | base2  # bytes 1 and 3
    x0 = e02.to(tl.int16).to(cdt, bitcast=True)
    x2 = (e02 >> 16).to(tl.int16).to(cdt, bitcast=True)
    x1 = e13.to(tl.int16).to(cdt, bitcast=True)
    x3 = (e13 >> 16).to(tl.int16).to(cdt, bitcast=True)
    both = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # [BN, Q/4, 2, 2]: [.., k, m] = byte 2k + m
    return tl.reshape(both, (words.shape[0], 4 * words.shape[1]))


@triton.jit
def _int2_block(q0, q1, q2, q3, qsum, row_off, nmask, krow_ptr, vrow_ptr, m_i, l_i,
                acc0, acc1, acc2, acc3, macc, scale_log2, code_bits2, Q: tl.constexpr, extra_mask):
    """One block of INT2 rows (row_off: byte offsets [BN]) and an extra [BN, rows or 1]
    visibility mask (the position rule in extend), folded into the running state.

    Keys are the dots' M dimension (logits [BN, rows]), so a few query rows (decode: G heads)
    pad to 8 columns, not 16 rows. The dots read codes as B + c (``_code_planes``):
    q . (B + c) = q . c + B * sum(q) for keys; for values the B * sum(p s) term goes into
    ``macc`` with the minimums."""
    cdt: tl.constexpr = _code_dtype(q0.dtype)
    base: tl.constexpr = _code_value(cdt)
    # Rows are 4-byte multiples (codec.RowLayout): the codes are read as Q/4 int32 words.
    row_off = tl.multiple_of(row_off, 4)
    wc = tl.arange(0, Q // 4)[None, :]
    kp = (krow_ptr + row_off[:, None]).to(tl.pointer_type(tl.int32), bitcast=True)
    k0, k1, k2, k3 = _code_planes(tl.load(kp + wc, mask=nmask[:, None], other=0), cdt, code_bits2)
    ks, km = _row_params(krow_ptr, row_off, nmask, Q)
    qk = tl.dot(k0, q0.to(cdt))
    qk = tl.dot(k1, q1.to(cdt), qk)
    qk = tl.dot(k2, q2.to(cdt), qk)
    qk = tl.dot(k3, q3.to(cdt), qk)
    logit = qk * (ks * scale_log2)[:, None] + ((km - base * ks) * scale_log2)[:, None] * qsum[None, :]
    logit = tl.where(nmask[:, None] & extra_mask, logit, float("-inf"))
    m_new, alpha, p, l_i = _online_update(m_i, l_i, logit)
    vp = (vrow_ptr + row_off[:, None]).to(tl.pointer_type(tl.int32), bitcast=True)
    v0, v1, v2, v3 = _code_planes(tl.load(vp + wc, mask=nmask[:, None], other=0), cdt, code_bits2)
    vs, vm = _row_params(vrow_ptr, row_off, nmask, Q)
    smax = tl.max(vs, axis=0)
    ps = (p * (vs / tl.where(smax > 0, smax, 1.0))[:, None]).to(cdt)
    a = alpha[None, :]
    acc0 = acc0 * a + tl.dot(tl.trans(v0), ps) * smax
    acc1 = acc1 * a + tl.dot(tl.trans(v1), ps) * smax
    acc2 = acc2 * a + tl.dot(tl.trans(v2), ps) * smax
    acc3 = acc3 * a + tl.dot(tl.trans(v3), ps) * smax
    macc = macc * alpha + tl.sum(p * vm[:, None] - (base * smax) * ps.to(tl.float32), axis=0)
    return m_new, l_i, acc0, acc1, acc2, acc3, macc


@triton.jit
def _dense_block(q0, q1, q2, q3, k_off, v_off, nmask, kw_ptr, vw_ptr, m_i, l_i,
                 acc0, acc1, acc2, acc3, macc, scale_log2, Q: tl.constexpr, extra_mask):
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
    return m_new, l_i, acc0, acc1, acc2, acc3, macc * alpha
