"""INT2 split-KV decode vs the best BF16 decode measured in the same run.

Per shape (model heads, context, batch): check the Triton kernel against the reference on a
reduced problem, then time it (median, CUDA events, L2 flushed) and report bytes read,
GB/s, fraction of the device copy bandwidth measured in this run, and the speedup over the
fastest BF16 baseline that ran: torch SDPA on dense BF16, our own kernel with every token in
the BF16 segment (same schedule, 7x the bytes), sglang's Triton decode and FlashInfer's
paged decode when importable. Each request: (ctx - 320) INT2 rows + 64 sink + 256 more BF16
window rows (dense window buffers).

    python3 -m benchmarks.bench_decode --quick      # CPU: interpreter, reference check only
    python3 -m benchmarks.bench_decode [--out DIR]  # GPU
    python3 -m benchmarks.bench_decode --sweep      # GPU: tile/launch configs of our kernel only
"""

from __future__ import annotations


import torch
from benchmarks.common import MODELS, PAGE, RECENT, SINK, append_rows, copy_bandwidth_gbs, fmt, paged_slots, parse_args, \
    random_rows, setup, time_cuda

GPU_SHAPES = [  # (model, ctx, batch)
    ("qwen3-8b", 4096, 1), ("qwen3-8b", 32768, 1), ("qwen3-8b", 65536, 1), ("qwen3-8b", 131072, 1),
    ("qwen3-8b", 4096, 8), ("qwen3-8b", 32768, 8), ("qwen3-8b", 131072, 8),
    ("qwen3-8b", 4096, 64), ("qwen3-8b", 16384, 64),
    ("smollm2-135m", 4096, 1), ("smollm2-135m", 32768, 1), ("smollm2-135m", 131072, 1), ("smollm2-135m", 32768, 8),
    ("llama3-70b-tp8", 32768, 1), ("llama3-70b-tp8", 131072, 1), ("llama3-70b-tp8", 32768, 8),
]


def build(model, lens, dtype, dev, seed, bits=(2, 2)):
    """Decode inputs for requests of the given context lengths; ``bits``: (key, value) code widths."""
    from oscar_sglang.kernels.codec import RowLayout
    from oscar_sglang.kernels.window import WindowRows

    hq, hkv, d = MODELS[model]
    gen = torch.Generator(device=dev).manual_seed(seed)
    n_win = [min(n, SINK + RECENT) for n in lens]
    i_ptr, i_idx, n = paged_slots([a - b for a, b in zip(lens, n_win)], dev, gen)
    w_ptr, w_idx, m = paged_slots(n_win, dev, gen, page=1)
    return dict(
        q=torch.randn(len(lens), hq, d, device=dev, generator=gen).to(dtype),
        k_rows=random_rows(n, hkv, d, dev, gen, bits[0]), v_rows=random_rows(n, hkv, d, dev, gen, bits[1]),
        packed_indptr=i_ptr, packed_indices=i_idx,
        k_win=WindowRows.dense(torch.randn(m, hkv, d, device=dev, generator=gen).to(dtype)),
        v_win=WindowRows.dense(torch.randn(m, hkv, d, device=dev, generator=gen).to(dtype)),
        win_indptr=w_ptr, win_indices=w_idx, sm_scale=d**-0.5, layout=RowLayout(d, bits=bits[0]),
        v_layout=RowLayout(d, bits=bits[1]),
    )


IMPLS = {"oscar_int2": (2, 2), "oscar_k3v2": (3, 2)}  # the maximum-capacity mode and the default widths


def check(model, lens, dtype, dev, bits=(2, 2)) -> float:
    from oscar_sglang.kernels import decode, reference

    a = build(model, lens, dtype, dev, seed=1, bits=bits)
    out, lse = decode.decode_attention(**a)
    ref, ref_lse = reference.decode_attention(**a)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=tol, rtol=1e-3)
    return (out.float() - ref.float()).abs().max().item()


