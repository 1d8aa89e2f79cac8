"""The position rule through the oscar backend: the query at position t reads key j in full
precision iff j < sink or j is in t's block, else from its INT2 row, whatever the chunking, the
cache history or the batch.

Every case runs the backend's real metadata, write and attention path (CPU references) on
given q/k/v and compares it with attention computed straight from the rule.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from oscar_sglang.testing import take_slots
from test_backend_graph import HKV, HQ, D, _backend, begin

T = 36  # two and a quarter blocks


def _inputs(seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(T, h, D, generator=g).half() for h in (HQ, HKV, HKV))


def _batch(backend, mode, rows, seq_lens, new_lens):
    """A forward batch for requests on ``rows``; slots come from the request table."""
    out = torch.cat([backend.req_to_token[r, n - m: n].long() for r, n, m in zip(rows, seq_lens, new_lens)])
    return SimpleNamespace(forward_mode=mode, batch_size=len(rows), seq_lens=torch.tensor(seq_lens),
                           extend_seq_lens=torch.tensor(new_lens), req_pool_indices=torch.tensor(rows),
                           out_cache_loc=out)


def _run(backend, layer, rows, spans, q, k, v, hits=None):
    """One extend over requests ``rows``, request b computing positions spans[b] = (a, e) of q/k/v."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    fb = _batch(backend, ForwardMode.EXTEND, rows, [e for _, e in spans], [e - a for a, e in spans])
    begin(backend, ForwardMode.EXTEND, rows, [e for _, e in spans], [e - a for a, e in spans], hits)
    backend.init_forward_metadata(fb)
    idx = torch.cat([torch.arange(a, e) for a, e in spans])
    return backend.forward_extend(q[idx].flatten(1), k[idx].flatten(1), v[idx].flatten(1), layer,
                                  fb).view(-1, HQ, D).float()


def _decode(backend, layer, rows, pos, q, k, v):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    fb = _batch(backend, ForwardMode.DECODE, rows, [pos + 1] * len(rows), [1] * len(rows))
    begin(backend, ForwardMode.DECODE, rows, [pos + 1] * len(rows), [1] * len(rows))
    backend.init_forward_metadata(fb)
    return backend.forward_decode(q[pos].expand(len(rows), -1, -1).flatten(1),
                                  k[pos].expand(len(rows), -1, -1).flatten(1),
                                  v[pos].expand(len(rows), -1, -1).flatten(1), layer, fb).view(-1, HQ, D).float()


