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

# ==== infer: dsclora.infer / dsclora infer (fused merged-weight inference) ====================
if want infer; then
  echo "== infer: tests (CUDA fp32 == reference, fp16 Set5 PSNR, tiling) =="
  python -m pytest -q tests/test_infer.py -k "cuda or tiles or dscf" || status=1
  echo "== infer: DIV2K-size LR 1x3x339x510 x4: eager fp16/fp32, torch.compile(max-autotune) fp16, dsclora.infer =="
  python bench/bench_infer.py --device cuda || status=1
fi
# ==== end infer ================================================================================

# ==== spab: the fused SPAB op dsclora_kernels.spab (Triton forward + recompute backward) =========
if want spab; then
  echo "== spab: CUDA tests (fp32/fp16/bf16 forward == reference, fp32 gradients, opcheck, compile) =="
  python -m pytest -q tests/test_spab.py -k cuda || status=1
  echo "== spab: 1x26x512x512 fp16: eager (cuDNN NCHW / channels_last), torch.compile, fused; fwd+bwd, memory =="
  PYTHONPATH=. python bench/bench_spab.py --device cuda || status=1
fi
# ==== end spab =================================================================================

exit $status
