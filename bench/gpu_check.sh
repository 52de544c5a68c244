#!/usr/bin/env bash
# GPU checks for the lent GPU machine (no GPU in CI): bash bench/gpu_check.sh [SECTION...]
# Sections: perf budget spab affinity infer pipeline sanitizer (default: all, in that order). Each is
# independent, has its own timeout, prints "== section: PASS|FAIL|TIMEOUT (s)" and ends up in the
# summary table. perf (bench/gpu_perf.py, every figure of #19 and #20) runs first and writes
# $OUT/gpu_perf.md (./gpu_perf.md without $OUT); pipeline prints #22's GPU folder figure. Whole run:
# about 10 minutes on one H100/H200 at most (the section timeouts add up to 16 minutes; perf
# usually takes under 4).
# PYTHON (default python3) is the interpreter with the CUDA torch: a bare `pip` may be another's.
set -u
cd "$(dirname "$0")/.."
export DSCLORA_SHARED="${DSCLORA_SHARED:-$(pwd)/../shared}"
WANTED="$*"
PY="${PYTHON:-python3}"
export PY
want() { [ -z "$WANTED" ] || [[ " $WANTED " == *" $1 "* ]]; }
# Tests run from tests/ so that they import the installed package, with Triton compiled for the GPU.
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1 PYTHONWARNINGS=ignore
SUMMARY=()
overall=0

# section NAME SECONDS COMMAND...: run COMMAND under a timeout, record PASS / FAIL / TIMEOUT.
section() {
  local name=$1 limit=$2 start code verdict
  shift 2
  echo "== $name: $* (timeout ${limit}s)"
  start=$(date +%s)
  # a child bash, so that COMMAND may be one of the functions below
  timeout --kill-after=10 "$limit" bash -c "$(declare -f gpu_pytest gpu_pytest_under)"'; "$@"' "$name" "$@"
  code=$?
  case $code in
    0) verdict=PASS ;;
    124|137) verdict=TIMEOUT; overall=1 ;;
    *) verdict="FAIL (exit $code)"; overall=1 ;;
  esac
  echo "== $name: $verdict ($(( $(date +%s) - start )) s)"
  SUMMARY+=("$(printf '%-34s %-16s %5s s' "$name" "$verdict" "$(( $(date +%s) - start ))")")
}
gpu_pytest() { (cd tests && "$PY" -m pytest -q -p no:cacheprovider --no-header --tb=short -rfE "$@"); }
# gpu_pytest_under TOOL ARGS... -- PYTEST ARGS...: the same pytest run inside a tool (compute-sanitizer)
gpu_pytest_under() {
  local tool=()
  while [ "$1" != "--" ]; do tool+=("$1"); shift; done
  shift
  (cd tests && "${tool[@]}" "$PY" -m pytest -q -p no:cacheprovider --no-header --tb=short -rfE "$@")
}

echo "== machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
section "install (no C++ extensions)" 120 env DSCLORA_EXTENSIONS=none "$PY" -m pip install -q --no-build-isolation --no-deps .
# from tests/, so that the installed package is imported, not the source tree
if ! (cd tests && "$PY" -c "import dsclora, dsclora_kernels; print('== installed:', dsclora.__file__)"); then
  echo "== FATAL: dsclora is not importable by $PY ($(command -v "$PY")) after the install; nothing else can run" >&2
  exit 2
fi
(cd tests && "$PY" -m dsclora info 2>/dev/null | grep -i -E "triton|torch|cuda" | head -5)

# ==== perf: every figure of #19 and #20 in one run (each of its sections has its own timeout) ====
if want perf; then
  section "perf: bench/gpu_perf.py" 420 "$PY" bench/gpu_perf.py --out "${OUT:-.}/gpu_perf.md"
fi

# ==== budget: every Triton launch on this GPU: what the driver reports vs the ahead-of-time compile ====
if want budget; then
  section "budget: launch + report" 100 "$PY" -m dsclora_kernels.triton_budget --device cuda
fi

# ==== spab: the fused SPAB op (Triton forward + recompute backward) ==============================
if want spab; then
  section "spab: CUDA tests" 60 gpu_pytest test_spab.py -k cuda
  section "spab: bench 1x26x512x512 fp16" 30 "$PY" bench/bench_spab.py --device cuda --repeats 20
fi

# ==== affinity: the blockwise Triton loss + gradient ============================================
if want affinity; then
  section "affinity: CUDA tests" 60 gpu_pytest test_affinity.py -k "triton-cuda and not real_features_student"
  section "affinity: bench B=8 H=W 64,128" 30 "$PY" bench/bench_affinity.py --device cuda --sizes 64 128
fi

# ==== infer: fused merged-weight inference ======================================================
if want infer; then
  section "infer: CUDA tests" 30 gpu_pytest test_infer.py -k cuda
  section "infer: bench 1x3x339x510 x4 (no compile)" 30 "$PY" bench/bench_infer.py --device cuda --no-compile --no-onnx
fi

# ==== pipeline: `dsclora infer`'s folder target on this machine (#22: >= 40 images/s or the encode bound) ====
if want pipeline; then
  section "pipeline: 64 PNGs 480x270 -> 1080p" 120 "$PY" bench/bench_pipeline.py --device cuda --images 64 \
    --threads "$(nproc)" --skip levels memory model video
fi

# ==== sanitizer: compute-sanitizer memcheck on the fused kernels (small sizes) ==================
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own allocation, so memcheck sees an access
# past a tensor's end instead of landing in the caching allocator's pool.
if want sanitizer; then
  SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  if [ -x "$SANITIZER" ]; then
    section "sanitizer: memcheck spab+affinity" 45 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      gpu_pytest_under "$SANITIZER" --tool memcheck --error-exitcode 99 --print-limit 20 -- \
      test_spab.py test_affinity.py -k "cuda_forward_matches_reference and shape0 or triton-cuda and single_pixel"
  else
    SUMMARY+=("$(printf '%-34s %-16s' "sanitizer" "SKIPPED (no compute-sanitizer)")")
  fi
fi

echo
echo "== summary =="
printf '%s\n' "${SUMMARY[@]}"
echo "== overall: $([ $overall -eq 0 ] && echo PASS || echo FAIL)"
exit $overall
