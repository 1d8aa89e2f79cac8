"""The window store with sglang's real paged allocator on CPU: window rows live in KV pages taken
as requests need them, cached prefixes keep theirs attached to the tree's slots, and every page
goes back to the allocator when nothing holds it (no caps, no fixed shares)."""

from __future__ import annotations

import torch

from oscar_sglang.health import free_pages
from oscar_sglang.health import LEAK_FIELDS
from oscar_sglang.testing import make_pool, take_slots

SINK, BLOCK, PAGE = 4, 32, 16
H, D = 2, 32


def _pool(size=4096, request_rows=8):
    return make_pool(size, H, D, 1, sink=SINK, block=BLOCK, request_rows=request_rows, page_size=PAGE)


def _healthy(pool, alloc):
    h = pool.store.health(free_pages(alloc))
    assert not any(h[k] for k in LEAK_FIELDS), h
    return h


def _run(store, row, prompt, decode=0):
    store.begin_extend(row, 0, prompt)
    store.plans.pop(row)
    for t in range(prompt, prompt + decode):
        store.begin_decode(row, t)


def test_a_request_holds_its_sinks_and_current_block_only():
    pool, alloc = _pool()
    store, free0 = pool.store, alloc.free_size()
    per = pool.per_page
    _run(store, 1, 70, decode=100)  # positions 0..169: blocks of 32, the last is [160, 170)
    held = _healthy(pool, alloc)["window_pages_running"]
    assert held == store.pages_for(SINK) + store.pages_for(170 - 160)
    assert free0 - alloc.free_size() == held * PAGE  # window memory is KV pages, taken from the allocator
    ids = store.table[1][store.table[1] >= 0]
    assert ids.numel() == SINK + 10 and len(set(ids.tolist())) == ids.numel()
    assert per >= 1 and (ids & ((1 << store.log2_ids) - 1)).max() < per
    store.release_row(1)
    assert alloc.free_size() == free0 and _healthy(pool, alloc)["window_pages"] == 0


def test_more_requests_than_any_table_share_nothing_and_leak_nothing():
    pool, alloc = _pool(size=8192, request_rows=40)
    store, free0 = pool.store, alloc.free_size()
    for row in range(40):  # every request-table row, each at a different point of a block
        _run(store, row, 20 + row, decode=row)
    ids = torch.cat([store.table[r][store.table[r] >= 0] for r in range(40)])
    assert len(set(ids.tolist())) == ids.numel()  # no row read by two requests
    pages = store.page_of(ids).unique()
    assert store.held[pages].eq(1).sum() > 0 and _healthy(pool, alloc)["window_pages_running"] == pages.numel()
    for row in range(40):
        store.release_row(row)
    assert alloc.free_size() == free0


def _cache(store, row, slots, upto):
    store.attach(row, lambda positions: slots[positions], upto)


