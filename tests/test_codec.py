"""Reference codec: exact codes, packing layout, clipping, round trip, bytes accounting."""

import pytest
import torch

from oscar_sglang.kernels.codec import (
    RowLayout,
    clip_index,
    clip_rows,
    dequantize_rows,
    kv_bits_per_element,
    kv_bytes_per_token,
    pack_codes,
    quantize_rows,
    rotate,
    split_rows,
    unpack_codes,
)


def test_row_layout_sizes():
    assert RowLayout(128).row_bytes == 36  # 32 code bytes + fp16 scale + fp16 min
    assert RowLayout(64).row_bytes == 20
    assert RowLayout(128, 32).row_bytes == 32 + 4 * 4
    for bad in [(100, None), (128, 48), (128, 256), (128, 2)]:
        with pytest.raises(ValueError):
            RowLayout(*bad)


def test_plane_packing_layout():
    d = 16
    codes = torch.tensor([i % 4 for i in range(d)], dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (4,)
    # byte j holds elements j, j+4, j+8, j+12 in bits 0-1, 2-3, 4-5, 6-7
    for j in range(4):
        expect = sum(int(codes[j + 4 * i]) << (2 * i) for i in range(4))
        assert int(packed[j]) == expect
    assert torch.equal(unpack_codes(packed), codes)


def test_exact_codes_constructed_row():
    # values 0..15 ramp, no clipping: min 0, max 15, scale 5 -> codes floor(x/5 + 0.5)
    x = torch.arange(16, dtype=torch.float32)
    layout = RowLayout(16)
    rows = quantize_rows(x, layout, clip_ratio=1.0)
    codes, scale, minimum = split_rows(rows, layout)
    assert scale.item() == 5.0 and minimum.item() == 0.0
    expect = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3], dtype=torch.uint8)
    assert torch.equal(codes, expect)
    assert torch.equal(dequantize_rows(rows, layout), expect.float() * 5.0)


def test_scale_and_min_stored_as_fp16_bytes():
    layout = RowLayout(16)
    x = torch.linspace(-1.5, 3.0, 16)
    rows = quantize_rows(x, layout, 1.0)
    params = rows[layout.code_bytes :].contiguous().view(torch.float16)
    assert params[0].item() == pytest.approx(1.5, abs=1e-3)
    assert params[1].item() == -1.5


def test_constant_row_is_exact():
    layout = RowLayout(32)
    x = torch.full((3, 32), 0.75)
    assert torch.equal(dequantize_rows(quantize_rows(x, layout, 0.9), layout), x)


def test_clip_threshold_index():
    assert clip_index(0.96, 128) == 122
    assert clip_index(0.92, 64) == 58
    assert clip_index(1.0, 64) == 64  # no clipping
    with pytest.raises(ValueError):
        clip_index(0.0, 64)
    x = torch.tensor([1.0, -8.0, 2.0, 3.0, -4.0, 0.5, 0.25, 100.0])
    # ratio 0.75 -> index 6 of sorted |x| = [0.25, 0.5, 1, 2, 3, 4, 8, 100] -> t = 8
    out = clip_rows(x, 0.75)
    assert out.tolist() == [1.0, -8.0, 2.0, 3.0, -4.0, 0.5, 0.25, 8.0]
    assert torch.equal(clip_rows(x, 1.0), x)


@pytest.mark.parametrize("d,group", [(64, None), (128, None), (128, 32)])
def test_round_trip_error_bound(d, group):
    torch.manual_seed(0)
    layout = RowLayout(d, group)
    x = torch.randn(256, 4, d)
    xh = dequantize_rows(quantize_rows(x, layout, 1.0), layout)
    g = x.unflatten(-1, (layout.n_groups, layout.group))
    half_step = ((g.amax(-1) - g.amin(-1)) / 6).repeat_interleave(layout.group, -1)
    # nearest-level rounding: error <= half a step (+ fp16 rounding of scale/min)
    assert ((x - xh).abs() <= half_step * 1.01 + 1e-3).all()
    if group:  # smaller groups quantize more finely
        coarse = RowLayout(d)
        err_coarse = (x - dequantize_rows(quantize_rows(x, coarse, 1.0), coarse)).pow(2).mean()
        assert (x - xh).pow(2).mean() < err_coarse


def test_non_finite_rows_stay_finite():
    layout = RowLayout(16)
    x = torch.randn(4, 16)
    x[0, 3] = float("nan")
    x[1, 0] = float("inf")
    x[2, :] = float("-inf")
    out = dequantize_rows(quantize_rows(x, layout, 0.9), layout)
    assert torch.isfinite(out).all()


def test_rotation_row_vector_convention():
    torch.manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    x = torch.randn(5, 2, 16)
    assert torch.allclose(rotate(x, q.float()), x @ q.float(), atol=1e-6)
    per_head = torch.stack([q, q.T]).float()
    y = rotate(x, per_head)
    assert torch.allclose(y[:, 1], x[:, 1] @ q.T.float(), atol=1e-6)


def test_bits_accounting():
    layout = RowLayout(128)
    base = 8 * 36 / 128
    assert base == 2.25
    assert kv_bits_per_element(layout, 131072) <= 2.30
    assert kv_bits_per_element(layout, 32768) == pytest.approx(2.25 + (320 * 256 * 8) / (32768 * 128))
    assert kv_bits_per_element(layout, 100, sink=64, recent=256) == pytest.approx(2.25 + 16)
    assert kv_bytes_per_token(layout, kv_heads=8, layers=36) == 2 * 36 * 8 * 36
