"""The exact tensors the oscar backend builds (pool buffers, window map, split segments)
fed to the Triton launchers under the interpreter, against the references: the
integration and the kernels agree on dtypes, strides and index conventions."""

from __future__ import annotations

import torch

from oscar_sglang.kernels import decode, extend, reference, write
from oscar_sglang.kernels.codec import RowLayout

H_KV, GROUP, D = 1, 2, 64


def _state():
    from oscar_sglang.backend import split_cached_tokens
    from oscar_sglang.pool import OscarKVPool

    torch.manual_seed(0)
    pool = OscarKVPool(64, 1, torch.float16, H_KV, D, 1, "cpu", layout=RowLayout(D), sink=2, recent=4,
                       ring_blocks=2, sink_rows=4)
    req_to_token = torch.zeros(2, 32, dtype=torch.int32)
    lens = torch.tensor([11, 6])
    slots = torch.randperm(60)[: int(lens.sum())] + 1
    req_to_token[0, :11], req_to_token[1, :6] = slots[:11].int(), slots[11:].int()
    positions = torch.cat([torch.arange(11), torch.arange(6)])
    reqs = torch.cat([torch.zeros(11, dtype=torch.int64), torch.ones(6, dtype=torch.int64)])
    win_rows = pool.assign_windows(slots, positions, reqs, lens[reqs])
    rot = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0].float().contiguous()
    kv = torch.randn(2, len(slots), H_KV, D, dtype=torch.float16)
    k_rows, v_rows = pool.get_kv_buffer(0)
    k_win, v_win = pool.get_window_buffers(0)
    for x, rows, win in ((kv[0], k_rows, k_win), (kv[1], v_rows, v_win)):
        ref_rows, ref_win = rows.clone(), win.clone()
        reference.quantize_kv_write(x, rot, 0.96, pool.layout, ref_rows, slots, ref_win, win_rows)
        write.quantize_kv_write(x, rot, 0.96, pool.layout, rows, slots, win, win_rows)
        assert (rows.float() - ref_rows.float()).abs().gt(0).float().mean() < 0.02  # rare tf32 boundary flips
        assert torch.allclose(win.float(), ref_win.float(), atol=1e-2)
    segments = split_cached_tokens(pool, req_to_token, torch.tensor([0, 1]), lens)
    return pool, req_to_token, lens, segments, (k_rows, v_rows, k_win, v_win)


def test_decode_kernel_on_backend_metadata():
    pool, _, lens, (i_ptr, i_idx, w_ptr, w_idx), (k_rows, v_rows, k_win, v_win) = _state()
    assert i_ptr.tolist() == [0, 5, 5] and w_ptr.tolist() == [0, 6, 12]  # 2 sinks + 4 recent each
    q = torch.randn(2, H_KV * GROUP, D, dtype=torch.float16)
    args = (q, k_rows, v_rows, i_ptr, i_idx, k_win, v_win, w_ptr, w_idx, D**-0.5, pool.layout)
    out, lse = decode.decode_attention(*args)
    ref_out, ref_lse = reference.decode_attention(*args)
    assert torch.allclose(out.float(), ref_out.float(), atol=2e-2) and torch.allclose(lse, ref_lse, atol=2e-2)


def test_extend_kernel_on_backend_metadata():
    pool, _, lens, (i_ptr, i_idx, w_ptr, w_idx), (k_rows, v_rows, k_win, v_win) = _state()
    chunk = torch.tensor([3, 1])
    q = torch.randn(int(chunk.sum()), H_KV * GROUP, D, dtype=torch.float16)
    k_new = torch.randn(int(chunk.sum()), H_KV, D, dtype=torch.float16)
    v_new = torch.randn_like(k_new)
    qo = torch.tensor([0, 3, 4])
    args = (q, k_new, v_new, qo, k_rows, v_rows, i_ptr, i_idx, k_win, v_win, w_ptr, w_idx, D**-0.5, pool.layout)
    assert torch.allclose(extend.extend_attention(*args).float(), reference.extend_attention(*args).float(), atol=2e-2)
