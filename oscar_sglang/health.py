"""KV health report of a running server, readable from outside the process.

``register()`` adds two AFTER hooks (targets in :data:`HOOKED_TARGETS`):

* the scheduler's internal-state readback gains a ``"kv_health"`` entry, so
  ``GET /get_server_info`` -> ``internal_states[0]["kv_health"]`` reports it;
* the radix cache's eviction walk counts the tokens it evicts (kept as an attribute
  of the tree object, not in module state), so a stress run can prove that it forced
  evictions.

``kv_health`` fields (all ints)::

    max_total_num_tokens, available_size, evictable_size, protected_size
    evicted_tokens                  tokens evicted by the radix cache since start
    with an OscarKVPool, also:
    window_bytes                    bytes of the BF16 windows (request rows + retained store)
    request_rows, retained_rows, retained_free, retained_owned
    window_fill_misses              window rows a prefix hit needed but the store had lost
    window_rows_of_free_slots       retained rows still owned by a slot the allocator holds as free
    window_map_mismatches           slot_of_ret / ret_of_slot disagree
    retained_rows_lost              retained rows neither free nor owned
    retained_free_duplicates        a retained row listed twice in the free list

At idle, after ``/flush_cache``, a healthy server has ``available_size ==
max_total_num_tokens``, ``retained_free == retained_rows`` and the five leak fields 0;
the leak fields must be 0 at any time between forwards.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

_STATE = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController"
_TREE = "sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache"
HOOKED_TARGETS = (f"{_STATE}._add_memory_usage", f"{_TREE}._evict")
LEAK_FIELDS = ("window_fill_misses", "window_rows_of_free_slots", "window_map_mismatches", "retained_rows_lost",
               "retained_free_duplicates")
_EVICTED_ATTR = "_oscar_evicted_tokens"


def free_slots(allocator: Any) -> torch.Tensor:
    """Slot ids the allocator holds as free (int64, any order)."""
    pages = allocator.get_all_free_pages()
    if pages is None:
        return torch.empty(0, dtype=torch.int64)
    pages = pages.to(torch.int64)
    page = allocator.page_size
    if page == 1:
        return pages
    return (pages.reshape(-1, 1) * page + torch.arange(page, device=pages.device)).reshape(-1)


def window_health(pool: Any, free: torch.Tensor) -> dict[str, int]:
    """Consistency of an OscarKVPool's retained-window maps against the allocator's free slots."""
    owner = pool.slot_of_ret
    rows = torch.nonzero(owner >= 0).reshape(-1)
    slots = owner[rows]
    mismatched = int((pool.ret_of_slot[slots] != rows).sum())
    back = torch.nonzero(pool.ret_of_slot >= 0).reshape(-1)
    mismatched += int((owner[pool.ret_of_slot[back]] != back).sum())
    ret_free = pool.ret_free
    unique_free = set(ret_free)
    return {
        "request_rows": int(pool.request_rows),
        "retained_rows": int(owner.numel()),
        "retained_free": len(ret_free),
        "retained_owned": int(rows.numel()),
        "window_fill_misses": int(pool.fill_misses),
        "window_rows_of_free_slots": int(torch.isin(slots, free.cpu()).sum()),
        "window_map_mismatches": mismatched,
        "retained_rows_lost": int(owner.numel()) - len(unique_free) - int(rows.numel()),
        "retained_free_duplicates": len(ret_free) - len(unique_free),
    }


def kv_health(scheduler: Any) -> dict[str, int]:
    """The ``kv_health`` report of one scheduler (see the module docstring)."""
    from oscar_sglang.pool import OscarKVPool

    allocator, tree = scheduler.token_to_kv_pool_allocator, scheduler.tree_cache
    report = {
        "max_total_num_tokens": int(scheduler.max_total_num_tokens),
        "available_size": int(allocator.available_size()),
        "evictable_size": int(tree.evictable_size()),
        "protected_size": int(tree.protected_size()),
        "evicted_tokens": int(getattr(tree, _EVICTED_ATTR, 0)),
    }
    pool = allocator.get_kvcache()
    if isinstance(pool, OscarKVPool):
        slot_map = pool.ret_of_slot.numel() * pool.ret_of_slot.element_size()  # charged in the per-token cell
        report |= window_health(pool, free_slots(allocator)) | {"window_bytes": int(pool.window_bytes() - slot_map)}
        leaks = {k: report[k] for k in LEAK_FIELDS if report[k]}
        if leaks:
            logger.warning("OSCAR window rows leaked or inconsistent: %s", leaks)
    return report


def _add_kv_health(result, controller, state: dict) -> None:
    state["kv_health"] = kv_health(controller.scheduler)


def _count_evicted(result, tree, *args, **kwargs) -> None:
    setattr(tree, _EVICTED_ATTR, getattr(tree, _EVICTED_ATTR, 0) + int(result.num_tokens_evicted))


def register(hook_registry: Any, after: Any) -> None:
    """Install the hooks (called from ``oscar_sglang.plugin.register``)."""
    hook_registry.register(HOOKED_TARGETS[0], _add_kv_health, after)
    hook_registry.register(HOOKED_TARGETS[1], _count_evicted, after)
