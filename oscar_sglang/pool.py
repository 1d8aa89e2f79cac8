"""The OSCAR KV pool: rotated INT2 storage rows in sglang's own pool, plus BF16 windows.

Layout (per layer, as sglang's ``MHATokenToKVPool`` sees it)::

    k_buffer[l], v_buffer[l]  uint8 [size + page_size, H_kv, row_bytes]

Every token's K and V are quantized on write into one storage row per
(token, KV head) (``kernels/codec.py``: codes + fp16 scale/minimum). sglang
reports ``dtype=uint8, head_dim=row_bytes``, so everything that copies KV rows
byte for byte (radix cache, HiCache, ``move_kv_cache``, retraction) carries
complete quantized vectors. Slot ids, pages and the radix cache are untouched.

Full-precision windows live beside the rows, keyed by slot::

    k_win[l], v_win[l]  model dtype [sink_rows + ring_blocks * recent, H_kv, D]  (rotated)
    win_of_slot         int64 [size + page_size]   window row of a slot, -1 = none
    slot_of_win         int64 [window rows]        owner slot of a window row, -1 = free

* Sink rows (positions < ``sink``) come from a free list and belong to the
  slot until sglang frees the slot: they follow the slot into the radix cache,
  so every request that hits a cached prefix reads the same BF16 sinks.
* Recent rows form a ring per request-pool row: position ``p`` of request row
  ``r`` lands in row ``sink_rows + (r % ring_blocks) * recent + p % recent``.
  Writing a ring row evicts whichever token owned it: normally position
  ``p - recent`` of the same request, i.e. exactly the token leaving the window;
  because tokens are quantized independently, the evicted token's INT2 row
  (written at the same time) is already final. With more running requests than
  ring blocks, two requests can share a block: they then evict each other's
  window tokens to INT2 (less accurate, never wrong).

A token is attended in BF16 iff its slot has a window row, else from its INT2 row.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from oscar_sglang.kernels import ops
from oscar_sglang.kernels.codec import RowLayout

logger = logging.getLogger(__name__)


class OscarKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` whose buffers hold storage rows; adds the BF16 windows."""

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
        layout: RowLayout,
        sink: int,
        recent: int,
        ring_blocks: int,
        sink_rows: int,
        enable_memory_saver: bool = False,
        start_layer: int | None = None,
        end_layer: int | None = None,
    ):
        self.layout = layout
        self.window_dtype = dtype
        self.sink, self.recent = sink, recent
        self.sink_rows = sink_rows
        self.ring_blocks = ring_blocks
        rows = sink_rows + ring_blocks * recent
        self.k_win = [torch.zeros(rows, head_num, head_dim, dtype=dtype, device=device) for _ in range(layer_num)]
        self.v_win = [torch.zeros(rows, head_num, head_dim, dtype=dtype, device=device) for _ in range(layer_num)]
        self.win_of_slot = torch.full((size + page_size,), -1, dtype=torch.int64, device=device)
        self.slot_of_win = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.sink_free: list[int] = []
        self.sink_overflow = 0  # sink tokens that found no free row and stayed INT2 only
        super().__init__(
            size,
            page_size,
            torch.uint8,
            head_num,
            layout.row_bytes,
            layer_num,
            device,
            enable_memory_saver,
            v_head_dim=layout.row_bytes,
            start_layer=start_layer,
            end_layer=end_layer,
            enable_alt_stream=False,
        )
        self.reset_windows()

    # ------------------------------------------------------------------ sizes
    def window_bytes(self) -> int:
        per_layer = self.k_win[0].numel() * self.k_win[0].element_size() if self.k_win else 0
        maps = (self.win_of_slot.numel() + self.slot_of_win.numel()) * 8
        return 2 * per_layer * len(self.k_win) + maps

    def get_kv_size_bytes(self):
        k_size, v_size = super().get_kv_size_bytes()
        half = self.window_bytes() // 2
        return k_size + half, v_size + half

    # ---------------------------------------------------------------- windows
    def reset_windows(self) -> None:
        """Forget every window row (sglang cleared its allocator: no slot is live)."""
        self.win_of_slot.fill_(-1)
        self.slot_of_win.fill_(-1)
        self.sink_free = list(range(self.sink_rows - 1, -1, -1))

    def free_window_rows(self) -> int:
        """Sink rows not owned by any slot (== sink_rows when nothing is cached)."""
        return len(self.sink_free)

    def release_slots(self, slots: torch.Tensor) -> None:
        """sglang freed these slots: drop their window rows (idempotent)."""
        if slots.numel() == 0:
            return
        slots = slots.to(self.win_of_slot.device, torch.int64)
        rows = self.win_of_slot[slots]
        live = rows >= 0
        if not bool(live.any()):
            return
        rows = rows[live]
        self.win_of_slot[slots[live]] = -1
        self.slot_of_win[rows] = -1
        self.sink_free.extend(rows[rows < self.sink_rows].tolist())

    def release_pages(self, page_ids: torch.Tensor) -> None:
        offsets = torch.arange(self.page_size, device=page_ids.device)
        self.release_slots((page_ids.reshape(-1, 1) * self.page_size + offsets).reshape(-1))

    def assign_windows(
        self, slots: torch.Tensor, positions: torch.Tensor, req_rows: torch.Tensor, seq_ends: torch.Tensor
    ) -> torch.Tensor:
        """Give window rows to the tokens about to be written; returns rows [T] (-1 = INT2 only).

        slots/positions/req_rows/seq_ends: [T] int64 on the pool device; seq_ends is
        the length of the token's sequence after this forward.
        """
        dev = self.win_of_slot.device
        slots, positions = slots.to(dev, torch.int64), positions.to(dev, torch.int64)
        req_rows, seq_ends = req_rows.to(dev, torch.int64), seq_ends.to(dev, torch.int64)
        self.release_slots(slots)  # a reused slot must not keep a stale row
        rows = torch.full_like(slots, -1)
        is_sink = positions < self.sink
        recent = ~is_sink & (positions >= seq_ends - self.recent)
        block = req_rows[recent] % self.ring_blocks
        rows[recent] = self.sink_rows + block * self.recent + positions[recent] % self.recent
        n_sink = int(is_sink.sum())
        if n_sink:
            take = min(n_sink, len(self.sink_free))
            self.sink_overflow += n_sink - take
            got = [self.sink_free.pop() for _ in range(take)] + [-1] * (n_sink - take)
            rows[is_sink] = torch.tensor(got, dtype=torch.int64, device=dev)
        valid = rows >= 0
        rows_v, slots_v = rows[valid], slots[valid]
        previous = self.slot_of_win[rows_v]  # ring rows being overwritten: evict their old token
        stale = previous >= 0
        self.win_of_slot[previous[stale]] = -1
        self.win_of_slot[slots_v] = rows_v
        self.slot_of_win[rows_v] = slots_v
        return rows

    # ----------------------------------------------------------------- writes
    def write_rows(self, layer_id, slots, k, v, win_rows, rot_k, rot_v, clip_k: float, clip_v: float) -> None:
        """Rotate, quantize and store k/v [T, H, D] at slots; rotated BF16 copies at win_rows."""
        lid = layer_id - self.start_layer
        ops.quantize_kv_write(k, rot_k, clip_k, self.layout, self.k_buffer[lid], slots, self.k_win[lid], win_rows)
        ops.quantize_kv_write(v, rot_v, clip_v, self.layout, self.v_buffer[lid], slots, self.v_win[lid], win_rows)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        raise NotImplementedError(
            "OscarKVPool stores rotated INT2 rows: K/V are written by the oscar attention backend, "
            "which needs the layer's rotations. A code path that writes the KV cache directly "
            "(e.g. speculative decoding) is not supported with --oscar."
        )

    def get_window_buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        lid = layer_id - self.start_layer
        return self.k_win[lid], self.v_win[lid]
