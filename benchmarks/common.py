"""Shared helpers for the benchmark scripts: setup, timing, bandwidth, CSV rows, caches.

Every bench script calls ``setup(quick)`` BEFORE importing ``oscar_sglang.kernels``: in
``--quick`` mode without CUDA it selects the Triton interpreter (tiny shapes, reference
checks only, no timing claims). Rows are appended to ``benchmarks/results/<device>.csv``
(and to ``--out DIR`` when given), each with the git commit and the device name.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# name: (query heads, KV heads, head_dim) per GPU
MODELS = {
    "qwen3-8b": (32, 8, 128),
    "smollm2-135m": (9, 3, 64),
    "llama3-70b-tp8": (8, 1, 128),
}
SINK, RECENT = 64, 256
PAGE = 16


def parse_args(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU-capable tiny run: reference checks only, no timing")
    ap.add_argument("--out", default=None, help="extra directory to append the CSV to (e.g. $OUT)")
    ap.add_argument("--baselines", default="sdpa,sglang,flashinfer", help="comma list of BF16 baselines to try")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="bench_decode only: sweep kernel configs")
    return ap.parse_args()


def setup(quick: bool) -> torch.device:
    if not torch.cuda.is_available():
        if not quick:
            sys.exit("no CUDA device: run with --quick for the CPU reference checks")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any kernel import
        return torch.device("cpu")
    return torch.device("cuda")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev).replace(" ", "_") if dev.type == "cuda" else "cpu"


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_cuda(fn, iters: int = 30, warmup: int = 3, flush_mb: int = 256) -> float:
    """Median ms of fn() with CUDA events; L2 is flushed before every timed call so that a
    layer's cache is read from HBM, as in a real forward pass over many layers."""
    flush = torch.empty(flush_mb << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(mb: int = 1024) -> float:
    """Device copy bandwidth (read + write bytes / time) measured now, GB/s."""
    src = torch.empty(mb << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), iters=10, flush_mb=64)
    return 2 * src.numel() / ms / 1e6


def append_rows(rows: list[dict], dev: torch.device, out: str | None) -> None:
    if not rows:
        return
    commit, name = git_commit(), device_name(dev)
    dirs = [RESULTS] + ([Path(out)] if out else [])
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{name}.csv"
        fields = ["bench", "commit", "device"] + list(rows[0].keys())
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({"commit": commit, "device": name, **r})
    print(f"appended {len(rows)} rows to {', '.join(str(d / (name + '.csv')) for d in dirs)}")


def random_rows(n: int, heads: int, d: int, dev: torch.device, gen: torch.Generator, bits: int = 2) -> torch.Tensor:
    """Storage rows of ``bits`` per code (codec.RowLayout) with random codes and plausible fp16
    scale/minimum (fast, any size)."""
    from oscar_sglang.kernels.codec import RowLayout

    layout = RowLayout(d, bits=bits)
    rows = torch.randint(0, 256, (n, heads, layout.row_bytes), dtype=torch.uint8, device=dev, generator=gen)
    scale = torch.rand(n, heads, device=dev, generator=gen) * 0.5 / layout.top + 0.2 / layout.top
    params = torch.stack([scale, -0.5 * layout.top * scale], dim=-1).half().view(torch.uint8)
    rows[..., layout.code_bytes:] = params
    return rows


def paged_slots(lens: list[int], dev: torch.device, gen: torch.Generator, page: int = PAGE):
    """indptr (int32 [B+1]), token slot ids (int32, shuffled pages of `page`), pool size."""
    n_pages = sum(-(-n // page) for n in lens)
    perm = torch.randperm(n_pages, device=dev, generator=gen)
    slots, p = [], 0
    for n in lens:
        k = -(-n // page)
        slots.append((perm[p : p + k, None] * page + torch.arange(page, device=dev)).flatten()[:n])
        p += k
    indptr = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
    return indptr, torch.cat(slots).to(torch.int32), max(1, n_pages * page)


def fmt(rows: list[dict]) -> None:
    """Print rows as an aligned table."""
    if not rows:
        return
    keys = list(rows[0].keys())
    width = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.rjust(width[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r.get(k, "")).rjust(width[k]) for k in keys))
