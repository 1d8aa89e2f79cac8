"""Extend (chunked prefill) over an INT2 prefix vs BF16 extend of the same prefix + chunk.

Per shape (model heads, prefix length, chunk length, batch 1): check the kernel against the
reference on a reduced ragged problem, then time it and compare with BF16 extends measured
in the same run: our kernel with the whole prefix in the BF16 segment (same schedule),
torch SDPA with a lower-right causal mask over [prefix, chunk], and sglang's Triton
extend kernel when importable. Extend is compute bound: rows report TFLOP/s (causal
attention FLOPs), not bandwidth. Target: INT2 extend no slower than the best BF16 extend.

    python3 -m benchmarks.bench_extend --quick      # CPU: interpreter, reference check only
    python3 -m benchmarks.bench_extend [--out DIR]  # GPU
"""

from __future__ import annotations

import torch
from benchmarks.common import MODELS, SINK, append_rows, fmt, paged_slots, parse_args, random_rows, setup, time_cuda

BLOCK = 1024  # the block rule's block (rule.PositionRule's default)

GPU_SHAPES = [("qwen3-8b", p, c) for p in (4096, 32768) for c in (512, 2048)] + [
    ("smollm2-135m", 32768, 2048), ("llama3-70b-tp8", 32768, 2048)]


