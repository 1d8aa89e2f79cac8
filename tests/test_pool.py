"""OscarKVPool with sglang's real allocators on CPU: storage rows, window lifetime, no leaks."""

from __future__ import annotations

import importlib

import pytest
import torch

from oscar_sglang.kernels.codec import CacheLayout, RowLayout, dequantize_rows
from oscar_sglang.plugin import HOOKED_TARGETS
from oscar_sglang.windows import oscar_cell_size
from support import make_pool

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


def _pool(page_size=1, size=64, sink=4, recent=8, request_rows=3, retained_sets=1):
    return make_pool(size, H, D, LAYERS, sink=sink, recent=recent, request_rows=request_rows,
                     retained_sets=retained_sets, page_size=page_size)


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
    assert oscar_cell_size(2 * 36 * 36, kv_heads=8) * 7 < 2 * 36 * 8 * 128 * 2  # ~7x BF16


def test_pool_rows_follow_the_bit_allocation_per_layer_and_tensor():
    """Mixed widths: every layer's K and V buffers have their own row width; writes land in them and
    sglang's slot move (tiled from the first buffer's stride) sees the widest rows first."""
    from support import make_pool

    lay = CacheLayout.of(32, None, [3, 4, 2], [2, 2, 4])
    pool = make_pool(16, H, 32, 3, sink=4, recent=8, request_rows=2, layouts=lay)
    assert [b.shape[2] for b in pool.k_buffer] == [16, 20, 12] and [b.shape[2] for b in pool.v_buffer] == [12, 12, 20]
    assert pool.layouts(1) == (RowLayout(32, None, 4), RowLayout(32, None, 2))
    assert pool.get_kv_size_bytes()[0] - pool.window_bytes() // 2 == 17 * H * (16 + 20 + 12)
    assert [b.stride(0) for b in pool._slot_move_pointer_buffers()][0] == H * 20
    torch.manual_seed(0)
    x = torch.randn(2, H, 32)
    eye = torch.eye(32)
    for layer in range(3):
        pool.write_rows(layer, torch.tensor([3, 4]), x, x, None, eye, eye, 1.0, 1.0)
    err = [float((dequantize_rows(pool.k_buffer[l][3:5], lay.key[l]) - x).abs().max()) for l in range(3)]
    assert err[1] < err[0] < err[2]  # 4 < 3 < 2 bits
    with pytest.raises(ValueError, match="layouts cover 3 layers"):
        make_pool(16, H, 32, 4, sink=4, recent=8, request_rows=2, layouts=lay)


def test_request_windows_are_disjoint_and_a_pure_function_of_row_and_position():
    pool = _pool(request_rows=70)
    rows = torch.arange(70).repeat_interleave(40)
    pos = torch.arange(40).repeat(70)
    win = pool.window_rows(rows, pos)
    recent_or_sink = (pos < 4) | (pos >= 40 - 8)  # one request's window after 40 tokens
    assert win[recent_or_sink].unique().numel() == int(recent_or_sink.sum())  # no two requests share a row
    assert torch.equal(win.view(70, 40)[:, 36:], win.view(70, 40)[:, 28:32])  # ring: p and p - recent
    assert int(win.max()) < pool.ret_base


def test_write_quantizes_rows_and_windows():
    pool = _pool()
    torch.manual_seed(0)
    x = torch.randn(3, H, D, dtype=torch.float16)
    eye = torch.eye(D)
    slots = torch.tensor([5, 6, 7])
    rows = torch.tensor([0, 1, -1])  # two window rows; the third token INT2 only
    pool.write_rows(0, slots, x, x, rows, eye, eye, 1.0, 1.0)
    k_rows, _ = pool.get_kv_buffer(0)
    k_win, _ = pool.get_window_buffers(0)
    assert torch.equal(k_win[:2], x[:2])  # rotated (identity) full precision copies
    err = (dequantize_rows(k_rows[slots], RowLayout(D)) - x.float()).abs().max()
    assert 0 < err < 1.5


@pytest.mark.parametrize("page_size", [1, 4])
def test_retained_windows_follow_slot_lifetime_and_nothing_leaks(page_size):
    pool = _pool(page_size=page_size, retained_sets=2)
    alloc = _allocator(pool, page_size)
    free0 = alloc.available_size()
    slots = alloc.alloc(16)
    pool.row_len[1] = 16
    pool.retain_request(1, slots)  # sinks 0-3 and the ring 8-15 (what queries at 15 and 16 read)
    have = pool.retained(slots)
    assert have.tolist() == [True] * 4 + [False] * 4 + [True] * 8
    assert pool.usable_prefix(slots, page_size) == 16 and pool.free_window_rows() == pool.plan.retained_rows - 12
    # freeing the request's slots returns its retained rows (hooked allocator free)
    alloc.free(slots)
    assert pool.free_window_rows() == pool.plan.retained_rows and (pool.ret_of_slot[slots] == -1).all()
    assert alloc.available_size() == free0
    alloc.clear()  # flush: every slot and every window row is free again
    assert pool.free_window_rows() == pool.plan.retained_rows and (pool.ret_of_slot == -1).all() and (pool.slot_of_ret == -1).all()


