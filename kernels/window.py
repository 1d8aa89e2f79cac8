"""Full-precision window rows: where the rotated model-dtype copy of a (token, KV head) row lives.

A :class:`WindowRows` addresses one layer's K (or V) window rows by id. Row ``w`` holds ``heads x
head_dim`` elements, heads contiguous, starting at element

    (w >> log2_rows) * page_stride + (w & (2**log2_rows - 1)) * row_stride

of ``data`` (flat, in the window dtype; ``row_stride`` defaults to heads * head_dim). ``log2_rows``
0 is a plain ``[M, heads, head_dim]`` buffer (:meth:`dense`); a paged one packs ``2**log2_rows`` id
slots per page of ``page_stride`` elements, which is how the serving pool keeps window rows inside
pages of its own quantized-row buffers (ids past a page's real rows are never handed out; with
``row_stride`` 2 * heads * head_dim a K and a V window interleave their rows in one page). The
kernels (through :func:`_window_offset`) and their references take it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["WindowRows"]


@dataclass(frozen=True)
class WindowRows:
    data: torch.Tensor  # contiguous, the window dtype (bf16 / fp16 / fp32)
    heads: int
    head_dim: int
    page_stride: int  # elements from one page (or, with log2_rows 0, one row) to the next
    log2_rows: int = 0
    row_stride: int = 0  # elements from one row of a page to the next (0: heads * head_dim)

    def __post_init__(self):
        if not self.data.is_contiguous():
            raise ValueError("window data must be contiguous")
        if not self.row_stride:
            object.__setattr__(self, "row_stride", self.heads * self.head_dim)
        if self.row_stride < self.heads * self.head_dim or self.page_stride < self.row_stride or self.log2_rows < 0:
            raise ValueError("a window page (or row) must hold at least one row of heads x head_dim elements")

    @classmethod
    def dense(cls, t: torch.Tensor) -> WindowRows:
        """A plain ``[M, heads, head_dim]`` buffer (contiguous)."""
        if t.dim() != 3:
            raise ValueError(f"a dense window buffer is [M, heads, head_dim], got {tuple(t.shape)}")
        return cls(t, t.shape[1], t.shape[2], t.shape[1] * t.shape[2])

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def row_elems(self) -> int:
        return self.heads * self.head_dim

    def offsets(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 element offset of each row id."""
        ids = ids.long()
        return (ids >> self.log2_rows) * self.page_stride + (ids & ((1 << self.log2_rows) - 1)) * self.row_stride

    def _index(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat element index of every element of rows ``ids``, row by row."""
        ids = ids.to(self.device)
        return (self.offsets(ids)[:, None] + torch.arange(self.row_elems, device=ids.device)).flatten()

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, heads, head_dim] copies of rows ``ids``."""
        return self.data.view(-1).index_select(0, self._index(ids)).view(-1, self.heads, self.head_dim)

    def scatter(self, ids: torch.Tensor, x: torch.Tensor) -> None:
        """Rows ``ids`` <- x [n, heads, head_dim] (cast to the window dtype)."""
        self.data.view(-1).index_copy_(0, self._index(ids), x.reshape(-1).to(self.dtype))


@triton.jit
def _window_offset(ids, page_stride, row_stride, LOG2_ROWS: tl.constexpr):
    """int64 element offsets of window row ids (``WindowRows.offsets``): page, then the row in it."""
    ids = ids.to(tl.int64)
    if LOG2_ROWS == 0:
        off = ids * page_stride
    else:
        off = (ids >> LOG2_ROWS) * page_stride + (ids & ((1 << LOG2_ROWS) - 1)) * row_stride
    return off
