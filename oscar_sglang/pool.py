"""The OSCAR KV pool: rotated 2/3/4-bit storage rows in sglang's own pool, plus BF16 windows.

Layout (per layer, as sglang's ``MHATokenToKVPool`` sees it)::

    k_buffer[l]  uint8 [size + page_size, H_kv, layouts.key[l].row_bytes]
    v_buffer[l]  uint8 [size + page_size, H_kv, layouts.value[l].row_bytes]

Every token's K and V are quantized on write into one storage row per (token, KV head)
(``kernels/codec.py``: codes + fp16 scale/minimum) at the layer's calibrated bit widths
(``codec.CacheLayout``), so rows differ in width between layers and between K and V.
sglang sees ``dtype=uint8`` buffers, so everything that copies KV rows byte for byte
(radix cache, ``move_kv_cache``, retraction) carries complete quantized vectors.

Full-precision (rotated, model dtype) windows live beside the rows (``windows.py`` sizes them)::

    k_win[l], v_win[l]  [request_rows * (sink + recent) + retained_rows, H_kv, D]

* **Request windows** (rows ``r * (sink + recent) ...``): request-table row r alone owns
  them. Position p < sink lands in row ``r * (sink + recent) + p``, any other position in
  ``r * (sink + recent) + sink + p % recent`` (a ring of the last ``recent`` tokens).
  No two running requests ever share a row. ``row_len[r]`` is the sequence length the
  row's window belongs to (-1 = none: the row was freed or never used).
* **Retained store** (the rest): the window of a cached prefix end, copied out of a request
  window when sglang caches the request (``retain_request``) and keyed by slot
  (``ret_of_slot``), so a request that hits that prefix copies it into its own window
  (``fill_rows``). Rows are freed with their slots; when the store is full, the least
  recently used go first, a proven window (hit, or where a request left a cached sequence)
  counting as used ``protect`` window allocations (the store's capacity in windows) after it
  was: it outlives that many newer guesses (chunk and request ends nobody has hit yet), and
  one nobody has hit for longer goes before them, so a new workload's documents do not starve
  behind an old workload's proven windows. A lost window only shortens later prefix hits
  (``usable_prefix``).

All bookkeeping is host-side (CPU tensors, python ints): it is read by the scheduler when it
matches prefixes and by the backend when it builds a forward's metadata, and every data copy
it implies is issued in stream order after the writes it depends on.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from oscar_sglang.kernels import ops
from oscar_sglang.kernels.codec import CacheLayout
from oscar_sglang.windows import SLACK, WindowPlan

logger = logging.getLogger(__name__)


class OscarKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` whose buffers hold storage rows; adds the BF16 windows.
    ``layouts``: every model layer's row layouts (this pool holds ``start_layer`` onwards)."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        *,
        layouts: CacheLayout,
        plan: WindowPlan,
        enable_memory_saver: bool = False,
        start_layer: int | None = None,
        end_layer: int | None = None,
    ):
        first = start_layer or 0
        self.key_layouts = layouts.key[first : first + layer_num]
        self.value_layouts = layouts.value[first : first + layer_num]
        if len(self.key_layouts) != layer_num:
            raise ValueError(f"layouts cover {len(layouts.key)} layers, the pool holds layers {first}..{first + layer_num - 1}")
        widest = max(r.row_bytes for r in self.key_layouts + self.value_layouts)
        self.plan = plan
        self.window_dtype = dtype
        self.sink, self.recent = plan.sink, plan.recent
        self.request_rows = plan.request_rows
        self.ret_base = plan.request_rows * plan.rows_per_set  # first retained row
        rows = self.ret_base + plan.retained_rows
        self.k_win = [torch.zeros(rows, head_num, head_dim, dtype=dtype, device=device) for _ in range(layer_num)]
        self.v_win = [torch.zeros(rows, head_num, head_dim, dtype=dtype, device=device) for _ in range(layer_num)]
        self.ret_of_slot = torch.full((size + page_size,), -1, dtype=torch.int64)  # retained row index, -1 = none
        self.slot_of_ret = torch.full((plan.retained_rows,), -1, dtype=torch.int64)
        self.ret_used = torch.zeros(plan.retained_rows, dtype=torch.int64)  # LRU key of each retained row
        self.clock = 0  # window allocations so far
        self.protect = max(1, plan.retained_rows // plan.rows_per_set)  # the store's capacity in windows
        self.in_forward = False
        self.busy = torch.zeros(plan.retained_rows, dtype=torch.bool)  # taken by the forward being planned
        self.fill_misses = 0  # window rows a prefix hit needed but the store had lost (must stay 0)
        super().__init__(
            size,
            page_size,
            torch.uint8,
            head_num,
            widest,  # what sglang reads as head_dim; _create_buffers_normal sizes every layer's own rows
            layer_num,
            device,
            enable_memory_saver,
            v_head_dim=widest,
            start_layer=start_layer,
            end_layer=end_layer,
            enable_alt_stream=False,
            kv_cache_layout="nhd",  # token rows: what the kernels and _create_buffers_normal assume
        )
        self.reset_windows()

    # ------------------------------------------------------------------ sizes
    def _create_buffers_normal(self):
        rows = self.size + self.page_size
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.k_buffer, self.v_buffer = (
                [torch.zeros(rows, self.head_num, r.row_bytes, dtype=torch.uint8, device=self.device) for r in lays]
                for lays in (self.key_layouts, self.value_layouts))

    def _slot_move_pointer_buffers(self):
        """Widest rows first: sglang's tiled slot copy sizes its tiles from the first buffer's stride."""
        return sorted([*self.k_buffer, *self.v_buffer], key=lambda b: -b.stride(0))

    def layouts(self, layer_id: int):
        """(key, value) row layouts of a layer."""
        lid = layer_id - self.start_layer
        return self.key_layouts[lid], self.value_layouts[lid]

    def window_bytes(self) -> int:
        per_layer = self.k_win[0].numel() * self.k_win[0].element_size() if self.k_win else 0
        return 2 * per_layer * len(self.k_win) + self.ret_of_slot.numel() * 8

    def get_kv_size_bytes(self):
        k_size, v_size = super().get_kv_size_bytes()
        half = self.window_bytes() // 2
        return k_size + half, v_size + half

    # ------------------------------------------------------- request windows
    def window_rows(self, req_rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Request-window row of each (request row, position): a pure function of both."""
        s, w = self.sink, self.plan.rows_per_set
        return req_rows * w + torch.where(positions < s, positions, s + positions % self.recent)

    def window_positions(self, seq_len: int) -> tuple[range, range]:
        """Positions a query right after ``seq_len`` tokens reads from the window: (sinks, ring)."""
        s = self.sink
        return range(min(s, seq_len)), range(max(s, seq_len - self.recent + 1), seq_len)

    def release_request(self, req_row: int) -> None:
        """sglang freed a request-table row: its window belongs to nobody now."""
        self.row_len[req_row] = -1
        self.snapshot_at.pop(req_row, None)

    # ---------------------------------------------------------- retained store
    def reset_windows(self) -> None:
        """Forget every window (sglang cleared its allocator: no slot or request is live)."""
        self.row_len = [-1] * self.request_rows
        self.snapshot_at: dict[int, int] = {}  # request row -> prefix end whose window it recomputes
        self.ret_of_slot.fill_(-1)
        self.slot_of_ret.fill_(-1)
        self.ret_used.zero_()
        self.ret_free = list(range(self.plan.retained_rows - 1, -1, -1))

    def free_window_rows(self) -> int:
        """Retained rows not owned by any slot (== retained_rows when nothing is cached)."""
        return len(self.ret_free)

    def release_slots(self, slots: torch.Tensor) -> None:
        """sglang freed these slots: drop their retained rows (idempotent)."""
        if slots.numel() == 0:
            return
        slots = slots.cpu().long()
        rows = self.ret_of_slot[slots]
        live = rows >= 0
        if not bool(live.any()):
            return
        rows = rows[live]
        self.ret_of_slot[slots[live]] = -1
        self.slot_of_ret[rows] = -1
        self.ret_free.extend(rows.tolist())

    def release_pages(self, page_ids: torch.Tensor) -> None:
        offsets = torch.arange(self.page_size, device=page_ids.device)
        self.release_slots((page_ids.reshape(-1, 1) * self.page_size + offsets).reshape(-1))

    def retained(self, slots: torch.Tensor) -> torch.Tensor:
        """Bool [n]: which of these slots have a retained window row (a match proves them: touched)."""
        rows = self.ret_of_slot[slots.cpu().long()]
        have = rows >= 0
        self.ret_used[rows[have]] = self._key(proven=True)
        return have

    def _key(self, proven: bool) -> int:
        """LRU key of a retained row used now: a guess at the clock, a proven window ``protect``
        allocations later (odd: never equal to a guess's key)."""
        return 2 * (self.clock + self.protect) + 1 if proven else 2 * self.clock

    def usable_prefix(self, slots: torch.Tensor, page_size: int) -> int:
        """Longest page-aligned m <= len(slots) whose window the store holds: the sinks
        [0, min(sink, m)) and the ring [max(sink, m - recent + 1), m) all retained."""
        have = self.retained(slots).long()
        c = torch.cat([have.new_zeros(1), have.cumsum(0)])
        m = torch.arange(0, slots.numel() + 1, page_size)
        s_hi = m.clamp(max=self.sink)
        r_lo = (m - self.recent + 1).clamp(min=self.sink).minimum(m)
        ok = (c[s_hi] == s_hi) & (c[m] - c[r_lo] == m - r_lo)
        return int(m[ok].max())

    def begin_forward(self) -> None:
        """While a forward's metadata is built, rows it takes are not reclaimed by the same forward
        (two tokens of one forward would write one row)."""
        self.in_forward = True

    def end_forward(self) -> None:
        self.in_forward = False
        self.busy.zero_()

    def _take_rows(self, n: int, keep: torch.Tensor) -> torch.Tensor:
        """n retained rows, reclaiming the least recently used ones (never ``keep``) when none are free."""
        short = n - len(self.ret_free)
        if short > 0:
            spare = (self.slot_of_ret >= 0) & ~self.busy
            spare[keep] = False
            owned = spare.nonzero().squeeze(1)
            victims = owned[self.ret_used[owned].argsort(stable=True)[:short]]
            self.release_slots(self.slot_of_ret[victims])
        rows = torch.tensor([self.ret_free.pop() for _ in range(min(n, len(self.ret_free)))], dtype=torch.int64)
        if self.in_forward:
            self.busy[rows] = True
        return rows

    def retain_rows(self, slots: torch.Tensor, proven: bool) -> torch.Tensor:
        """Retained rows (global window-row ids) for these distinct slots, allocated where missing.
        ``proven``: a window a request is known to leave the cache at (used now, kept ``protect``
        allocations longer); otherwise a guess (a chunk or request end)."""
        slots = slots.cpu().long()
        rows = self.ret_of_slot[slots]
        need = rows < 0
        got = self._take_rows(int(need.sum()), keep=rows[~need])
        fresh = need.nonzero().squeeze(1)[: got.numel()]
        rows[fresh] = got
        keep = rows >= 0  # a store smaller than one window keeps what it can
        self.ret_of_slot[slots[keep]] = rows[keep]
        self.slot_of_ret[rows[keep]] = slots[keep]
        self.clock += 1
        if proven:
            self.ret_used[rows[keep]] = self._key(proven=True)
        else:
            self.ret_used[got] = self._key(proven=False)
        return torch.where(keep, rows + self.ret_base, -1)

    def move_retained(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Hand src's retained rows to dst (the same tokens' slots in the radix tree) where dst has none."""
        src_slots, dst_slots = src_slots.cpu().long(), dst_slots.cpu().long()
        rows = self.ret_of_slot[src_slots]
        move = (rows >= 0) & (self.ret_of_slot[dst_slots] < 0) & (src_slots != dst_slots)
        self.ret_of_slot[src_slots[move]] = -1
        self.ret_of_slot[dst_slots[move]] = rows[move]
        self.slot_of_ret[rows[move]] = dst_slots[move]

    def retained_positions(self, end: int) -> list[int]:
        """Positions whose rows make the prefix ends ``end - SLACK - 1 .. end`` usable: the sinks and
        the last ``recent + SLACK`` tokens (a request that retokenizes the same text may leave
        the cache a few tokens early). A request window holds only the last ``recent``."""
        return [*range(min(self.sink, end)), *range(max(self.sink, end - self.recent - SLACK), end)]

    def retain_from_request(self, req_row: int, positions: list[int], slots: torch.Tensor,
                            proven: bool = False) -> None:
        """Copy request row ``req_row``'s window rows of these positions into the store, keyed by
        their slots. Only positions its window holds now (sinks, the last ``recent``) are valid."""
        n = self.row_len[req_row]
        keep = [i for i, p in enumerate(positions) if p < self.sink or n - self.recent <= p < n]
        if not keep:
            return
        pos = torch.tensor([positions[i] for i in keep], dtype=torch.int64)
        dst = self.retain_rows(slots.cpu()[keep], proven)
        src = self.window_rows(torch.full_like(pos, req_row), pos)
        self.copy_rows(dst[dst >= 0], src[dst >= 0])

    def retain_request(self, req_row: int, slots_by_pos: torch.Tensor) -> None:
        """Keep request row ``req_row``'s window at its end in the store (``slots_by_pos[p]``:
        the slot of position p, for at least its first ``row_len`` tokens)."""
        n = min(self.row_len[req_row], slots_by_pos.numel())
        if n > 0:
            pos = self.retained_positions(n)
            self.retain_from_request(req_row, pos, slots_by_pos.cpu()[pos])

    def fill_rows(self, req_row: int, slots_by_pos: torch.Tensor, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(dst, src) window rows that give request row ``req_row`` the window of its cached
        prefix of ``prefix_len`` tokens from the store."""
        sinks, ring = self.window_positions(prefix_len)
        pos = torch.tensor([*sinks, *ring], dtype=torch.int64)
        rows = self.ret_of_slot[slots_by_pos.cpu().long()[pos]]
        have = rows >= 0
        self.fill_misses += int((~have).sum())
        dst = self.window_rows(torch.full_like(pos, req_row), pos)
        return dst[have], rows[have] + self.ret_base

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Window rows dst <- src in every layer (K and V)."""
        if dst.numel() == 0:
            return
        dev = self.k_win[0].device
        dst, src = dst.to(dev, non_blocking=True), src.to(dev, non_blocking=True)
        for buf in (*self.k_win, *self.v_win):
            buf[dst] = buf[src]

    # ----------------------------------------------------------------- writes
    def write_rows(self, layer_id, slots, k, v, win_rows, rot_k, rot_v, clip_k: float, clip_v: float,
                   rotated=None, q=None):
        """Rotate, quantize and store k/v [T, H, D] at slots; their rotated full-precision copies
        at the window rows ``win_rows``, or, with ``rotated=(k_out, v_out, rows)``, into those
        scratch tensors instead (extend: the chunk's own k/v). ``rot_v`` None: v is already
        rotated (R_V folded into the weights). One launch (``ops.write_step``), which with ``q``
        also rotates the layer's queries by ``rot_k`` and returns them."""
        lid = layer_id - self.start_layer
        if rotated is not None:
            kw, vw, win_rows = rotated
        elif win_rows is not None:
            kw, vw = self.k_win[lid], self.v_win[lid]
        else:
            kw = vw = None
        return ops.write_step(k, v, rot_k, rot_v, clip_k, clip_v, self.key_layouts[lid], self.value_layouts[lid],
                              self.k_buffer[lid], self.v_buffer[lid], slots, kw, vw, win_rows, q=q)

    def write_windows(self, layer_id: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store already rotated full-precision k/v [n, H, D] at window rows."""
        lid = layer_id - self.start_layer
        self.k_win[lid][rows] = k.to(self.window_dtype)
        self.v_win[lid][rows] = v.to(self.window_dtype)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        raise NotImplementedError(
            "OscarKVPool stores rotated quantized rows: K/V are written by the oscar attention backend, "
            "which needs the layer's rotations. A code path that writes the KV cache directly "
            "(e.g. speculative decoding) is not supported with --oscar."
        )

    def get_window_buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        lid = layer_id - self.start_layer
        return self.k_win[lid], self.v_win[lid]
