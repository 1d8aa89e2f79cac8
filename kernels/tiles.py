"""Triton tile helpers shared by the decode and extend kernels (no launchers here).

A program holds a block of query rows (decode: the G query heads of one KV head, padded to
8; extend: BLOCK_M chunk tokens x the G heads of one KV head) as four D/4 quarter-planes (the
storage row's plane layout), transposed to [D/4, rows] so that keys are the dots' M dimension,
and folds blocks of keys into an online softmax: ``_int2_block`` over quantized storage rows
(2, 3 or 4 bits per code: the constexprs K_BITS and V_BITS, each tensor its own row layout),
``_dense_block`` over full-precision rows (windows, a chunk's own k/v).

Quantized rows are never dequantized element by element: with codes c in 0..2^bits - 1, per-row
scale s and minimum m (fp16), the plane layout gives four dense quarter dots and

    logit = s * (q . c) + m * sum(q)
    sum_t p_t v_t = sum_t (p_t s_t) c_t + (sum_t p_t m_t) * 1

(p_t s_t is normalized by the block's max scale before the cast to the dot dtype so that
small scales do not underflow). The codes enter the dots as the numbers B + c, built from the
words of the row with the exponent trick (``_code_planes``): the low 2 bits from the 32-bit
words of the 2-bit plane, the high bits (3 and 4 bits) from the high plane's words or-ed into
mantissa bits 2-3 (B's ulp is 1 up to 2B - 1, so any code up to 15 is exact). The B terms are
subtracted per row and per key, never per element, the same for every bit width.
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
    word = tl.load((row_ptr + row_off + P).to(tl.pointer_type(tl.int32), bitcast=True), mask=nmask, other=0)
    scale = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    minimum = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _load_q_planes(qp, mask, Q: tl.constexpr):
    """The four D/4 quarter-planes of a block of query rows, transposed: [Q, rows] each (``qp``
    points at column 0 of each plane as [Q, rows]), and the row sums of their code-dot copies
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
    """The dtype of the code dots: bf16 for bf16 queries, else fp16."""
    return tl.bfloat16 if dt == tl.bfloat16 else tl.float16


@triton.constexpr_function
def _code_value(dt):
    """B: the ``_code_dtype`` number whose ulp is 1 and whose low mantissa bits are 0, so that
    its bits or-ed with a code c in 0..15 are the number B + c (bf16 128.0, fp16 1024.0)."""
    return 128.0 if dt == tl.bfloat16 else 1024.0


def code_bits2(dtype: torch.dtype) -> int:
    """Launcher argument ``code_bits2``: the bits of B (``_code_value``) in both 16-bit halves of
    a 32-bit word, for queries of ``dtype``. A runtime argument on purpose: held in a register,
    the mask-and-or of ``_plane`` is one LOP3 (two immediates take two: 9% more SASS in the
    INT2 loop, ``benchmarks/kernel_static.py``)."""
    bits = 0x4300 if dtype == torch.bfloat16 else 0x6400
    return bits | bits << 16


