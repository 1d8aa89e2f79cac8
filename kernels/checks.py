"""What the Triton launchers (write, decode, extend) share: argument checks, the rule of which
layouts they support (``ops.py`` sends every other layout to the reference), and launch sizing
from host-known numbers (no device sync)."""

from __future__ import annotations

import torch
import triton

from .codec import RowLayout
from .window import WindowRows


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached by torch); 1 elsewhere (the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def plan_splits(programs: int, tokens: int, num_sms: int, programs_per_sm: int, min_split_tokens: int,
                max_splits: int) -> int:
    """Split-KV count: enough programs (``programs`` per split) to fill the GPU ``programs_per_sm``
    times, never splits shorter than ``min_split_tokens``, at most ``max_splits``."""
    want = triton.cdiv(programs_per_sm * num_sms, max(1, programs))
    by_len = triton.cdiv(max(1, tokens), min_split_tokens)
    return int(max(1, min(want, by_len, max_splits)))


def triton_supports(layout: RowLayout, attention: bool = True) -> bool:
    """One group per row (2, 3 or 4 bits per code) and a power-of-two head_dim: 16..128 for the
    write, >= 64 for attention."""
    d = layout.head_dim
    if layout.n_groups != 1 or d & (d - 1):
        return False
    return d >= 64 if attention else 16 <= d <= 128


def check_head_dim(d: int, layout: RowLayout, attention: bool = True) -> None:
    if layout.n_groups != 1:
        raise ValueError("the Triton kernels support group_size == head_dim only; use the reference")
    if d != layout.head_dim or not triton_supports(layout, attention):
        # D = 256 is neither compiled nor tested for the write (ops sends it to the reference).
        span = "a power of two >= 64" if attention else "a power of two in [16, 128]"
        raise ValueError(f"head_dim {d} must equal layout.head_dim {layout.head_dim} and be {span}")


def check_rows(name: str, rows: torch.Tensor, hkv: int, layout: RowLayout) -> None:
    """uint8 storage rows [N, hkv, row_bytes], contiguous in the last dim, rows and heads 4-byte
    aligned (the kernels read 32-bit words; a row may be followed by other bytes, as the pool's K
    row is by the same head's V row)."""
    if rows.dtype != torch.uint8 or rows.dim() != 3 or rows.shape[1:] != (hkv, layout.row_bytes):
        raise ValueError(f"{name} must be uint8 [N, {hkv}, {layout.row_bytes}], got {rows.dtype} {tuple(rows.shape)}")
    if rows.stride(2) != 1 or rows.stride(1) < layout.row_bytes or rows.stride(0) < hkv * rows.stride(1) \
            or rows.stride(1) % 4 or rows.stride(0) % 4 or rows.data_ptr() % 4:
        raise ValueError(f"{name} must be 4-byte aligned, contiguous in its last dim, heads and rows apart")


def check_index(name: str, t: torch.Tensor, length: int | None = None) -> None:
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1 or not t.is_contiguous() \
            or (length is not None and t.numel() != length):
        want = "" if length is None else f" [{length}]"
        raise ValueError(f"{name} must be a contiguous 1-D int32/int64 tensor{want}, got {t.dtype} {tuple(t.shape)}")


def check_window(name: str, w: WindowRows, hkv: int, d: int) -> None:
    """Window rows of ``hkv`` heads x ``d`` elements, in a float dtype, over contiguous data."""
    if not isinstance(w, WindowRows):
        raise TypeError(f"{name} must be a WindowRows (WindowRows.dense wraps an [M, H, D] tensor), "
                        f"got {type(w).__name__}")
    if (w.heads, w.head_dim) != (hkv, d):
        raise ValueError(f"{name} must have {hkv} heads x {d} head_dim, got {w.heads} x {w.head_dim}")
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name} must be fp16, bf16 or fp32, got {w.dtype}")
    if not w.data.is_contiguous():
        raise ValueError(f"{name} data must be contiguous")


def check_windows(k_win: WindowRows, v_win: WindowRows, hkv: int, d: int) -> None:
    """A K and a V window read with one row-id layout (the kernels' one WIN_LOG2 and row stride)."""
    check_window("k_win", k_win, hkv, d)
    check_window("v_win", v_win, hkv, d)
    if (k_win.log2_rows, k_win.row_stride) != (v_win.log2_rows, v_win.row_stride):
        raise ValueError(f"k_win and v_win must have the same log2_rows and row_stride, got "
                         f"{(k_win.log2_rows, k_win.row_stride)} and {(v_win.log2_rows, v_win.row_stride)}")
