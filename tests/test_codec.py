"""Reference codec: exact codes, packing layout, clipping, round trip, bytes accounting."""

import pytest
import torch

from oscar_sglang.kernels.codec import (
    CacheLayout,
    RowLayout,
    widths_for,
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
from oscar_sglang.kernels.rule import PositionRule


def test_row_layout_sizes():
    assert RowLayout(128).row_bytes == 36  # 32 code bytes + fp16 scale + fp16 min
    assert RowLayout(64).row_bytes == 20
    assert RowLayout(128, 32).row_bytes == 32 + 4 * 4
    # 3 bits: + a 1-bit plane (D/8 bytes); 4 bits: + a second 2-bit plane (D/4 bytes)
    assert [RowLayout(128, None, b).row_bytes for b in (2, 3, 4)] == [36, 52, 68]
    assert [RowLayout(128, None, b).bits_per_element for b in (2, 3, 4)] == [2.25, 3.25, 4.25]
    assert [RowLayout(64, None, b).bits_per_element for b in (2, 3, 4)] == [2.5, 3.5, 4.5]
    assert widths_for(64) == (2, 3, 4) and widths_for(16) == (2, 4)
    for bad in [(100, None), (128, 48), (128, 256), (128, 2), (128, None, 1), (128, None, 5), (16, None, 3)]:
        with pytest.raises(ValueError):
            RowLayout(*bad)


def test_cache_layout_bits_per_element_counts_real_rows():
    c = CacheLayout.of(128, None, [3, 3], [2, 2])  # keys 3 / values 2: the 2.75-bit default
    assert c.token_row_bytes == 2 * 52 + 2 * 36 and c.bits_per_element == 2.75
    assert kv_bytes_per_token(c, kv_heads=8, layers=2) == 8 * c.token_row_bytes
    assert kv_bits_per_element(c, 32768 + 512) == pytest.approx(2.75 + (64 + 512) * 16 / (32768 + 512))
    assert kv_bytes_per_token(CacheLayout.uniform(RowLayout(128), 2), 8, 2) == kv_bytes_per_token(RowLayout(128), 8, 2)
    with pytest.raises(ValueError, match="2 key bit widths but 1 value"):
        CacheLayout.of(128, None, [3, 3], [2])


@pytest.mark.parametrize("bits", [3, 4])
def test_high_plane_layout(bits):
    """The low 2 bits stay in the 2-bit plane; the high bits follow the module docstring."""
    d = 32
    codes = torch.randint(0, 1 << bits, (d,), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert torch.equal(packed[: d // 4], pack_codes(codes & 3))
    hi = (codes >> 2).int()
    for k in range(d // 8 if bits == 3 else d // 4):
        if bits == 3:  # byte k: element 2k + p*D/4 in bit 2p, element 2k + 1 + p*D/4 in bit 2p + 1
            expect = sum(int(hi[2 * k + p * d // 4]) << 2 * p | int(hi[2 * k + 1 + p * d // 4]) << (2 * p + 1)
                         for p in range(4))
        else:  # the 2-bit plane layout again
            expect = sum(int(hi[k + p * d // 4]) << (2 * p) for p in range(4))
        assert int(packed[d // 4 + k]) == expect
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_exact_codes_at_every_width(bits):
    """A ramp 0..top over D values, no clipping: scale 1, minimum 0, code = value."""
    layout = RowLayout(32, None, bits)
    x = torch.arange(32, dtype=torch.float32) % (layout.top + 1)
    x[0], x[1] = 0.0, float(layout.top)
    codes, scale, minimum = split_rows(quantize_rows(x, layout, 1.0), layout)
    assert scale.item() == 1.0 and minimum.item() == 0.0 and torch.equal(codes, x.to(torch.uint8))


def test_more_bits_less_error():
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    err = [float((dequantize_rows(quantize_rows(x, RowLayout(128, None, b), 1.0), RowLayout(128, None, b)) - x)
                 .square().mean()) for b in (2, 3, 4)]
    assert err[0] > 3 * err[1] > 9 * err[2]  # about 4x per bit


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
    # a running sequence keeps its 64 sinks and the part of its current block of 1024 in BF16
    assert kv_bits_per_element(layout, 131072 + 1023) <= 2.39  # a block less one past 128K: the most it holds
    assert kv_bits_per_element(layout, 32768 + 256) == pytest.approx(2.25 + (64 + 256) * 16 / (32768 + 256))
    assert kv_bits_per_element(layout, 100) == pytest.approx(2.25 + 16)  # all of it in the first block
    assert kv_bits_per_element(layout, 100, PositionRule(sink=4, block=32)) == pytest.approx(2.25 + (4 + 4) * 16 / 100)
    assert kv_bytes_per_token(layout, kv_heads=8, layers=36) == 2 * 36 * 8 * 36
