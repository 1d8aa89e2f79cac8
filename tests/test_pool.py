"""OscarKVPool with sglang's real allocators on CPU: storage rows, window lifetime, no leaks."""

from __future__ import annotations

import importlib

import pytest
import torch

from oscar_sglang.kernels.codec import RowLayout, dequantize_rows
from oscar_sglang.plugin import HOOKED_TARGETS, oscar_cell_size

H, D, LAYERS = 2, 32, 2


def test_every_hooked_sglang_target_exists():
    for target in HOOKED_TARGETS:
        parts = target.split(".")
        for i in range(len(parts) - 1, 0, -1):  # longest importable module prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), target
            obj = getattr(obj, attr)
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    load_plugins()
    assert "oscar" in ATTENTION_BACKENDS


def _pool(page_size=1, size=64, sink=4, recent=8, ring_blocks=2, sink_rows=8):
    from oscar_sglang.pool import OscarKVPool

    return OscarKVPool(size, page_size, torch.float16, H, D, LAYERS, "cpu", layout=RowLayout(D), sink=sink,
                       recent=recent, ring_blocks=ring_blocks, sink_rows=sink_rows)


def _allocator(pool, page_size):
    from sglang.srt.plugins import load_plugins

    load_plugins()  # applies the slot-lifetime hooks
    if page_size == 1:
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

        return TokenToKVPoolAllocator(pool.size, torch.int64, "cpu", pool, need_sort=False)
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator

    return PagedTokenToKVPoolAllocator(pool.size, page_size, torch.int64, "cpu", pool, need_sort=False)


def test_pool_reports_packed_rows_to_sglang():
    pool = _pool()
    k, v = pool.get_kv_buffer(0)
    assert k.dtype == torch.uint8 and k.shape == (64 + 1, H, RowLayout(D).row_bytes)
    assert pool.head_dim == pool.v_head_dim == RowLayout(D).row_bytes == 12
    assert oscar_cell_size(36, kv_heads=8, num_layers=36) * 7 < 2 * 36 * 8 * 128 * 2  # ~7x BF16


def test_write_quantizes_rows_and_windows():
    pool = _pool()
    torch.manual_seed(0)
    x = torch.randn(3, H, D, dtype=torch.float16)
    eye = torch.eye(D)
    slots = torch.tensor([5, 6, 7])
    rows = pool.assign_windows(slots, torch.tensor([0, 1, 20]), torch.tensor([0, 0, 0]), torch.tensor([30, 30, 30]))
    assert rows[:2].tolist() == [0, 1] and rows[2] == -1  # two sinks; position 20 < 30 - 8: INT2 only
    pool.write_rows(0, slots, x, x, rows, eye, eye, 1.0, 1.0)
    k_rows, _ = pool.get_kv_buffer(0)
    k_win, _ = pool.get_window_buffers(0)
    assert torch.equal(k_win[:2], x[:2])  # rotated (identity) full precision copies
    err = (dequantize_rows(k_rows[slots], RowLayout(D)) - x.float()).abs().max()
    assert 0 < err < 1.5


@pytest.mark.parametrize("page_size", [1, 4])
def test_window_rows_follow_slot_lifetime_and_nothing_leaks(page_size):
    pool = _pool(page_size=page_size)
    alloc = _allocator(pool, page_size)
    free0 = alloc.available_size()
    # request row 1 writes 16 tokens: positions 0-3 are sinks, 8-15 the recent ring
    slots = alloc.alloc(16)
    rows = pool.assign_windows(slots, torch.arange(16), torch.ones(16, dtype=torch.int64), torch.full((16,), 16))
    assert (rows[:4] >= 0).all() and (rows[4:8] == -1).all() and (rows[8:] >= 8).all()
    assert pool.free_window_rows() == 8 - 4
    # decoding position 16 evicts position 8 from the ring (its INT2 row stays final)
    new = alloc.alloc(page_size)[:1]
    pool.assign_windows(new, torch.tensor([16]), torch.tensor([1]), torch.tensor([17]))
    assert pool.win_of_slot[slots[8]] == -1 and pool.win_of_slot[new[0]] >= 0
    # freeing the request's slots returns its sink rows (hooked allocator free)
    alloc.free(slots)
    alloc.free(new)
    assert pool.free_window_rows() == 8
    assert (pool.win_of_slot[slots] == -1).all()
    assert alloc.available_size() == free0
    # sink rows run out gracefully: extra sinks stay INT2 only, counted
    many = alloc.alloc(12)
    pool.assign_windows(many, torch.tensor([0, 1, 2, 3] * 3), torch.zeros(12, dtype=torch.int64), torch.full((12,), 4))
    assert pool.sink_overflow == 4 and pool.free_window_rows() == 0
    alloc.clear()  # flush: every slot and every window row is free again
    assert pool.free_window_rows() == 8 and (pool.win_of_slot == -1).all() and (pool.slot_of_win == -1).all()
    assert alloc.available_size() == free0


def test_requests_sharing_a_ring_block_degrade_to_int2_never_to_wrong_rows():
    pool = _pool(ring_blocks=1)  # request rows 0 and 1 share one ring
    a, b = torch.arange(10, 20), torch.arange(30, 40)
    ra = pool.assign_windows(a, torch.arange(4, 14), torch.zeros(10, dtype=torch.int64), torch.full((10,), 14))
    rb = pool.assign_windows(b, torch.arange(4, 14), torch.ones(10, dtype=torch.int64), torch.full((10,), 14))
    assert torch.equal(ra[ra >= 0], rb[rb >= 0])  # same ring rows, taken over by request b
    assert (pool.win_of_slot[a] == -1).all()  # a's window tokens now read their INT2 rows
    owned = pool.win_of_slot[b][rb >= 0]
    assert torch.equal(pool.slot_of_win[owned], b[rb >= 0])  # every live row maps back to its slot


@pytest.mark.parametrize("per_head", [False, True])
def test_backend_rotations_preserve_logits_and_invert_values(per_head):
    """q·k is invariant when q and k use their KV head's R_K; un-rotating by R_V^T inverts v·R_V."""
    from oscar_sglang.backend import OscarAttnBackend
    from oscar_sglang.kernels.codec import rotate

    torch.manual_seed(0)
    hq, hkv = 6, 2
    r = torch.linalg.qr(torch.randn(LAYERS, hkv if per_head else 1, D, D, dtype=torch.float64))[0].float()
    r = r if per_head else r[:, 0]
    backend = object.__new__(OscarAttnBackend)  # only the rotation helpers are exercised
    backend.rot_k, backend.rot_v, backend.values_folded = r, r, False  # the runtime (unfolded) path
    q, k = torch.randn(3, hq, D), torch.randn(3, hkv, D)
    qr, kr = backend._rotate_q(q, 1), rotate(k, r[1])
    group = hq // hkv
    logits = torch.einsum("thd,thd->th", q, k.repeat_interleave(group, 1))
    logits_rot = torch.einsum("thd,thd->th", qr, kr.repeat_interleave(group, 1))
    assert torch.allclose(logits, logits_rot, atol=1e-4)
    v = torch.randn(3, hkv, D)
    out_rot = rotate(v, r[1]).repeat_interleave(group, 1)  # attention output in the rotated basis
    assert torch.allclose(backend._unrotate_out(out_rot, 1), v.repeat_interleave(group, 1), atol=1e-4)
