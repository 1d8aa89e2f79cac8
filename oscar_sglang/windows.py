"""Full-precision window rows: where they live, who holds them, which a cached prefix can reuse.

Under the block rule (``kernels/rule.py``) the query at position t reads exactly the sinks
(positions < sink) and its own block [exact_from(t), t]. So a running request needs rotated
full-precision rows for its sinks and for the block it is in, and a prefix hit of m cached tokens
needs the sinks and [exact_from(m), m) of the cached sequence, or recomputes from exact_from(m).

**Where.** Window rows live in pages of sglang's own token pool: a page of ``page_size`` slots,
taken from the allocator like any KV page, holds ``rows_per_page`` rows in the bytes of its
quantized rows (``pool.py``). Row id ``w = page << log2_ids | i`` (i < rows_per_page). Window memory
is thus part of the KV budget, taken when a request needs it and given back when nothing does.

**Who holds a page** (``refs``): every request-table entry that reads one of its rows (``held``,
the running requests) and every radix-tree slot one of its rows is attached to. A page goes back
to the allocator the moment nothing holds it.

- Request table (per row of sglang's request table): column ``col(p)`` (p for sinks, else
  sink + p % block) holds the row id of position p for the sinks and the current block; a host
  tensor and its device mirror (``table_dev``, updated before each forward by ``flush``).
- Attachments (``win_of_slot``): when sglang caches a request's tokens, the rows of its sinks and of
  its current block are attached to the tree's slots at those positions, so every later request
  under that prefix reads the same rows (one set of sinks per distinct beginning). They go when
  sglang frees the slot (the node is evicted) or, while no running request holds them, when the
  allocator needs the memory: tails first, least recently used first (a lost tail costs a recompute
  of at most one block at the next hit, never precision), then sglang's own cache entries (their
  slots take their rows along), sinks last (a prefix without its sinks is no hit at all).

Everything here is host-side bookkeeping (python ints and CPU tensors) run by the scheduler
process; the only device work is the table mirror and the pages' bytes themselves.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from oscar_sglang.kernels.rule import PositionRule

_EMPTY = torch.zeros(0, dtype=torch.int64)


def rows_per_page(page_size: int, kv_row_bytes: Iterable[int], head_dim: int, itemsize: int) -> int:
    """Window rows one page of ``page_size`` slots holds: in every layer, the page's K and V storage
    rows (``kv_row_bytes``: K + V row bytes per head, per layer) hold a window row's K and V head_dim
    elements of every head."""
    return page_size * min(kv_row_bytes) // (2 * head_dim * itemsize)


@dataclass
class ExtendPlan:
    """What one request's extend forward reads and writes (host tensors)."""

    prefix_ids: torch.Tensor  # window rows the chunk's queries read before it: sinks, then [exact_from(a), a)
    write_offsets: torch.Tensor  # chunk tokens (offset from the chunk start) whose rows are written ...
    write_ids: torch.Tensor  # ... into these window rows, after attention


