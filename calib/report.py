"""Calibration report: per-layer attention error on held-out text, the eigen-spectra and the
bit allocation (sensitivity per layer and width, chosen widths) of the first file.

Methods compared on the same held-out sequences (default: the essays, never used for
calibration), all with the reference codec and the same windows:

- ``identity``: no rotation, clip 0.96 / 0.92 (the method's defaults);
- ``hadamard``: R = H·P, clip 0.96 / 0.92;
- one entry per rotations file given (named by its file stem), with the file's own clips and
  bit widths (identity and Hadamard are 2-bit).

Outputs in ``--out-dir``: ``report.png`` (logit error, output error, K and V spectra, bits),
``report.txt`` (the same numbers, also printed) and ``report.json``. The paired comparison
is the per-sequence, layer-averaged output error of each method relative to the first file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

import torch

from oscar_sglang.kernels.codec import RowLayout

from .metrics import Candidate, ErrorAccumulator
from .rotation import hadamard_rotation
from .rotations import Rotations, load_rotations

BASELINE_CLIPS = (0.96, 0.92)


def candidates(files: list[Path], rots: list[Rotations]) -> list[Candidate]:
    """identity, hadamard, then one candidate per rotations file (unique names)."""
    m = rots[0].meta.model
    L, D = m.num_layers, m.head_dim
    eye = torch.eye(D).expand(L, D, D)
    had = hadamard_rotation(D).float().expand(L, D, D)
    ck, cv = [BASELINE_CLIPS[0]] * L, [BASELINE_CLIPS[1]] * L
    out = [Candidate("identity", eye, eye, ck, cv), Candidate("hadamard", had, had, ck, cv)]
    for f, r in zip(files, rots):
        name = f.stem
        while name in {c.name for c in out}:
            name += "'"
        m = r.meta
        out.append(Candidate(name, r.key, r.value, list(m.clip_k), list(m.clip_v), m.key_bits, m.value_bits))
    return out


def paired(acc: ErrorAccumulator, name: str, ref: str) -> tuple[float, float, int]:
    """Mean and standard error (over sequences) of err(name)/err(ref) - 1."""
    a, b = acc.per_sequence(name), acc.per_sequence(ref)
    d = [x / y - 1.0 for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se, n


def format_tables(acc: ErrorAccumulator, names: list[str], header: str) -> str:
    lines = [header]
    for kind in ("output", "logit"):
        cols = {n: acc.per_layer(n, kind) for n in names}
        width = max(10, *(len(n) + 1 for n in names))
        lines.append(f"\nattention-{kind} relative MSE per layer")
        lines.append("layer" + "".join(f"{n:>{width}}" for n in names))
        for layer in range(len(cols[names[0]])):
            lines.append(f"{layer:5d}" + "".join(f"{cols[n][layer]:>{width}.3e}" for n in names))
        lines.append(" mean" + "".join(f"{sum(cols[n]) / len(cols[n]):>{width}.3e}" for n in names))
    ref = names[2]
    lines.append(f"\npaired, per sequence (layer-mean output error) vs {ref}: mean relative change ± SE")
    for n in names:
        mean, se, k = paired(acc, n, ref)
        lines.append(f"  {n:<24s} {100 * mean:+8.2f}% ± {100 * se:.2f}%  (n={k} sequences)")
    return "\n".join(lines)


def plot(acc: ErrorAccumulator, names: list[str], rots: list[Rotations], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(3, 2, figsize=(13, 13))
    for i, kind in enumerate(("logit", "output")):
        for n in names:
            ax[0, i].plot(acc.per_layer(n, kind), marker="o", ms=3, label=n)
        ax[0, i].set(yscale="log", xlabel="layer", ylabel="relative MSE", title=f"attention-{kind} error (held out)")
        ax[0, i].legend(fontsize=8)
    spec = next((r for r in rots if r.key_eigenvalues is not None), None)
    for i, which in enumerate(("key", "value")):
        a = ax[1, i]
        if spec is None:
            a.text(0.5, 0.5, "no spectra stored (no oscar-recipe file)", ha="center", transform=a.transAxes)
            continue
        ev = getattr(spec, f"{which}_eigenvalues")
        ev = ev.mean(1) if ev.dim() == 3 else ev  # kv-head files: mean over heads
        cmap = plt.get_cmap("viridis")
        for layer in range(ev.shape[0]):
            e = ev[layer].clamp_min(1e-12)
            a.plot((e / e[0]).numpy(), color=cmap(layer / max(ev.shape[0] - 1, 1)), lw=1)
        a.set(yscale="log", xlabel="eigen-direction (descending)", ylabel="λ / λ_max",
              title=f"C_{which[0].upper()} eigen-spectra per layer (dark = first layer)")
    _plot_bits(ax[2], rots[0])
    fig.suptitle(textwrap.fill(title, 160), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_bits(ax, rot: Rotations) -> None:
    """The first file's bit allocation: per-layer sensitivity (calibration tokens) and widths."""
    bits = rot.meta.bits
    if bits is None or not bits.key_error:
        for a in ax:
            a.text(0.5, 0.5, "no measured bit allocation in this file", ha="center", transform=a.transAxes)
        return
    for j, w in enumerate(bits.widths):
        ax[0].plot([e[j] for e in bits.key_error], marker="o", ms=3, label=f"keys {w}-bit")
        ax[0].plot([e[j] for e in bits.value_error], ls="--", marker="x", ms=3, label=f"values {w}-bit")
    ax[0].set(yscale="log", xlabel="layer", ylabel="attention-output relative MSE",
              title="bit sensitivity (the other tensor exact; calibration tokens)")
    ax[0].legend(fontsize=7, ncol=2)
    layers = range(len(bits.key_bits))
    ax[1].bar([x - 0.2 for x in layers], bits.key_bits, width=0.4, label="keys")
    ax[1].bar([x + 0.2 for x in layers], bits.value_bits, width=0.4, label="values")
    budget = f", budget {bits.budget:g} bits per element" if bits.budget else ""
    ax[1].set(xlabel="layer", ylabel="code bits", yticks=[2, 3, 4], ylim=(0, 4.5), title=f"allocation{budget}")
    ax[1].legend(fontsize=8)


