#!/usr/bin/env bash
# On a CUDA machine with no internet, from the repo root:
#   bash bench/run_gpu.sh [bench/gpu.py options]    the benchmark table
#   bash bench/run_gpu.sh --tests [pytest options]  tests/test_gpu.py (fp8 + inductor on the tiny model)
# The machine has torch; diffusers, torchao and peft come as wheels in .whl/ (bench/fetch_wheels.sh
# fills it on a machine that reaches the package index). Output goes to stdout and $OUT.
set -euo pipefail
OUT=${OUT:-/tmp/bench-gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 OUT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
python3 -c "import torch, diffusers, torchao, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__, 'peft', peft.__version__)"
if [ "${1:-}" = "--tests" ]; then
  shift
  python3 -m pytest -q -p no:cacheprovider -s tests/test_gpu.py "$@" 2>&1 | tee "$OUT/tests.txt"
  exit "${PIPESTATUS[0]}"
fi
python3 bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
