"""KV health report of a running server, readable from outside the process.

Two AFTER hooks (installed from ``plugin.HOOKS``):

* the scheduler's internal-state readback gains a ``"kv_health"`` entry, so
  ``GET /get_server_info`` -> ``internal_states[0]["kv_health"]`` reports it;
* the radix cache's eviction walk counts the tokens it evicts (kept by the process's
  ``plugin.OscarPlugin``), so a stress run can prove that it forced evictions.

``kv_health`` fields (all ints)::

    max_total_num_tokens, available_size, evictable_size, protected_size
    evicted_tokens                  tokens evicted by the radix cache since start
    with an OscarKVPool, also (``windows.WindowStore.health``):
    window_pages                    KV pages holding full-precision window rows
    window_pages_running            ... of which running requests hold
    window_pages_cached             ... of which only cached prefixes hold (evictable)
    window_ref_errors               pages whose hold counts disagree with the tables and attachments
    window_map_errors               slot <-> row attachment maps that disagree
    window_free_page_errors         window pages the allocator also lists as free
    window_attached_free_slot_errors  rows attached to slots the allocator lists as free
    window_idle_row_errors          request rows with no request that still hold rows

At idle, after ``/flush_cache``, a healthy server has ``available_size ==
max_total_num_tokens`` and ``window_pages == 0``; the ``*_errors`` fields must be 0 at any time
between forwards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
LEAK_FIELDS = ("window_ref_errors", "window_map_errors", "window_free_page_errors",
               "window_attached_free_slot_errors", "window_idle_row_errors")


def free_pages(allocator: Any) -> torch.Tensor:
    """Page ids the allocator holds as free (int64, any order)."""
    pages = allocator.get_all_free_pages()
    return torch.empty(0, dtype=torch.int64) if pages is None else pages.to(torch.int64)


def kv_health(scheduler: Any, evicted_tokens: int) -> dict[str, int]:
    """The ``kv_health`` report of one scheduler (see the module docstring)."""
    from oscar_sglang.pool import OscarKVPool

    allocator, tree = scheduler.token_to_kv_pool_allocator, scheduler.tree_cache
    report = {
        "max_total_num_tokens": int(scheduler.max_total_num_tokens),
        "available_size": int(allocator.available_size()),
        "evictable_size": int(tree.evictable_size()),
        "protected_size": int(tree.protected_size()),
        "evicted_tokens": int(evicted_tokens),
    }
    pool = allocator.get_kvcache()
    if isinstance(pool, OscarKVPool):
        report |= pool.store.health(free_pages(allocator))
        leaks = {k: report[k] for k in LEAK_FIELDS if report[k]}
        if leaks:
            logger.warning("OSCAR window rows leaked or inconsistent: %s", leaks)
    return report
