#!/usr/bin/env bash
# For a lent GPU: the tests on CUDA, then the benchmark suite; everything lands under $OUT.
# Needs only the machine's torch and triton (liger-kernel and matplotlib are used when present).
# Budget: under 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"

echo "== tests on CUDA =="
timeout 240 python -m pytest -q -x -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.txt" | tail -15
tests_rc=${PIPESTATUS[0]}

echo "== benchmark =="
timeout 300 python -m bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "tests exit $tests_rc, bench exit $bench_rc" | tee "$OUT/status.txt"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