def test_store_reclaims_least_recently_used_windows_and_matches_shrink_never_lie():
    pool = _pool(retained_sets=1)  # 28 rows: two 12-row windows fit, a third reclaims the oldest
    a, b, c = torch.arange(1, 17), torch.arange(21, 37), torch.arange(41, 57)
    pool.row_len[0] = 16
    pool.retain_request(0, a)
    assert pool.usable_prefix(a, 1) == 16 and pool.usable_prefix(a[:15], 1) == 15
    pool.retain_request(0, b)
    assert pool.usable_prefix(b, 1) == 16  # b's match touched its rows: a is now the oldest
    pool.retain_request(0, c)
    assert pool.usable_prefix(c, 1) == 16 and pool.usable_prefix(b, 1) == 16 and pool.usable_prefix(a, 1) == 0
    assert pool.free_window_rows() == 0


def test_store_reclaims_guesses_before_proven_windows():
    """A window a match has used outlives the next guesses (chunk/request ends nobody hit yet)."""
    pool = _pool(retained_sets=1)  # 28 rows: two 12-row windows
    a, b, c = torch.arange(1, 17), torch.arange(21, 37), torch.arange(41, 57)
    pool.row_len[0] = 16
    pool.retain_request(0, a)
    assert pool.usable_prefix(a, 1) == 16  # a hit: a is proven
    pool.retain_request(0, b)
    pool.retain_request(0, c)  # the store is full: the guess b goes, not the older proven a
    assert [pool.usable_prefix(s, 1) for s in (a, b, c)] == [16, 0, 16]


def test_proven_windows_age_behind_newer_guesses():
    """A proven window nobody hits again outlives ``protect`` newer guesses (the store's capacity in
    windows), then goes before them: an old workload's proven windows do not starve a new one's."""
    pool = _pool(size=128, retained_sets=1)  # 28 rows: two 12-row windows
    assert pool.protect == 2
    a, b, c, d, e = (torch.arange(1 + 20 * i, 17 + 20 * i) for i in range(5))
    pool.row_len[0] = 16
    pool.retain_request(0, a)
    assert pool.usable_prefix(a, 1) == 16  # a hit: a is proven
    for s in (b, c, d):  # each evicts the previous guess: a is still protected
        pool.retain_request(0, s)

    def held(s):  # the window at s's end (sinks, ring) is in the store; usable_prefix would count a hit
        return bool((pool.ret_of_slot[torch.cat([s[:pool.sink], s[-pool.recent:]])] >= 0).all())

    assert [held(s) for s in (a, b, c, d)] == [True, False, False, True]
    pool.retain_request(0, e)  # a's protection is spent: a goes, not the newer guess d
    assert [held(s) for s in (a, d, e)] == [False, True, True]


def test_tree_slots_inherit_retained_rows_of_duplicates():
    pool = _pool()
    own, tree = torch.arange(1, 17), torch.arange(31, 47)
    pool.row_len[0] = 16
    pool.retain_request(0, own)
    pool.move_retained(own[:10], tree[:10])  # the tree held the first 10 tokens already
    assert pool.usable_prefix(torch.cat([tree[:10], own[10:]]), 1) == 16
    assert (pool.ret_of_slot[own[:10]] == -1).all()


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


def test_reclaiming_never_takes_a_row_of_the_window_being_kept():
    """A full store: a window whose sinks are already retained reclaims other rows, never its own sinks."""
    pool = _pool(retained_sets=1)  # 28 rows
    a, x, b = torch.arange(1, 17), torch.arange(41, 57), torch.arange(21, 37)
    b[:4] = a[:4]  # b shares a's first four slots (its sinks)
    pool.row_len[0] = 16
    pool.retain_request(0, a)
    pool.retain_request(0, x)
    pool.retain_request(0, b)  # needs 8 rows, 4 free: reclaims the oldest, which include a's sinks
    from oscar_sglang.health import window_health

    h = window_health(pool, torch.empty(0, dtype=torch.int64))
    assert h["window_map_mismatches"] == 0 and h["retained_rows_lost"] == 0, h
    assert pool.usable_prefix(b, 1) == 16
