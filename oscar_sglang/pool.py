"""The OSCAR KV pool: rotated 2/3/4-bit storage rows in sglang's own pool, full-precision windows inside it.

Layout (per layer): one uint8 buffer, each (slot, KV head) its K row then its V row, which
sglang's ``MHATokenToKVPool`` sees as two views::

    kv_buffer[l] uint8 [size + page_size, H_kv, key[l].row_bytes + value[l].row_bytes]
    k_buffer[l]  kv_buffer[l][..., :key[l].row_bytes]
    v_buffer[l]  kv_buffer[l][..., key[l].row_bytes:]

Every token's K and V are quantized on write into one storage row per (token, KV head)
(``kernels/codec.py``: codes + fp16 scale/minimum) at the layer's calibrated bit widths
(``codec.CacheLayout``), so rows differ in width between layers and between K and V.
sglang sees ``dtype=uint8`` buffers, so everything that copies KV rows byte for byte
(radix cache, ``move_kv_cache``, retraction) carries complete quantized vectors.

Full-precision (rotated, model dtype) window rows live in whole pages of the same buffers: a
page that ``windows.WindowStore`` took from the allocator holds ``per_page`` window rows in the
bytes of its ``page_size`` K and V rows, in every layer (``window_rows``: row id
``page << log2_ids | i`` holds its K at ``2 i H_kv D`` elements into the page and its V right
after), so a window row costs what a model-dtype token costs, whatever the K and V widths.
sglang never reads or writes such a page (it is in no request's table and no radix node), and
the store gives it back to the allocator when no running request and no cached prefix needs
its rows.
"""

from __future__ import annotations

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from oscar_sglang.kernels import ops
from oscar_sglang.kernels.codec import CacheLayout
from oscar_sglang.kernels.rule import PositionRule
from oscar_sglang.kernels.window import WindowRows
from oscar_sglang.windows import WindowStore, rows_per_page


class OscarKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` whose buffers hold storage rows and window pages.
    ``layouts``: every model layer's row layouts (this pool holds ``start_layer`` onwards);
    ``request_rows``: rows of sglang's request table (each may run one request)."""

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
        rule: PositionRule,
        request_rows: int,
        enable_memory_saver: bool = False,
        start_layer: int | None = None,
        end_layer: int | None = None,
    ):
        first = start_layer or 0
        self.key_layouts = layouts.key[first : first + layer_num]
        self.value_layouts = layouts.value[first : first + layer_num]
        if len(self.key_layouts) != layer_num:
            raise ValueError(f"layouts cover {len(layouts.key)} layers, the pool holds layers {first}..{first + layer_num - 1}")
        row_bytes = [k.row_bytes + v.row_bytes for k, v in zip(self.key_layouts, self.value_layouts)]
        self.rule = rule
        self.window_dtype = dtype
        self.per_page = rows_per_page(page_size, row_bytes, head_dim, dtype.itemsize)
        if self.per_page < 1:
            raise ValueError(f"a page of {page_size} slots of {min(row_bytes)}-byte K+V rows cannot hold a window "
                             f"row of {head_dim} {dtype} elements per head for K and V")
        super().__init__(
            size,
            page_size,
            torch.uint8,
            head_num,
            max(r.row_bytes for r in self.key_layouts),  # what sglang reads as head_dim; each layer has its own
            layer_num,
            device,
            enable_memory_saver,
            v_head_dim=max(r.row_bytes for r in self.value_layouts),
            start_layer=start_layer,
            end_layer=end_layer,
            enable_alt_stream=False,
            kv_cache_layout="nhd",  # token rows: what the kernels and _create_buffers_normal assume
        )
        self.window_head_dim = head_dim
        self.store = WindowStore(rule, page_size, self.per_page, size + page_size, request_rows, device)
        self._windows = [self._window_views(buf) for buf in self.kv_buffer]

    # ------------------------------------------------------------------ sizes
    def _create_buffers_normal(self):
        rows = self.size + self.page_size
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.kv_buffer = [torch.zeros(rows, self.head_num, k.row_bytes + v.row_bytes, dtype=torch.uint8,
                                          device=self.device) for k, v in zip(self.key_layouts, self.value_layouts)]
        self.k_buffer = [b[..., : k.row_bytes] for b, k in zip(self.kv_buffer, self.key_layouts)]
        self.v_buffer = [b[..., k.row_bytes :] for b, k in zip(self.kv_buffer, self.key_layouts)]

    def _slot_move_pointer_buffers(self):
        """One buffer per layer (a slot's K and V rows are contiguous), widest first: sglang's tiled slot
        copy sizes its tiles from the first buffer's stride."""
        return sorted(self.kv_buffer, key=lambda b: -b.stride(0))

    def _window_views(self, buf: torch.Tensor) -> tuple[WindowRows, WindowRows]:
        """(K, V) window rows of one layer: pages of its buffer in the model dtype, each row's K then V."""
        flat = buf.view(-1).view(self.window_dtype)
        row = self.head_num * self.window_head_dim
        page = self.page_size * buf.stride(0) // self.window_dtype.itemsize
        return tuple(WindowRows(flat[i * row:], self.head_num, self.window_head_dim, page_stride=page,
                                log2_rows=self.store.log2_ids, row_stride=2 * row) for i in (0, 1))

    def layouts(self, layer_id: int):
        """(key, value) row layouts of a layer."""
        lid = layer_id - self.start_layer
        return self.key_layouts[lid], self.value_layouts[lid]

    def window_rows(self, layer_id: int) -> tuple[WindowRows, WindowRows]:
        """(K, V) window rows of a layer."""
        return self._windows[layer_id - self.start_layer]

    # ----------------------------------------------------------------- writes
    def write_rows(self, layer_id, slots, k, v, win_ids, rot_k, rot_v, clip_k: float, clip_v: float,
                   rotated=None, q=None):
        """Rotate, quantize and store k/v [T, H, D] at slots; their rotated full-precision copies
        into the window rows ``win_ids``, or, with ``rotated=(k_out, v_out, rows)``, into those
        scratch tensors instead (extend: the chunk's own k/v). ``rot_v`` None: v is already
        rotated (R_V folded into the weights). One launch (``ops.write_step``), which with ``q``
        also rotates the layer's queries by ``rot_k`` and returns them."""
        lid = layer_id - self.start_layer
        if rotated is not None:
            kw, vw, win_ids = (WindowRows.dense(rotated[0]), WindowRows.dense(rotated[1]), rotated[2])
        elif win_ids is not None:
            kw, vw = self._windows[lid]
        else:
            kw = vw = None
        return ops.write_step(k, v, rot_k=rot_k, rot_v=rot_v, clip_k=clip_k, clip_v=clip_v,
                              k_layout=self.key_layouts[lid], v_layout=self.value_layouts[lid],
                              k_rows=self.k_buffer[lid], v_rows=self.v_buffer[lid], slots=slots, k_win=kw, v_win=vw,
                              window_slots=win_ids, q=q)

    def write_windows(self, layer_id: int, ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store already rotated full-precision k/v [n, H, D] at window rows ``ids``."""
        kw, vw = self.window_rows(layer_id)
        kw.scatter(ids, k)
        vw.scatter(ids, v)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, *args, **kwargs):
        raise NotImplementedError(
            "OscarKVPool stores rotated quantized rows: K/V are written by the oscar attention backend, "
            "which needs the layer's rotations. A code path that writes the KV cache directly "
            "(e.g. speculative decoding) is not supported with --oscar."
        )