def test_cached_prefix_keeps_sinks_and_tail_and_hits_at_every_offset():
    pool, alloc = _pool()
    store = pool.store
    slots = take_slots(alloc, 80)
    _run(store, 1, 80)
    _cache(store, 1, slots, 80)  # sglang cached all 80 tokens: sinks and [64, 80) attach
    store.release_row(1)
    h = _healthy(pool, alloc)
    assert h["window_pages_running"] == 0 and h["window_pages_cached"] == store.pages_for(SINK) + store.pages_for(16)
    assert alloc.available_size() == alloc.free_size() + h["window_pages_cached"] * PAGE  # evictable, not lost
    for m in range(0, 81, PAGE):  # a hit at every page boundary: the whole tail where kept, else its block start
        assert store.usable_prefix(slots[:m]) == (m if m in (0, 80) else m // BLOCK * BLOCK), m
    # a request on the hit reads the cached rows (shared pages: no copy), recomputes nothing
    sinks, block = store.rule.window(80)
    hit = store.pin(store.lookup(slots[[*sinks, *block]]))
    store.begin_extend(2, 80, 90, hit)
    plan = store.plans.pop(2)
    assert torch.equal(plan.prefix_ids, hit) and plan.write_offsets.tolist() == list(range(10))
    assert _healthy(pool, alloc)["window_pages_cached"] == 0  # held again by request 2
    store.release_row(2)
    _healthy(pool, alloc)


def test_eviction_gives_back_tails_before_sinks_and_a_lost_tail_costs_a_recompute():
    pool, alloc = _pool()
    store = pool.store
    slots = [take_slots(alloc, 50) for _ in range(3)]
    for row, s in enumerate(slots):
        _run(store, row, 50)
        _cache(store, row, s, 48)  # the tree holds the first 48 (3 pages); tails [32, 48)
        store.release_row(row)
    assert [store.usable_prefix(s[:48]) for s in slots] == [48, 48, 48]
    store.usable_prefix(slots[0][:48])  # document 0 used most recently
    free = alloc.free_size()
    tail_pages = store.pages_for(16)
    assert store.evict(tail_pages) == tail_pages and alloc.free_size() == free + tail_pages * PAGE
    assert [store.usable_prefix(s[:48]) for s in slots] == [48, 32, 48]  # the LRU tail went: hit at the block start
    store.evict(10 * tail_pages, sinks=False)  # every tail, no sink: each hit recomputes from its block start
    assert [store.usable_prefix(s[:48]) for s in slots] == [32, 32, 32]
    store.evict(10 * tail_pages)  # then sinks: no hit at all
    assert [store.usable_prefix(s[:48]) for s in slots] == [0, 0, 0]
    assert _healthy(pool, alloc)["window_pages"] == 0


def test_freed_slots_free_their_rows():
    """sglang evicts a cached node: its slots go back to the allocator and take their rows along."""
    pool, alloc = _pool()
    store = pool.store
    free0 = alloc.free_size()
    slots = take_slots(alloc, 40)
    _run(store, 1, 40)
    _cache(store, 1, slots, 32)
    store.release_row(1)
    assert _healthy(pool, alloc)["window_pages_cached"] > 0
    alloc.free(slots)
    assert _healthy(pool, alloc)["window_pages"] == 0 and alloc.free_size() == free0


def test_a_recomputed_hit_keeps_the_tail_where_it_left_the_cache():
    """The first question after a document recomputes its tail (none attached at the document's end);
    it keeps those rows until sglang caches it, so the next question hits the whole document."""
    pool, alloc = _pool()
    store = pool.store
    doc = take_slots(alloc, 48)
    _run(store, 1, 48 + 20)  # document + question 1 ends in the next block: only [64, 68) is its block
    _cache(store, 1, torch.cat([doc, take_slots(alloc, 20)]), 64)
    store.release_row(1)
    assert store.usable_prefix(doc) == 32  # the document's tail [32, 48) was never kept
    sinks, block = store.rule.window(32)
    hit = store.pin(store.lookup(doc[[*sinks, *block]]))
    store.begin_extend(2, 32, 48 + 20, hit, snapshot_end=48)
    store.plans.pop(2)
    _cache(store, 2, torch.cat([doc, take_slots(alloc, 20)]), 64)
    store.release_row(2)
    assert store.usable_prefix(doc) == 48
    _healthy(pool, alloc)


def test_a_snapshot_gives_way_when_memory_is_short():
    """The kept tail of a cut prefix hit is optional (admission reserves none): without the pages for
    it the request still gets the rows it needs, and the next hit recomputes from the block start."""
    pool, alloc = _pool(size=256)  # 16 pages of 16
    store = pool.store
    doc = take_slots(alloc, 48)
    _run(store, 1, 32)
    _cache(store, 1, doc, 32)
    store.release_row(1)
    sinks, block = store.rule.window(32)
    hit = store.pin(store.lookup(doc[[*sinks, *block]]))
    free = alloc.free_size() // PAGE
    need = store.pages_for(6)  # the rows of [64, 70): request 2 needs these whatever happens
    alloc.alloc((free - need) * PAGE)  # leave exactly those pages
    store.begin_extend(2, 32, 70, hit, snapshot_end=48)
    assert store.plans.pop(2).write_offsets.tolist() == list(range(32, 38)) and 2 not in store.snap
    _healthy(pool, alloc)
