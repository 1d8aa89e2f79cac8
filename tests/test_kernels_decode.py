"""Split-KV INT2 decode kernel vs the reference: odd lengths, pages of 1/8/16 tokens with
splits crossing pages, GQA 1/3/4/8, head_dim 64/128, empty INT2 or window segments,
empty requests, ragged batches, window rows dense or in pages of the uint8 row buffers (as
the pool keeps them). CPU runs a small subset under TRITON_INTERPRET=1; the full matrix
(and bf16) is marked gpu."""

import itertools
import os

import pytest
import torch
import triton
import triton.language as tl

from oscar_sglang.kernels import decode, ops, reference, tiles
from oscar_sglang.kernels.codec import RowLayout, pack_codes, quantize_rows
from oscar_sglang.kernels.rule import PositionRule
from oscar_sglang.kernels.window import WindowRows

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def require_gpu():
    if DEV != "cuda":
        pytest.skip("needs CUDA with TRITON_INTERPRET=0 (benchmarks/gpu_check.sh)")


def paged_indices(lens, page, gen, spare_pages=3):
    """One slot id per token (sglang convention), tokens laid in shuffled pages of `page`."""
    n_pages = sum(-(-n // page) for n in lens) + spare_pages
    perm = torch.randperm(n_pages, generator=gen)
    out, p = [], 0
    for n in lens:
        k = -(-n // page)
        out.append((perm[p : p + k, None] * page + torch.arange(page)).flatten()[:n])
        p += k
    indptr = torch.tensor([0] + list(lens)).cumsum(0)
    return indptr, torch.cat(out) if out else torch.zeros(0, dtype=torch.long), n_pages * page


def window_page_rows(page, row_bytes, d, dtype):
    """Window rows of d elements per head that fit in a page of ``page`` slots of every one of the
    buffers of ``row_bytes`` bytes per head (K's and V's: one row-id layout for both)."""
    return min(page * rb for rb in row_bytes) // (d * dtype.itemsize)


def paged_window_ids(m, g, first_page, gen, spare_pages=2):
    """m row ids of a paged window of g rows per page (log2_rows = ceil(log2(g))), spread over
    shuffled pages first_page, first_page + 1, ...; a page's id slots past g stay unused.
    Returns (ids, log2_rows, the end page)."""
    log2 = (g - 1).bit_length()
    n_pages = -(-m // g) + spare_pages
    pages = first_page + torch.randperm(n_pages, generator=gen)
    ids = ((pages[:, None] << log2) + torch.arange(g)).flatten()
    return ids[torch.randperm(ids.numel(), generator=gen)[:m]], log2, first_page + n_pages


def pool_window(buf, d, dtype, page, log2):
    """WindowRows inside the pool's uint8 rows buf [N, H, row_bytes] (viewed flat as ``dtype``),
    pages of ``page`` slots."""
    h, rb = buf.shape[1], buf.shape[2]
    return WindowRows(buf.view(-1).view(dtype), h, d, page * h * rb // dtype.itemsize, log2)


def pool_buffers(row_sets, win_page, end_page):
    """Each of the uint8 row sets [n, H, row_bytes] grown to end_page pages of win_page slots,
    the new rows 0xFF bytes (NaN in every window dtype: a stray window read shows)."""
    bufs = []
    for rows in row_sets:
        buf = torch.full((end_page * win_page, *rows.shape[1:]), 0xFF, dtype=torch.uint8)
        buf[: rows.shape[0]] = rows
        bufs.append(buf)
    return bufs


def make_cache(lens_i, lens_w, hkv, d, page, win_dtype, seed, idx_dtype=torch.int32, dev=DEV, bits=(2, 2),
               win_page=None):
    """Random rotated K/V quantized into storage rows (K clip 0.96, V 0.92) of ``bits`` = (key, value)
    code widths, and windows. Returns the key layout; ``cache["v_layout"]`` is the value rows'.
    ``win_page``: the window rows live in pages of that many slots appended to the row buffers
    (``pool_window``), else in dense [M, Hkv, D] tensors."""
    gen = torch.Generator().manual_seed(seed)
    layout, v_layout = RowLayout(d, bits=bits[0]), RowLayout(d, bits=bits[1])
    i_ptr, i_idx, n = paged_indices(lens_i, page, gen)
    w_ptr, w_idx, m = paged_indices(lens_w, 1, gen)
    chan = 1 + 2 * torch.rand(d, generator=gen)
    k_rows = quantize_rows(torch.randn(n, hkv, d, generator=gen) * chan, layout, 0.96)
    v_rows = quantize_rows(torch.randn(n, hkv, d, generator=gen) + 0.5, v_layout, 0.92)
    k_win = (torch.randn(m, hkv, d, generator=gen) * chan).to(win_dtype)
    v_win = (torch.randn(m, hkv, d, generator=gen) + 0.5).to(win_dtype)
    if win_page is None:
        wins = WindowRows.dense(k_win.to(dev)), WindowRows.dense(v_win.to(dev))
    else:
        g = window_page_rows(win_page, (layout.row_bytes, v_layout.row_bytes), d, win_dtype)
        assert g > 1 and g & (g - 1), f"{g} window rows per page: pick a page that leaves unused id slots"
        ids, log2, end = paged_window_ids(m, g, -(-n // win_page), gen)
        k_rows, v_rows = (b.to(dev) for b in pool_buffers((k_rows, v_rows), win_page, end))
        wins = tuple(pool_window(buf, d, win_dtype, win_page, log2) for buf in (k_rows, v_rows))
        wins[0].scatter(ids, k_win.to(dev))
        wins[1].scatter(ids, v_win.to(dev))
        w_idx = ids[w_idx]
    cache = dict(k_rows=k_rows, v_rows=v_rows, packed_indptr=i_ptr.to(idx_dtype), packed_indices=i_idx.to(idx_dtype),
                 win_indptr=w_ptr.to(idx_dtype), win_indices=w_idx.long())
    cache = {k: v.to(dev) for k, v in cache.items()}
    return {**cache, "k_win": wins[0], "v_win": wins[1], "v_layout": v_layout}, layout, gen


def run_decode(impl, q, cache, layout, **kw):
    c = cache
    return impl.decode_attention(q, k_rows=c["k_rows"], v_rows=c["v_rows"], packed_indptr=c["packed_indptr"],
        packed_indices=c["packed_indices"], k_win=c["k_win"],
                                 v_win=c["v_win"], win_indptr=c["win_indptr"], win_indices=c["win_indices"],
                                 sm_scale=q.shape[-1] ** -0.5, layout=layout,
                                 v_layout=c["v_layout"], **kw)


def tolerance(dtype):
    return {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]


def check_decode(d, hkv, group, lens_i, lens_w, page, dtype, splits, seed=0, config=decode.DecodeConfig(),
                 bits=(2, 2), win_page=None):
    cache, layout, gen = make_cache(lens_i, lens_w, hkv, d, page, dtype, seed, bits=bits, win_page=win_page)
    q = (torch.randn(len(lens_i), hkv * group, d, generator=gen) * 0.7).to(dtype).to(DEV)
    out, lse = run_decode(decode, q, cache, layout, num_splits=splits, config=config)
    ref, ref_lse = run_decode(reference, q, cache, layout)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = tolerance(dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=1e-3)


CPU_CASES = [  # d, hkv, group, lens_i, lens_w, page, dtype, num_splits, (key bits, value bits)
    (64, 2, 1, [1, 7], [0, 3], 1, torch.float16, 2, (2, 2)),
    (64, 1, 3, [97, 0, 20], [7, 5, 0], 16, torch.float16, 3, (2, 2)),  # empty INT2 / empty window
    (128, 2, 4, [130, 33], [5, 64], 16, torch.float32, 4, (2, 2)),
    (64, 1, 8, [200], [20], 8, torch.float16, None, (2, 2)),  # planner picks splits
    (128, 1, 4, [1, 97], [7, 0], 16, torch.float16, 2, (2, 2)),
    # 3/4-bit rows; K and V of different widths have different row bytes (strides)
    (128, 1, 4, [70, 9], [3, 0], 16, torch.float16, 2, (3, 2)),
    (64, 2, 3, [40, 5], [0, 4], 8, torch.float16, 2, (4, 2)),
    (64, 1, 2, [33, 60], [5, 2], 1, torch.float32, 3, (2, 4)),
    (128, 1, 3, [50], [6], 16, torch.float32, 2, (4, 4)),  # equal widths: one row stride
    (64, 1, 4, [45, 8], [2, 3], 16, torch.float16, 2, (3, 4)),
]


@pytest.mark.parametrize("d,hkv,group,lens_i,lens_w,page,dtype,splits,bits", CPU_CASES)
def test_decode_matches_reference(d, hkv, group, lens_i, lens_w, page, dtype, splits, bits):
    check_decode(d, hkv, group, lens_i, lens_w, page, dtype, splits, bits=bits)


PAGED_CASES = [  # d, hkv, group, lens_i, lens_w, dtype, splits, bits, window page (rows per page: 10, 9, 5)
    (64, 2, 3, [40, 9], [13, 30], torch.float16, 3, (2, 2), 64),
    (128, 2, 2, [33, 0], [20, 7], torch.float32, 2, (3, 2), 128),
    (64, 1, 4, [17], [41], torch.float32, 2, (2, 4), 64),
]


@pytest.mark.parametrize("d,hkv,group,lens_i,lens_w,dtype,splits,bits,win_page", PAGED_CASES)
def test_decode_paged_window_matches_reference(d, hkv, group, lens_i, lens_w, dtype, splits, bits, win_page):
    """Window rows inside pages of the K and V row buffers (different page strides), row ids
    spread over several pages with unused id slots; small window blocks: many window steps."""
    check_decode(d, hkv, group, lens_i, lens_w, 8, dtype, splits, seed=d + win_page, bits=bits, win_page=win_page,
                 config=decode.DecodeConfig(block_n=16, block_w=16))


@pytest.mark.parametrize("bits", [(2, 2), (3, 2), (4, 4)])
def test_decode_small_blocks_many_steps(bits):
    """16-row blocks: many loop steps per split (the unmasked full blocks, then the masked last
    one), split edges inside pages and blocks."""
    small = decode.DecodeConfig(block_n=16, block_w=16)
    check_decode(64, 1, 3, [150, 33], [40, 17], 8, torch.float16, 3, seed=9, config=small, bits=bits)


@pytest.mark.parametrize("d,bits", [(128, (3, 2)), (64, (2, 2))])
def test_decode_bf16_queries_on_quantized_rows(d, bits):
    """bf16 queries are rounded to fp16 for the code dots (tiles._load_q_codes). Checked on CPU
    without window rows: only the dense blocks use bf16 tl.dot, which the interpreter gets wrong."""
    check_decode(d, 1, 4, [150, 40], [0, 0], 16, torch.bfloat16, 2, seed=d, bits=bits)


def test_decode_empty_request_and_out_buffer():
    cache, layout, gen = make_cache([0, 9], [0, 2], 1, 64, 1, torch.float16, seed=1, idx_dtype=torch.int64)
    q = torch.randn(2, 2, 64, generator=gen).half().to(DEV)
    buf = torch.full_like(q, 7.0)
    out, lse = run_decode(decode, q, cache, layout, out=buf, num_splits=2)
    assert out.data_ptr() == buf.data_ptr()
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    ref, ref_lse = run_decode(reference, q, cache, layout)
    torch.testing.assert_close(out[1].float(), ref[1].float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse[1], ref_lse[1], atol=1e-3, rtol=1e-3)


def test_decode_split_merge_is_split_invariant():
    """More splits than blocks (empty splits) must not change the result."""
    cache, layout, gen = make_cache([70], [9], 1, 64, 16, torch.float16, seed=2)
    q = torch.randn(1, 1, 64, generator=gen).half().to(DEV)
    a, la = run_decode(decode, q, cache, layout, num_splits=1)
    for splits in (5, 19):  # 19: the merge takes three steps of MERGE_BLOCK_S, most of them empty splits
        b, lb = run_decode(decode, q, cache, layout, num_splits=splits)
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)


@triton.jit
def _planes_kernel(r_ptr, o_ptr, p_ptr, BITS2, ROW: tl.constexpr, BN: tl.constexpr, Q: tl.constexpr,
                   BITS: tl.constexpr):
    """Writes tiles._load_rows of BN storage rows of ROW bytes: the planes as fp32 [BN, 4 planes, Q]
    (in the unpacked column order) and (scale, minimum) as fp32 [BN, 2]."""
    rows = tl.arange(0, BN)
    p0, p1, p2, p3, s, m = tiles._load_rows(r_ptr, rows * ROW, rows < BN, BITS2, Q, BITS)
    o = o_ptr + rows[:, None] * 4 * Q + tl.arange(0, Q)[None, :]
    tl.store(o, p0.to(tl.float32))
    tl.store(o + Q, p1.to(tl.float32))
    tl.store(o + 2 * Q, p2.to(tl.float32))
    tl.store(o + 3 * Q, p3.to(tl.float32))
    tl.store(p_ptr + 2 * rows, s)
    tl.store(p_ptr + 2 * rows + 1, m)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_code_planes_are_base_plus_code(bits):
    """The mask-only unpack of every code width, exactly: plane p's codes as the fp16 numbers
    B_p + c (B_p = 1024 / 4^p) in ``tiles.plane_order``, and the scale/minimum pair after the codes."""
    gen = torch.Generator().manual_seed(5 + bits)
    layout = RowLayout(128, bits=bits)
    codes = torch.randint(0, layout.top + 1, (16, 128), dtype=torch.uint8, generator=gen)
    params = (torch.randn(16, 2, generator=gen) * 3).half()
    rows = torch.cat([pack_codes(codes, bits), params.view(torch.uint8)], dim=-1).to(DEV)
    assert rows.shape[-1] == layout.row_bytes
    out = torch.empty(16, 128, device=DEV)
    got = torch.empty(16, 2, device=DEV)
    _planes_kernel[(1,)](rows, out, got, tiles.code_bits2(), ROW=layout.row_bytes, BN=16, Q=32, BITS=bits)
    order = tiles.plane_order(32)
    want = torch.cat([codes[:, 32 * p:32 * (p + 1)][:, order].float() + 1024.0 / 4 ** p for p in range(4)], dim=1)
    assert torch.equal(out.cpu(), want)
    assert torch.equal(got.cpu(), params.float())


def test_plan_num_splits():
    assert decode.plan_num_splits(1, 8, 65536, 132) == 132  # fill 8 x 132 SMs
    assert decode.plan_num_splits(64, 8, 65536, 132) == 3
    assert decode.plan_num_splits(1, 8, 100, 132) == 1  # short: never below min_split_tokens
    assert decode.plan_num_splits(0, 8, 0, 132) == 1


def test_decode_rejects_unsupported():
    cache, layout, gen = make_cache([3], [1], 1, 64, 1, torch.float16, seed=3)
    q = torch.randn(1, 3, 64).half().to(DEV)
    with pytest.raises(ValueError, match="group_size"):
        run_decode(decode, q[:, :1], cache, RowLayout(64, 16))
    q2 = torch.randn(1, 2, 64).half().to(DEV)
    cache2 = dict(cache, k_rows=cache["k_rows"][:, :, :-2])
    with pytest.raises(ValueError, match="k_rows"):
        run_decode(decode, q2, cache2, layout)
    with pytest.raises(TypeError, match="k_win must be a WindowRows"):
        run_decode(decode, q2, dict(cache, k_win=cache["k_win"].data), layout)
    with pytest.raises(ValueError, match="v_win must have 1 heads x 64 head_dim"):
        run_decode(decode, q2, dict(cache, v_win=WindowRows.dense(cache["v_win"].data.view(-1, 2, 32))), layout)
    paged = WindowRows(cache["v_win"].data, 1, 64, 128, log2_rows=1)
    with pytest.raises(ValueError, match="same log2_rows"):
        run_decode(decode, q2, dict(cache, v_win=paged), layout)


def test_ops_decode_cpu_is_reference():
    cache, layout, gen = make_cache([5, 2], [3, 0], 2, 64, 1, torch.float32, seed=4, dev="cpu")
    q = torch.randn(2, 4, 64, generator=gen)
    a, la = run_decode(ops, q, cache, layout)
    b, lb = run_decode(reference, q, cache, layout)
    assert torch.equal(a, b) and torch.equal(la, lb)


GPU_LENS = ([1, 4097, 0, 97, 33000], [64 + 256, 0, 7, 320, 320])


@pytest.mark.gpu
@pytest.mark.parametrize("d,group,dtype,page,splits", list(itertools.product(
    [64, 128], [1, 3, 4, 8], [torch.float16, torch.bfloat16], [1, 16], [None, 7])))
def test_decode_gpu_matrix(d, group, dtype, page, splits):
    require_gpu()
    check_decode(d, 2, group, *GPU_LENS, page, dtype, splits, seed=d + group)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(3, 2), (4, 2), (2, 3), (4, 4)])
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float16)])
def test_decode_gpu_bit_widths(d, dtype, bits):
    require_gpu()
    check_decode(d, 2, 4, *GPU_LENS, 16, dtype, None, seed=d + bits[0], bits=bits)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [(2, 2), (3, 2)])
