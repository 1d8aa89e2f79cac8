"""Fused quantize-on-write kernel vs the reference: bit-exact codes/scales of 2-, 3- and 4-bit
rows given the same rotated rows (identity and signed-permutation rotations are exact in any precision),
dequantized values within tolerance under a real rotation, padding slots, windows (dense, or
in pages of the quantized rows' own uint8 buffer as the pool keeps them), non-finite inputs.
CPU runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

import os

import pytest
import torch
from test_kernels_decode import paged_window_ids, pool_window, window_page_rows

from oscar_sglang.kernels import ops, reference, write
from oscar_sglang.kernels.codec import RowLayout, dequantize_rows, split_rows
from oscar_sglang.kernels.window import WindowRows

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def require_gpu():
    if DEV != "cuda":
        pytest.skip("needs CUDA with TRITON_INTERPRET=0 (benchmarks/gpu_check.sh)")


def signed_permutation(d, heads, gen):
    """Exactly representable rotations: x @ R is exact in any precision, so codes must match."""
    mats = []
    for _ in range(max(heads, 1)):
        r = torch.zeros(d, d)
        r[torch.arange(d), torch.randperm(d, generator=gen)] = 1.0
        mats.append(r * torch.where(torch.rand(d, 1, generator=gen) < 0.5, -1.0, 1.0))
    return torch.stack(mats) if heads else mats[0]


def random_orthogonal(d, gen):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def make_inputs(t, h, d, dtype, seed, n_rows=None, n_win=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, d, generator=gen) * (1 + 4 * torch.rand(d, generator=gen))  # uneven channels
    n_rows = n_rows or t + 5
    slots = torch.randperm(n_rows, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.15] = -1  # CUDA-graph style padding
    n_win = n_win or t + 3
    wslots = torch.randperm(n_win, generator=gen)[:t]
    wslots[torch.rand(t, generator=gen) < 0.5] = -1
    return x.to(dtype), slots, wslots, gen


def run_both(x, rot, ratio, layout, slots, wslots, n_rows, n_win, win_dtype, dev):
    h = x.shape[1]
    outs = []
    for impl in (write, reference):
        rows = torch.full((n_rows, h, layout.row_bytes), 0xAB, dtype=torch.uint8, device=dev)
        win = torch.full((n_win, h, layout.head_dim), -7.0, dtype=win_dtype, device=dev)
        r = None if rot is None else rot.to(dev)
        impl.quantize_kv_write(x.to(dev), rotation=r, clip_ratio=ratio, layout=layout, rows_out=rows,
            slots=slots.to(dev), window_out=WindowRows.dense(win),
                               window_slots=wslots.to(dev))
        outs.append((rows.cpu(), win.cpu()))
    return outs


CPU_CASES = [  # t, h, d, dtype, clip ratio, per-head rotation, slot dtype
    (1, 1, 64, torch.float16, 0.96, False, torch.int64),
    (7, 2, 64, torch.float32, 0.92, True, torch.int32),
    (97, 2, 128, torch.float16, 0.96, True, torch.int64),
    (33, 1, 128, torch.float16, 1.0, False, torch.int64),
    (5, 1, 32, torch.float16, 0.92, False, torch.int64),
    (6, 2, 16, torch.float16, 0.96, True, torch.int32),  # D=16: quarter-planes padded to 16 columns
    (19, 2, 128, torch.bfloat16, 0.92, True, torch.int32),  # V clip: 11 rank passes over 4 planes
]


BIT_CASES = [(*case, bits) for case in CPU_CASES for bits in (2, 3, 4) if bits != 3 or case[2] % 32 == 0]


@pytest.mark.parametrize("t,h,d,dtype,ratio,per_head,idx_dtype,bits", BIT_CASES)
def test_write_bit_exact(t, h, d, dtype, ratio, per_head, idx_dtype, bits):
    x, slots, wslots, gen = make_inputs(t, h, d, dtype, seed=t * 31 + d)
    rot = signed_permutation(d, h if per_head else 0, gen)
    layout = RowLayout(d, bits=bits)
    (rk, wk), (rr, wr) = run_both(x, rot, ratio, layout, slots.to(idx_dtype), wslots.to(idx_dtype),
                                  t + 5, t + 3, torch.float16, DEV)
    assert torch.equal(rk, rr), f"{(rk != rr).sum()} bytes differ"
    assert torch.equal(wk, wr)
    untouched = torch.ones(t + 5, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert (rk[untouched] == 0xAB).all(), "padding slot or unused row was written"


PAGED_CASES = [  # t, h, d, window dtype, bits, page (window rows per page: 10, 13, 5)
    (23, 2, 64, torch.float16, 2, 64),
    (17, 1, 128, torch.float32, 3, 128),
    (9, 2, 32, torch.float16, 4, 16),
]


@pytest.mark.parametrize("t,h,d,win_dtype,bits,page", PAGED_CASES)
def test_write_paged_window_bit_exact(t, h, d, win_dtype, bits, page):
    """The window copies in pages of the quantized rows' own uint8 buffer (as the pool keeps
    them): quantized rows in the first pages, window rows in later ones at ids spread over
    pages with unused id slots, both with padding (-1); the whole buffer bit-exact against the
    reference, and the window rows read back as the rotated rows."""
    x, _, _, gen = make_inputs(t, h, d, torch.float16, seed=t + d)
    layout = RowLayout(d, bits=bits)
    rot = signed_permutation(d, h, gen)
    g = window_page_rows(page, (layout.row_bytes,), d, win_dtype)
    assert g > 1 and g & (g - 1)
    row_pages = -(-(t + 5) // page)
    slots = torch.randperm(row_pages * page, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.15] = -1
    wslots, log2, end = paged_window_ids(t, g, row_pages, gen)
    wslots[torch.rand(t, generator=gen) < 0.3] = -1
    bufs = []
    for impl in (write, reference):
        buf = torch.full((end * page, h, layout.row_bytes), 0xAB, dtype=torch.uint8, device=DEV)
        win = pool_window(buf, d, win_dtype, page, log2)
        impl.quantize_kv_write(x.to(DEV), rotation=rot.to(DEV), clip_ratio=0.96, layout=layout, rows_out=buf,
            slots=slots.to(DEV), window_out=win, window_slots=wslots.to(DEV))
        bufs.append(buf.cpu())
    assert torch.equal(bufs[0], bufs[1]), f"{(bufs[0] != bufs[1]).sum()} bytes differ"
    keep = wslots >= 0
    got = pool_window(bufs[0], d, win_dtype, page, log2).gather(wslots[keep])
    assert torch.equal(got, reference.rotated_rows(x, rot)[keep].to(win_dtype))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_write_nonfinite_rows_match_reference(bits):
    t, h, d = 9, 2, 64
    layout = RowLayout(d, bits=bits)
    x, slots, wslots, gen = make_inputs(t, h, d, torch.float16, seed=3)
    x[1, 0, 5] = float("inf")
    x[2, 1, :] = float("nan")
    x[3, 0, 7] = -float("inf")
    slots = torch.arange(t)
    (rk, wk), (rr, wr) = run_both(x, torch.eye(d), 0.96, layout, slots, wslots, t, t + 3, torch.float16, DEV)
    assert torch.equal(rk, rr)
    assert torch.equal(wk, wr)
    assert torch.isfinite(dequantize_rows(rk, layout)).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_write_without_rotation(d, bits):
    """rotation=None (R_V folded: values arrive rotated): no dot, the same bytes as the reference
    and as an identity rotation, non-finite values sanitized."""
    t, h = 11, 2
    layout = RowLayout(d, bits=bits)
    x, slots, wslots, gen = make_inputs(t, h, d, torch.float16, seed=d)
    x[2, 1, 3] = float("inf")
    x[4, 0, :] = float("nan")
    (rn, wn), (rr, wr) = run_both(x, None, 0.92, layout, slots, wslots, t + 5, t + 3, torch.float16, DEV)
    (re, we), _ = run_both(x, torch.eye(d), 0.92, layout, slots, wslots, t + 5, t + 3, torch.float16, DEV)
    assert torch.equal(rn, rr) and torch.equal(wn, wr)
    assert torch.equal(rn, re) and torch.equal(wn, we)


def test_write_clip_rank_ties_across_planes():
    """Few distinct |values|, repeated in every quarter-plane: the clip threshold's rank
    count must combine the four planes (ties counted) exactly like sort(|x|)."""
    t, h, d = 12, 1, 128
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-3, 4, (t, h, d), generator=gen).to(torch.float16) * 0.5
    x[0, 0] = 0.0  # all-zero row: scale 0, codes 0
    x[1, 0, ::32] = 40.0  # one outlier per plane, exactly at the 0.96 rank boundary
    for ratio in (0.96, 0.92, 1.0):
        rot = signed_permutation(d, 0, gen)
        (rk, wk), (rr, wr) = run_both(x, rot, ratio, RowLayout(d), torch.arange(t), torch.arange(t),
                                      t, t, torch.float16, DEV)
        assert torch.equal(rk, rr), f"ratio {ratio}: {(rk != rr).sum()} bytes differ"
        assert torch.equal(wk, wr)


def check_rotated_close(rk, rr, wk, wr, layout, win_dtype):
    """Real rotation: the kernel's fp32 rotation may differ from torch's in the last bit,
    so a code can flip at a rounding boundary; values must agree to one quantization step."""
    ck, sk, mk = split_rows(rk, layout)
    cr, sr, mr = split_rows(rr, layout)
    torch.testing.assert_close(sk.float(), sr.float(), rtol=2e-3, atol=1e-4)
    torch.testing.assert_close(mk.float(), mr.float(), rtol=2e-3, atol=1e-4)
    assert (ck != cr).float().mean() < 0.01
    diff = (dequantize_rows(rk, layout) - dequantize_rows(rr, layout)).abs()
    assert (diff <= sr.float() * 1.01 + 1e-3).all()
    tol = 2e-2 if win_dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(wk.float(), wr.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("d,bits", [(64, 2), (128, 2), (64, 4), (128, 3)])
def test_write_real_rotation_close(d, bits):
    t, h = 40, 2
    x, _, wslots, gen = make_inputs(t, h, d, torch.float16, seed=11)
    rot = torch.stack([random_orthogonal(d, gen) for _ in range(h)])
    layout = RowLayout(d, bits=bits)
    (rk, wk), (rr, wr) = run_both(x, rot, 0.92, layout, torch.arange(t), wslots, t, t + 3, torch.float16, DEV)
    check_rotated_close(rk, rr, wk, wr, layout, torch.float16)


WRITE_STEP_CASES = [  # d, KV heads, group, (key bits, value bits), values folded, per-head rotations, window page
    (64, 2, 3, (3, 2), True, True, None),
    (128, 1, 4, (2, 2), False, False, None),
    (32, 2, 2, (4, 3), False, True, None),
    (64, 2, 3, (3, 2), True, True, 64),  # windows in pages of the K and V row buffers: 10 rows per page
    (128, 2, 2, (2, 3), False, True, 64),  # 9 rows per page
]


@pytest.mark.parametrize("d,h,group,bits,fold_v,per_head,win_page", WRITE_STEP_CASES)
def test_write_step_is_the_separate_writes(d, h, group, bits, fold_v, per_head, win_page):
    """One launch for a layer's k, v and queries: rows and windows bit-exact against the
    reference's two writes and its query rotation (signed-permutation rotations are exact in
    any precision, fp16 queries too). ``win_page``: the K and V windows live in pages of the
    K and V row buffers (different page strides), after the quantized rows' pages."""
    t = 21
    k, slots, wslots, gen = make_inputs(t, h, d, torch.float16, seed=d + h)
    v = (torch.randn(t, h, d, generator=gen) * 2).half()
    q = torch.randn(t, h * group, d, generator=gen).half()
    rot_k = signed_permutation(d, h if per_head else 0, gen)
    rot_v = None if fold_v else signed_permutation(d, h if per_head else 0, gen)
    layouts = RowLayout(d, bits=bits[0]), RowLayout(d, bits=bits[1])
    n_rows = t + 5
    if win_page is not None:  # window row ids in the pages after the quantized rows'
        g = window_page_rows(win_page, [lay.row_bytes for lay in layouts], d, torch.float16)
        assert g > 1 and g & (g - 1)
        ids, log2, end = paged_window_ids(t + 3, g, -(-n_rows // win_page), gen)
        wslots = torch.where(wslots >= 0, ids[wslots.clamp(min=0)], -1)
        n_rows = end * win_page
    outs = []
    for impl in (write, reference):
        bufs = [torch.full((n_rows, h, lay.row_bytes), 0xAB, dtype=torch.uint8, device=DEV) for lay in layouts]
        if win_page is None:
            wins = [torch.full((t + 3, h, d), -7.0, dtype=torch.float16, device=DEV) for _ in range(2)]
            win_rows = [WindowRows.dense(w) for w in wins]
        else:
            wins, win_rows = [], [pool_window(buf, d, torch.float16, win_page, log2) for buf in bufs]
        qo = impl.write_step(k.to(DEV), v.to(DEV), rot_k=rot_k.to(DEV), rot_v=None if rot_v is None else rot_v.to(DEV),
                             clip_k=0.96, clip_v=0.92, k_layout=layouts[0], v_layout=layouts[1], k_rows=bufs[0],
                             v_rows=bufs[1], slots=slots.to(DEV), k_win=win_rows[0], v_win=win_rows[1],
                             window_slots=wslots.to(DEV), q=q.to(DEV))
        outs.append([x.cpu() for x in (*bufs, *wins, qo)])
    for got, want in zip(*outs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("per_head", [False, True])
def test_rotate_queries_close(per_head):
    """Queries alone (no k/v part in the launch) under a real rotation, against the fp32 reference."""
    gen = torch.Generator().manual_seed(3)
    d, h, group = 64, 2, 3
    q = torch.randn(9, h * group, d, generator=gen)
    rot = torch.stack([random_orthogonal(d, gen) for _ in range(h)]) if per_head else random_orthogonal(d, gen)
    got = write.rotate_queries(q.to(DEV), rot.contiguous().to(DEV)).cpu()
    assert got.dtype == q.dtype
    torch.testing.assert_close(got, reference.rotate_queries(q, rot), atol=1e-5, rtol=1e-5)


def test_write_rejects_unsupported_layouts():
    x = torch.zeros(2, 1, 64, dtype=torch.float16)
    rows = torch.zeros(2, 1, RowLayout(64, 32).row_bytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group_size"):
        write.quantize_kv_write(x, rotation=torch.eye(64), clip_ratio=0.96, layout=RowLayout(64, 32), rows_out=rows,
            slots=torch.arange(2))
    with pytest.raises(ValueError, match="head_dim"):
        write.quantize_kv_write(torch.zeros(1, 1, 256), rotation=torch.eye(256), clip_ratio=0.96, layout=RowLayout(256),
                                rows_out=torch.zeros(1, 1, RowLayout(256).row_bytes, dtype=torch.uint8),
                                    slots=torch.arange(1))
    with pytest.raises(ValueError, match="rotation"):
        write.quantize_kv_write(x, rotation=torch.eye(64).double(), clip_ratio=0.96, layout=RowLayout(64),
            rows_out=torch.zeros(2, 1, 20, dtype=torch.uint8),
                                slots=torch.arange(2))
    rows = torch.zeros(2, 1, RowLayout(64).row_bytes, dtype=torch.uint8)
    with pytest.raises(TypeError, match="k window must be a WindowRows"):
        write.quantize_kv_write(x, rotation=torch.eye(64), clip_ratio=0.96, layout=RowLayout(64), rows_out=rows,
            slots=torch.arange(2), window_out=torch.zeros(2, 1, 64),
                                window_slots=torch.arange(2))
    with pytest.raises(ValueError, match="fp16, bf16 or fp32"):
        write.quantize_kv_write(x, rotation=torch.eye(64), clip_ratio=0.96, layout=RowLayout(64), rows_out=rows,
            slots=torch.arange(2),
                                window_out=WindowRows.dense(torch.zeros(2, 1, 64, dtype=torch.float64)),
                                    window_slots=torch.arange(2))
    paged = WindowRows(torch.zeros(256), 1, 64, 128, log2_rows=1)
    with pytest.raises(ValueError, match="same log2_rows"):
        write.write_step(x, x, rot_k=torch.eye(64), rot_v=None, clip_k=0.96, clip_v=0.92, k_layout=RowLayout(64),
            v_layout=RowLayout(64), k_rows=rows, v_rows=rows.clone(),
                         slots=torch.arange(2), k_win=WindowRows.dense(torch.zeros(2, 1, 64)), v_win=paged,
                             window_slots=torch.arange(2))


def test_ops_dispatch_cpu_uses_reference_and_sub_row_groups():
    t, h, d = 5, 1, 64
    x, slots, _, _ = make_inputs(t, h, d, torch.float32, seed=5)
    layout = RowLayout(d, 16)
    a = torch.zeros(t + 5, h, layout.row_bytes, dtype=torch.uint8)
    b = a.clone()
    ops.quantize_kv_write(x, rotation=torch.eye(d), clip_ratio=0.96, layout=layout, rows_out=a, slots=slots)
    reference.quantize_kv_write(x, rotation=torch.eye(d), clip_ratio=0.96, layout=layout, rows_out=b, slots=slots)
    assert torch.equal(a, b)
    assert ops.triton_supports(RowLayout(128)) and not ops.triton_supports(layout)
    assert not ops.triton_supports(RowLayout(32)) and ops.triton_supports(RowLayout(32), attention=False)
    assert ops.triton_supports(RowLayout(256)) and not ops.triton_supports(RowLayout(256), attention=False)
    for bits in (3, 4):
        assert ops.triton_supports(RowLayout(128, bits=bits)) and ops.triton_supports(RowLayout(32, bits=bits), False)
        assert not ops.triton_supports(RowLayout(64, 16, bits=bits))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 97, 4099])
def test_write_gpu_matrix(d, dtype, t):
    check_write_gpu(d, dtype, t, bits=2)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("d", [32, 128])
def test_write_gpu_bit_widths(d, bits):
    check_write_gpu(d, torch.bfloat16, 4099, bits)


def check_write_gpu(d, dtype, t, bits):
    """Bit-exact under signed permutations, close under a real rotation (dense slots), both clips."""
    require_gpu()
    h = 8
    x, slots, wslots, gen = make_inputs(t, h, d, dtype, seed=d + t)
    layout = RowLayout(d, bits=bits)
    for ratio in (0.96, 0.92):
        rot = signed_permutation(d, h, gen)
        (rk, wk), (rr, wr) = run_both(x, rot, ratio, layout, slots, wslots, t + 5, t + 3, dtype, DEV)
        assert torch.equal(rk, rr) and torch.equal(wk, wr)
        rot = random_orthogonal(d, gen)
        dense = torch.randperm(t + 5, generator=gen)[:t]
        (rk, wk), (rr, wr) = run_both(x, rot, ratio, layout, dense, wslots, t + 5, t + 3, dtype, DEV)
        check_rotated_close(rk, rr, wk, wr, layout, dtype)
