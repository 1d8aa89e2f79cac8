"""Extend attention kernel vs the reference: ragged chunks (including empty and longer than
a query block), INT2 + window prefixes (either empty), plain prefill (no prefix), GQA,
head_dim 64/128, paged prefixes, window rows dense or in pages of the uint8 row buffers, the
block rule with block boundaries inside chunks. CPU subset under TRITON_INTERPRET=1; full
matrix gpu."""

import itertools

import pytest
import torch
from test_kernels_decode import DEV, make_cache, require_gpu, tolerance

from oscar_sglang.kernels import extend, ops, reference
from oscar_sglang.kernels.rule import PositionRule
from oscar_sglang.kernels.window import WindowRows


def run_extend(impl, q, k_new, v_new, qo_indptr, cache, layout, sink=2, block=8, prefix=None, first=0, **kw):
    """Small blocks so that the block rule's masks cut through every segment: request b's chunk
    starts at a = ``prefix[b]``, by default its INT2 + window length (INT2 at positions sink..,
    the sinks, then the window's run up to a - 1)."""
    c = cache
    if prefix is None:
        prefix = c["packed_indptr"].diff() + c["win_indptr"].diff()
    prefix = prefix.to(torch.int32).to(qo_indptr.device)
    return impl.extend_attention(q, k_new=k_new, v_new=v_new, qo_indptr=qo_indptr, k_rows=c["k_rows"],
        v_rows=c["v_rows"], packed_indptr=c["packed_indptr"],
                                 packed_indices=c["packed_indices"], k_win=c["k_win"], v_win=c["v_win"],
                                 win_indptr=c["win_indptr"], win_indices=c["win_indices"],
                                 prefix_lens=prefix, rule=PositionRule(sink=sink, block=block, first=first),
                                     sm_scale=q.shape[-1] ** -0.5, layout=layout,
                                 v_layout=c["v_layout"], **kw)


def make_chunk(lens_q, hkv, group, d, dtype, gen, dev=DEV):
    tq = sum(lens_q)
    q = torch.randn(tq, hkv * group, d, generator=gen) * 0.7
    k_new = torch.randn(tq, hkv, d, generator=gen)
    v_new = torch.randn(tq, hkv, d, generator=gen) + 0.5
    qo = torch.tensor([0] + list(lens_q)).cumsum(0).to(torch.int32)
    return q.to(dtype).to(dev), k_new.to(dtype).to(dev), v_new.to(dtype).to(dev), qo.to(dev)


