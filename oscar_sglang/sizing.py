"""Bytes per token, the page size and one KV budget under BF16 and --oscar. No sglang import.

A token slot of the OSCAR pool costs its K and V storage rows in every layer; the full-precision
window rows live in whole pages of the same pool (``windows.py``), so they need no budget of their
own: a running request takes window pages as it needs them and gives them back.
"""

from __future__ import annotations

import msgspec

from oscar_sglang.kernels.codec import CacheLayout
from oscar_sglang.kernels.rule import PositionRule
from oscar_sglang.settings import OscarError
from oscar_sglang.windows import rows_per_page

PAGE_SIZES = (64, 32, 16)  # preferred first; a page must hold a window row at any model dtype (fp32)
WORST_ITEMSIZE = 4


def bf16_cell_size(*, head_dim: int, kv_heads: int, layers: int, itemsize: int) -> int:
    """Bytes of one token's K and V in every layer at the model dtype (a BF16 pool's cell, and a window row)."""
    return 2 * layers * kv_heads * head_dim * itemsize


def oscar_cell_size(token_row_bytes: int, kv_heads: int) -> int:
    """Bytes one token slot costs: its K and V storage rows in every layer (``token_row_bytes`` per
    KV head, ``CacheLayout.token_row_bytes``)."""
    return kv_heads * token_row_bytes


def page_size_for(rule: PositionRule, layouts: CacheLayout, requested: int | None) -> int:
    """The pool's page size: ``requested`` (sglang's --page-size) when it holds a window row and divides
    every block (the first one), else refused; with none (or 1), the largest of :data:`PAGE_SIZES` that does."""
    rows = [k.row_bytes + v.row_bytes for k, v in zip(layouts.key, layouts.value)]
    d = layouts.key[0].head_dim

    def fits(p: int) -> bool:
        return rows_per_page(p, rows, d, WORST_ITEMSIZE) >= 1 and (rule.first or rule.block) % p == 0

    if requested and requested > 1:
        if not fits(requested):
            raise OscarError(
                f"--oscar keeps full-precision window rows in whole KV pages: --page-size {requested} must hold one "
                f"(2 x {d} fp32 values per head in {min(rows)}-byte K+V rows) and divide the rotations file's blocks "
                f"({rule.name}); use one of {[p for p in PAGE_SIZES if fits(p)]} or drop --page-size.")
        return requested
    ok = [p for p in PAGE_SIZES if fits(p)]
    if not ok:
        raise OscarError(f"--oscar: no page size in {PAGE_SIZES} divides the rotations file's blocks ({rule.name}); "
                         "recalibrate with blocks that are multiples of 16 (calib --block, --first-block).")
    return ok[0]


class BudgetSplit(msgspec.Struct, frozen=True, kw_only=True):
    """One KV budget served by BF16 and by --oscar: cells (bytes per token) and tokens."""

    bf16_cell: int
    oscar_cell: int
    bf16_tokens: int
    oscar_tokens: int


def split_budget(*, budget_bytes: int, head_dim: int, kv_heads: int, layers: int, itemsize: int,
                 token_row_bytes: int) -> BudgetSplit:
    """The arithmetic of the hooked sglang sizing at one budget (the demo, the capacity and RAG
    benchmarks): each holds budget / cell tokens."""
    bf16 = bf16_cell_size(head_dim=head_dim, kv_heads=kv_heads, layers=layers, itemsize=itemsize)
    oscar = oscar_cell_size(token_row_bytes, kv_heads)
    return BudgetSplit(bf16_cell=bf16, oscar_cell=oscar, bf16_tokens=budget_bytes // bf16,
                       oscar_tokens=budget_bytes // oscar)