def run_report(args: argparse.Namespace) -> int:
    """The ``report`` subcommand; returns the exit status."""
    import time

    from . import assets
    from .capture import observe_attention
    from .data import build_sequences, check_files, read_documents
    from .models import check_supported, load_config, load_model, load_tokenizer

    start = time.perf_counter()
    files = list(args.rotations)
    fp = check_supported(load_config(args.model))
    rots = [load_rotations(f, expect=fp) for f in files]
    paths = check_files(args.data) if args.data else assets.essay_files()
    out_dir = args.out_dir or files[0].parent
    meta = rots[0].meta
    windows = None if args.no_windows else meta.windows
    layout = RowLayout(fp.head_dim, meta.group_size)
    seqs = build_sequences(load_tokenizer(args.model), read_documents(paths), args.tokens, args.seq_len)
    cands = candidates(files, rots)
    acc = ErrorAccumulator(cands, layout, windows, args.query_stride)
    observe_attention(load_model(args.model, args.device, args.dtype), seqs, acc, desc="report")
    if not acc.sums:
        print("error: no query was scored: use --seq-len longer than the first block after the sinks, or --no-windows", file=sys.stderr)
        return 2
    names = [c.name for c in cands]
    win = f"position rule {windows.rule.name}, sink {windows.sink}" if windows else "no windows (every token quantized)"
    header = (f"held-out: {len(seqs)} x {seqs.shape[1]} tokens from {len(paths)} files ({paths[0].parent.name}/); "
              f"{win}; group {layout.group}; query stride {args.query_stride}; model {args.model}")
    text = format_tables(acc, names, header)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.txt").write_text(text + "\n")
    numbers = {n: {k: acc.per_layer(n, k) for k in ("logit", "output")} | {"per_sequence": acc.per_sequence(n)}
               for n in names}
    (out_dir / "report.json").write_text(json.dumps({"header": header, "methods": numbers}, indent=1))
    plot(acc, names, rots, out_dir / "report.png", header)
    print(text)
    print(f"\nwrote {out_dir / 'report.png'}, report.txt, report.json in {time.perf_counter() - start:.1f} s")
    return 0
