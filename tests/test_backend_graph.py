"""The CUDA-graph decode path of the oscar backend, exercised on CPU (no capture possible).

sglang's decode graph runner calls ``init_cuda_graph_state`` once, then
``init_forward_metadata_out_graph(batch, in_capture=True)`` before capturing each batch
size and ``init_forward_metadata_out_graph(view)`` (a padded replay view, as
``build_replay_fb_view`` builds it) before every replay; the captured layers only read
the static buffers. Here the same calls run eagerly on CPU: the replayed decode must
equal the eager decode (same outputs, same pool state) and must read the captured buffers.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from oscar_sglang.testing import make_pool, take_slots

HQ, HKV, D = 4, 2, 32
SINK, BLOCK = 2, 16
LENS = [9, 2, 36]  # after the decode step; request 1 decodes position 1 (< sink: a sink row), request 2 into
# its third block


def _backend(first: int = 0):
    from sglang.srt.layers.radix_attention import RadixAttention

    from oscar_sglang.backend import OscarAttnBackend
    from oscar_sglang.kernels.codec import CacheLayout
    from oscar_sglang.settings import OscarSettings

    torch.manual_seed(0)
    bits = (3,), (2,)  # keys 3 bits, values 2: rows of different widths
    pool, alloc = make_pool(2048, HKV, D, 1, sink=SINK, block=BLOCK, request_rows=4, page_size=8,
                            layouts=CacheLayout.of(D, None, *bits), first=first)
    req_to_token = torch.zeros(4, 64, dtype=torch.int32)
    # The four ModelRunner attributes the backend reads (a real runner needs a loaded model).
    runner = SimpleNamespace(token_to_kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             device="cpu", model=torch.nn.Module(), server_args=SimpleNamespace(tp_size=1))
    settings = OscarSettings(rotations_path="-", head_dim=D, group_size=None, sink=SINK, block=BLOCK, first_block=first, clip_k=(0.96,),
                             clip_v=(0.92,), key_bits=bits[0], value_bits=bits[1], granularity="kv-head")
    rot = torch.linalg.qr(torch.randn(2, 1, HKV, D, D, dtype=torch.float64))[0].float()
    layer = RadixAttention(HQ, D, D**-0.5, HKV, layer_id=0)
    return OscarAttnBackend(runner, settings, rot[0], rot[1]), layer, alloc


def begin(backend, mode, rows, seq_lens, new_lens, hits=None):
    """What the plugin's scheduler hooks do before a forward: move each request's window table."""
    store = backend.pool.store
    for i, (r, n, m) in enumerate(zip(rows, seq_lens, new_lens)):
        if mode.is_decode():
            store.begin_decode(r, n - 1)
        else:
            store.begin_extend(r, n - m, n, (hits or {}).get(i))


def _prefill(backend, layer, alloc):
    """Every request's tokens but the last, written through forward_extend."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    alloc_slots = take_slots(alloc, sum(LENS))
    slots = alloc_slots[torch.randperm(sum(LENS), generator=torch.Generator().manual_seed(1))]
    starts = torch.tensor([0, *LENS]).cumsum(0)
    for b, n in enumerate(LENS):
        backend.req_to_token[b, :n] = slots[starts[b]: starts[b] + n].int()
    prompt = [n - 1 for n in LENS]
    fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, seq_lens=torch.tensor(prompt),
                         extend_seq_lens=torch.tensor(prompt), req_pool_indices=torch.arange(3),
                         out_cache_loc=torch.cat([backend.req_to_token[b, : n - 1] for b, n in enumerate(LENS)]).long())
    t = sum(prompt)
    g = torch.Generator().manual_seed(2)
    begin(backend, ForwardMode.EXTEND, range(3), prompt, prompt)
    backend.init_forward_metadata(fb)
    backend.forward_extend(torch.randn(t, HQ * D, generator=g).half(), torch.randn(t, HKV * D, generator=g).half(),
                           torch.randn(t, HKV * D, generator=g).half(), layer, fb)
    return torch.stack([backend.req_to_token[b, n - 1] for b, n in enumerate(LENS)]).long()


def _decode_inputs(bs: int):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(bs, HQ * D, generator=g).half(), torch.randn(bs, HKV * D, generator=g).half(),
            torch.randn(bs, HKV * D, generator=g).half())


def test_replayed_graph_metadata_equals_eager_decode():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    decode = ForwardMode.DECODE
    eager, layer, alloc = _backend()
    new_slots = _prefill(eager, layer, alloc)
    fb = SimpleNamespace(forward_mode=decode, batch_size=3, seq_lens=torch.tensor(LENS),
                         req_pool_indices=torch.arange(3), out_cache_loc=new_slots)
    begin(eager, decode, range(3), LENS, [1] * 3)
    eager.init_forward_metadata(fb)
    q, k, v = _decode_inputs(4)
    want = eager.forward_decode(q[:3], k[:3], v[:3], layer, fb)

    graph, layer, alloc = _backend()
    _prefill(graph, layer, alloc)
    graph.init_cuda_graph_state(max_bs=4, max_num_tokens=4)
    store_before = graph.pool.store.table.clone()
    capture = SimpleNamespace(forward_mode=decode, batch_size=4, seq_lens=torch.ones(4, dtype=torch.int64),
                              req_pool_indices=torch.zeros(4, dtype=torch.int64),
                              out_cache_loc=torch.zeros(4, dtype=torch.int64))
    graph.init_forward_metadata_out_graph(capture, in_capture=True)
    captured = graph.forward_metadata
    graph.forward_decode(*_decode_inputs(4), layer, capture)  # the warm-up/capture forward
    assert torch.equal(graph.pool.store.table, store_before)  # capture touched no request window
    assert captured.num_splits is not None

    # replay: 3 real requests padded to the captured 4 (seq_len fill value 1, out_cache_loc unpadded)
    view = SimpleNamespace(forward_mode=decode, batch_size=4, num_padding=1,
                           seq_lens=torch.tensor([*LENS, graph.get_cuda_graph_seq_len_fill_value()]),
                           req_pool_indices=torch.tensor([0, 1, 2, 0]), out_cache_loc=new_slots)
    begin(graph, decode, range(3), LENS, [1] * 3)
    graph.init_forward_metadata_out_graph(view)
    md = graph.forward_metadata
    for name in ("out_loc", "win_rows", "packed_indptr", "packed_indices", "win_indptr", "win_indices"):
        assert getattr(md, name).data_ptr() == getattr(captured, name).data_ptr(), name  # graph reads these
    assert md.packed_indptr[-1] == md.packed_indptr[-2] and md.win_indptr[-1] == md.win_indptr[-2]  # padding: empty
    got = graph.forward_decode(q, k, v, layer, view)
    assert torch.allclose(got[:3].float(), want.float(), atol=1e-3)
    assert graph.pool.store.row_len == eager.pool.store.row_len and torch.equal(graph.pool.store.table,
                                                                                  eager.pool.store.table)
    packed = graph.pool.store.table[graph.pool.store.table >= 0]  # window rows hold float copies: compare apart
    for buf, want in ((graph.pool.k_buffer[0], eager.pool.k_buffer[0]), (graph.pool.v_buffer[0], eager.pool.v_buffer[0])):
        window_pages = set(graph.pool.store.page_of(packed).tolist())
        rows = [s for s in range(1, buf.shape[0]) if s // 8 not in window_pages]
        assert torch.equal(buf[rows], want[rows])
    for got_win, want_win in zip(graph.pool.window_rows(0), eager.pool.window_rows(0)):
        assert torch.allclose(got_win.gather(packed).float(), want_win.gather(packed).float(), atol=2e-3)