def packed_rows(a: int, chunk: int, block: int = BLOCK) -> int:
    """INT2 rows a chunk of ``chunk`` tokens at position a reads: positions SINK up to its last
    query's block start (the chunk's own older tokens included)."""
    return max(0, (a + chunk - 1) // block * block - SINK)


def build(model, prefixes, chunks, dtype, dev, seed, bits=(2, 2), block=BLOCK):
    from oscar_sglang.kernels.codec import RowLayout
    from oscar_sglang.kernels.rule import PositionRule
    from oscar_sglang.kernels.window import WindowRows

    hq, hkv, d = MODELS[model]
    gen = torch.Generator(device=dev).manual_seed(seed)
    # The segments the backend builds under the block rule for a chunk at position a: the INT2
    # rows of ``packed_rows``, the window rows of ``PositionRule.window(a)``: the sinks, then the
    # positions max(SINK, a // block * block) .. a - 1.
    rule = PositionRule(sink=SINK, block=block)
    n_win = [sum(map(len, rule.window(a))) for a in prefixes]
    n_packed = [packed_rows(a, c, block) for a, c in zip(prefixes, chunks)]
    i_ptr, i_idx, n = paged_slots(n_packed, dev, gen)
    w_ptr, w_idx, m = paged_slots(n_win, dev, gen, page=1)
    tq = sum(chunks)

    def randn(*shape):
        return torch.randn(*shape, device=dev, generator=gen).to(dtype)

    return dict(
        q=randn(tq, hq, d), k_new=randn(tq, hkv, d), v_new=randn(tq, hkv, d),
        qo_indptr=torch.tensor([0] + chunks, device=dev).cumsum(0).to(torch.int32),
        k_rows=random_rows(n, hkv, d, dev, gen, bits[0]), v_rows=random_rows(n, hkv, d, dev, gen, bits[1]),
        packed_indptr=i_ptr, packed_indices=i_idx, k_win=WindowRows.dense(randn(m, hkv, d)),
        v_win=WindowRows.dense(randn(m, hkv, d)), win_indptr=w_ptr, win_indices=w_idx,
        prefix_lens=torch.tensor(prefixes, dtype=torch.int32, device=dev),
        rule=rule, sm_scale=d**-0.5, layout=RowLayout(d, bits=bits[0]),
        v_layout=RowLayout(d, bits=bits[1]),
    )


IMPLS = {"oscar_int2": (2, 2), "oscar_k3v2": (3, 2)}  # the maximum-capacity mode and the default widths


def check(model, prefixes, chunks, dtype, dev, bits=(2, 2), block=BLOCK) -> float:
    from oscar_sglang.kernels import extend, reference

    a = build(model, prefixes, chunks, dtype, dev, seed=1, bits=bits, block=block)
    out = extend.extend_attention(**a)
    ref = reference.extend_attention(**a)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return (out.float() - ref.float()).abs().max().item()


def bf16_baselines(model, prefix, chunk, dev, gen):
    from torch.nn.attention.bias import causal_lower_right

    from oscar_sglang.kernels import extend
    from oscar_sglang.kernels.codec import RowLayout
    from oscar_sglang.kernels.rule import PositionRule
    from oscar_sglang.kernels.window import WindowRows

    hq, hkv, d = MODELS[model]
    bf = torch.bfloat16
    total = prefix + chunk
    q = torch.randn(chunk, hq, d, device=dev, dtype=bf, generator=gen)
    kn, vn = torch.randn(chunk, hkv, d, device=dev, dtype=bf, generator=gen), torch.randn(
        chunk, hkv, d, device=dev, dtype=bf, generator=gen)
    ptr, idx, n = paged_slots([prefix], dev, gen)
    kb = torch.randn(n, hkv, d, device=dev, dtype=bf, generator=gen)
    vb = torch.randn_like(kb)
    qo = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
    zero = torch.zeros(2, dtype=torch.int32, device=dev)
    rows = torch.zeros(1, hkv, d // 4 + 4, dtype=torch.uint8, device=dev)
    a = torch.tensor([prefix], dtype=torch.int32, device=dev)
    # the whole prefix as window rows, every position a "sink": every key read exactly (BF16)
    kw, vw = WindowRows.dense(kb), WindowRows.dense(vb)
    fns = {"triton_bf16_same_kernel": lambda: extend.extend_attention(
        q, k_new=kn, v_new=vn, qo_indptr=qo, k_rows=rows, v_rows=rows, packed_indptr=zero, packed_indices=idx[:0],
        k_win=kw, v_win=vw, win_indptr=ptr, win_indices=idx, prefix_lens=a, rule=PositionRule(sink=total, block=BLOCK),
        sm_scale=d**-0.5, layout=RowLayout(d), max_q_len=chunk)}
    q4 = q.transpose(0, 1).unsqueeze(0)
    kd = torch.randn(1, hkv, total, d, device=dev, dtype=bf, generator=gen)
    vd = torch.randn_like(kd)
    mask = causal_lower_right(chunk, total)
    fns["torch_sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q4, kd, vd, attn_mask=mask,
                                                                               enable_gqa=True)
    try:
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

        o = torch.empty_like(q)
        fns["sglang_triton"] = lambda: extend_attention_fwd(q, kn, vn, o, kb, vb, qo, ptr, idx, None, True, None,
                                                            chunk, 1.0, 1.0, sm_scale=d**-0.5)
    except Exception as e:  # noqa: BLE001 - optional baseline
        print(f"sglang baseline unavailable: {type(e).__name__}: {e}")
    return fns


def run_gpu(args, dev):
    from oscar_sglang.kernels import extend

    for model in MODELS:
        for bits in IMPLS.values():
            err = check(model, [3001, 0, 700], [300, 129, 1], torch.bfloat16, dev, bits)
            print(f"{model} K{bits[0]}V{bits[1]}: kernel matches reference (max abs err {err:.3g})")
    for model, prefix, chunk in GPU_SHAPES:
        hq, hkv, d = MODELS[model]
        ours = {}
        for impl, bits in IMPLS.items():
            a = build(model, [prefix], [chunk], torch.bfloat16, dev, seed=0, bits=bits)
            ours[impl] = time_cuda(lambda: extend.extend_attention(**a, max_q_len=chunk), args.iters)
            a = None  # free before the baselines allocate
        n_packed = packed_rows(prefix, chunk)
        flops = 4 * chunk * hq * d * (prefix + (chunk + 1) / 2)
        gen = torch.Generator(device=dev).manual_seed(2)
        base = {}
        for k, f in bf16_baselines(model, prefix, chunk, dev, gen).items():
            try:
                base[k] = time_cuda(f, args.iters)
            except Exception as e:  # noqa: BLE001 - optional baseline
                print(f"{k} failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
        best = min(base, key=base.get) if base else ""
        rows = [dict(bench="extend", model=model, prefix=prefix, chunk=chunk, impl=impl, ms=round(ms, 4),
                     tflops=round(flops / ms / 1e9, 1), packed_prefix=n_packed, best_bf16=best,
                     speedup_vs_best_bf16=round(base[best] / ms, 2) if best else "")
                for impl, ms in ours.items()]
        rows += [dict(bench="extend", model=model, prefix=prefix, chunk=chunk, impl=k, ms=round(ms, 4),
                      tflops=round(flops / ms / 1e9, 1), packed_prefix=0, best_bf16=best, speedup_vs_best_bf16="")
                 for k, ms in sorted(base.items(), key=lambda kv: kv[1])]
        fmt(rows)
        append_rows(rows, dev, args.out)


def main():
    args = parse_args(__doc__)
    dev = setup(args.quick)
    if args.quick:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float16
        for model in MODELS:
            # block 128: the short prefixes still read INT2 rows and cross block boundaries
            err = check(model, [97, 0, 400] if dev.type == "cpu" else [3001, 0, 700], [5, 9, 1], dtype, dev,
                        block=128)
            print(f"quick {model}: kernel matches reference (max abs err {err:.3g}); no timing in --quick")
        return
    run_gpu(args, dev)


if __name__ == "__main__":
    main()
