"""Pure-torch references for the Triton kernels (CPU and GPU).

Same names and signatures as the launchers in ``write.py``, ``decode.py`` and
``extend.py``; written from the quantizer (docs/calibration.md) on top of ``codec.py``. All math
is fp32; results are cast to the caller's dtype at the end. Slow by design
(python loop over requests): use for tests, CPU serving and benchmarks' checks.

Shapes (Hq query heads, Hkv KV heads, G = Hq / Hkv, D head_dim):

- storage rows  uint8 [N, Hkv, layout.row_bytes] (codec.py row layout)
- window rows   ``WindowRows`` (window.py) of Hkv x D, bf16/fp16/fp32, already rotated; row ids
- indptr        int32/int64 [B + 1]; indices int32/int64 slot ids (one per token)
- queries       rotated by R_K; outputs are in the rotated value basis (R_V).
"""

from __future__ import annotations

import math

import torch

from .codec import RowLayout, dequantize_rows, quantize_rows, rotate, sanitize
from .rule import PositionRule
from .window import WindowRows

__all__ = ["quantize_kv_write", "write_step", "rotate_queries", "decode_attention", "extend_attention",
           "rotated_rows"]


def rotated_rows(x: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Sanitized, rotated fp32 rows [T, H, D]: ``sanitize(sanitize(x) @ R)``; ``sanitize(x)``
    for ``rotation=None`` (x already in the rotated basis: R_V folded into the weights).

    Sanitizing before the rotation keeps one inf element from poisoning the whole
    row (inf * 0 = NaN inside the matmul); sanitizing after keeps the row in the
    fp16 range. This is exactly what the write kernel stores and quantizes.
    """
    if rotation is None:
        return sanitize(x)
    if rotation.dim() == 3 and rotation.shape[0] != x.shape[1]:
        raise ValueError(f"per-head rotation has {rotation.shape[0]} heads, x has {x.shape[1]}")
    return sanitize(rotate(sanitize(x), rotation))


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
    """Rotate, quantize and scatter x [T, H, D] into rows_out[slots] (slot -1 skipped);
    optionally scatter the rotated full-precision row into rows ``window_slots`` of window_out
    (-1 skipped)."""
    xr = rotated_rows(x, rotation)
    rows = quantize_rows(xr, layout, clip_ratio)
    keep = slots >= 0
    rows_out[slots[keep].long()] = rows[keep]
    if window_out is not None:
        if window_slots is None:
            raise ValueError("window_out given without window_slots")
        wkeep = window_slots >= 0
        window_out.scatter(window_slots[wkeep], xr[wkeep])


def rotate_queries(q: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """q [T, Hq, D] @ R_K in fp32, in q's dtype; a per-KV-head R [Hkv, D, D] rotates the G = Hq / Hkv
    query heads of KV head h by R[h]."""
    if rotation.dim() == 2:
        return rotate(q, rotation).to(q.dtype)
    t, hq, d = q.shape
    hkv = rotation.shape[0]
    return rotate(q.view(t, hkv, hq // hkv, d).transpose(1, 2), rotation).transpose(1, 2).reshape(t, hq, d).to(q.dtype)


def write_step(k, v, *, rot_k, rot_v=None, clip_k, clip_v, k_layout=None, v_layout=None, k_rows=None, v_rows=None,
               slots=None, k_win=None, v_win=None, window_slots=None, q=None, q_out=None):
    """``write.write_step``: k and v written as two ``quantize_kv_write`` calls (a None part is
    skipped); returns q rotated by ``rot_k`` (into ``q_out`` when given), or None without q."""
    if k is not None:
        quantize_kv_write(k, rotation=rot_k, clip_ratio=clip_k, layout=k_layout, rows_out=k_rows, slots=slots,
                          window_out=k_win, window_slots=window_slots)
    if v is not None:
        quantize_kv_write(v, rotation=rot_v, clip_ratio=clip_v, layout=v_layout, rows_out=v_rows, slots=slots,
                          window_out=v_win, window_slots=window_slots)
    if q is None:
        return None
    qr = rotate_queries(q, rot_k)
    return qr if q_out is None else q_out.copy_(qr)


def _gather_prefix(b, k_rows, v_rows, packed_indptr, packed_indices, k_win, v_win, win_indptr, win_indices, layout,
                   v_layout):
    """fp32 rotated K, V [n, Hkv, D] of request b: packed segment then window segment."""
    i0, i1 = int(packed_indptr[b]), int(packed_indptr[b + 1])
    w0, w1 = int(win_indptr[b]), int(win_indptr[b + 1])
    qi = packed_indices[i0:i1].long()
    wi = win_indices[w0:w1].long()
    k = torch.cat([dequantize_rows(k_rows[qi], layout), k_win.gather(wi).float()], dim=0)
    v = torch.cat([dequantize_rows(v_rows[qi], v_layout), v_win.gather(wi).float()], dim=0)
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, mask: torch.Tensor | None):
    """q [Tq, Hq, D], k/v [n, Hkv, D] fp32 -> (out [Tq, Hq, D], lse [Tq, Hq]); GQA by repeat.
    A query that sees no key gets out = 0 and lse = -inf."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    logits = torch.einsum("thd,nhd->htn", q, k) * sm_scale
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # [Hq, Tq]
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.einsum("htn,nhd->thd", p, v)
    return out, lse.transpose(0, 1)


def _check_gqa(hq: int, hkv: int, d: int, layout: RowLayout, v_layout: RowLayout | None) -> RowLayout:
    """Checks the head counts and head_dim; returns the value layout (``layout`` where None)."""
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
    v_layout = layout if v_layout is None else v_layout
    if d != layout.head_dim or d != v_layout.head_dim:
        raise ValueError(f"head_dim {d} != layout head_dim {layout.head_dim} / {v_layout.head_dim}")
    return v_layout


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query token per request over its INT2 + window segments (``layout``: the key rows',
    ``v_layout``: the value rows', default ``layout``).
    Returns out [B, Hq, D] (q.dtype, rotated value basis) and lse [B, Hq] fp32 (natural log).
    ``num_splits`` is accepted for signature parity and ignored."""
    del num_splits
    bsz, hq, d = q.shape
    v_layout = _check_gqa(hq, k_rows.shape[1], d, layout, v_layout)
    res = torch.empty(bsz, hq, d, dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        k, v = _gather_prefix(b, k_rows, v_rows, packed_indptr, packed_indices, k_win, v_win, win_indptr,
                              win_indices, layout, v_layout)
        o, l = _attend(q[b : b + 1].float(), k, v, sm_scale, None)
        res[b] = o[0].to(res.dtype)
        lse[b] = l[0]
    return res, lse


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
    v_layout: RowLayout | None = None,
) -> torch.Tensor:
    """Chunk queries q [Tq, Hq, D] under ``rule`` (``rule.PositionRule``): the query at position t
    reads key j <= t in full precision iff ``rule.exact(t, j)``, else from its packed row.

    Request b's chunk starts at position a = prefix_lens[b]. Its keys come from three places:
    the packed segment (positions ``sink, sink + 1, ...``: the prefix and the chunk's own tokens,
    whose rows are written before attention), the window segment (the sinks ``0 .. min(sink, a)``
    then a run of positions ending at a - 1), and the chunk's exact k_new/v_new (position a + j,
    causal). ``layout``/``v_layout`` as in ``decode_attention``.
    Returns out [Tq, Hq, D] (q.dtype).
    ``max_q_len`` is accepted for signature parity and ignored."""
    del max_q_len
    v_layout = _check_gqa(q.shape[1], k_new.shape[1], q.shape[2], layout, v_layout)
    sink = rule.sink
    res = torch.empty_like(q) if out is None else out
    dev = q.device
    for b in range(qo_indptr.numel() - 1):
        s, e = int(qo_indptr[b]), int(qo_indptr[b + 1])
        if e == s:
            continue
        a = int(prefix_lens[b])
        i0, i1 = int(packed_indptr[b]), int(packed_indptr[b + 1])
        w0, w1 = int(win_indptr[b]), int(win_indptr[b + 1])
        qi, wi = packed_indices[i0:i1].long(), win_indices[w0:w1].long()
        n_sink = min(sink, a, w1 - w0)
        n_run = (w1 - w0) - n_sink
        pos_packed = sink + torch.arange(i1 - i0, device=dev)
        pos_win = torch.cat([torch.arange(n_sink, device=dev), a - n_run + torch.arange(n_run, device=dev)])
        pos_new = a + torch.arange(e - s, device=dev)
        t = pos_new[:, None]  # query positions
        mask = torch.cat([(pos_packed <= t) & ~rule.exact(t, pos_packed),  # read quantized
                          rule.exact(t, pos_win), rule.exact(t, pos_new)], dim=1)
        k = torch.cat([dequantize_rows(k_rows[qi], layout), k_win.gather(wi).float(), k_new[s:e].float()], dim=0)
        v = torch.cat([dequantize_rows(v_rows[qi], v_layout), v_win.gather(wi).float(), v_new[s:e].float()], dim=0)
        o, _ = _attend(q[s:e].float(), k, v, sm_scale, mask.unsqueeze(0))
        res[s:e] = o.to(res.dtype)
    return res
