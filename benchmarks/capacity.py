"""KV token capacity and concurrency at the same memory budget, BF16 vs --oscar, with default flags.

Two modes, one arithmetic:

* ``--engine``: starts sglang.Engine (dummy weights of a real model's attention geometry;
  MLP and vocabulary shrunk), BF16 and --oscar at the same ``--mem-fraction-static``, and reads the
  capacity sglang sized through the plugin's hooks (packed cell size) and the running-request
  count sglang derived. The budget is inferred from the BF16 run (tokens x BF16 cell), and the
  same budget is also fed to the calculator below: the row says whether the two agree.
* default: the calculator for card classes. KV budget = ``frac x card - weights`` (the
  assumption is stated in each row), BF16 tokens = budget // BF16 cell, OSCAR tokens =
  budget // OSCAR cell: exactly the steps the hooked sglang sizing takes.

Concurrency (``--request-tokens``, default 2048): how many requests of that many tokens the budget
holds at once. BF16: tokens // n. OSCAR: each also holds full-precision window rows in pages of
the same pool (``oscar_sglang/windows.py``): its own sinks and the rows of its current block, on
average half a block (lengths spread over blocks) and at most a block; a window row costs
``page_size / rows_per_page`` token slots (``window_slots_per_row``).

Appends rows to benchmarks/results/capacity.csv and prints a markdown table.

    python3 -m benchmarks.capacity                                  # card classes
    python3 -m benchmarks.capacity --engine --shape qwen3-8b --budget-gib 2   # real sglang sizing (CPU ok)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {  # attention geometry of real models; hidden/MLP/vocab shrunk (capacity does not depend on them)
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=512),
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=512),
    "qwen2.5-32b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, head_dim=128, hidden_size=640),
}
WEIGHTS_GB = {"smollm2-135m": 0.27, "qwen3-8b": 16.4, "llama-3-8b": 16.1, "qwen2.5-32b": 65.5}  # BF16 checkpoints
CARDS = {"24 GB (RTX 4090)": (24, 0.85), "80 GB (H100)": (80, 0.88), "141 GB (H200)": (141, 0.88)}
BF16 = 2


def bf16_cell(shape: str) -> int:
    """sglang's MHA bytes per token (K and V, every layer)."""
    from oscar_sglang.sizing import bf16_cell_size

    g = SHAPES[shape]
    return bf16_cell_size(head_dim=g["head_dim"], kv_heads=g["num_key_value_heads"], layers=g["num_hidden_layers"],
                          itemsize=BF16)


def window_slots_per_row(rows, rule) -> float:
    """Token slots one bf16 window row costs in the pool (``rows``: a CacheLayout, ``rule``: the
    PositionRule): a page at the served page size holds rows_per_page."""
    from oscar_sglang.sizing import page_size_for
    from oscar_sglang.windows import rows_per_page

    page = page_size_for(rule, rows, None)
    return page / rows_per_page(page, [k.row_bytes + v.row_bytes for k, v in zip(rows.key, rows.value)],
                                rows.key[0].head_dim, BF16)


