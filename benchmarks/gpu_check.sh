#!/usr/bin/env bash
# GPU checks of the kernels, < 8 min on one H200: every kernel test compiled for CUDA
# (the gpu-marked full matrix, bf16 included, plus the CPU subset run on the GPU), then
# the three benchmarks. CSV rows go to benchmarks/results/<device>.csv and to OUT_DIR.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (from anywhere; OUT_DIR defaults to $OUT)
#   bash benchmarks/gpu_check.sh OUT_DIR --sweep    (only the decode config sweep, ~2 min)
#
# Needs torch + triton with CUDA. sglang / flashinfer baselines are used when importable:
# wheels placed in .whl/ are installed to /tmp/site first (no network needed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR" benchmarks/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# kernels/ and calib/ are installed as oscar_sglang.kernels / .calib (pyproject package-dir). On a
# machine where the project is not installed: an editable install, or failing that (no setuptools
# able to build one) a finder for those two names, loaded at interpreter start from PYTHONPATH.
if ! python3 -c "import oscar_sglang.kernels" 2>/dev/null; then
    if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>/dev/null \
            || ! python3 -c "import oscar_sglang.kernels" 2>/dev/null; then
        FINDER=$(mktemp -d)
        cat > "$FINDER/sitecustomize.py" <<PY
import importlib.util, sys
class _OscarLayout:  # the package-dir mapping of pyproject.toml
    roots = {"oscar_sglang.kernels": "$PWD/kernels", "oscar_sglang.calib": "$PWD/calib"}
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        root = cls.roots.get(name)
        return root and importlib.util.spec_from_file_location(name, root + "/__init__.py",
                                                               submodule_search_locations=[root])
sys.meta_path.insert(0, _OscarLayout)
PY
        export PYTHONPATH="$FINDER:$PYTHONPATH"
    fi
fi
python3 -c "import oscar_sglang.kernels, oscar_sglang.calib" || { echo "cannot import oscar_sglang.kernels"; exit 1; }
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

status=0
step() {  # step SECONDS LOGNAME CMD...: run with a time limit, keep going on failure
    local limit=$1 log=$2; shift 2
    echo "=== $* (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$log"
    local rc=${PIPESTATUS[0]}
    echo "=== rc=$rc in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || status=1
}
if [ "${2:-}" = "--sweep" ]; then
    step 300 bench_decode_sweep.log python3 -m benchmarks.bench_decode --sweep --out "$OUT_DIR"
    exit $status
fi
step 220 gpu_tests.log python3 -m pytest -q -p no:cacheprovider --maxfail=10 -o addopts="" \
    tests/test_kernels_write.py tests/test_kernels_decode.py tests/test_kernels_extend.py tests/test_codec_quant_error.py
step 140 bench_decode.log python3 -m benchmarks.bench_decode --out "$OUT_DIR"
step 50 bench_write.log python3 -m benchmarks.bench_write --out "$OUT_DIR"
step 70 bench_extend.log python3 -m benchmarks.bench_extend --out "$OUT_DIR"
exit $status
