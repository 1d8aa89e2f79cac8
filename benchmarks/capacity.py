"""KV token capacity at the same memory budget: sglang's max_total_num_tokens, BF16 vs --oscar.

Starts sglang.Engine twice with the same --mem-fraction-static (dummy weights of a real
model's attention geometry; MLP and vocabulary shrunk so the weights stay small) and
reads the capacity sglang sized from its (hooked) per-token cell size. Appends a row to
benchmarks/results/capacity.csv.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/cpu_standin python3 benchmarks/capacity.py --device cpu
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {  # attention geometry of real models; hidden/MLP/vocab shrunk (capacity does not depend on them)
    "smollm2-135m": dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_size=576),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=512),
}


def _capacity(model: Path, device: str, mem_fraction: float, extra: dict) -> int:
    code = (
        "import json, sglang as sgl\n"
        f"e = sgl.Engine(model_path={str(model)!r}, load_format='dummy', skip_tokenizer_init=True, device={device!r},"
        f" disable_overlap_schedule=True, mem_fraction_static={mem_fraction}, max_running_requests=64,"
        f" dtype='bfloat16', log_level='error', **{extra!r})\n"
        "print('CAPACITY', e.get_server_info()['max_total_num_tokens'])\n"
        "e.shutdown()\n"
    )
    out = subprocess.run([sys.executable, "-c", f"if __name__ == '__main__':\n" + "".join(
        "    " + line + "\n" for line in code.splitlines())], capture_output=True, text=True, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("CAPACITY"):
            return int(line.split()[1])
    raise RuntimeError(out.stderr[-3000:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2-135m")
    p.add_argument("--mem-fraction", type=float, default=0.05)
    args = p.parse_args()
    from support import write_rotations, write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "m", intermediate_size=256, vocab_size=1024, **SHAPES[args.shape])
        rot = write_rotations(Path(tmp) / "rot.safetensors", model)
        bf16 = _capacity(model, args.device, args.mem_fraction, {"attention_backend": "torch_native"})
        oscar = _capacity(model, args.device, args.mem_fraction,
                          {"attention_backend": "oscar", "quantization_param_path": str(rot)})
    row = {"shape": args.shape, "device": args.device, "mem_fraction_static": args.mem_fraction,
           "bf16_tokens": bf16, "oscar_tokens": oscar, "ratio": round(oscar / bf16, 3)}
    print(json.dumps(row))
    out = ROOT / "benchmarks" / "results" / "capacity.csv"
    new = not out.exists()
    with out.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


if __name__ == "__main__":
    main()