@triton.constexpr_function
def _code_bytes(q, bits):
    """Byte offset of the scale/minimum pair in a row of ``bits`` (codec.RowLayout.code_bytes; q = D/4)."""
    return q + {2: 0, 3: q // 2, 4: q}[bits]


@triton.jit
def _shr(x, s: tl.constexpr):
    """x >> s for a constexpr s of either sign (s < 0: x << -s)."""
    if s < 0:
        y = x << -s
    elif s > 0:
        y = x >> s
    else:
        y = x
    return y


@triton.jit
def _load_rows(row_ptr, row_off, nmask, cdt: tl.constexpr, base2, Q: tl.constexpr, BITS: tl.constexpr):
    """A block of storage rows (byte offsets [BN], 4-byte aligned) of ``BITS`` per code: the four
    [BN, Q] planes as ``cdt`` values B + c (``_code_planes``) and the fp32 (scale, minimum) [BN]."""
    row_off = tl.multiple_of(row_off, 4)
    wc = tl.arange(0, Q // 4)[None, :]
    m2 = nmask[:, None]
    wp = (row_ptr + row_off[:, None]).to(tl.pointer_type(tl.int32), bitcast=True) + wc
    words = tl.load(wp, mask=m2, other=0)
    hi = words  # unused at 2 bits
    if BITS == 4:  # the high plane: Q/4 more int32 words in the same layout
        hi = tl.load(wp + Q // 4, mask=m2, other=0)
    if BITS == 3:  # the 1-bit plane: one 16-bit word per int32 word of the 2-bit plane
        hp = (row_ptr + row_off[:, None] + Q).to(tl.pointer_type(tl.uint16), bitcast=True) + wc
        hi = tl.load(hp, mask=m2, other=0).to(tl.int32)
        hi = hi | (hi << 8)
    p0, p1, p2, p3 = _code_planes(words, hi, cdt, base2, BITS)
    scale, minimum = _row_params(row_ptr, row_off, nmask, _code_bytes(Q, BITS))
    return p0, p1, p2, p3, scale, minimum


@triton.jit
def _code_planes(words, hi, cdt: tl.constexpr, base2, BITS: tl.constexpr):
    """[BN, Q/4] int32 words of plane-layout codes (and ``hi``, their high bits) -> the four
    [BN, Q] planes as ``cdt`` values B + c (exponent trick: per two codes one shift and one
    mask-or at 2 bits, no int->float conversion).

    A word holds bytes 4i..4i+3; bits 2p..2p+1 of byte j are element j of plane p. Shifting the
    word right by 2p (bytes 0, 2) or 8 + 2p (bytes 1, 3) and masking with 0x00030003 leaves two
    codes in the two 16-bit halves, and or-ing the base's bits into both makes them two numbers.
    High bits go to bits 2-3 of each half, from ``hi``:

    - 4 bits: the int32 word of the high plane (same layout): shifted right by 2p - 2 (bytes
      0, 2) or 2p + 6 (bytes 1, 3), masked with 0x000C000C.
    - 3 bits: x = h | h << 8 of the 16-bit word h of the 1-bit plane, whose bits 4m + p hold
      plane p of byte m of the int32 word: x has the bits of bytes 0 and 2 at 0-3 and 16-19, of
      bytes 1 and 3 at 4-7 and 20-23 (bits 8-15 are never read); shifted right by p - 2 (bytes
      0, 2) or p + 2 (bytes 1, 3), masked with 0x00040004."""
    return (_plane(words, hi, 0, base2, cdt, BITS), _plane(words, hi, 1, base2, cdt, BITS),
            _plane(words, hi, 2, base2, cdt, BITS), _plane(words, hi, 3, base2, cdt, BITS))


@triton.jit
def _plane(words, hi, p: tl.constexpr, base2, cdt: tl.constexpr, BITS: tl.constexpr):
    e02 = (words >> (2 * p)) & 0x00030003  # halves: bytes 0 and 2 of each word
    e13 = (words >> (2 * p + 8)) & 0x00030003  # bytes 1 and 3
    if BITS == 4:
        e02 = e02 | (_shr(hi, 2 * p - 2) & 0x000C000C)
        e13 = e13 | (_shr(hi, 2 * p + 6) & 0x000C000C)
    if BITS == 3:
        e02 = e02 | (_shr(hi, p - 2) & 0x00040004)
        e13 = e13 | (_shr(hi, p + 2) & 0x00040004)
    e02 = e02 | base2
    e13 = e13 | base2
    x0 = e02.to(tl.int16).to(cdt, bitcast=True)
    x2 = (e02 >> 16).to(tl.int16).to(cdt, bitcast=True)
    x1 = e13.to(tl.int16).to(cdt, bitcast=True)
    x3 = (e13 >> 16).to(tl.int16).to(cdt, bitcast=True)
    both = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # [BN, Q/4, 2, 2]: [.., k, m] = byte 2k + m
    return tl.reshape(both, (words.shape[0], 4 * words.shape[1]))


@triton.jit
def _int2_block(q0, q1, q2, q3, qsum, k_off, v_off, nmask, krow_ptr, vrow_ptr, m_i, l_i,
                acc0, acc1, acc2, acc3, macc, scale_log2, code_bits2, Q: tl.constexpr,
                K_BITS: tl.constexpr, V_BITS: tl.constexpr, extra_mask):
    """One block of quantized rows (k_off / v_off: byte offsets [BN] of the key / value rows, of
    K_BITS / V_BITS per code) and an extra [BN, rows or 1] visibility mask (the position rule in
    extend), folded into the running state.

    Keys are the dots' M dimension (logits [BN, rows]), so a few query rows (decode: G heads)
    pad to 8 columns, not 16 rows. The dots read codes as B + c (``_code_planes``):
    q . (B + c) = q . c + B * sum(q) for keys; for values the B * sum(p s) term goes into
    ``macc`` with the minimums."""
    cdt: tl.constexpr = _code_dtype(q0.dtype)
    base: tl.constexpr = _code_value(cdt)
    k0, k1, k2, k3, ks, km = _load_rows(krow_ptr, k_off, nmask, cdt, code_bits2, Q, K_BITS)
    qk = tl.dot(k0, q0.to(cdt))
    qk = tl.dot(k1, q1.to(cdt), qk)
    qk = tl.dot(k2, q2.to(cdt), qk)
    qk = tl.dot(k3, q3.to(cdt), qk)
    logit = qk * (ks * scale_log2)[:, None] + ((km - base * ks) * scale_log2)[:, None] * qsum[None, :]
    logit = tl.where(nmask[:, None] & extra_mask, logit, float("-inf"))
    m_new, alpha, p, l_i = _online_update(m_i, l_i, logit)
    v0, v1, v2, v3, vs, vm = _load_rows(vrow_ptr, v_off, nmask, cdt, code_bits2, Q, V_BITS)
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
