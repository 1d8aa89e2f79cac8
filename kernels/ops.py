"""The one kernel interface the integration calls.

Each op has the signature of its launcher (``write.py``, ``decode.py``, ``extend.py``)
and of its reference (``reference.py``). Dispatch is by device and layout only:
CUDA tensors with a layout the Triton kernels support (one group per row; head_dim a
power of two, 16..128 for the write, >= 64 for attention) go to Triton, everything else
(CPU tensors, sub-row groups) to the pure-torch reference. No env vars, no global state.
"""

from __future__ import annotations

import torch

from . import decode as _decode
from . import extend as _extend
from . import reference as _reference
from . import write as _write
from .checks import triton_supports
from .codec import RowLayout
from .rule import PositionRule
from .window import WindowRows

__all__ = ["quantize_kv_write", "write_step", "rotate_queries", "decode_attention", "extend_attention",
           "triton_supports"]


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
    impl = _write if x.is_cuda and triton_supports(layout, attention=False) else _reference
    impl.quantize_kv_write(x, rotation=rotation, clip_ratio=clip_ratio, layout=layout, rows_out=rows_out, slots=slots,
                           window_out=window_out, window_slots=window_slots)


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
    x = next(t for t in (k, v, q) if t is not None)
    layouts = [lay for t, lay in ((k, k_layout), (v, v_layout)) if t is not None] or [RowLayout(x.shape[-1])]
    triton_ok = x.is_cuda and all(triton_supports(lay, attention=False) for lay in layouts)
    impl = _write if triton_ok else _reference
    return impl.write_step(k, v, rot_k=rot_k, rot_v=rot_v, clip_k=clip_k, clip_v=clip_v, k_layout=k_layout,
                           v_layout=v_layout, k_rows=k_rows, v_rows=v_rows, slots=slots, k_win=k_win, v_win=v_win,
                           window_slots=window_slots, q=q, q_out=q_out)


def rotate_queries(q: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    return write_step(None, None, rot_k=rotation, clip_k=1.0, clip_v=1.0, q=q)


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
    impl = _decode if q.is_cuda and _triton_attention(layout, v_layout) else _reference
    return impl.decode_attention(
        q, k_rows=k_rows, v_rows=v_rows, packed_indptr=packed_indptr, packed_indices=packed_indices, k_win=k_win,
        v_win=v_win, win_indptr=win_indptr, win_indices=win_indices, sm_scale=sm_scale, layout=layout, out=out,
        num_splits=num_splits, v_layout=v_layout,
    )


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
    impl = _extend if q.is_cuda and _triton_attention(layout, v_layout) else _reference
    return impl.extend_attention(
        q, k_new=k_new, v_new=v_new, qo_indptr=qo_indptr, k_rows=k_rows, v_rows=v_rows, packed_indptr=packed_indptr,
        packed_indices=packed_indices, k_win=k_win, v_win=v_win, win_indptr=win_indptr, win_indices=win_indices,
        prefix_lens=prefix_lens, rule=rule, sm_scale=sm_scale, layout=layout, out=out, max_q_len=max_q_len,
        v_layout=v_layout,
    )


def _triton_attention(layout: RowLayout, v_layout: RowLayout | None) -> bool:
    return triton_supports(layout) and (v_layout is None or triton_supports(v_layout))