def check_extend(d, hkv, group, lens_i, lens_w, lens_q, page, dtype, seed=0, max_q_len=None,
                 config=extend.ExtendConfig(), bits=(2, 2), win_page=None, **rule):
    cache, layout, gen = make_cache(lens_i, lens_w, hkv, d, page, dtype, seed, bits=bits, win_page=win_page)
    q, k_new, v_new, qo = make_chunk(lens_q, hkv, group, d, dtype, gen)
    out = run_extend(extend, q, k_new, v_new, qo, cache, layout, max_q_len=max_q_len, config=config, **rule)
    ref = run_extend(reference, q, k_new, v_new, qo, cache, layout, **rule)
    assert out.dtype == dtype and out.shape == q.shape
    tol = tolerance(dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


CPU_CASES = [  # d, hkv, group, lens_i, lens_w, lens_q, page, dtype, (key bits, value bits); block 8
    (64, 2, 1, [0, 7], [3, 0], [1, 7], 1, torch.float16, (2, 2)),  # the 7-token chunk crosses a block boundary
    (64, 1, 3, [97], [7], [70], 16, torch.float16, (2, 2)),  # two query blocks, chunk crosses key blocks
    (128, 1, 4, [33, 0, 5], [0, 0, 2], [5, 9, 0], 16, torch.float32, (2, 2)),  # plain prefill, empty chunk
    # 3/4-bit rows; K and V of different widths have different row bytes (strides)
    (128, 1, 2, [40, 6], [3, 2], [6, 3], 16, torch.float16, (3, 2)),
    (64, 2, 1, [37, 0], [4, 0], [5, 2], 8, torch.float32, (4, 2)),
    (64, 1, 3, [30], [2], [7], 1, torch.float16, (2, 4)),
    (64, 1, 2, [35, 9], [3, 1], [4, 3], 16, torch.float16, (4, 4)),  # equal widths: one row stride
]


@pytest.mark.parametrize("d,hkv,group,lens_i,lens_w,lens_q,page,dtype,bits", CPU_CASES)
def test_extend_matches_reference(d, hkv, group, lens_i, lens_w, lens_q, page, dtype, bits):
    check_extend(d, hkv, group, lens_i, lens_w, lens_q, page, dtype, bits=bits)


PAGED_CASES = [  # d, hkv, group, lens_i, lens_w, lens_q, dtype, bits, window page (rows per page: 10, 9, 5)
    (64, 2, 2, [30, 4], [13, 20], [11, 6], torch.float16, (2, 2), 64),
    (128, 2, 1, [20, 0], [9, 25], [7, 10], torch.float32, (3, 2), 128),
    (64, 1, 3, [12], [40], [9], torch.float32, (2, 4), 64),
]


@pytest.mark.parametrize("d,hkv,group,lens_i,lens_w,lens_q,dtype,bits,win_page", PAGED_CASES)
def test_extend_paged_window_matches_reference(d, hkv, group, lens_i, lens_w, lens_q, dtype, bits, win_page):
    """Window rows inside pages of the K and V row buffers (different page strides), row ids
    spread over several pages with unused id slots; block 16: most windows' runs are longer than
    the rule's, so a query reads exactly only the part at or after its block start, and chunks
    cross block boundaries."""
    check_extend(d, hkv, group, lens_i, lens_w, lens_q, 8, dtype, seed=d + win_page, bits=bits, win_page=win_page,
                 config=extend.ExtendConfig(block_rows=16, block_n=16), sink=3, block=16)


@pytest.mark.parametrize("win_page,first", [(None, 0), (64, 0), (64, 2)])
def test_extend_block_rule_as_served(win_page, first):
    """The segments as the backend builds them under the block rule: INT2 rows of positions
    sink .. a + chunk - 1 (the chunk's own rows are written before attention), the window =
    ``PositionRule.window(a)`` (the sinks, then [max(sink, block start of a), a)). Chunks start
    before, at and after a block start and cross block boundaries, so queries read keys exactly
    from the window and from the chunk and quantized from INT2 rows of the prefix and of the
    chunk; 16-row tiles put a query block boundary inside the chunks, and the first query
    block's unmasked INT2 blocks end inside the prefix. ``first``: blocks doubling from 2 up to
    8 ([0, 2), [2, 4), [4, 8), then every 8)."""
    sink, block = 3, 8
    rule = PositionRule(sink=sink, block=block, first=first)
    starts, lens_q = [21, 24, 2, 0, 45, 5], [11, 5, 9, 4, 19, 4]
    lens_i = [max(0, a + n - sink) for a, n in zip(starts, lens_q)]
    lens_w = [sum(map(len, rule.window(a))) for a in starts]
    cache, layout, gen = make_cache(lens_i, lens_w, 2, 64, 8, torch.float16, seed=13, win_page=win_page)
    q, k_new, v_new, qo = make_chunk(lens_q, 2, 2, 64, torch.float16, gen)
    prefix = torch.tensor(starts)
    cfg = extend.ExtendConfig(block_rows=16, block_n=16)
    kw = dict(sink=sink, block=block, first=first, prefix=prefix)
    out = run_extend(extend, q, k_new, v_new, qo, cache, layout, config=cfg, **kw)
    ref = run_extend(reference, q, k_new, v_new, qo, cache, layout, **kw)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    split = run_extend(extend, q, k_new, v_new, qo, cache, layout, config=cfg, num_splits=3, **kw)
    torch.testing.assert_close(split.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_extend_small_blocks_many_steps():
    """16-row tiles (8 tokens x 2 heads): several query blocks, causal diagonal inside and across
    key blocks."""
    small = extend.ExtendConfig(block_rows=16, block_n=16)
    check_extend(64, 1, 2, [40, 3], [17, 0], [37, 20], 8, torch.float16, seed=8, config=small)


@pytest.mark.parametrize("group,splits", [(3, 3), (4, 5)])
def test_extend_split_kv_over_the_prefix(group, splits):
    """Split-KV over the INT2 prefix (more splits than blocks for the short request: empty
    splits), merged by decode's merge kernel; group 3 pads its heads to 4 rows per token."""
    cache, layout, gen = make_cache([150, 20], [9, 3], 2, 64, 16, torch.float16, seed=group)
    q, k_new, v_new, qo = make_chunk([9, 4], 2, group, 64, torch.float16, gen)
    cfg = extend.ExtendConfig(block_rows=16, block_n=16)
    out = run_extend(extend, q, k_new, v_new, qo, cache, layout, num_splits=splits, config=cfg)
    ref = run_extend(reference, q, k_new, v_new, qo, cache, layout)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    one = run_extend(extend, q, k_new, v_new, qo, cache, layout, num_splits=1, config=cfg)
    torch.testing.assert_close(out.float(), one.float(), atol=2e-3, rtol=2e-3)


def test_plan_extend_splits():
    assert extend.plan_extend_splits(32, 32768, 132) == 17  # a short question over a 32K prefix
    assert extend.plan_extend_splits(4096, 32768, 132) == 1  # a long prefill fills the GPU by itself
    assert extend.plan_extend_splits(1, 100, 132) == 1  # short prefixes are never split


def test_extend_out_buffer_and_max_q_len():
    cache, layout, gen = make_cache([4], [2], 1, 64, 1, torch.float16, seed=5)
    q, k_new, v_new, qo = make_chunk([6], 1, 2, 64, torch.float16, gen)
    buf = torch.empty_like(q)
    out = run_extend(extend, q, k_new, v_new, qo, cache, layout, out=buf, max_q_len=6)
    assert out.data_ptr() == buf.data_ptr()
    ref = run_extend(reference, q, k_new, v_new, qo, cache, layout)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


def test_extend_first_query_sees_prefix_plus_itself():
    """A chunk of one token equals decode over prefix + that token (causal edge)."""
    cache, layout, gen = make_cache([3], [0], 1, 64, 1, torch.float32, seed=6, dev="cpu")
    q, k_new, v_new, qo = make_chunk([1], 1, 1, 64, torch.float32, gen, dev="cpu")
    out = run_extend(reference, q, k_new, v_new, qo, cache, layout, sink=0, block=1)  # all 3 prefix keys INT2
    win = dict(cache, win_indptr=torch.tensor([0, 1]), win_indices=torch.tensor([0]))
    dec, _ = reference.decode_attention(q, k_rows=win["k_rows"], v_rows=win["v_rows"],
        packed_indptr=win["packed_indptr"], packed_indices=win["packed_indices"],
                                        k_win=WindowRows.dense(k_new), v_win=WindowRows.dense(v_new),
                                            win_indptr=win["win_indptr"],
                                        win_indices=win["win_indices"], sm_scale=64 ** -0.5, layout=layout)
    torch.testing.assert_close(out, dec)


def test_ops_extend_cpu_is_reference():
    cache, layout, gen = make_cache([5], [3], 1, 64, 1, torch.float32, seed=7, dev="cpu")
    q, k_new, v_new, qo = make_chunk([4], 1, 2, 64, torch.float32, gen, dev="cpu")
    a = run_extend(ops, q, k_new, v_new, qo, cache, layout)
    b = run_extend(reference, q, k_new, v_new, qo, cache, layout)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("d,group,dtype,page", list(itertools.product(
    [64, 128], [1, 3, 4, 8], [torch.float16, torch.bfloat16], [1, 16])))
def test_extend_gpu_matrix(d, group, dtype, page):
    require_gpu()
    check_extend(d, 2, group, [0, 1000, 97, 4000], [0, 320, 7, 320], [300, 1, 129, 700], page, dtype, seed=d + group)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(2, 2), (3, 2)])
def test_extend_gpu_paged_window(bits):
    """Window rows in pages of 64 slots of the row buffers (9 bf16 rows of 8 x 128 per page), block 64."""
    require_gpu()
    check_extend(128, 8, 4, [0, 1000, 97, 4000], [0, 320, 7, 320], [300, 1, 129, 700], 16, torch.bfloat16,
                 seed=bits[0], bits=bits, win_page=64, sink=4, block=64)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(3, 2), (4, 2), (2, 4)])
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.bfloat16)])
def test_extend_gpu_bit_widths(d, dtype, bits):
    require_gpu()
    check_extend(d, 2, 4, [0, 1000, 97, 4000], [0, 320, 7, 320], [300, 1, 129, 700], 16, dtype, seed=d, bits=bits)