def calculate(shape: str, budget: int, bits: tuple[int, int] = (2, 2), request_tokens: int = 2048) -> dict:
    """One row at ``bits`` = (key, value) code widths in every layer, the default position rule."""
    from oscar_sglang.kernels.codec import CacheLayout
    from oscar_sglang.kernels.rule import PositionRule
    from oscar_sglang.sizing import split_budget

    g = SHAPES[shape]
    n = g["num_hidden_layers"]
    rows = CacheLayout.of(g["head_dim"], None, [bits[0]] * n, [bits[1]] * n)
    split = split_budget(budget_bytes=budget, head_dim=g["head_dim"], kv_heads=g["num_key_value_heads"],
                         layers=n, itemsize=BF16, token_row_bytes=rows.token_row_bytes)
    rule = PositionRule()
    row_slots = window_slots_per_row(rows, rule)

    def requests(window_rows: float) -> int:
        return int(split.oscar_tokens // (request_tokens + window_rows * row_slots))

    avg, worst = rule.sink + rule.block / 2, rule.sink + rule.block - 1
    return {"shape": shape, "bits": f"K{bits[0]}V{bits[1]} ({rows.bits_per_element:g})",
            "kv_budget_gib": round(budget / 2**30, 2), "bf16_tokens": split.bf16_tokens,
            "oscar_tokens": split.oscar_tokens, "ratio": round(split.oscar_tokens / split.bf16_tokens, 3),
            "request_tokens": request_tokens, "bf16_requests": split.bf16_tokens // request_tokens,
            "oscar_requests_avg": requests(avg), "oscar_requests_worst": requests(worst),
            "oscar_requests_shared_sinks": requests(avg - rule.sink),
            "window_slots_per_row": round(row_slots, 2),
            "window_share_avg": round(avg * row_slots / (request_tokens + avg * row_slots), 3)}


def _engine_capacity(model: Path, device: str, budget_bytes: int, extra: dict) -> dict:
    """One sglang.Engine start at ``--mem-fraction-static`` = ``budget_bytes`` / the free memory the
    child sees after importing sglang (on CPU, free memory moves by GiBs between starts while
    earlier processes exit: a fraction fixed in the parent would give each start another budget)."""
    free = "torch.cuda.mem_get_info()[0]" if device == "cuda" else "get_free_cpu_memory()"  # what sglang reads
    code = (
        "import json, torch, sglang as sgl\n"
        "from sglang.srt.utils.common import get_free_cpu_memory\n"
        f"fraction = round({budget_bytes} / {free}, 4)\n"
        f"e = sgl.Engine(model_path={str(model)!r}, load_format='dummy', skip_tokenizer_init=True, device={device!r},"
        f" disable_overlap_schedule=True, mem_fraction_static=fraction,"
        f" dtype='bfloat16', log_level='error', **{extra!r})\n"
        "i = e.get_server_info()\n"
        "running = i['internal_states'][0]['effective_max_running_requests_per_dp']\n"
        "print('CAPACITY', json.dumps({'tokens': i['max_total_num_tokens'], 'running': running,"
        " 'fraction': fraction}))\n"
        "e.shutdown()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", "if __name__ == '__main__':\n" + "".join(
        "    " + line + "\n" for line in code.splitlines())], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        _reap_group(proc.pid)  # the engine's own processes too: the next start must not see their memory go
    for line in stdout.splitlines():
        if line.startswith("CAPACITY"):
            return json.loads(line.split(maxsplit=1)[1])
    raise RuntimeError(stderr[-3000:])


def _reap_group(pgid: int, timeout: float = 60) -> None:
    """Wait until every process of group ``pgid`` has exited (SIGKILL after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL if time.monotonic() > deadline else 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def engine_row(shape: str, device: str, budget_bytes: int) -> dict:
    """Real sglang sizing, BF16 and --oscar, each at the ``--mem-fraction-static`` (default flags
    otherwise) that gives a KV budget of roughly ``budget_bytes`` (sglang's own overheads come off
    it); the budget both saw is inferred from the BF16 start."""
    from oscar_sglang.testing import write_rotations, write_tiny_model

    cell = bf16_cell(shape)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "m", intermediate_size=256, vocab_size=1024, **SHAPES[shape])
        rot = write_rotations(Path(tmp) / "rot.safetensors", model)
        bf16 = _engine_capacity(model, device, budget_bytes, {"attention_backend": "torch_native"})
        oscar = _engine_capacity(model, device, budget_bytes,
                                 {"attention_backend": "oscar", "quantization_param_path": str(rot)})
    calc = calculate(shape, bf16["tokens"] * cell)
    return {"mode": f"engine {device} mem_fraction {bf16['fraction']}/{oscar['fraction']}", "card": "", "shape": shape,
            "bits": calc["bits"],
            "kv_budget_gib": calc["kv_budget_gib"], "bf16_tokens": bf16["tokens"], "oscar_tokens": oscar["tokens"],
            "ratio": round(oscar["tokens"] / bf16["tokens"], 3), "max_running_requests": oscar["running"],
            "bf16_max_running_requests": bf16["running"], "calculator_oscar_tokens": calc["oscar_tokens"]}


def card_rows(bits: tuple[int, int], request_tokens: int = 2048) -> list[dict]:
    rows = []
    for card, (gb, frac) in CARDS.items():
        for shape in ("qwen3-8b", "llama-3-8b", "qwen2.5-32b"):
            budget = int((frac * gb - WEIGHTS_GB[shape]) * 1e9)
            base = {"mode": f"calculator: budget = {frac} x {gb} GB - {WEIGHTS_GB[shape]} GB weights", "card": card}
            if budget <= 0:
                rows.append(base | {"shape": shape, "bits": "", "kv_budget_gib": 0, "bf16_tokens": 0, "oscar_tokens": 0})
                continue
            rows.append(base | calculate(shape, budget, bits=bits, request_tokens=request_tokens))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", action="store_true", help="real sglang sizing instead of the card-class calculator")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=list(SHAPES), default="qwen3-8b")
    p.add_argument("--budget-gib", type=float, default=2.0, help="--engine: the KV budget to aim at")
    p.add_argument("--bits", nargs=2, type=int, default=None, metavar=("K", "V"),
                   help="calculator: key and value code widths in every layer (default: both K2V2 and K3V2)")
    p.add_argument("--request-tokens", type=int, default=2048, help="calculator: tokens per request for concurrency")
    args = p.parse_args()
    if args.engine:
        rows = [engine_row(args.shape, args.device, int(args.budget_gib * 2**30))]
    else:
        rows = [r for b in ([tuple(args.bits)] if args.bits else [(2, 2), (3, 2)])
                for r in card_rows(b, args.request_tokens)]
    fields = ["mode", "card", "shape", "bits", "kv_budget_gib", "bf16_tokens", "oscar_tokens", "ratio", "request_tokens",
              "bf16_requests", "oscar_requests_avg", "oscar_requests_worst", "oscar_requests_shared_sinks",
              "window_slots_per_row", "window_share_avg", "max_running_requests", "bf16_max_running_requests",
              "calculator_oscar_tokens"]
    out = ROOT / "benchmarks" / "results" / "capacity.csv"
    new = not out.exists() or out.read_text().splitlines()[:1] != [",".join(fields)]
    with out.open("w" if new else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
    if args.engine:
        print(rows[0])
        return
    print(f"| card | model | bits | KV budget GiB | BF16 tokens | OSCAR tokens | ratio | {rows[0]['request_tokens']}-token "
          "requests BF16 | OSCAR (avg / worst block fill) | OSCAR, shared sinks | window share (avg) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if not r["bf16_tokens"]:
            print(f"| {r['card']} | {r['shape']} | | BF16 weights do not fit | | | | | | | |")
            continue
        print(f"| {r['card']} | {r['shape']} | {r['bits']} | {r['kv_budget_gib']} | {r['bf16_tokens']:,} | "
              f"{r['oscar_tokens']:,} | {r['ratio']} | {r['bf16_requests']} | {r['oscar_requests_avg']} / "
              f"{r['oscar_requests_worst']} | {r['oscar_requests_shared_sinks']} | {100 * r['window_share_avg']:.0f}% |")


if __name__ == "__main__":
    main()
