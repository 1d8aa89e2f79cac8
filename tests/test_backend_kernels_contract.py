"""The exact tensors the oscar backend builds (pool buffers, window map, split segments)
fed to the Triton launchers under the interpreter, against the references: the
integration and the kernels agree on dtypes, strides and index conventions."""

from __future__ import annotations

import torch

from oscar_sglang.kernels import decode, extend, reference, write
from support import make_pool

H_KV, GROUP, D = 1, 2, 64


def _state():
    """Two requests (11 and 6 tokens) written through the pool; the backend's own metadata builder."""
    from oscar_sglang.backend import OscarAttnBackend

    torch.manual_seed(0)
    pool = make_pool(64, H_KV, D, 1, sink=2, recent=4, request_rows=2)
    req_to_token = torch.zeros(2, 32, dtype=torch.int32)
    lens = torch.tensor([11, 6])
    slots = torch.randperm(60)[: int(lens.sum())] + 1
    req_to_token[0, :11], req_to_token[1, :6] = slots[:11].int(), slots[11:].int()
    positions = torch.cat([torch.arange(11), torch.arange(6)])
    reqs = torch.cat([torch.zeros(11, dtype=torch.int64), torch.ones(6, dtype=torch.int64)])
    in_window = (positions < 2) | (positions >= lens[reqs] - 4)
    win_rows = torch.where(in_window, pool.window_rows(reqs, positions), -1)
    pool.row_len[:] = lens.tolist()
    rot = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0].float().contiguous()
    kv = torch.randn(2, len(slots), H_KV, D, dtype=torch.float16)
    k_rows, v_rows = pool.get_kv_buffer(0)
    k_win, v_win = pool.get_window_buffers(0)
    q = torch.randn(len(slots), H_KV * GROUP, D, dtype=torch.float16)
    refs = [t.clone() for t in (k_rows, v_rows, k_win, v_win)]
    args = (rot, None, 0.96, 0.92, *pool.layouts(0))  # as the backend's folded values: no V rotation
    qr = write.write_step(*kv, *args, k_rows, v_rows, slots, k_win, v_win, win_rows, q=q)
    ref_qr = reference.write_step(*kv, *args, *refs[:2], slots, *refs[2:], win_rows, q=q)
    for rows, ref_rows in zip((k_rows, v_rows), refs[:2]):
        assert (rows.float() - ref_rows.float()).abs().gt(0).float().mean() < 0.02  # rare tf32 boundary flips
    for win, ref_win in zip((k_win, v_win), refs[2:]):
        assert torch.allclose(win.float(), ref_win.float(), atol=1e-2)
    assert torch.allclose(qr.float(), ref_qr.float(), atol=1e-2)
    backend = object.__new__(OscarAttnBackend)  # only the metadata builder runs
    backend.pool, backend.req_to_token = pool, req_to_token
    return pool, backend, lens, (k_rows, v_rows, k_win, v_win)


def test_decode_kernel_on_backend_metadata():
    pool, backend, lens, (k_rows, v_rows, k_win, v_win) = _state()
    md = backend._metadata(torch.tensor([0, 1]), lens, torch.ones(2, dtype=torch.int64), None, decode=True)
    assert md.int2_indptr.tolist() == [0, 5, 5] and md.win_indptr.tolist() == [0, 6, 12]  # 2 sinks + 4 recent
    q = torch.randn(2, H_KV * GROUP, D, dtype=torch.float16)
    args = (q, k_rows, v_rows, md.int2_indptr, md.int2_indices, k_win, v_win, md.win_indptr, md.win_indices,
            D**-0.5, pool.layouts(0)[0])
    v_layout = pool.layouts(0)[1]
    out, lse = decode.decode_attention(*args, v_layout=v_layout)
    ref_out, ref_lse = reference.decode_attention(*args, v_layout=v_layout)
    assert torch.allclose(out.float(), ref_out.float(), atol=2e-2) and torch.allclose(lse, ref_lse, atol=2e-2)


def test_extend_kernel_on_backend_metadata():
    """Chunks of 3 and 1 tokens ending at the written lengths (prefixes 8 and 5)."""
    pool, backend, lens, (k_rows, v_rows, k_win, v_win) = _state()
    chunk = torch.tensor([3, 1])
    pool.row_len[:] = (lens - chunk).tolist()
    md = backend._metadata(torch.tensor([0, 1]), lens, chunk, torch.zeros(4, dtype=torch.int64), decode=False)
    assert md.prefix_lens.tolist() == [8, 5] and md.int2_indptr.tolist() == [0, 5, 5]
    q = torch.randn(int(chunk.sum()), H_KV * GROUP, D, dtype=torch.float16)
    k_new = torch.randn(int(chunk.sum()), H_KV, D, dtype=torch.float16)
    v_new = torch.randn_like(k_new)
    args = (q, k_new, v_new, md.qo_indptr, k_rows, v_rows, md.int2_indptr, md.int2_indices, k_win, v_win,
            md.win_indptr, md.win_indices, md.prefix_lens, pool.sink, pool.recent, D**-0.5, pool.layouts(0)[0])
    v_layout = pool.layouts(0)[1]
    assert torch.allclose(extend.extend_attention(*args, v_layout=v_layout).float(),
                          reference.extend_attention(*args, v_layout=v_layout).float(), atol=2e-2)
