"""Fused quantize-on-write (K and V of one layer) vs what BF16 serving does for the same tokens,
and one decode step's write_step (K, V and the query rotation in one launch) vs the launches it replaced.

Per shape (model heads, T new tokens): check the kernel against the reference (bit-exact
with an identity rotation, within one quantization step with a real rotation), then time
K + V writes (per-layer rotation, sink/recent window copies) and report GB/s, fraction of
copy bandwidth, and the ratio to (a) sglang-style BF16 KV store of the same tokens and
(b) a BF16 causal prefill attention (torch SDPA) of the same tokens: the issue's target is
write <= 10% of the prefill it rides on.

    python3 -m benchmarks.bench_write --quick      # CPU: interpreter, reference check only
    python3 -m benchmarks.bench_write [--out DIR]  # GPU
"""

from __future__ import annotations

import torch
from benchmarks.common import MODELS, RECENT, SINK, append_rows, copy_bandwidth_gbs, fmt, parse_args, setup, time_cuda

GPU_SHAPES = [(m, t) for m in MODELS for t in (512, 4096, 32768)]


def make(model, t, dtype, dev, seed, identity=False):
    from oscar_sglang.kernels.codec import RowLayout
    from oscar_sglang.kernels.window import WindowRows

    _, hkv, d = MODELS[model]
    gen = torch.Generator(device=dev).manual_seed(seed)
    layout = RowLayout(d)
    rot = torch.eye(d, device=dev) if identity else torch.linalg.qr(torch.randn(d, d, device=dev, generator=gen))[0]
    wslots = torch.full((t,), -1, dtype=torch.int64, device=dev)
    keep = torch.cat([torch.arange(min(t, SINK)), torch.arange(min(t, max(SINK, t - RECENT)), t)]).to(dev)
    wslots[keep] = torch.arange(keep.numel(), device=dev)
    return dict(
        x=torch.randn(t, hkv, d, device=dev, generator=gen).to(dtype), rotation=rot.contiguous(), layout=layout,
        rows_out=torch.zeros(t + 8, hkv, layout.row_bytes, dtype=torch.uint8, device=dev),
        slots=torch.randperm(t + 8, device=dev, generator=gen)[:t],
        window_out=WindowRows.dense(torch.zeros(keep.numel() + 1, hkv, d, dtype=dtype, device=dev)),
        window_slots=wslots,
    )


def check(model, t, dtype, dev) -> str:
    from oscar_sglang.kernels import reference, write
    from oscar_sglang.kernels.codec import dequantize_rows, split_rows
    from oscar_sglang.kernels.window import WindowRows

    for identity in (True, False):
        a = make(model, t, dtype, dev, seed=1, identity=identity)
        b = {**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()},
             "window_out": WindowRows.dense(a["window_out"].data.clone())}
        write.quantize_kv_write(**a, clip_ratio=0.96)
        reference.quantize_kv_write(**b, clip_ratio=0.96)
        if identity:
            assert torch.equal(a["rows_out"], b["rows_out"])
            assert torch.equal(a["window_out"].data, b["window_out"].data)
        else:
            _, sk, _ = split_rows(a["rows_out"], a["layout"])
            _, sr, _ = split_rows(b["rows_out"], a["layout"])
            torch.testing.assert_close(sk.float(), sr.float(), rtol=2e-3, atol=1e-4)
            diff = (dequantize_rows(a["rows_out"], a["layout"]) - dequantize_rows(b["rows_out"], a["layout"])).abs()
            assert (diff <= sr.float() * 1.01 + 1e-3).all()
    return "bit-exact (identity), within one step (rotation)"


