"""What the Triton launchers (write, decode, extend) share: argument checks, the rule of which
layouts they support (``ops.py`` sends every other layout to the reference), and launch sizing
from host-known numbers (no device sync)."""

from __future__ import annotations

import torch
import triton

from .codec import RowLayout


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
    """uint8 storage rows [N, hkv, row_bytes], 4-byte aligned (the kernels read 32-bit words)."""
    if rows.dtype != torch.uint8 or rows.dim() != 3 or rows.shape[1:] != (hkv, layout.row_bytes):
        raise ValueError(f"{name} must be uint8 [N, {hkv}, {layout.row_bytes}], got {rows.dtype} {tuple(rows.shape)}")
    if rows.stride(2) != 1 or rows.stride(1) != layout.row_bytes or rows.stride(0) % 4 or rows.data_ptr() % 4:
        raise ValueError(f"{name} must be 4-byte aligned and contiguous in its last two dims")


def check_index(name: str, t: torch.Tensor, length: int | None = None) -> None:
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1 or not t.is_contiguous() \
            or (length is not None and t.numel() != length):
        want = "" if length is None else f" [{length}]"
        raise ValueError(f"{name} must be a contiguous 1-D int32/int64 tensor{want}, got {t.dtype} {tuple(t.shape)}")


def check_window(name: str, w: torch.Tensor, hkv: int, d: int) -> None:
    if w.dim() != 3 or w.shape[1:] != (hkv, d) or w.stride(-1) != 1:
        raise ValueError(f"{name} must be [M, {hkv}, {d}] contiguous in its last dim, got {tuple(w.shape)}")
