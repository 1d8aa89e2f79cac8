"""The exact tensors the oscar backend builds (pool buffers, window pages, window tables, split
segments) fed to the Triton launchers under the interpreter, against the references: the
integration and the kernels agree on dtypes, strides, paged window rows and index conventions."""

from __future__ import annotations

import torch

from oscar_sglang.kernels import decode, extend, reference, write
from oscar_sglang.testing import make_pool, take_slots

H_KV, GROUP, D = 1, 2, 64
SINK, BLOCK = 2, 8
LENS = torch.tensor([19, 6])  # request 0 is in its third block


def _state(starts: list[int]):
    """Two requests whose window tables are at positions ``starts`` (the store as the scheduler hooks
    leave it), every token's storage row and every table row written by the Triton write against
    the reference's write into copies of the buffers; the backend's own metadata builder."""
    from oscar_sglang.backend import OscarAttnBackend

    torch.manual_seed(0)
    pool, alloc = make_pool(512, H_KV, D, 1, sink=SINK, block=BLOCK, request_rows=2, page_size=16)
    store = pool.store
    for row, a in enumerate(starts):
        store.begin_extend(row, 0, a)
        store.plans.pop(row)
    req_to_token = torch.zeros(2, 32, dtype=torch.int32)
    slots = take_slots(alloc, int(LENS.sum()))
    req_to_token[0, :19], req_to_token[1, :6] = slots[:19].int(), slots[19:].int()
    positions = torch.cat([torch.arange(19), torch.arange(6)])
    reqs = torch.cat([torch.zeros(19, dtype=torch.int64), torch.ones(6, dtype=torch.int64)])
    cols = torch.where(positions < SINK, positions, SINK + positions % BLOCK)
    win_ids = torch.where(positions < torch.tensor(starts)[reqs], store.table[reqs, cols], -1)
    rot = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0].float().contiguous()
    kv = torch.randn(2, len(slots), H_KV, D, dtype=torch.float16)
    k_rows, v_rows = pool.get_kv_buffer(0)
    k_win, v_win = pool.window_rows(0)
    q = torch.randn(len(slots), H_KV * GROUP, D, dtype=torch.float16)
    ref_kv = pool.kv_buffer[0].clone()  # the reference writes into a copy of the layer's buffer
    rk = pool.layouts(0)[0].row_bytes
    ref_rows = [ref_kv[..., :rk], ref_kv[..., rk:]]
    ref_win = pool._window_views(ref_kv)
    k_lay, v_lay = pool.layouts(0)
    args = dict(rot_k=rot, clip_k=0.96, clip_v=0.92, k_layout=k_lay, v_layout=v_lay, slots=slots,  # folded values:
                window_slots=win_ids, q=q)                                                         # no V rotation
    qr = write.write_step(*kv, **args, k_rows=k_rows, v_rows=v_rows, k_win=k_win, v_win=v_win)
    ref_qr = reference.write_step(*kv, **args, k_rows=ref_rows[0], v_rows=ref_rows[1], k_win=ref_win[0],
                                  v_win=ref_win[1])
    packed = torch.ones(k_rows.shape[0], dtype=torch.bool)
    packed[store.page_of(win_ids[win_ids >= 0]).unique()[:, None] * 16 + torch.arange(16)] = False
    for rows, ref in zip((k_rows, v_rows), ref_rows):  # storage rows (outside window pages): rare tf32 flips
        assert (rows[packed].float() - ref[packed].float()).abs().gt(0).float().mean() < 0.02
    for win, ref in zip((k_win, v_win), ref_win):
        assert torch.allclose(win.gather(win_ids[win_ids >= 0]).float(), ref.gather(win_ids[win_ids >= 0]).float(),
                              atol=1e-2)
    assert torch.allclose(qr.float(), ref_qr.float(), atol=1e-2)
    backend = object.__new__(OscarAttnBackend)  # only the metadata builder runs
    backend.pool, backend.req_to_token = pool, req_to_token
    return pool, backend, (k_rows, v_rows, k_win, v_win)


def test_decode_kernel_on_backend_metadata():
    pool, backend, (k_rows, v_rows, k_win, v_win) = _state((LENS - 1).tolist())
    for row, n in enumerate(LENS.tolist()):
        pool.store.begin_decode(row, n - 1)
    md = backend._metadata(torch.tensor([0, 1]), LENS, torch.ones(2, dtype=torch.int64), None, decode=True)
    # request 0 (t = 18): INT2 [2, 16), window sinks + [16, 19); request 1 (t = 5): all in the window
    assert md.packed_indptr.tolist() == [0, 14, 14] and md.win_indptr.tolist() == [0, 5, 11]
    q = torch.randn(2, H_KV * GROUP, D, dtype=torch.float16)
    args = dict(k_rows=k_rows, v_rows=v_rows, packed_indptr=md.packed_indptr, packed_indices=md.packed_indices,
                k_win=k_win, v_win=v_win, win_indptr=md.win_indptr, win_indices=md.win_indices, sm_scale=D**-0.5,
                layout=pool.layouts(0)[0], v_layout=pool.layouts(0)[1])
    out, lse = decode.decode_attention(q, **args)
    ref_out, ref_lse = reference.decode_attention(q, **args)
    assert torch.allclose(out.float(), ref_out.float(), atol=2e-2) and torch.allclose(lse, ref_lse, atol=2e-2)


def test_extend_kernel_on_backend_metadata():
    """Chunks of 6 and 1 tokens ending at the written lengths (prefixes 13 and 5): request 0's chunk
    starts in its second block and ends in its third."""
    chunk = torch.tensor([6, 1])
    pool, backend, (k_rows, v_rows, k_win, v_win) = _state((LENS - chunk).tolist())
    for row, (n, c) in enumerate(zip(LENS.tolist(), chunk.tolist())):
        pool.store.begin_extend(row, n - c, n)
    md = backend._metadata(torch.tensor([0, 1]), LENS, chunk, torch.zeros(7, dtype=torch.int64), decode=False)
    assert md.prefix_lens.tolist() == [13, 5] and md.packed_indptr.tolist() == [0, 14, 14]
    assert md.win_indptr.tolist() == [0, 7, 12]  # sinks + [8, 13); sinks + [2, 5)
    q = torch.randn(int(chunk.sum()), H_KV * GROUP, D, dtype=torch.float16)
    k_new = torch.randn(int(chunk.sum()), H_KV, D, dtype=torch.float16)
    v_new = torch.randn_like(k_new)
    args = dict(k_new=k_new, v_new=v_new, qo_indptr=md.qo_indptr, k_rows=k_rows, v_rows=v_rows,
                packed_indptr=md.packed_indptr, packed_indices=md.packed_indices, k_win=k_win, v_win=v_win,
                win_indptr=md.win_indptr, win_indices=md.win_indices, prefix_lens=md.prefix_lens, rule=pool.rule,
                sm_scale=D**-0.5, layout=pool.layouts(0)[0], v_layout=pool.layouts(0)[1])
    assert torch.allclose(extend.extend_attention(q, **args).float(), reference.extend_attention(q, **args).float(),
                          atol=2e-2)
