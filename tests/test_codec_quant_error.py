"""Quantization error of the whole pipeline (rotate -> INT2 write -> attention -> un-rotate)
against exact fp32 attention on the unrotated q, k, v. Uses only the references, so kernel
bugs (tests/test_kernels_*.py) and quantization error are never mixed.

Bounds are ~1.5x the values measured on these seeds (Gaussian rows, D = 128, Hadamard
rotation, clip 0.96/0.92, 4 sink + 32 recent full-precision tokens out of 1000):
diffuse attention: output rel. error ~0.07-0.15, |lse error| ~0.02;
needle-peaked attention: output rel. error ~0.37 (one INT2 value row dominates), |lse| < 1.45."""

import math

import pytest
import torch

from oscar_sglang.kernels import reference
from oscar_sglang.kernels.codec import RowLayout
from oscar_sglang.kernels.window import WindowRows

D, HKV, GROUP, N, SINK, RECENT = 128, 2, 4, 1000, 4, 32


def hadamard(d):
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def attention_errors(seed, peak, window_all=False, rotation=None):
    """(max per-head output rel. error, max |lse error|, min max-prob) for one decode step."""
    g = torch.Generator().manual_seed(seed)
    rot = hadamard(D) if rotation is None else rotation
    layout = RowLayout(D)
    k = torch.randn(N, HKV, D, generator=g)
    v = torch.randn(N, HKV, D, generator=g) + torch.randn(D, generator=g)
    q = torch.randn(1, HKV * GROUP, D, generator=g) * 0.5
    needles = torch.randint(SINK, N - RECENT, (HKV * GROUP,), generator=g)
    for h in range(HKV * GROUP):
        q[0, h] += peak * k[needles[h], h // GROUP]

    rows_k = torch.zeros(N, HKV, layout.row_bytes, dtype=torch.uint8)
    rows_v = torch.zeros_like(rows_k)
    win_k = WindowRows.dense(torch.zeros(N, HKV, D))
    win_v = WindowRows.dense(torch.zeros(N, HKV, D))
    in_win = torch.zeros(N, dtype=torch.bool)
    in_win[:SINK] = in_win[N - RECENT :] = True
    if window_all:
        in_win[:] = True
    slots = torch.arange(N)
    wslots = torch.where(in_win, slots, -1)
    reference.quantize_kv_write(k, rotation=rot, clip_ratio=0.96, layout=layout, rows_out=rows_k, slots=slots,
        window_out=win_k, window_slots=wslots)
    reference.quantize_kv_write(v, rotation=rot, clip_ratio=0.92, layout=layout, rows_out=rows_v, slots=slots,
        window_out=win_v, window_slots=wslots)
    packed_idx, win_idx = slots[~in_win], slots[in_win]
    out, lse = reference.decode_attention(
        q @ rot, k_rows=rows_k, v_rows=rows_v, packed_indptr=torch.tensor([0, packed_idx.numel()]),
            packed_indices=packed_idx, k_win=win_k, v_win=win_v,
        win_indptr=torch.tensor([0, win_idx.numel()]), win_indices=win_idx, sm_scale=D**-0.5, layout=layout)
    out = out[0] @ rot.T  # back to the unrotated value basis (R_V = R_K here)

    logits = torch.einsum("hd,nhd->hn", q[0], k.repeat_interleave(GROUP, 1)) * D**-0.5
    p = torch.softmax(logits, -1)
    exact = torch.einsum("hn,nhd->hd", p, v.repeat_interleave(GROUP, 1))
    rel = ((out - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
    return rel, (lse[0] - torch.logsumexp(logits, -1)).abs().max().item(), p.max(-1).values.min().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diffuse_attention_error_bounded(seed):
    rel, lse_err, _ = attention_errors(seed, peak=0.0)
    assert rel < 0.25 and lse_err < 0.06


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_needle_attention_error_bounded_and_needle_kept(seed):
    rel, lse_err, pmax = attention_errors(seed, peak=1.0)
    assert pmax > 0.8  # the exact attention really is peaked on the needle
    assert rel < 0.55 and lse_err < 2.2  # needle logit ~11: ~13% logit error


def test_full_precision_window_is_exact_through_rotations():
    """All tokens in the fp32 window: only rotation round-off remains, which also checks
    the basis conventions (q @ R_K in, out @ R_V^T back)."""
    rel, lse_err, _ = attention_errors(0, peak=1.0, window_all=True)
    assert rel < 1e-5 and lse_err < 1e-4


def test_window_only_helps():
    """Identity vs Hadamard both stay in the INT2 regime; the fp32-window run is far better."""
    for rot in (torch.eye(D), hadamard(D)):
        rel, _, _ = attention_errors(3, peak=0.3, rotation=rot)
        rel_w, _, _ = attention_errors(3, peak=0.3, rotation=rot, window_all=True)
        assert rel_w < 1e-4 < rel < 0.25
