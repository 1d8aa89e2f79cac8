"""BF16 window sizing: the one place that decides how many window rows exist.

The position rule (``backend.py``) needs, per running request, its sinks and its last
``recent`` tokens in full precision, and, per cached prefix that a later request may hit,
the same window at the prefix's end. Both are rows of ``2 * layers * kv_heads * head_dim``
model-dtype elements (K and V, all layers):

- request windows: ``sink + recent`` rows for every row of sglang's request table
  (``max_running_requests + 1``: row 0 is its padding row), owned by that row alone;
- the retained store: windows of cached prefix ends, keyed by slot, least recently used
  first out. Losing one costs a recompute at the next hit, never precision. Each cached
  prefix end that later requests leave the cache at costs one window (sink + recent rows,
  about 7x as many INT2 tokens), so short shared prefixes gain less than long ones.

With ``--max-running-requests`` unset, the running count is derived so that the windows
take at most ``WINDOW_SHARE`` of the KV budget (at most ``MAX_DERIVED_RUNNING``); set, the
reservation is exactly what it needs, refused if it does not fit. No sglang import here.
"""

from __future__ import annotations

import msgspec

from oscar_sglang.settings import OscarError

WINDOW_SHARE = 0.10  # of the KV budget, when the running count is derived
MAX_DERIVED_RUNNING = 64  # beyond this, ask for it with --max-running-requests
RETAINED_SHARE = 0.05  # of the KV budget for the retained store (at least 2 windows, at most 32)
MAX_RETAINED_SETS = 32
SLACK = 16  # a retained window also covers prefix ends up to this many tokens earlier (retokenized text)
_MAP_BYTES = 8  # int64 window-map entry per retained row (host side, charged anyway)


class WindowPlan(msgspec.Struct, frozen=True, kw_only=True):
    sink: int
    recent: int
    request_rows: int  # request-table rows (max_running_requests + 1)
    retained_sets: int  # windows of cached prefix ends the store holds
    row_bytes: int  # one window row, K and V, all layers

    @property
    def max_running_requests(self) -> int:
        return self.request_rows - 1

    @property
    def rows_per_set(self) -> int:
        return self.sink + self.recent

    @property
    def retained_rows(self) -> int:
        return self.retained_sets * (self.rows_per_set + SLACK)

    @property
    def total_bytes(self) -> int:
        rows = self.request_rows * self.rows_per_set + self.retained_rows
        return rows * self.row_bytes + self.retained_rows * _MAP_BYTES


def window_row_bytes(*, head_dim: int, kv_heads: int, layers: int, itemsize: int, **_) -> int:
    """Bytes of one window row: K and V, every layer, model dtype."""
    return 2 * layers * kv_heads * head_dim * itemsize


def oscar_cell_size(token_row_bytes: int, kv_heads: int) -> int:
    """Bytes one token slot costs: its K and V storage rows in every layer (``token_row_bytes`` per
    KV head, ``CacheLayout.token_row_bytes``) + its retained-window map entry."""
    return kv_heads * token_row_bytes + _MAP_BYTES


def plan_for(sink: int, recent: int, row_bytes: int, running: int, budget_bytes: int = 0) -> WindowPlan:
    """The plan for exactly ``running`` concurrent requests (and a store sized from the budget)."""
    set_bytes = (sink + recent + SLACK) * row_bytes
    retained = min(MAX_RETAINED_SETS, max(2, running // 2, int(RETAINED_SHARE * budget_bytes) // set_bytes))
    return WindowPlan(sink=sink, recent=recent, request_rows=running + 1, retained_sets=retained,
                      row_bytes=row_bytes)


def plan_windows(*, sink: int, recent: int, head_dim: int, kv_heads: int, layers: int, itemsize: int,
                 budget_bytes: int, max_running_requests: int | None, share_of: int | None = None) -> WindowPlan:
    """The window reservation for this budget; raises OscarError when it cannot fit. The shares
    (derived running count, store size) are of ``share_of`` when given (a pool capped by
    --max-total-tokens), else of the budget."""
    share = share_of or budget_bytes
    row_bytes = window_row_bytes(head_dim=head_dim, kv_heads=kv_heads, layers=layers, itemsize=itemsize)
    gib = 2**30
    if max_running_requests is not None:
        plan = plan_for(sink, recent, row_bytes, max_running_requests, share)
        if plan.total_bytes >= budget_bytes:
            raise OscarError(
                f"--oscar: BF16 windows for --max-running-requests {max_running_requests} need "
                f"{plan.total_bytes / gib:.2f} GiB, more than the {budget_bytes / gib:.2f} GiB KV budget: "
                "lower --max-running-requests or raise --mem-fraction-static.")
        return plan
    running = 1
    while running < MAX_DERIVED_RUNNING and plan_for(sink, recent, row_bytes, running + 1, share).total_bytes \
            <= WINDOW_SHARE * share:
        running += 1
    plan = plan_for(sink, recent, row_bytes, running, share)
    if plan.total_bytes >= budget_bytes / 2:
        raise OscarError(
            f"--oscar: BF16 windows for one request need {plan.total_bytes / gib:.2f} GiB, half or more of the "
            f"{budget_bytes / gib:.2f} GiB KV budget: raise --mem-fraction-static.")
    return plan


class BudgetSplit(msgspec.Struct, frozen=True, kw_only=True):
    """One KV budget served by BF16 and by --oscar: cells (bytes per token) and tokens."""

    bf16_cell: int
    oscar_cell: int
    bf16_tokens: int
    oscar_tokens: int  # what the budget holds after the window plan
    plan: WindowPlan


def split_budget(*, budget_bytes: int, head_dim: int, kv_heads: int, layers: int, itemsize: int,
                 token_row_bytes: int, sink: int, recent: int, max_running_requests: int | None = None) -> BudgetSplit:
    """The arithmetic of the hooked sglang sizing at one budget (the demo, the capacity and RAG
    benchmarks): BF16 holds budget / cell tokens; --oscar first takes the window plan out.
    ``token_row_bytes``: one token's K+V storage rows of one KV head, all layers
    (``codec.CacheLayout.token_row_bytes``)."""
    shape = dict(head_dim=head_dim, kv_heads=kv_heads, layers=layers, itemsize=itemsize)
    plan = plan_windows(sink=sink, recent=recent, budget_bytes=budget_bytes,
                        max_running_requests=max_running_requests, **shape)
    bf16_cell, oscar_cell = window_row_bytes(**shape), oscar_cell_size(token_row_bytes, kv_heads)
    return BudgetSplit(bf16_cell=bf16_cell, oscar_cell=oscar_cell, bf16_tokens=budget_bytes // bf16_cell,
                       oscar_tokens=(budget_bytes - plan.total_bytes) // oscar_cell, plan=plan)
