"""Static kernel report: compile every Triton kernel offline for sm_80/86/89/90 (no GPU needed).

For each (kernel, arch, model shape) this compiles exactly what the launcher would launch
(its own tile/warp choices and Triton's argument specialization, captured by running the
launcher on small CPU tensors of the model's head geometry, window rows in pages of the row
buffers as the pool keeps them, with the kernels replaced by recorders), then reports from
ptxas -v (registers, spill bytes) and the compiled metadata (shared memory):

- whether the kernel fits the arch's per-block shared-memory limit (else it cannot launch),
- an ESTIMATED occupancy (warps/SM from registers, shared memory and the arch's limits),
- for the decode split kernel, the SASS instructions of the INT2 and window inner loops
  (found by their backward branch) per (token, KV head), and from them ESTIMATED
  issue-bound vs HBM-bound times per million (token, KV head) rows on H100/H200/RTX 4090;
  also for 3- and 4-bit key rows over 2-bit value rows (``decode_split_k3v2``/``_k4v2``:
  the quantized loop then reads 3/4-bit K and 2-bit V rows, hence different byte counts).

Estimates are estimates: static instruction counts (no stalls, no predication effects),
4 warp-instructions issued per SM per clock at the boost clock, peak HBM bandwidth.
Writes benchmarks/results/kernel_static.csv and prints a table.

    python3 -m benchmarks.kernel_static [--quick | --ci] [--kernels K,..] [--archs 86,..] [--models M,..]
                                        [--jobs N] [--json PATH] [--no-csv]
    python3 -m benchmarks.kernel_static --markdown   # docs/kernels.md's table, from the CSV

Runs without a GPU and without TRITON_INTERPRET (removed from this process only): ~2 min on
2 cores for everything (90 rows), ~40 s for --ci.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # this process compiles for real targets (before any kernel import)

import argparse
import contextlib
import csv
import io
import json
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from benchmarks.common import MODELS, RESULTS, git_commit
from oscar_sglang.kernels import decode, extend, write
from oscar_sglang.kernels.codec import RowLayout
from oscar_sglang.kernels.rule import PositionRule
from oscar_sglang.kernels.window import WindowRows

NV_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass(frozen=True)
class Arch:
    smem_block: int  # max dynamic shared memory per block (opt-in), bytes
    smem_sm: int  # shared memory per SM, bytes
    max_warps: int  # resident warps per SM
    max_blocks: int  # resident blocks per SM


ARCHS = {  # CUDA C programming guide, compute capabilities table
    80: Arch(166912, 167936, 64, 32),
    86: Arch(101376, 102400, 48, 16),
    89: Arch(101376, 102400, 48, 24),
    90: Arch(232448, 233472, 64, 32),
}
REGS_PER_SM = 65536
SMEM_RESERVED_PER_BLOCK = 1024  # sm_80+: the driver reserves 1 KiB per resident block


@dataclass(frozen=True)
class Gpu:
    cc: int
    hbm_bytes_s: float
    sms: int
    clock_hz: float


GPUS = {  # peak HBM, SM count, boost clock (approximate, public spec sheets)
    "H100-SXM": Gpu(90, 3.35e12, 132, 1.98e9),
    "H200": Gpu(90, 4.8e12, 132, 1.98e9),
    "RTX4090": Gpu(89, 1.01e12, 128, 2.52e9),
}
ISSUE_PER_SM_CLK = 4  # 4 schedulers, 1 warp-instruction each per clock

# Decode scenario used to pick num_splits (runtime arg; only BLOCK_S of the merge depends on it)
DECODE_BATCH, DECODE_CONTEXT, DECODE_SMS = 32, 32768, 132
WRITE_TOKENS = 64  # decode-time write: one token per request of a 64-request batch
WINDOW_PAGE = 64  # the pool's default page size (oscar_sglang.sizing.PAGE_SIZES)


# ----------------------------------------------------------------------------- capture
class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, fn: JITFunction, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, args, kwargs))
        return launch


def capture(module, call) -> list:
    """Run ``call()`` (a launcher call on CPU tensors) with every JIT function of ``module``
    replaced by a recorder; returns the recorded launches [(fn, args, kwargs)]."""
    launches: list = []
    saved = {n: f for n, f in vars(module).items() if isinstance(f, JITFunction)}
    try:
        for n, f in saved.items():
            setattr(module, n, _Recorder(f, launches))
        call()
    finally:
        for n, f in saved.items():
            setattr(module, n, f)
    return launches


# ----------------------------------------------------------------------------- kernel specs
# Each spec: shape (hq, hkv, d) -> launches of its launcher at that shape. Add a kernel by
# adding a function here; a spec whose call raises is reported as skipped with the reason.
def _pool_rows(tokens: int, hkv: int, k_layout: RowLayout, v_layout: RowLayout):
    """(k_rows, v_rows, k_win, v_win) as the pool keeps them (oscar_sglang/pool.py): one uint8 buffer
    [N, hkv, K + V row bytes] of at least ``tokens`` slots in whole pages, K and V rows its two views,
    bf16 window rows in pages of WINDOW_PAGE slots, each row's K then V."""
    rk, d = k_layout.row_bytes, k_layout.head_dim
    buf = torch.zeros(-(-tokens // WINDOW_PAGE) * WINDOW_PAGE, hkv, rk + v_layout.row_bytes, dtype=torch.uint8)
    per_page = WINDOW_PAGE * buf.shape[2] // (2 * d * 2)
    flat, row = buf.view(-1).view(torch.bfloat16), hkv * d
    wins = [WindowRows(flat[i * row:], hkv, d, WINDOW_PAGE * buf.stride(0) // 2, (per_page - 1).bit_length(), 2 * row)
            for i in (0, 1)]
    return buf[..., :rk], buf[..., rk:], *wins


def _write_launches(clip_ratio: float, rotate: bool = True, bits: int = 2):
    def spec(shape):
        _, hkv, d = shape
        layout = RowLayout(d, bits=bits)
        t = WRITE_TOKENS
        x = torch.zeros(t, hkv, d, dtype=torch.bfloat16)
        # per-KV-head rotations (the calibration default); None: values with R_V folded
        rot = torch.zeros(hkv, d, d) if rotate else None
        rows, _, win, _ = _pool_rows(t + 8, hkv, layout, RowLayout(d))
        slots = torch.arange(t, dtype=torch.int64)
        return capture(write, lambda: write.quantize_kv_write(x, rotation=rot, clip_ratio=clip_ratio, layout=layout,
                                                              rows_out=rows, slots=slots, window_out=win,
                                                              window_slots=slots))
    return spec


def _write_step_launches(shape):
    """One decode step's write as the backend launches it with the defaults: 3-bit keys (clip
    0.96, per-head R_K), 2-bit values with R_V folded (clip 0.92, no rotation), the window
    copies (in pages of the row buffers), and the queries rotated by R_K, in one launch."""
    hq, hkv, d = shape
    t = WRITE_TOKENS
    k_layout, v_layout = RowLayout(d, bits=3), RowLayout(d)
    k = torch.zeros(t, hkv, d, dtype=torch.bfloat16)
    k_rows, v_rows, *wins = _pool_rows(t + 8, hkv, k_layout, v_layout)
    rows = k_rows, v_rows
    slots = torch.arange(t, dtype=torch.int64)
    q = torch.zeros(t, hq, d, dtype=torch.bfloat16)
    return capture(write, lambda: write.write_step(
        k, k, rot_k=torch.zeros(hkv, d, d), clip_k=0.96, clip_v=0.92, k_layout=k_layout, v_layout=v_layout,
        k_rows=rows[0], v_rows=rows[1], slots=slots, k_win=wins[0], v_win=wins[1], window_slots=slots, q=q))


def _paged_inputs(shape, n_tokens: int, batch: int, key_bits: int):
    """2-bit value rows and ``key_bits`` key rows in the pool's buffer of a layer, and the K and V
    windows in pages of it."""
    hq, hkv, d = shape
    v_layout = RowLayout(d)
    k_layout = v_layout.with_bits(key_bits)
    k_rows, v_rows, *wins = _pool_rows(n_tokens + 8, hkv, k_layout, v_layout)
    indptr = torch.linspace(0, n_tokens, batch + 1).round().to(torch.int32)  # sglang: int32 indices
    indices = torch.arange(n_tokens, dtype=torch.int32)
    return k_layout, v_layout, k_rows, v_rows, wins, indptr, indices


def _variant(launches: list, key_bits: int, kernel: str) -> list:
    """All launches at 2-bit keys; for a key-width variant only ``kernel`` (the merge it shares
    with the 2-bit spec is not reported twice)."""
    return launches if key_bits == 2 else [x for x in launches if x[0].__name__ == kernel]


def _decode_launches(key_bits: int = 2):
    """``key_bits`` keys over 2-bit values; a variant reports the split kernel only."""
    def spec(shape):
        hq, hkv, d = shape
        k_layout, v_layout, k_rows, v_rows, wins, indptr, indices = _paged_inputs(shape, 64, 2, key_bits)
        q = torch.zeros(2, hq, d, dtype=torch.bfloat16)
        splits = decode.plan_num_splits(DECODE_BATCH, hkv, DECODE_CONTEXT, DECODE_SMS)
        return _variant(capture(decode, lambda: decode.decode_attention(
            q, k_rows=k_rows, v_rows=v_rows, packed_indptr=indptr, packed_indices=indices, k_win=wins[0],
            v_win=wins[1], win_indptr=indptr, win_indices=indices, sm_scale=d ** -0.5, layout=k_layout,
            num_splits=splits, v_layout=v_layout)), key_bits, "_decode_split_kernel")
    return spec


def _extend_launches(key_bits: int = 2):
    """Current extend signature (prefix_lens, rule); if it changes, this is skipped.
    ``key_bits`` keys over 2-bit values; a variant reports the extend kernel only."""
    def spec(shape):
        hq, hkv, d = shape
        k_layout, v_layout, k_rows, v_rows, wins, indptr, indices = _paged_inputs(shape, 64, 2, key_bits)
        tq = 64
        q = torch.zeros(tq, hq, d, dtype=torch.bfloat16)
        kn = torch.zeros(tq, hkv, d, dtype=torch.bfloat16)
        qo = torch.tensor([0, 32, 64], dtype=torch.int32)
        prefix = torch.tensor([32, 32], dtype=torch.int32)
        return _variant(capture(extend, lambda: extend.extend_attention(
            q, k_new=kn, v_new=kn, qo_indptr=qo, k_rows=k_rows, v_rows=v_rows, packed_indptr=indptr,
            packed_indices=indices, k_win=wins[0], v_win=wins[1], win_indptr=indptr, win_indices=indices,
            prefix_lens=prefix, rule=PositionRule(), sm_scale=d ** -0.5, layout=k_layout, max_q_len=32,
            v_layout=v_layout)), key_bits, "_extend_kernel")
    return spec


# CI subset (tests/test_kernel_static.py, ~1 min on 2 cores): D=128 only; the write kernel on the
# arches where shared memory is tight (86/89) and on sm_90, decode everywhere, extend and the
# unrotated (folded) V write on sm_86/90.
CI_JOBS = {"write_v": (86, 89, 90), "write_k": (86, 89, 90), "write_v_folded": (86, 90), "extend": (86, 90),
           "write_k3": (89, 90), "write_k4": (90,), "write_step": (86, 89, 90), "extend_k3v2": (86, 90),
           "decode": (80, 86, 89, 90), "decode_k3v2": (89, 90), "decode_k4v2": (89, 90)}

SPECS = {  # in order of compile cost
    "write_v": _write_launches(0.92),  # V clip (OSCAR default 0.92): 11 rank-selection passes at D=128
    "write_k": _write_launches(0.96),  # K clip (0.96): 6 passes
    "write_v_folded": _write_launches(0.92, rotate=False),  # V when R_V is folded into the weights: no dot
    "write_k3": _write_launches(0.96, bits=3),  # 3-bit keys (the default): the 1-bit high plane
    "write_k4": _write_launches(0.96, bits=4),  # 4-bit keys: a second 2-bit plane
    "write_step": _write_step_launches,  # K3 + folded V2 + q @ R_K: the backend's one launch per layer
    "decode": _decode_launches(),  # -> decode_split, decode_merge
    "decode_k3v2": _decode_launches(3),  # -> decode_split_k3v2 (3-bit keys, 2-bit values)
    "decode_k4v2": _decode_launches(4),  # -> decode_split_k4v2
    "extend": _extend_launches(),
    "extend_k3v2": _extend_launches(3),  # 3-bit keys over 2-bit values (the default widths)
}
KERNEL_NAMES = {  # JIT function name -> reported kernel name
    "_write_step_kernel": None,  # the spec's name (write_k / write_v / write_step)
    "_decode_split_kernel": "decode_split",
    "_merge_splits_kernel": "decode_merge",
    "_extend_kernel": "extend",
}


# ----------------------------------------------------------------------------- compile
def compile_launch(fn: JITFunction, args, kwargs, cc: int):
    """Compile one recorded launch for sm_<cc> exactly as the JIT would specialize it
    (same binder and argument packing as JITFunction.run). Returns (compiled, ptxas log)."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = {"debug": False, **kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # knobs.nvidia.dump_ptxas_log prints ptxas -v
        ck = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return ck, log.getvalue()


def parse_ptxas(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        raise RuntimeError(f"no ptxas -v output captured:\n{log[-2000:]}")
    return {"regs": int(regs.group(1)), "stack_bytes": int(spill.group(1)),
            "spill_store_bytes": int(spill.group(2)), "spill_load_bytes": int(spill.group(3))}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """[(address, instruction)] of the cubin (cuobjdump -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(NV_BIN / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                             check=True).stdout
    return [(int(a, 16), ins.strip()) for a, ins in _SASS_LINE.findall(out)]


def find_loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int, int]]:
    """Innermost-level loops as (start, end, instruction count), in program order: every
    branch to a lower address closes the loop [target, branch]."""
    addrs = [a for a, _ in instrs]
    loops = []
    for a, ins in instrs:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < a:
            t = int(m.group(1), 16)
            loops.append((t, a, sum(1 for x in addrs if t <= x <= a)))
    return sorted(loops)


def occupancy(regs: int, smem: int, warps: int, arch: Arch) -> tuple[int, int, str]:
    """ESTIMATE of resident (blocks, warps) per SM and the limiting resource."""
    if smem > arch.smem_block:
        return 0, 0, "smem>limit"
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    limits = {
        "regs": (REGS_PER_SM // regs_per_warp) // warps,
        "smem": arch.smem_sm // (smem + SMEM_RESERVED_PER_BLOCK),
        "warps": arch.max_warps // warps,
        "blocks": arch.max_blocks,
    }
    name = min(limits, key=limits.get)
    return limits[name], limits[name] * warps, name


# (label, constexpr name of the tokens per iteration, HBM bytes per (token, KV head) from the
# key and value row layouts)
DECODE_LOOPS = (
    ("int2", "BLOCK_N", lambda k, v, hkv: k.row_bytes + v.row_bytes + 4 / hkv),
    ("window", "BLOCK_W", lambda k, v, hkv: 2 * 2 * k.head_dim + 4 / hkv),  # bf16 rows
)


def _config(kwargs: dict) -> str:
    keep = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages") and not k.startswith("stride")}
    s = " ".join(f"{k}={v}" for k, v in keep.items())
    return f"{s} warps={kwargs.get('num_warps', 4)} stages={kwargs.get('num_stages', 3)}"


def _rows_for(kernel: str, cc: int, model: str, fn, args, kwargs, memo: dict) -> list[dict]:
    hq, hkv, d = MODELS[model]
    arch = ARCHS[cc]
    t0 = time.time()
    key = (fn.__name__, cc, repr(args_sig(args)), repr(sorted(kwargs.items())))
    if key not in memo:
        ck, log = compile_launch(fn, args, kwargs, cc)
        memo[key] = (ck, parse_ptxas(log))
    ck, ptx = memo[key]
    warps = ck.metadata.num_warps
    smem = ck.metadata.shared
    blocks, occ_warps, limiter = occupancy(ptx["regs"], smem, warps, arch)
    base = {
        "kernel": kernel, "arch": f"sm_{cc}", "model": model, "hq": hq, "hkv": hkv, "d": d,
        "config": _config(kwargs), "num_warps": warps, **ptx, "smem_bytes": smem,
        "smem_limit_bytes": arch.smem_block, "fits_smem": smem <= arch.smem_block,
        "est_blocks_per_sm": blocks, "est_warps_per_sm": occ_warps, "est_occupancy_limit": limiter,
        "compile_s": round(time.time() - t0, 2),
        "status": "ok" if smem <= arch.smem_block else "CANNOT LAUNCH: shared memory over the per-block limit",
    }
    if fn.__name__ != "_decode_split_kernel":
        return [base]
    loops = find_loops(sass(ck.asm["cubin"]))
    if len(loops) != len(DECODE_LOOPS):
        return [{**base, "status": f"ok (found {len(loops)} SASS loops, expected {len(DECODE_LOOPS)}: no loop counts)"}]
    rows = []
    k_layout, v_layout = RowLayout(d, bits=kwargs["K_BITS"]), RowLayout(d, bits=kwargs["V_BITS"])
    for (label, tok_name, bytes_fn), (_, _, count) in zip(DECODE_LOOPS, loops):
        per_row = count * warps / kwargs[tok_name]
        loop = {"loop": label, "loop_sass_instr_per_warp_iter": count, "loop_tokens_per_iter": kwargs[tok_name],
                "sass_instr_per_token_kvhead": round(per_row, 2)}
        gpus = [(g, spec) for g, spec in GPUS.items() if spec.cc == cc]
        for g, spec in gpus or [("", None)]:
            est = {}
            if spec is not None:
                issue_us = per_row / (ISSUE_PER_SM_CLK * spec.sms * spec.clock_hz) * 1e12  # per 1M rows
                hbm_us = bytes_fn(k_layout, v_layout, hkv) / spec.hbm_bytes_s * 1e12
                est = {"est_gpu": g, "est_issue_bound_us_per_Mrow": round(issue_us, 2),
                       "est_hbm_bound_us_per_Mrow": round(hbm_us, 2),
                       "est_issue_over_hbm": round(issue_us / hbm_us, 2)}
            rows.append({**base, **loop, **est})
    return rows


def args_sig(args) -> tuple:
    """What the JIT specializes on: tensor dtype + 16-byte alignment, int value class."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            out.append(a)
        else:
            out.append("one" if a == 1 else ("d16" if a % 16 == 0 else "int"))
    return tuple(out)


def run_job(spec: str, cc: int, models: list[str]) -> list[dict]:
    """All models of one (spec, arch); compiles identical specializations once."""
    memo: dict = {}
    rows = []
    for model in models:
        hq, hkv, d = MODELS[model]
        base = {"kernel": spec, "arch": f"sm_{cc}", "model": model, "hq": hq, "hkv": hkv, "d": d}
        try:
            launches = SPECS[spec](MODELS[model])
        except Exception as e:  # noqa: BLE001 - reported, e.g. a launcher whose signature changed
            rows.append({**base, "status": f"skipped: launcher call failed: {type(e).__name__}: {e}"})
            continue
        for fn, args, kwargs in launches:
            kernel = KERNEL_NAMES.get(fn.__name__) or spec
            if spec.startswith("decode_"):  # a decode variant: decode_split_<variant>
                kernel += spec[len("decode"):]
            elif spec.startswith("extend_"):  # an extend variant: its spec's name
                kernel = spec
            try:
                rows.extend(_rows_for(kernel, cc, model, fn, args, kwargs, memo))
            except Exception as e:  # noqa: BLE001
                status = "skipped" if spec == "extend" else "error"
                msg = str(e).strip().splitlines()
                rows.append({**base, "kernel": kernel, "status": f"{status}: compile failed: {type(e).__name__}: "
                                                                  f"{msg[-1] if msg else ''}"})
    return rows


COLUMNS = [
    "commit", "kernel", "arch", "model", "hq", "hkv", "d", "config", "num_warps", "regs", "smem_bytes",
    "smem_limit_bytes", "fits_smem", "spill_store_bytes", "spill_load_bytes", "stack_bytes",
    "est_blocks_per_sm", "est_warps_per_sm", "est_occupancy_limit", "loop", "loop_sass_instr_per_warp_iter",
    "loop_tokens_per_iter", "sass_instr_per_token_kvhead", "est_gpu", "est_issue_bound_us_per_Mrow",
    "est_hbm_bound_us_per_Mrow", "est_issue_over_hbm", "compile_s", "status",
]


def print_tables(rows: list[dict]) -> None:
    seen, main = set(), []
    for r in rows:
        k = (r["kernel"], r["arch"], r["model"])
        if k not in seen:
            seen.add(k)
            main.append(r)
    hdr = f"{'kernel':13} {'arch':6} {'model':15} {'regs':>4} {'smem':>7} {'limit':>7} {'fits':>4} " \
          f"{'spill st/ld':>11} {'EST warps/SM':>12} {'limit by':>9}  status"
    print(hdr)
    print("-" * len(hdr))
    for r in main:
        if "regs" not in r:
            print(f"{r['kernel']:13} {r['arch']:6} {r['model']:15} {r['status']}")
            continue
        sp = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        print(f"{r['kernel']:13} {r['arch']:6} {r['model']:15} {r['regs']:>4} {r['smem_bytes']:>7} "
              f"{r['smem_limit_bytes']:>7} {'yes' if r['fits_smem'] else 'NO':>4} {sp:>11} "
              f"{r['est_warps_per_sm']:>12} {r['est_occupancy_limit']:>9}  {r['status']}")
    loops = [r for r in rows if r.get("loop")]
    if not loops:
        return
    print("\nDecode split kernel inner loops: static SASS count, and ESTIMATES (issue-bound = "
          f"{ISSUE_PER_SM_CLK} warp-instr/SM/clk at boost clock, HBM-bound = peak bandwidth), per 1M (token, KV head) rows")
    hdr = f"{'arch':6} {'model':15} {'loop':6} {'instr/iter':>10} {'tok/iter':>8} {'instr/(tok,kvh)':>15} " \
          f"{'EST gpu':9} {'EST issue us':>12} {'EST HBM us':>10} {'EST issue/HBM':>13}"
    print(hdr)
    print("-" * len(hdr))
    for r in loops:
        est = (f"{r.get('est_gpu', ''):9} {r.get('est_issue_bound_us_per_Mrow', ''):>12} "
               f"{r.get('est_hbm_bound_us_per_Mrow', ''):>10} {r.get('est_issue_over_hbm', ''):>13}")
        print(f"{r['arch']:6} {r['model']:15} {r['loop']:6} {r['loop_sass_instr_per_warp_iter']:>10} "
              f"{r['loop_tokens_per_iter']:>8} {r['sass_instr_per_token_kvhead']:>15} {est}")


def markdown(path: Path, model: str = "qwen3-8b") -> str:
    """docs/kernels.md's table from a written CSV: every kernel per arch at one model's heads, with
    the decode INT2 loop's count and the ESTIMATED issue-bound / HBM-bound ratio."""
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model and r["regs"]]
    loops = {(r["kernel"], r["arch"], r["est_gpu"]): r for r in rows if r["loop"] == "int2"}
    out = ["| kernel | arch | registers | shared memory (B) | spills st/ld (B) | EST warps/SM | "
           "INT2 loop SASS / (token, KV head) | EST issue / HBM time |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if (r["kernel"], r["arch"]) in seen:
            continue
        seen.add((r["kernel"], r["arch"]))
        loop, ratio = "", ""
        if r["kernel"].startswith("decode_split"):
            ests = [v for (kernel, arch, _), v in loops.items() if kernel == r["kernel"] and arch == r["arch"]]
            loop = ests[0]["sass_instr_per_token_kvhead"] if ests else ""
            ratio = ", ".join(f"{v['est_issue_over_hbm']} ({v['est_gpu']})" for v in ests if v["est_gpu"])
        out.append(f"| {r['kernel']} | {r['arch']} | {r['regs']} | {r['smem_bytes']} | "
                   f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['est_warps_per_sm']} | {loop} | {ratio} |")
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default=",".join(SPECS), help=f"comma list of {list(SPECS)}")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)), help="comma list of compute capabilities")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--quick", action="store_true", help="qwen3-8b only (D=128)")
    ap.add_argument("--ci", action="store_true", help="the CI subset (CI_JOBS), qwen3-8b only")
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--no-csv", action="store_true", help="do not write benchmarks/results/kernel_static.csv")
    ap.add_argument("--markdown", action="store_true", help="print docs/kernels.md's table from the written CSV (no compile)")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(RESULTS / "kernel_static.csv"))
        return []
    models = ["qwen3-8b"] if a.quick or a.ci else a.models.split(",")
    specs, archs = a.kernels.split(","), [int(c) for c in a.archs.split(",")]
    for name, pool in (("kernel", SPECS), ("model", MODELS), ("arch", ARCHS)):
        bad = [x for x in {"kernel": specs, "model": models, "arch": archs}[name] if x not in pool]
        if bad:
            ap.error(f"unknown {name}(s) {bad}")
    torch.set_num_threads(1)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="kernel_static_") as cache:
        triton.knobs.cache.dir = cache  # every number below comes from a compile in this run
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        if a.ci:
            jobs = [(s, cc, models) for s, ccs in CI_JOBS.items() for cc in ccs]
        else:  # most expensive compiles first: better balance over the workers
            jobs = [(s, cc, models) for s in sorted(specs, key=list(SPECS).index) for cc in archs]
        if a.jobs > 1:
            with ProcessPoolExecutor(a.jobs, mp_context=get_context("fork")) as ex:
                results = list(ex.map(run_job, *zip(*jobs)))
        else:
            results = [run_job(*j) for j in jobs]
    commit = git_commit()
    rows = [{"commit": commit, **r} for res in results for r in res]
    print_tables(rows)
    print(f"\n{len(rows)} rows, {time.time() - t0:.0f} s, commit {commit}; triton {triton.__version__}")
    if not a.no_csv:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "kernel_static.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({c: r.get(c, "") for c in COLUMNS})
        print(f"wrote {path}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