class WindowStore:
    def __init__(self, rule: PositionRule, page_size: int, per_page: int, num_slots: int, request_rows: int,
                 device: torch.device | str):
        if not rule.rebuildable:
            raise ValueError(f"the served position rule must be rebuildable, got {rule.name}")
        if per_page < 1:
            raise ValueError("a window page must hold at least one row")
        self.rule = rule
        self.page_size = page_size
        self.per_page = per_page
        self.log2_ids = (per_page - 1).bit_length()
        self.num_pages = num_slots // page_size
        self.cols = rule.sink + rule.block
        self.device = torch.device(device)
        self.refs = torch.zeros(self.num_pages, dtype=torch.int32)
        self.held = torch.zeros(self.num_pages, dtype=torch.int32)
        self.used = torch.zeros(self.num_pages, dtype=torch.int64)  # LRU clock of attached pages
        self.sink_page = torch.zeros(self.num_pages, dtype=torch.bool)
        self.win_of_slot = torch.full((num_slots,), -1, dtype=torch.int64)
        self.slot_of_win = torch.full((self.num_pages << self.log2_ids,), -1, dtype=torch.int64)
        self.table = torch.full((request_rows, self.cols), -1, dtype=torch.int64)
        self.table_dev = torch.full((request_rows, self.cols), -1, dtype=torch.int32, device=self.device)
        self._take: Callable[[int], torch.Tensor | None] | None = None
        self._give: Callable[[torch.Tensor], None] | None = None
        self.snapshot_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # request -> its full prefix match
        self.reset()

    def bind(self, take: Callable[[int], torch.Tensor | None], give: Callable[[torch.Tensor], None]) -> None:
        """The allocator's page hand-out (``take(n)`` -> n page ids or None) and return (``give(pages)``)."""
        self._take, self._give = take, give

    def reset(self) -> None:
        """Forget everything (sglang cleared its allocator: nothing is cached or running)."""
        self.refs.zero_()
        self.held.zero_()
        self.used.zero_()
        self.sink_page.zero_()
        self.win_of_slot.fill_(-1)
        self.slot_of_win.fill_(-1)
        self.table.fill_(-1)
        self.table_dev.fill_(-1)
        self.clock = 0
        self.attached = 0
        self.row_len = [-1] * self.table.shape[0]
        self.cursor = [(-1, 0)] * self.table.shape[0]  # (page, next row) each request writes new rows into
        self.snap: dict[int, tuple[list[int], list[int]]] = {}  # row -> (positions, ids) kept for attaching only
        self.plans: dict[int, ExtendPlan] = {}
        self._pending: list[tuple[int, int, int]] = []  # (row, col, id) not yet mirrored on the device

    # ------------------------------------------------------------------ geometry
    def col(self, p: int) -> int:
        """Table column of position p: the sinks, then the offset in its block."""
        return p if p < self.rule.sink else self.rule.sink + p - self.rule.block_start(p)

    def page_of(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >> self.log2_ids

    def pages_for(self, rows: int) -> int:
        return -(-rows // self.per_page)

    # ------------------------------------------------------------------ pages
    def _hold(self, ids: torch.Tensor, by_request: bool) -> None:
        pages = self.page_of(ids[ids >= 0])
        ones = torch.ones_like(pages, dtype=torch.int32)
        self.refs.index_add_(0, pages, ones)
        if by_request:
            self.held.index_add_(0, pages, ones)

    def _release(self, ids: torch.Tensor, by_request: bool) -> None:
        """Drop one hold per id; pages nobody holds any more go back to the allocator."""
        pages = self.page_of(ids[ids >= 0])
        if pages.numel() == 0:
            return
        ones = torch.ones_like(pages, dtype=torch.int32)
        self.refs.index_add_(0, pages, -ones)
        if by_request:
            self.held.index_add_(0, pages, -ones)
        gone = pages.unique()
        gone = gone[self.refs[gone] == 0]
        if gone.numel():
            self.sink_page[gone] = False
            self._give(gone)

    def _new_pages(self, n: int, optional: bool = False) -> torch.Tensor | None:
        pages = self._take(n) if n else _EMPTY
        if pages is None and not optional:
            raise RuntimeError(f"OSCAR: no KV memory left for {n} full-precision window pages; sglang's admission "
                               "should have reserved them (lower --max-running-requests or raise "
                               "--mem-fraction-static)")
        return None if pages is None else pages.cpu().long()

    def _starts_page(self, page: int, nxt: int, p: int) -> bool:
        """Whether position p (after the cursor's page / next row) takes a new page: the cursor's is
        full or none, or p begins the non-sink rows or a block (callers' runs are contiguous
        within a block, so a gap always falls on one of these)."""
        s = self.rule.sink
        return page < 0 or nxt >= self.per_page or p == s or (p > s and self.rule.block_start(p) == p)

    def _alloc(self, row: int, positions: list[int], optional: bool = False) -> torch.Tensor | None:
        """New row ids for ascending positions of request ``row``, written page by page: a page is
        never shared between the sinks and the rest, between blocks, or between requests.
        ``optional``: None instead of an error when the allocator has too few pages."""
        if not positions:
            return _EMPTY
        starts, (page, nxt) = [], self.cursor[row]
        for p in positions:
            if self._starts_page(page, nxt, p):
                starts.append(p)
                page, nxt = 0, 0
            nxt += 1
        pages = self._new_pages(len(starts), optional)
        if pages is None:
            return None
        new = iter(pages.tolist())
        starts, (page, nxt) = set(starts), self.cursor[row]
        ids = []
        for p in positions:
            if p in starts:
                page, nxt = next(new), 0
            ids.append(page << self.log2_ids | nxt)
            nxt += 1
        self.cursor[row] = (page, nxt)
        out = torch.tensor(ids, dtype=torch.int64)
        self._hold(out, by_request=True)
        return out

    def _set(self, row: int, positions: list[int], ids: torch.Tensor) -> None:
        cols = [self.col(p) for p in positions]
        self.table[row, cols] = ids
        self._pending += zip([row] * len(cols), cols, ids.tolist())

    def _drop(self, row: int, positions: Iterable[int]) -> None:
        cols = [self.col(p) for p in positions]
        if cols:
            ids = self.table[row, cols]
            self.table[row, cols] = -1
            self._release(ids, by_request=True)

    # ------------------------------------------------------------------ requests
    def lookup(self, slots: torch.Tensor) -> torch.Tensor:
        """Row ids attached to these slots (-1: none)."""
        return self.win_of_slot[slots.cpu().long()]

    def _touch(self, ids: torch.Tensor) -> None:
        """Their pages were used now (the eviction order)."""
        self.clock += 1
        self.used[self.page_of(ids[ids >= 0])] = self.clock

    def pin(self, ids: torch.Tensor) -> torch.Tensor:
        """Hold rows a request admitted on a prefix hit will read (before sglang allocates, which may
        evict); ``begin_extend(hit=ids)`` hands the holds to its table."""
        self._hold(ids, by_request=True)
        return ids

    def unpin(self, ids: torch.Tensor) -> None:
        self._release(ids, by_request=True)

    def begin_extend(self, row: int, start: int, end: int, hit: torch.Tensor | None = None,
                     snapshot_end: int | None = None) -> None:
        """Request ``row`` extends positions [start, end). A new request on a prefix hit of ``start``
        tokens brings ``hit`` (pinned ids of ``rule.window(start)``'s positions). Records the
        forward's plan (``plans[row]``) and moves the table to the block of ``end``.
        ``snapshot_end``: a cached prefix end M inside this chunk whose tail rows the request keeps
        until sglang caches it (``attach``), so the next request that leaves the cache at M hits it."""
        r, s = self.rule, self.rule.sink
        if self.row_len[row] != start:
            self.release_row(row)
            if start:
                if hit is None:
                    raise RuntimeError(f"OSCAR: request row {row} starts at {start} without its prefix's window")
                self._set(row, [*r.window(start)[0], *r.window(start)[1]], hit)
        elif hit is not None:
            self.unpin(hit)
        sinks, block = r.window(start)
        prefix_ids = self.table[row, [self.col(p) for p in [*sinks, *block]]]
        if (prefix_ids < 0).any():
            raise RuntimeError(f"OSCAR: request row {row} lacks window rows before position {start}")
        first = max(s, r.exact_from(end))
        if r.exact_from(end) > r.exact_from(start):  # a new block begins inside the chunk
            self._drop(row, block)
            self.cursor[row] = (-1, 0)
        keep = [*range(start, min(end, s)), *range(max(start, first), end)]  # own sinks, the block at the end
        snap = []
        if snapshot_end is not None and start < snapshot_end <= end and r.exact_from(snapshot_end) < first:
            snap = list(range(max(start, s, r.exact_from(snapshot_end)), snapshot_end))
        positions = sorted({*keep, *snap})
        ids = self._alloc(row, positions, optional=bool(snap))
        if ids is None:  # no memory for the snapshot (admission reserves none): the next hit recomputes instead
            positions, snap = keep, []
            ids = self._alloc(row, positions)
        by_pos = dict(zip(positions, ids.tolist()))
        self._set(row, keep, torch.tensor([by_pos[p] for p in keep], dtype=torch.int64))
        if snap:
            self.snap[row] = (snap, [by_pos[p] for p in snap])
        self.plans[row] = ExtendPlan(prefix_ids, torch.tensor(positions, dtype=torch.int64) - start, ids)
        self.row_len[row] = end

    def begin_decode(self, row: int, t: int) -> int:
        """Request ``row`` writes position t (its length becomes t + 1): returns t's row id."""
        if self.row_len[row] != t:
            raise RuntimeError(f"OSCAR: request row {row} decodes position {t} but its window holds {self.row_len[row]}")
        r = self.rule
        if t > r.sink and r.block_start(t) == t:  # a new block: the old one is no longer read
            self._drop(row, range(max(r.sink, r.block_start(t - 1)), t))
            self.cursor[row] = (-1, 0)
        ids = self._alloc(row, [t])
        self._set(row, [t], ids)
        self.row_len[row] = t + 1
        return int(ids[0])

    def decode_pages_needed(self, rows: Iterable[int]) -> int:
        """New pages the next decode step of these request rows takes."""
        return sum(self._starts_page(*self.cursor[row], self.row_len[row]) for row in rows)

    def release_row(self, row: int) -> None:
        """sglang freed request-table row ``row``: drop everything it holds."""
        held = self.table[row].clone()
        self.table[row] = -1
        self._release(held, by_request=True)
        if row in self.snap:
            self._release(torch.tensor(self.snap.pop(row)[1], dtype=torch.int64), by_request=True)
        self.plans.pop(row, None)
        self.row_len[row] = -1
        self.cursor[row] = (-1, 0)

    # ------------------------------------------------------------------ the radix tree
    def attach(self, row: int, slots_by_pos: Callable[[list[int]], torch.Tensor], upto: int) -> None:
        """sglang cached request ``row``'s first ``upto`` positions: attach the rows it holds for them
        (sinks, current block, snapshot) to the tree's slots there (``slots_by_pos(positions)``),
        where no row is attached yet. The snapshot's own hold ends here."""
        n = self.row_len[row]
        sinks, block = self.rule.window(n)
        positions = [p for p in [*sinks, *block] if p < upto]
        ids = self.table[row, [self.col(p) for p in positions]] if positions else _EMPTY
        snap_pos, snap_ids = self.snap.pop(row, ([], []))
        keep = [i for i, p in enumerate(snap_pos) if p < upto]
        positions += [snap_pos[i] for i in keep]
        ids = torch.cat([ids, torch.tensor([snap_ids[i] for i in keep], dtype=torch.int64)])
        if positions:
            slots = slots_by_pos(positions).cpu().long()
            free = (self.win_of_slot[slots] < 0) & (ids >= 0)
            slots, ids, pos = slots[free], ids[free], torch.tensor(positions)[free]
            self.win_of_slot[slots] = ids
            self.slot_of_win[ids] = slots
            pages = self.page_of(ids)
            self.refs.index_add_(0, pages, torch.ones_like(pages, dtype=torch.int32))
            self.sink_page[pages[pos < self.rule.sink]] = True
            self.clock += 1
            self.used[pages] = self.clock
            self.attached += int(free.sum())
        if snap_ids:
            self._release(torch.tensor(snap_ids, dtype=torch.int64), by_request=True)

    def detach(self, slots: torch.Tensor) -> None:
        """sglang freed these slots: their attached rows are no longer the tree's."""
        if self.attached == 0 or slots.numel() == 0:
            return
        slots = slots.cpu().long()
        ids = self.win_of_slot[slots]
        have = ids >= 0
        if have.any():
            ids = ids[have]
            self.win_of_slot[slots[have]] = -1
            self.slot_of_win[ids] = -1
            self.attached -= int(have.sum())
            self._release(ids, by_request=False)

    def usable_prefix(self, slots: torch.Tensor) -> int:
        """Longest page-aligned m <= n = len(slots) (a cached prefix, one slot per position) whose
        window rows are all attached: the sinks and [exact_from(m), m). Never below the block start
        exact_from(n) when the sinks are attached (nothing to rebuild there); 0 without them."""
        n, s = slots.numel(), self.rule.sink
        lo = self.rule.rebuild_start(n)
        pos = torch.cat([torch.arange(min(s, n)), torch.arange(min(max(s, lo), n), n)])
        ids = self.lookup(slots[pos.to(slots.device)])
        missing = torch.nonzero(ids < 0).flatten()
        first = int(pos[missing[0]]) if missing.numel() else n
        m = first // self.page_size * self.page_size
        if m < lo:
            return 0
        self._touch(ids[pos < m])
        return m

    # ------------------------------------------------------------------ eviction
    def evictable_pages(self) -> int:
        return int(((self.refs > 0) & (self.held == 0)).sum()) if self.attached else 0

    def evict(self, pages: int, sinks: bool = True) -> int:
        """Give back at least ``pages`` pages that only the tree holds (tails before sinks, least recently
        used first; ``sinks=False``: tails only), or all there are; returns how many."""
        cand = torch.nonzero((self.refs > 0) & (self.held == 0)).flatten() if self.attached else _EMPTY
        if not sinks:
            cand = cand[~self.sink_page[cand]]
        if pages <= 0 or cand.numel() == 0:
            return 0
        order = torch.argsort(self.sink_page[cand].long() * (self.clock + 1) + self.used[cand], stable=True)
        victims = cand[order[:pages]]
        slots = self.slot_of_win[((victims[:, None] << self.log2_ids) + torch.arange(self.per_page)).flatten()]
        self.detach(slots[slots >= 0])
        return victims.numel()

    # ------------------------------------------------------------------ device mirror
    def flush(self) -> None:
        """Mirror the table changes on the device (before a forward reads it)."""
        if self._pending:
            row, col, ids = torch.tensor(self._pending, dtype=torch.int64).T
            dev = self.device
            self.table_dev[row.to(dev, non_blocking=True), col.to(dev, non_blocking=True)] = \
                ids.to(dev, non_blocking=True).to(torch.int32)
            self._pending = []

    # ------------------------------------------------------------------ health
    def health(self, free_pages: torch.Tensor) -> dict[str, int]:
        """Page counts and consistency checks (every ``*_errors`` field is 0 in a healthy store)
        against the allocator's free pages."""
        expect_held = torch.zeros_like(self.refs)
        for ids in [self.table[self.table >= 0], *(torch.tensor(v[1], dtype=torch.int64) for v in self.snap.values())]:
            expect_held.index_add_(0, self.page_of(ids), torch.ones_like(ids, dtype=torch.int32))
        attached = self.win_of_slot[self.win_of_slot >= 0]
        expect_refs = expect_held.clone()
        expect_refs.index_add_(0, self.page_of(attached), torch.ones_like(attached, dtype=torch.int32))
        linked = torch.nonzero(self.win_of_slot >= 0).flatten()
        used = torch.nonzero(self.refs > 0).flatten()
        free = free_pages.cpu().long()
        idle_rows = [r for r, n in enumerate(self.row_len) if n < 0 and bool((self.table[r] >= 0).any())]
        return {
            "window_pages": int(used.numel()),
            "window_pages_running": int((self.held > 0).sum()),
            "window_pages_cached": int(((self.refs > 0) & (self.held == 0)).sum()),
            "window_ref_errors": int((expect_refs != self.refs).sum() + (expect_held != self.held).sum()),
            "window_map_errors": int((self.slot_of_win[self.win_of_slot[linked]] != linked).sum())
            + int(attached.numel() != self.attached),
            "window_free_page_errors": int(torch.isin(used, free).sum()),
            "window_attached_free_slot_errors": int(torch.isin(linked // self.page_size, free).sum()),
            "window_idle_row_errors": len(idle_rows),
        }
