#!/usr/bin/env bash
# On a CUDA machine with no internet, from the repo root:
#   bash bench/run_gpu.sh [bench/gpu.py options]    the benchmark table, then the flux-fast anchor if time is left
#   bash bench/run_gpu.sh --tests [pytest options]  tests/test_gpu.py (fp8 + inductor on the tiny model)
# The machine has torch; diffusers, torchao and peft come as wheels in .whl/ (bench/fetch_wheels.sh
# fills it on a machine that reaches the package index). Output goes to stdout and $OUT.
# BUDGET_S (default 530): everything, the anchor included, ends within it: a lent GPU has 10 minutes a
# command. The anchor kit, where it was copied to .anchors/ (../shared/gpu-anchors/README.md), runs its
# fp8 + compile recipe (config c, dev) on the same machine when 150 s or more are left.
set -euo pipefail
START=$(date +%s)
export BENCH_DEADLINE=$(( START + ${BUDGET_S:-530} ))
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
status=0
python3 bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt" || status=$?
LEFT=$(( BENCH_DEADLINE - $(date +%s) ))
if [ -f .anchors/run_gpu.sh ] && [ "$LEFT" -ge 150 ]; then
  echo "anchor: flux-fast's recipe (fp8 + compile, config c, dev) with ${LEFT} s left"
  OUT="$OUT/anchor" LIMIT=$(( LEFT - 20 )) bash .anchors/run_gpu.sh --configs c:dev --no-vae || true
else
  echo "anchor: not run (${LEFT} s left; kit in .anchors/: $([ -f .anchors/run_gpu.sh ] && echo yes || echo no))"
fi
exit "$status"