def run_gpu(args, dev):
    from oscar_sglang.kernels import write

    copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s")
    for model in MODELS:
        print(f"{model}: {check(model, 1000, torch.bfloat16, dev)}")
    for model, t in GPU_SHAPES:
        hq, hkv, d = MODELS[model]
        k, v = make(model, t, torch.bfloat16, dev, seed=0), make(model, t, torch.bfloat16, dev, seed=1)
        ours = time_cuda(lambda: (write.quantize_kv_write(**k, clip_ratio=0.96),
                                  write.quantize_kv_write(**v, clip_ratio=0.92)), args.iters)
        n_win = int((k["window_slots"] >= 0).sum())
        nbytes = 2 * (t * hkv * d * 2 + t * hkv * k["layout"].row_bytes + n_win * hkv * d * 2 + t * 16)
        kc = torch.empty(t + 8, hkv, d, dtype=torch.bfloat16, device=dev)
        vc = torch.empty_like(kc)
        slots = k["slots"]
        store = time_cuda(lambda: (kc.index_put_((slots,), k["x"]), vc.index_put_((slots,), v["x"])), args.iters)
        q = torch.randn(1, hq, t, d, device=dev, dtype=torch.bfloat16)
        kd, vd = k["x"].transpose(0, 1).unsqueeze(0), v["x"].transpose(0, 1).unsqueeze(0)
        sdpa = time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, kd, vd, is_causal=True, enable_gqa=True), args.iters)
        rows = [dict(bench="write", model=model, tokens=t, impl="oscar_write_kv", ms=round(ours, 4),
                     mbytes=round(nbytes / 1e6, 2), gbs=round(nbytes / ours / 1e6, 1),
                     frac_copy_bw=round(nbytes / ours / 1e6 / copy_gbs, 3), bf16_store_ms=round(store, 4),
                     sdpa_prefill_ms=round(sdpa, 4), ratio_to_prefill_attn=round(ours / sdpa, 3))]
        fmt(rows)
        append_rows(rows, dev, args.out)
        k = v = kc = vc = q = None
        torch.cuda.empty_cache()
    for batch in DECODE_BATCHES:
        fmt(rows := decode_step_rows("qwen3-8b", batch, dev, args.iters))
        append_rows(rows, dev, args.out)


DECODE_BATCHES = (1, 64)  # decode tokens per step (requests); one head shape (compiles cost seconds)


def decode_step_rows(model, batch, dev, iters) -> list[dict]:
    """One decode step's write per layer at the default widths (K3 with per-head R_K, V2 with R_V
    folded, window copies) and the query rotation: one write_step launch vs the two writes and a
    torch rotation of the queries it replaces."""
    from oscar_sglang.kernels import reference, write
    from oscar_sglang.kernels.codec import RowLayout
    from oscar_sglang.kernels.window import WindowRows

    hq, hkv, d = MODELS[model]
    gen = torch.Generator(device=dev).manual_seed(2)
    k, v = (torch.randn(batch, hkv, d, device=dev, generator=gen).bfloat16() for _ in range(2))
    q = torch.randn(batch, hq, d, device=dev, generator=gen).bfloat16()
    rot = torch.linalg.qr(torch.randn(hkv, d, d, device=dev, generator=gen))[0].contiguous()
    lk, lv = RowLayout(d, bits=3), RowLayout(d)
    rows = [torch.zeros(batch + 8, hkv, lay.row_bytes, dtype=torch.uint8, device=dev) for lay in (lk, lv)]
    wins = [WindowRows.dense(torch.zeros(batch + 8, hkv, d, dtype=torch.bfloat16, device=dev)) for _ in range(2)]
    slots = torch.randperm(batch + 8, device=dev, generator=gen)[:batch]
    args = dict(rot_k=rot, clip_k=0.96, clip_v=0.92, k_layout=lk, v_layout=lv, k_rows=rows[0], v_rows=rows[1],
                slots=slots, k_win=wins[0], v_win=wins[1], window_slots=slots)
    fused = time_cuda(lambda: write.write_step(k, v, **args, q=q), iters)
    separate = time_cuda(lambda: (write.quantize_kv_write(k, rotation=rot, clip_ratio=0.96, layout=lk, rows_out=rows[0],
                                                          slots=slots, window_out=wins[0], window_slots=slots),
                                  write.quantize_kv_write(v, rotation=None, clip_ratio=0.92, layout=lv, rows_out=rows[1],
                                                          slots=slots, window_out=wins[1], window_slots=slots),
                                  reference.rotate_queries(q, rot)), iters)
    torch.testing.assert_close(write.write_step(k, v, **args, q=q).float(), reference.rotate_queries(q, rot).float(),
                               atol=2e-2, rtol=2e-2)
    return [dict(bench="write_step", model=model, tokens=batch, impl="oscar_write_step", ms=round(fused, 4),
                 separate_ms=round(separate, 4), ratio_to_separate=round(fused / separate, 3))]


def main():
    args = parse_args(__doc__)
    dev = setup(args.quick)
    if args.quick:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
        for model in MODELS:
            print(f"quick {model}: {check(model, 37, dtype, dev)}; no timing in --quick")
        return
    run_gpu(args, dev)


if __name__ == "__main__":
    main()