def _rule(backend, q, k, v):
    """Attention of every position straight from the rule (fp32, rotated basis and back)."""
    from oscar_sglang.kernels.codec import dequantize_rows, quantize_rows
    from oscar_sglang.kernels.reference import rotated_rows

    rk, rv = backend.rot_k[0], backend._rot_v(0)
    kr, vr = rotated_rows(k, rk), rotated_rows(v, rv)
    lk, lv = backend.pool.layouts(0)
    kq = dequantize_rows(quantize_rows(kr, lk, backend.settings.clip_k[0]), lk)
    vq = dequantize_rows(quantize_rows(vr, lv, backend.settings.clip_v[0]), lv)
    kr, vr = kr.half().float(), vr.half().float()  # the windows hold model-dtype copies
    qr = backend._rotate_q(q, 0).float()
    out = torch.empty(T, HQ, D)
    g = HQ // HKV
    for t in range(T):
        j = torch.arange(t + 1)
        exact = backend.pool.rule.exact(t, j)[:, None, None]
        kk = torch.where(exact, kr[: t + 1], kq[: t + 1]).repeat_interleave(g, 1)
        vv = torch.where(exact, vr[: t + 1], vq[: t + 1]).repeat_interleave(g, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", qr[t], kk) * D**-0.5, dim=-1)
        out[t] = torch.einsum("hn,nhd->hd", p, vv)
    return backend._unrotate_out(out, 0).float()


def _table(backend, alloc, rows):
    slots = take_slots(alloc, T * len(rows))
    slots = slots[torch.randperm(slots.numel(), generator=torch.Generator().manual_seed(1))]
    for i, r in enumerate(rows):
        backend.req_to_token[r, :T] = slots[i * T: (i + 1) * T].int()


@pytest.mark.parametrize("first", [0, 8])  # blocks of 16, or [0, 8), [8, 16), then every 16
@pytest.mark.parametrize("chunks", [[36], [6, 30], [3, 3, 3, 5, 22], [1] * 36, [7, 17, 12], [10, "decode"],
                                    [3, "decode"]])
def test_any_chunking_reads_by_the_position_rule(chunks, first):
    backend, layer, alloc = _backend(first)
    _table(backend, alloc, [0])
    q, k, v = _inputs()
    want = _rule(backend, q, k, v)
    outs, a = [], 0
    for c in chunks:
        if c == "decode":
            for pos in range(a, T):
                outs.append(_decode(backend, layer, [0], pos, q, k, v))
            break
        outs.append(_run(backend, layer, [0], [(a, a + c)], q, k, v))
        a += c
    torch.testing.assert_close(torch.cat(outs), want, atol=3e-3, rtol=3e-3)


def test_requests_in_one_batch_never_share_window_rows():
    """Four requests with equal positions in ONE decode batch each equal their lone run."""
    rows = [0, 1, 2, 3]
    batched, layer, alloc = _backend()
    _table(batched, alloc, rows)
    q, k, v = _inputs()
    qs = [q * (1 + i) for i in range(4)]  # different requests: different queries and keys
    ks = [k.roll(i, dims=0) for i in range(4)]
    for i, r in enumerate(rows):
        _run(batched, layer, [r], [(0, 10)], qs[i], ks[i], v)
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    fb = _batch(batched, ForwardMode.DECODE, rows, [11] * 4, [1] * 4)
    begin(batched, ForwardMode.DECODE, rows, [11] * 4, [1] * 4)
    batched.init_forward_metadata(fb)
    got = batched.forward_decode(torch.stack([x[10] for x in qs]).flatten(1), torch.stack([x[10] for x in ks]).flatten(1),
                                 v[10].expand(4, -1, -1).flatten(1), layer, fb).view(4, HQ, D).float()
    for i in range(4):
        alone, layer1, alloc1 = _backend()
        _table(alone, alloc1, [0])  # its own slots: the output depends on values only
        _run(alone, layer1, [0], [(0, 10)], qs[i], ks[i], v)
        torch.testing.assert_close(got[i], _decode(alone, layer1, [0], 10, qs[i], ks[i], v)[0], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("first", [0, 8])
@pytest.mark.parametrize("cached", [8, 16, 24, 32])
def test_a_prefix_hit_equals_the_cold_run(cached, first):
    """Request A writes ``cached`` tokens and sglang caches them (the rows of its sinks and of its
    block attach to the tree's slots); request B on another row shares those slots and computes the
    rest: equal to the cold run, for hits at block starts (16, 32) and inside a block (8, 24: B
    reads the attached tail instead of recomputing it); with ``first`` 8, 8 is a block start too."""
    backend, layer, alloc = _backend(first)
    _table(backend, alloc, [0, 1])
    backend.req_to_token[1, :cached] = backend.req_to_token[0, :cached]
    q, k, v = _inputs()
    store = backend.pool.store
    shared = backend.req_to_token[0, :cached].long()
    assert store.usable_prefix(shared) == 0  # nothing attached yet: no hit
    _run(backend, layer, [0], [(0, cached)], q, k, v)
    store.attach(0, lambda positions: backend.req_to_token[0, positions].long(), cached)
    store.release_row(0)
    assert store.usable_prefix(shared) == cached
    sinks, block = store.rule.window(cached)
    hit = store.pin(store.lookup(shared[[*sinks, *block]]))
    warm = _run(backend, layer, [1], [(cached, T)], q, k, v, hits={0: hit})
    torch.testing.assert_close(warm, _rule(backend, q, k, v)[cached:], atol=3e-3, rtol=3e-3)
