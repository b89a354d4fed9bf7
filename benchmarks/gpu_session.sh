#!/usr/bin/env bash
# One lent-GPU session's work, in steps that each fit a 10-minute command:
#
#   bash benchmarks/gpu_session.sh test    # info + the GPU test suite (bf16, CUDA backend, ...)
#   bash benchmarks/gpu_session.sh bench   # every benchmark -> benchmarks/results/<gpu>/
#   bash benchmarks/gpu_session.sh all     # both
#
# Logs and a tarball of benchmarks/results (raw JSON, markdown, plots) land in $OUT (default
# ./gpu-out), ready to be copied back and committed. Nothing is downloaded: the GPU image's
# torch/triton/transformers are reused (make gpu-test / make bench set up .venv offline).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step="${1:-all}"

run_test() {
  nvidia-smi -L 2>&1 | tee "$OUT/nvidia-smi.txt"
  make -s gpu-test PYTEST_ARGS="-q -p no:logging --durations=20" 2>&1 | tee "$OUT/gpu-test.log"
  .venv/bin/python -m fastlm info 2>&1 | tee "$OUT/info.txt"
}

run_bench() {
  make -s bench BENCH_ARGS="${BENCH_ARGS:-}" 2>&1 | tee "$OUT/bench.log"
  .venv/bin/python -m benchmarks.make_dispatch_table 2>&1 | tee "$OUT/dispatch_table.txt"
  tar czf "$OUT/results.tgz" benchmarks/results
}

case "$step" in
  test) run_test ;;
  bench) run_bench ;;
  all) run_test; run_bench ;;
  *) echo "usage: $0 test|bench|all" >&2; exit 2 ;;
esac
