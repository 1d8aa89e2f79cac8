"""Which cached tokens an extend chunk reads in BF16: the ``recent`` tokens before the chunk, whatever its size.

The backend attends before it writes a chunk. Writing first would let the chunk's ring rows evict
the window it is about to read, so with a chunk as long as the recent window the whole prefix past
the sinks would be read from INT2 (and sglang's default chunk of thousands of tokens would read even
the token just before the chunk from INT2). Here a 6-token prefix is exactly the sinks plus the
recent window, so the next 4-token chunk must see every earlier token exactly: its output equals
dense fp32 attention over the original q/k/v.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from test_backend_graph import HKV, HQ, D, _backend

PREFIX, CHUNK = 6, 4  # sink 2 + recent 4, then a chunk as long as the recent window


def _extend(backend, layer, start: int, q, k, v):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    n = q.shape[0]
    fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, seq_lens=torch.tensor([start + n]),
                         extend_seq_lens=torch.tensor([n]), req_pool_indices=torch.tensor([0]),
                         out_cache_loc=backend.req_to_token[0, start : start + n].long())
    backend.init_forward_metadata(fb)
    md = backend.forward_metadata
    out = backend.forward_extend(q.flatten(1).half(), k.flatten(1).half(), v.flatten(1).half(), layer, fb)
    return md, out.view(n, HQ, D).float()


def test_a_chunk_as_long_as_the_recent_window_reads_the_window_exactly():
    backend, layer = _backend()
    t = PREFIX + CHUNK
    backend.req_to_token[0, :t] = torch.arange(1, t + 1, dtype=torch.int32)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(t, h, D, generator=g).half().float() for h in (HQ, HKV, HKV))
    _extend(backend, layer, 0, q[:PREFIX], k[:PREFIX], v[:PREFIX])
    md, got = _extend(backend, layer, PREFIX, q[PREFIX:], k[PREFIX:], v[PREFIX:])
    assert md.int2_indptr.tolist() == [0, 0] and md.win_indptr.tolist() == [0, PREFIX]  # nothing from INT2

    causal = torch.ones(t, t, dtype=torch.bool).tril()[PREFIX:]
    want = F.scaled_dot_product_attention(q[PREFIX:].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=causal, scale=D**-0.5, enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # The chunk's own tokens were written after attention: the ring now holds positions 6..9.
    assert backend.pool.win_of_slot[backend.req_to_token[0, :t].long()].ge(0).tolist() == [True] * 2 + \
        [False] * 4 + [True] * 4
