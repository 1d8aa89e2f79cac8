"""OscarKVPool with sglang's real allocator on CPU: storage rows per layer and tensor, window rows in
whole pages of the same buffers, rotations."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from oscar_sglang.allocator import OscarTokenToKVPoolAllocator
from oscar_sglang.kernels.codec import CacheLayout, RowLayout, dequantize_rows
from oscar_sglang.sizing import oscar_cell_size
from oscar_sglang.testing import make_pool, take_slots

H, D, LAYERS = 2, 32, 2


def _resolve(target: str):
    """The object a dotted sglang path names (longest importable module prefix, then attributes)."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    owner = obj
    for attr in parts[i:]:
        assert hasattr(obj, attr), target
        owner, obj = obj, getattr(obj, attr)
    return owner, parts[-1], obj


def test_every_hook_matches_its_sglang_target():
    """Each hook of plugin.HOOKS (and cpu.parallel.HOOKS) takes what its target takes: after its
    first parameter (the result of an AFTER hook, the original of an AROUND hook) the same
    parameters, of the same kinds and names (a hook may name self / cls its own way), unless it
    takes *args / **kwargs there."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins import load_plugins

    from oscar_sglang.cpu import parallel
    from oscar_sglang.plugin import OscarPlugin

    for target, fn, kind in [*OscarPlugin().hooks(), *parallel.HOOKS]:
        assert kind in ("after", "around"), target
        owner, name, _ = _resolve(target)
        raw = inspect.getattr_static(owner, name)  # a function, or a classmethod's: self / cls included
        original = inspect.unwrap(getattr(raw, "__func__", raw))  # sglang's applied hooks wrap it (functools.wraps)
        want = list(inspect.signature(original).parameters.values())
        got = list(inspect.signature(fn).parameters.values())[1:]
        var = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for i, (w, g) in enumerate(zip(want, got)):
            if g.kind in var:
                break
            assert g.kind == w.kind and (g.name == w.name or (i == 0 and w.name in ("self", "cls"))), \
                f"{target}: hook {fn.__name__} parameter {g} vs sglang's {w}"
        else:
            assert len(got) == len(want) or (got and got[-1].kind in var), f"{target}: {fn.__name__} {got} vs {want}"
    load_plugins()
    assert "oscar" in ATTENTION_BACKENDS


def _pool(page_size=16, size=256, sink=4, block=32, request_rows=3, layouts=None):
    return make_pool(size, H, D, LAYERS, sink=sink, block=block, request_rows=request_rows, page_size=page_size,
                     layouts=layouts)


def test_pool_reports_packed_rows_to_sglang():
    pool, alloc = _pool()
    k, v = pool.get_kv_buffer(0)
    assert k.dtype == torch.uint8 and k.shape == (256 + 16, H, RowLayout(D).row_bytes)
    assert pool.head_dim == pool.v_head_dim == RowLayout(D).row_bytes == 12
    assert oscar_cell_size(2 * 36 * 36, kv_heads=8) * 7 < 2 * 36 * 8 * 128 * 2  # ~7x BF16
    assert isinstance(alloc, OscarTokenToKVPoolAllocator) and alloc.available_size() == 256


def test_pool_rows_follow_the_bit_allocation_per_layer_and_tensor():
    """Mixed widths: every layer's K and V rows have their own width (one buffer per layer, each slot's
    K then V); writes land in them and sglang's slot move (tiled from the first buffer's stride) sees
    the widest layer first."""
    lay = CacheLayout.of(32, None, [3, 4, 2], [2, 2, 4])
    pool, _ = make_pool(16, H, 32, 3, sink=4, block=32, request_rows=2, layouts=lay)
    assert [b.shape[2] for b in pool.k_buffer] == [16, 20, 12] and [b.shape[2] for b in pool.v_buffer] == [12, 12, 20]
    assert pool.layouts(1) == (RowLayout(32, None, 4), RowLayout(32, None, 2))
    assert pool.get_kv_size_bytes()[0] == 32 * H * (16 + 20 + 12)  # window rows take no memory of their own
    assert [b.stride(0) for b in pool._slot_move_pointer_buffers()] == [H * 32, H * 32, H * 28]
    assert pool.per_page == 16 * 28 // (2 * 32 * 2)  # the layer with the narrowest K + V rows decides
    torch.manual_seed(0)
    x = torch.randn(2, H, 32)
    eye = torch.eye(32)
    for layer in range(3):
        pool.write_rows(layer, torch.tensor([3, 4]), x, x, None, eye, eye, 1.0, 1.0)
    err = [float((dequantize_rows(pool.k_buffer[l][3:5], lay.key[l]) - x).abs().max()) for l in range(3)]
    assert err[1] < err[0] < err[2]  # 4 < 3 < 2 bits
    with pytest.raises(ValueError, match="layouts cover 3 layers"):
        make_pool(16, H, 32, 4, sink=4, block=32, request_rows=2, layouts=lay)


def test_window_rows_live_in_whole_pages_of_the_pool():
    """A window page is one allocator page: its rows fill the bytes of its slots in every layer, K and V,
    and writing them touches no other page."""
    pool, alloc = _pool()
    store = pool.store
    torch.manual_seed(0)
    x = torch.randn(3, H, D, dtype=torch.float16)
    eye = torch.eye(D)
    store.begin_extend(1, 0, 3)
    ids = store.plans.pop(1).write_ids
    page = int(store.page_of(ids).unique())
    before = [b.clone() for b in (*pool.k_buffer, *pool.v_buffer)]
    slots = take_slots(alloc, 3)
    pool.write_rows(0, slots, x, x, ids, eye, eye, 1.0, 1.0)
    for win in pool.window_rows(0):
        assert torch.equal(win.gather(ids), x)  # rotated (identity) full precision copies
    for b, old in zip((*pool.k_buffer, *pool.v_buffer), before):
        changed = torch.nonzero((b != old).flatten(1).any(1)).flatten()
        assert set((changed // 16).tolist()) <= {page, int(slots[0]) // 16}, changed
    err = (dequantize_rows(pool.k_buffer[0][slots], RowLayout(D)) - x.float()).abs().max()
    assert 0 < err < 1.5


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
