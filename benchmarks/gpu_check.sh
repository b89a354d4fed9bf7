#!/usr/bin/env bash
# The one command for a short GPU window (about 15 minutes, one command at most 10):
#
#   OUT=<folder> bash benchmarks/gpu_check.sh            # one H100/H200, offline: < 8 minutes
#   OUT=<folder> bash benchmarks/gpu_check.sh --dry-run  # CPU, Triton interpreter, tiny shapes
#
# Stages, in order of value, each under its own `timeout`:
#   probe        nvidia-smi, versions, the environment (below); starts the CUDA extension's
#                JIT build (MAX_JOBS=16) in the background
#   correctness  the GPU parity subset listed in benchmarks/gpu_check_tests.txt, pytest -n 8,
#                per-test timeouts, one line per test as it finishes, FASTLM_AUTOTUNE=0
#   models       benchmarks/gpu_check_models.py: BERT / GPT-2 against transformers
#   bench        benchmarks/gpu_check_bench.py: the headline benchmarks, autotuning on
# After every stage, benchmarks/gpu_check_report.py packs $OUT: summary.md (every check
# with pass/fail, every benchmark with its ratio to the baseline, the device), results.json
# (the raw rows) and the stages' logs, so a kill at any moment keeps what finished. $OUT
# holds at most 8 plain files and no folders (what a GPU window can bring back).
#
# Environment: no pip, no network, no ensurepip. The image's python3 (or $PYTHON) keeps its
# torch/triton/transformers; a throw-away `venv --without-pip --system-site-packages` on top
# of it, and PYTHONPATH=<repo>: fastlm maps fastlm.kernels -> kernels/ and fastlm.csrc -> csrc/
# itself in a checkout (fastlm/_source_tree.py), so the repository runs as it stands.
# A tree copied without .git can name its commit in FASTLM_GIT_SHA (stamped on every row).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: OUT=<folder> bash $0 [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-${TMPDIR:-/tmp}/gpu-check-out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
STATE="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1  # before anything imports triton
  PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo "$REPO/.venv/bin/python" || echo python3)}"
  # One xdist worker: the dry run's nine tests take seconds, and each worker pays its own
  # imports and collection (12 s of CPU that the CI suite, already on both cores, waits for).
  WORKERS=1 PER_TEST=120 PER_LINE=1 BENCH_BUDGET=60 DRY_FLAG=--dry-run
  T_PROBE=60 T_CORRECTNESS=150 T_MODELS=120 T_BENCH=120
else
  PYTHON="${PYTHON:-python3}"
  WORKERS=8 PER_TEST=120 PER_LINE=0 BENCH_BUDGET=135 DRY_FLAG=
  # 25 + 180 + 60 + 170 = 435 s of stages, under 8 minutes with the packs in between.
  T_PROBE=25 T_CORRECTNESS=180 T_MODELS=60 T_BENCH=170
fi
export PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"  # the image's ninja, next to its python

pack() {
  "$VPY" -m benchmarks.gpu_check_report pack --state "$STATE" --out "$OUT" $DRY_FLAG "$@" \
    || echo "pack failed (exit $?)"
}

FAILED=0
# run_stage NAME LIMIT_S CMD...: output to $OUT/NAME.log (and stdout); a row in stages.tsv.
run_stage() {
  local name=$1 limit=$2 start=$SECONDS rc status
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=passed ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  [ "$status" = passed ] || FAILED=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$rc" >>"$STATE/stages.tsv"
  pack
  echo "== $name: $status (exit $rc, $((SECONDS - start)) s)"
}

# ------------------------------------------------------------------------------ probe
make_env() {
  local site
  if "$PYTHON" -m venv --system-site-packages --without-pip "$STATE/venv"; then
    VPY="$STATE/venv/bin/python"
    site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # The parent may itself be a venv (the GPU image's python3 is): reach its packages too.
    "$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" >"$site/_parent_site.pth"
  else  # no venv module at all: the image's python as it is
    VPY="$(command -v "$PYTHON")"
  fi
}

probe() {
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  "$VPY" -m benchmarks.gpu_check_report probe --state "$STATE" || return 1
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v ninja >/dev/null && echo "ninja $(ninja --version)"
  return 0
}

make_env
export VPY STATE
export -f probe
run_stage probe "$T_PROBE" bash -c probe
# The CUDA extension's JIT build (minutes, once) runs beside the correctness stage; the cuda
# tests wait on its lock. Killed only at the very end: a killed build leaves a stale lock.
MAX_JOBS=16 "$VPY" -c "from fastlm import _cuda_ext
print('CUDA extension:', _cuda_ext.unavailable_reason() or 'built')" >"$OUT/cuda-build.log" 2>&1 &
BUILD_PID=$!

# ------------------------------------------------------------------------ correctness
TIMEOUT_ARGS=()  # pytest-timeout is on the GPU image; without it, only the stage's timeout
grep -q '"pytest_timeout": "absent"' "$STATE/probe.json" 2>/dev/null || TIMEOUT_ARGS=(--timeout "$PER_TEST")
mapfile -t TEST_FILES < <(awk '!/^#/ && NF {print $1}' benchmarks/gpu_check_tests.txt | sort -u)
run_stage correctness "$T_CORRECTNESS" env FASTLM_AUTOTUNE=0 \
  "$VPY" -m pytest -o addopts="" -p no:cacheprovider -p benchmarks.gpu_check_select \
  --select-file benchmarks/gpu_check_tests.txt --select-per-line "$PER_LINE" \
  --select-report "$STATE/selection.json" -n "$WORKERS" -v --tb=line -rfE \
  "${TIMEOUT_ARGS[@]}" "${TEST_FILES[@]}"

# ----------------------------------------------------------------------------- models
run_stage models "$T_MODELS" "$VPY" -m benchmarks.gpu_check_models --out "$STATE/models.jsonl" $DRY_FLAG

# ------------------------------------------------------------------------------ bench
run_stage bench "$T_BENCH" "$VPY" -m benchmarks.gpu_check_bench --out "$STATE/bench.json" \
  --budget-s "$BENCH_BUDGET" $DRY_FLAG

# ------------------------------------------------------------------------------- pack
if kill -0 "$BUILD_PID" 2>/dev/null; then
  echo "CUDA extension build still running at the end: stopped" >>"$OUT/cuda-build.log"
  kill "$BUILD_PID" 2>/dev/null
fi
wait "$BUILD_PID" 2>/dev/null
pack --final
rm -rf "$STATE"
echo "== $OUT:"
ls -l "$OUT"
cat "$OUT/summary.md"
exit "$FAILED"
