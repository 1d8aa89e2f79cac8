"""Static kernel report: compile every Triton kernel offline for sm_80/86/89/90 (no GPU needed).

For each (kernel, arch, model shape) this compiles exactly what the launcher would launch
(its own tile/warp choices and Triton's argument specialization, captured by running the
launcher on small CPU tensors of the model's head geometry with the kernels replaced by
recorders), then reports from ptxas -v (registers, spill bytes) and the compiled metadata
(shared memory):

- whether the kernel fits the arch's per-block shared-memory limit (else it cannot launch),
- an ESTIMATED occupancy (warps/SM from registers, shared memory and the arch's limits),
- for the decode split kernel, the SASS instructions of the INT2 and window inner loops
  (found by their backward branch) per (token, KV head), and from them ESTIMATED
  issue-bound vs HBM-bound times per million (token, KV head) rows on H100/H200/RTX 4090.

Estimates are estimates: static instruction counts (no stalls, no predication effects),
4 warp-instructions issued per SM per clock at the boost clock, peak HBM bandwidth.
Writes benchmarks/results/kernel_static.csv and prints a table.

    python3 benchmarks/kernel_static.py [--quick] [--jobs N] [--json PATH] [--no-csv]
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # this process compiles for real targets (before any kernel import)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import MODELS, RESULTS, git_commit  # noqa: E402
from oscar_sglang.kernels import decode, extend, write  # noqa: E402
from oscar_sglang.kernels.codec import RowLayout  # noqa: E402

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
def _write_launches(clip_ratio: float):
    def spec(shape):
        _, hkv, d = shape
        layout = RowLayout(d)
        t = WRITE_TOKENS
        x = torch.zeros(t, hkv, d, dtype=torch.bfloat16)
        rot = torch.zeros(hkv, d, d)  # per-KV-head rotations (the calibration default)
        rows = torch.zeros(t + 8, hkv, layout.row_bytes, dtype=torch.uint8)
        win = torch.zeros(t + 8, hkv, d, dtype=torch.bfloat16)
        slots = torch.arange(t, dtype=torch.int64)
        return capture(write, lambda: write.quantize_kv_write(x, rot, clip_ratio, layout, rows, slots, win, slots))
    return spec


def _paged_inputs(shape, n_tokens: int, batch: int):
    hq, hkv, d = shape
    layout = RowLayout(d)
    rows = torch.zeros(n_tokens + 8, hkv, layout.row_bytes, dtype=torch.uint8)
    win = torch.zeros(n_tokens + 8, hkv, d, dtype=torch.bfloat16)
    indptr = torch.linspace(0, n_tokens, batch + 1).round().to(torch.int32)  # sglang: int32 indices
    indices = torch.arange(n_tokens, dtype=torch.int32)
    return layout, rows, win, indptr, indices


def _decode_launches(shape):
    hq, hkv, d = shape
    layout, rows, win, indptr, indices = _paged_inputs(shape, 64, 2)
    q = torch.zeros(2, hq, d, dtype=torch.bfloat16)
    splits = decode.plan_num_splits(DECODE_BATCH, hkv, DECODE_CONTEXT, DECODE_SMS)
    return capture(decode, lambda: decode.decode_attention(
        q, rows, rows, indptr, indices, win, win, indptr, indices, d ** -0.5, layout, num_splits=splits))


def _extend_launches(shape):
    """Current extend signature (prefix_lens, sink, recent); if it changes, this is skipped."""
    hq, hkv, d = shape
    layout, rows, win, indptr, indices = _paged_inputs(shape, 64, 2)
    tq = 64
    q = torch.zeros(tq, hq, d, dtype=torch.bfloat16)
    kn = torch.zeros(tq, hkv, d, dtype=torch.bfloat16)
    qo = torch.tensor([0, 32, 64], dtype=torch.int32)
    prefix = torch.tensor([32, 32], dtype=torch.int32)
    return capture(extend, lambda: extend.extend_attention(
        q, kn, kn, qo, rows, rows, indptr, indices, win, win, indptr, indices, prefix, 64, 256,
        d ** -0.5, layout, max_q_len=32))


SPECS = {
    "write_k": _write_launches(0.96),  # K clip (OSCAR default)
    "write_v": _write_launches(0.92),  # V clip: more rank-selection passes
    "decode": _decode_launches,  # -> decode_split, decode_merge
    "extend": _extend_launches,
}
KERNEL_NAMES = {  # JIT function name -> reported kernel name
    "_quantize_write_kernel": None,  # the spec's name (write_k / write_v)
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
