#!/usr/bin/env bash
# GPU checks for the lent GPU machine (no GPU in CI): bash bench/gpu_check.sh [SECTION...]
# Each feature owns one clearly separated section below; with no argument every section runs.
# Sections must stay short (the machine is lent for minutes): a few tests, one benchmark table.
set -uo pipefail
cd "$(dirname "$0")/.."
export DSCLORA_SHARED="${DSCLORA_SHARED:-$(pwd)/../shared}"
WANTED="$*"
want() { [ -z "$WANTED" ] || [[ " $WANTED " == *" $1 "* ]]; }
status=0
# Tests run from tests/ so that they import the installed package (with its compiled kernels),
# and with Triton compiled for the GPU (no TRITON_INTERPRET).
unset TRITON_INTERPRET
gpu_pytest() { (cd tests && python -m pytest -q -p no:cacheprovider "$@"); }

echo "== install: pip install --no-build-isolation --no-deps . =="
pip install -q --no-build-isolation --no-deps . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -m dsclora info

# ==== infer: dsclora.infer / dsclora infer (fused merged-weight inference) ====================
if want infer; then
  echo "== infer: tests (CUDA fp32 == reference, fp16 Set5 PSNR, tiling) =="
  gpu_pytest test_infer.py -k "cuda or tiles or dscf" || status=1
  echo "== infer: DIV2K-size LR 1x3x339x510 x4: eager fp16/fp32, torch.compile(max-autotune) fp16, dsclora.infer =="
  python bench/bench_infer.py --device cuda || status=1
fi
# ==== end infer ================================================================================

# ==== spab: the fused SPAB op dsclora_kernels.spab (Triton forward + recompute backward) =========
if want spab; then
  echo "== spab: CUDA tests (fp32/fp16/bf16 forward == reference, fp32 gradients, opcheck, compile) =="
  gpu_pytest test_spab.py -k cuda || status=1
  echo "== spab: 1x26x512x512 fp16: eager (cuDNN NCHW / channels_last), torch.compile, fused; fwd+bwd, memory =="
  python bench/bench_spab.py --device cuda || status=1
fi
# ==== end spab =================================================================================

# ==== affinity: dsclora_kernels.spatial_affinity_loss (blockwise Triton loss + gradient) ========
if want affinity; then
  echo "== affinity: tests (triton-cuda vs float64 reference, real SPAN features, gradcheck, opcheck, compile; cpp) =="
  gpu_pytest test_affinity.py || status=1
  echo "== affinity: B=8, Cs=26, Ct=28, H=W 32..256: naive vs fused fwd+bwd per precision, memory, TFLOP/s =="
  python bench/bench_affinity.py --device cuda || status=1
fi
# ==== end affinity =============================================================================

# ==== sanitizer: compute-sanitizer memcheck + racecheck on the fused kernels (small sizes) =======
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own allocation, so memcheck sees an access
# past a tensor's end instead of landing in the caching allocator's pool.
if want sanitizer; then
  SANITIZER="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  if [ ! -x "$SANITIZER" ]; then
    echo "== sanitizer: SKIPPED: compute-sanitizer not found (install the CUDA toolkit or put it on PATH) =="
  else
    for tool in memcheck racecheck; do
      for subset in "tests/test_spab.py::-k cuda_forward_matches_reference and shape0 or cuda_gradients" \
                    "tests/test_affinity.py::-k triton-cuda and (matches_reference or ragged_edge or single_pixel)" \
                    "tests/test_properties.py::-k triton"; do
        file="${subset%%::*}"; selection="${subset#*::-k }"
        echo "== sanitizer: $tool: $file -k '$selection' =="
        (cd tests && PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 "$SANITIZER" --tool "$tool" \
          --error-exitcode 99 --print-limit 20 python -m pytest -q -p no:cacheprovider "${file#tests/}" -k "$selection")
        code=$?
        case $code in
          0) ;;
          5) echo "   (no CUDA test selected in $file)" ;;
          99) echo "   $tool REPORTED ERRORS in $file"; status=1 ;;
          *) echo "   $file failed under $tool (exit $code)"; status=1 ;;
        esac
      done
    done
  fi
fi
# ==== end sanitizer ============================================================================

exit $status
