"""sglang's paged token allocator, accounting for the window pages the OSCAR pool takes from it.

Window rows (``windows.py``) live in whole pages of the token pool, so they come out of the same
budget sglang admits requests against. This subclass tells sglang's scheduler about them through
the allocator's own capacity seams (``mem_cache/allocator/base.py``), with no change to its logic:

- ``available_size``: free pages plus window pages only the radix tree holds (cached tails and
  sinks), so sglang's admission, its idle leak check and its usage log see them as it sees its own
  evictable cache; ``evict_to_free_tokens`` gives back cached tails first, then sglang's own cache
  entries (their slots take their rows along), then sinks;
- ``request_slot_reserve`` / ``OscarPrefillBudget.reserve``: a new request's window rows at
  prefill and as it decodes; ``get_extend_allocation_demand`` / ``check_decode_capacity``: the
  window pages the next extend / decode step takes, evicted for before sglang allocates (a decode
  step that does not fit retracts requests, as sglang does for tokens);
- ``_release_page_ids`` (every free ends here): slots sglang frees lose their attached window
  rows, and window pages nobody holds any more are freed with them.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.prefill_budget import PrefillBudget

from oscar_sglang.pool import OscarKVPool


class OscarPrefillBudget(PrefillBudget):
    """sglang's prefill budget plus each admitted request's window rows as it decodes."""

    def reserve(self, extend_input_len: int, max_new_tokens: int, *, extra_tokens: int = 0, **kwargs) -> None:
        growth = self.allocator.window_growth_slots(max_new_tokens)
        super().reserve(extend_input_len, max_new_tokens, extra_tokens=extra_tokens + growth, **kwargs)


class OscarTokenToKVPoolAllocator(PagedTokenToKVPoolAllocator):
    def __init__(self, size: int, page_size: int, dtype: torch.dtype, device: str, kvcache: OscarKVPool,
                 need_sort: bool):
        super().__init__(size, page_size, dtype, device, kvcache, need_sort)
        self.store = kvcache.store
        self.store.bind(self._take_pages, self._give_pages)

    # ------------------------------------------------------------ window pages
    def _take_pages(self, n: int) -> torch.Tensor | None:
        slots = self.alloc(n * self.page_size)
        return None if slots is None else slots[:: self.page_size] // self.page_size

    def _give_pages(self, pages: torch.Tensor) -> None:
        super()._release_page_ids(pages.to(self.device))

    def _release_page_ids(self, *page_ids: torch.Tensor):
        super()._release_page_ids(*page_ids)
        offsets = torch.arange(self.page_size)
        for pages in page_ids:  # their slots lose attached rows (pages nobody holds then are given back)
            self.store.detach((pages.cpu()[:, None] * self.page_size + offsets).flatten())

    def clear(self):
        super().clear()
        if hasattr(self, "store"):
            self.store.reset()

    def window_slots(self, rows: int) -> int:
        return self.store.pages_for(rows) * self.page_size

    def window_growth_slots(self, new_tokens: int) -> int:
        """Slots the window rows of ``new_tokens`` decoded tokens take (at most a block at a time)."""
        return self.window_slots(min(int(new_tokens), self.store.rule.block))

    # ------------------------------------------------------------ capacity seams
    def free_size(self) -> int:
        return super().available_size()

    def available_size(self):
        return self.free_size() + self.store.evictable_pages() * self.page_size

    def evict_to_free_tokens(self, tree_cache, num_tokens: int) -> bool | None:
        """Free ``num_tokens`` slots: cached tails first (a lost tail costs at most a block of recompute),
        then sglang's own cache entries (their slots take their sinks and tails along), then sinks."""
        self._evict_windows(num_tokens, sinks=False)
        if self.free_size() < num_tokens and tree_cache is not None and tree_cache.supports_prefix_sharing():
            tree_cache.evict_for_alloc(EvictParams(num_tokens=num_tokens - self.free_size()))
        self._evict_windows(num_tokens, sinks=True)
        return self.free_size() >= num_tokens

    def _evict_windows(self, num_tokens: int, sinks: bool) -> None:
        short = num_tokens - self.free_size()
        if short > 0:
            self.store.evict(-(-short // self.page_size), sinks=sinks)

    def create_prefill_budget(self, tree_cache, *, num_mixed_decode_tokens=0):
        return OscarPrefillBudget(self, tree_cache, num_mixed_decode_tokens=num_mixed_decode_tokens)

    def request_slot_reserve(self, *, has_req_pool_slot: bool, prefill_tokens: int = 0) -> int:
        """A request of ``prefill_tokens`` tokens holds window rows for its sinks and its current block."""
        sinks, block = self.store.rule.window(prefill_tokens)
        return self.window_slots(len(sinks)) + self.window_slots(len(block))

    def get_extend_allocation_demand(self, prefix_lens_cpu, seq_lens_cpu, *, conservative_num_tokens: int,
                                     shard_size: int) -> int:
        windows = sum(self.request_slot_reserve(has_req_pool_slot=True, prefill_tokens=int(n)) for n in seq_lens_cpu)
        return conservative_num_tokens + windows

    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, spec_algorithm=None) -> bool:
        rows = [r.kv.req_pool_idx for r in requests or [] if r.kv.req_pool_idx is not None]
        need = num_tokens + self.store.decode_pages_needed(rows) * self.page_size
        return self.evict_to_free_tokens(tree_cache, need)