def bf16_baselines(model, ctx, batch, dev, names, gen):
    """{name: fn} of BF16 decodes over the same context (full ctx in BF16)."""
    hq, hkv, d = MODELS[model]
    q = torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16, generator=gen)
    fns = {}
    if "sdpa" in names:
        kd = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16, generator=gen)
        vd = torch.randn_like(kd)
        q4 = q.unsqueeze(2)
        fns["torch_sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q4, kd, vd, enable_gqa=True)
    ptr, idx, n = paged_slots([ctx] * batch, dev, gen)
    kb = torch.randn(n, hkv, d, device=dev, dtype=torch.bfloat16, generator=gen)
    vb = torch.randn_like(kb)
    from oscar_sglang.kernels import decode
    from oscar_sglang.kernels.codec import RowLayout
    from oscar_sglang.kernels.window import WindowRows

    empty_ptr = torch.zeros(batch + 1, dtype=torch.int32, device=dev)
    rows = torch.zeros(1, hkv, d // 4 + 4, dtype=torch.uint8, device=dev)
    kw, vw = WindowRows.dense(kb), WindowRows.dense(vb)
    fns["triton_bf16_same_kernel"] = lambda: decode.decode_attention(
        q, k_rows=rows, v_rows=rows, packed_indptr=empty_ptr, packed_indices=idx[:0], k_win=kw, v_win=vw,
            win_indptr=ptr, win_indices=idx, sm_scale=d**-0.5, layout=RowLayout(d))
    if "sglang" in names:
        try:
            from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

            o = torch.empty_like(q)
            for s in (16, 64):
                logits = torch.empty(batch, hq, s, d, dtype=torch.float32, device=dev)
                lse = torch.empty(batch, hq, s, dtype=torch.float32, device=dev)
                nsp = torch.full((batch,), s, dtype=torch.int32, device=dev)
                fns[f"sglang_triton_s{s}"] = (lambda lg=logits, ls=lse, ns=nsp, s=s: decode_attention_fwd(
                    q, kb, vb, o, ptr, idx, lg, ls, ns, s, d**-0.5, 1.0, 1.0))
        except Exception as e:  # noqa: BLE001 - optional baseline
            print(f"sglang baseline unavailable: {type(e).__name__}: {e}")
    if "flashinfer" in names:
        try:
            import flashinfer

            ws = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=hq // hkv >= 4)
            pages = idx.view(-1, PAGE)[:, 0] // PAGE if ctx % PAGE == 0 else None
            pptr = torch.arange(batch + 1, device=dev, dtype=torch.int32) * (ctx // PAGE)
            last = torch.full((batch,), PAGE, dtype=torch.int32, device=dev)
            w.plan(pptr, pages.int(), last, hq, hkv, d, PAGE, q_data_type=torch.bfloat16,
                   kv_data_type=torch.bfloat16, sm_scale=d**-0.5)
            kv = (kb.view(-1, PAGE, hkv, d), vb.view(-1, PAGE, hkv, d))
            fns["flashinfer"] = lambda: w.run(q, kv)
        except Exception as e:  # noqa: BLE001 - optional baseline
            print(f"flashinfer baseline unavailable: {type(e).__name__}: {e}")
    return fns


SWEEP_SHAPES = [("qwen3-8b", 32768, 1), ("qwen3-8b", 131072, 1), ("qwen3-8b", 16384, 64), ("smollm2-135m", 32768, 1)]
# (block_n, block_w, num_warps, num_stages): the default (128, 32, 4, 2) first, then its neighbours
SWEEP_CONFIGS = [(128, 32, 4, 2), (64, 32, 4, 2), (128, 32, 4, 3), (128, 32, 8, 2), (128, 64, 4, 2), (64, 32, 2, 2),
                  (128, 32, 2, 2)]


def run_sweep(args, dev):
    """Time DecodeConfig variants (block_n, block_w, num_warps, num_stages) x programs_per_sm."""
    from oscar_sglang.kernels import decode

    copy_gbs = copy_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    for model, ctx, batch in SWEEP_SHAPES:
        hq, hkv, d = MODELS[model]
        a = build(model, [ctx] * batch, torch.bfloat16, dev, seed=0)
        n_win = min(ctx, SINK + RECENT)
        nbytes = batch * hkv * 2 * ((ctx - n_win) * a["layout"].row_bytes + n_win * d * 2) + batch * ctx * 4
        for bn, bw, nw, ns in SWEEP_CONFIGS:
            for pps in (4, 8, 16):
                cfg = decode.DecodeConfig(block_n=bn, block_w=bw, num_warps=nw, num_stages=ns, programs_per_sm=pps)
                splits = decode.plan_num_splits(batch, hkv, ctx, sms, cfg)
                ms = time_cuda(lambda: decode.decode_attention(**a, num_splits=splits, config=cfg), args.iters)
                rows.append(dict(bench="decode_sweep", model=model, ctx=ctx, batch=batch,
                                 impl=f"bn{bn}_bw{bw}_w{nw}_s{ns}_pps{pps}", splits=splits, ms=round(ms, 4),
                                 gbs=round(nbytes / ms / 1e6, 1), frac_copy_bw=round(nbytes / ms / 1e6 / copy_gbs, 3)))
        a = None  # free before the baselines allocate
    rows.sort(key=lambda r: (r["model"], r["ctx"], r["batch"], r["ms"]))
    fmt(rows)
    append_rows(rows, dev, args.out)


def run_gpu(args, dev):
    from oscar_sglang.kernels import decode

    names = set(args.baselines.split(","))
    copy_gbs = copy_bandwidth_gbs()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    print(f"copy bandwidth {copy_gbs:.0f} GB/s, {sms} SMs")
    checked = set()
    for model, ctx, batch in GPU_SHAPES:
        hq, hkv, d = MODELS[model]
        if model not in checked:
            for bits in IMPLS.values():
                err = check(model, [3001, 1, 700, 321], torch.bfloat16, dev, bits)
                print(f"{model} K{bits[0]}V{bits[1]}: kernel matches reference (max abs err {err:.3g})")
            checked.add(model)
        splits = decode.plan_num_splits(batch, hkv, ctx, sms)
        n_win = min(ctx, SINK + RECENT)
        ours = {}
        for impl, bits in IMPLS.items():
            a = build(model, [ctx] * batch, torch.bfloat16, dev, seed=0, bits=bits)
            out = torch.empty_like(a["q"])
            ms = time_cuda(lambda: decode.decode_attention(**a, out=out, num_splits=splits), args.iters)
            row_b = a["layout"].row_bytes + a["v_layout"].row_bytes
            ours[impl] = ms, batch * hkv * ((ctx - n_win) * row_b + 2 * n_win * d * 2) + batch * ctx * 4
            a = out = None  # free before the baselines allocate
        bf16_bytes = batch * hkv * 2 * ctx * d * 2 + batch * ctx * 4
        gen = torch.Generator(device=dev).manual_seed(2)
        base = {}
        for k, f in bf16_baselines(model, ctx, batch, dev, names, gen).items():
            try:
                base[k] = time_cuda(f, args.iters)
            except Exception as e:  # noqa: BLE001 - optional baseline
                print(f"{k} failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
        best = min(base, key=base.get) if base else ""
        rows = [dict(bench="decode", model=model, ctx=ctx, batch=batch, impl=impl, splits=splits,
                     ms=round(ms, 4), mbytes=round(nbytes / 1e6, 2), gbs=round(nbytes / ms / 1e6, 1),
                     frac_copy_bw=round(nbytes / ms / 1e6 / copy_gbs, 3), best_bf16=best,
                     speedup_vs_best_bf16=round(base[best] / ms, 2) if best else "")
                for impl, (ms, nbytes) in ours.items()]
        for k, ms in sorted(base.items(), key=lambda kv: kv[1]):
            rows.append(dict(bench="decode", model=model, ctx=ctx, batch=batch, impl=k, splits="", ms=round(ms, 4),
                             mbytes=round(bf16_bytes / 1e6, 2), gbs=round(bf16_bytes / ms / 1e6, 1),
                             frac_copy_bw=round(bf16_bytes / ms / 1e6 / copy_gbs, 3), best_bf16=best,
                             speedup_vs_best_bf16=""))
        fmt(rows)
        append_rows(rows, dev, args.out)


def main():
    args = parse_args(__doc__)
    dev = setup(args.quick)
    if args.quick:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16  # interpreter: no bf16 dot
        for model in MODELS:
            err = check(model, [97, 1, 0, 500] if dev.type == "cpu" else [3001, 1, 0, 700], dtype, dev)
            print(f"quick {model}: kernel matches reference (max abs err {err:.3g}); no timing in --quick")
        return
    if args.sweep:
        run_sweep(args, dev)
    else:
        run_gpu(args, dev)


if __name__ == "__main__":
    main()