def test_decode_gpu_paged_window(bits):
    """Window rows in pages of 64 slots of the row buffers (9 bf16 rows of 8 x 128 per page)."""
    require_gpu()
    check_decode(128, 8, 4, *GPU_LENS, 16, torch.bfloat16, None, seed=bits[0], bits=bits, win_page=64)


@pytest.mark.gpu
def test_decode_gpu_large_batch():
    require_gpu()
    check_decode(128, 8, 4, [4096 + i for i in range(64)], [320] * 64, 16, torch.bfloat16, None)


@pytest.mark.gpu
def test_kernels_launch_without_host_syncs():
    """Zero host syncs in the kernel launchers (decode with a fixed split count,
    extend with max_q_len given, the write): torch raises on any synchronizing call."""
    require_gpu()
    from oscar_sglang.kernels import extend, write

    cache, layout, gen = make_cache([300, 40], [20, 7], 2, 128, 16, torch.bfloat16, seed=11, win_page=64)
    q = torch.randn(2, 8, 128, generator=gen).bfloat16().to(DEV)
    c = cache
    x = torch.randn(2, 2, 128, generator=gen).bfloat16().to(DEV)
    rot = torch.eye(128, device=DEV).expand(2, 128, 128).contiguous()
    slots = torch.tensor([0, 1], device=DEV)
    qo = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV)
    prefix = (c["packed_indptr"].diff() + c["win_indptr"].diff()).to(torch.int32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_decode(decode, q, cache, layout, num_splits=4)
        extend.extend_attention(q, k_new=x, v_new=x, qo_indptr=qo, k_rows=c["k_rows"], v_rows=c["v_rows"],
            packed_indptr=c["packed_indptr"], packed_indices=c["packed_indices"],
                                k_win=c["k_win"], v_win=c["v_win"], win_indptr=c["win_indptr"],
                                win_indices=c["win_indices"], prefix_lens=prefix,
                                rule=PositionRule(sink=4, block=16),
                                sm_scale=128 ** -0.5, layout=layout, max_q_len=1, num_splits=3)
        wslots = c["win_indices"][:2]
        write.quantize_kv_write(x, rotation=rot, clip_ratio=0.96, layout=layout, rows_out=c["k_rows"], slots=slots,
            window_out=c["k_win"], window_slots=wslots)
        write.quantize_kv_write(x, rotation=None, clip_ratio=0.92, layout=layout, rows_out=c["v_rows"], slots=slots)
        write.write_step(x, x, rot_k=rot, rot_v=None, clip_k=0.96, clip_v=0.92, k_layout=layout, v_layout=layout,
            k_rows=c["k_rows"], v_rows=c["v_rows"], slots=slots,
                         k_win=c["k_win"], v_win=c["v_win"], window_slots=wslots,
                         q=q)  # the backend's one launch per layer
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_decode_step_captures_and_replays_in_a_cuda_graph():
    """A decode step's kernels as the backend launches them (k, v and the query rotation in one
    write_step, then attention with a fixed split count) under torch.cuda.graph: replaying on new
    inputs in the same buffers equals eager execution."""
    require_gpu()
    from oscar_sglang.kernels import write

    cache, layout, gen = make_cache([300, 40], [20, 7], 2, 128, 16, torch.bfloat16, seed=12)
    c = cache
    q = torch.randn(2, 8, 128, generator=gen).bfloat16().to(DEV)
    x = torch.randn(2, 2, 128, generator=gen).bfloat16().to(DEV)
    rot = torch.linalg.qr(torch.randn(2, 128, 128, generator=gen))[0].contiguous().to(DEV)
    slots = c["packed_indices"][:2].long()
    out, qr = torch.empty_like(q), torch.empty_like(q)

    def step():
        write.write_step(x, x, rot_k=rot, rot_v=None, clip_k=0.96, clip_v=0.92, k_layout=layout, v_layout=layout,
            k_rows=c["k_rows"], v_rows=c["v_rows"], slots=slots, q=q, q_out=qr)
        run_decode(decode, qr, cache, layout, out=out, num_splits=4)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles every kernel outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    q.copy_(torch.randn(q.shape, generator=gen).bfloat16())
    x.copy_(torch.randn(x.shape, generator=gen).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    replayed = out.clone()
    step()  # eager on the same inputs (the writes are idempotent)
    torch.testing.assert_close(replayed.float(), out.float(), atol=0, rtol=0)
