#!/usr/bin/env bash
# The GPU check in two stages, each well under 5 minutes on one H200:
#
#   OUT=/some/dir bash bench/gpu_check.sh correctness   # build for this machine's torch (sm_90),
#                       # lafs_fast.info, the CUDA + Triton tests (per-test and per-group limits),
#                       # 3 pretrain + 3 finetune steps on cuda with bf16 autocast
#   OUT=/some/dir bash bench/gpu_check.sh bench         # op benchmarks (B=256 N=196 P=8 D=768 bf16),
#                       # the part_fvit_b batch-82 pretraining step (fused vs original-style, peak
#                       # memory), decode + views images/s, mean GPU utilisation
#
# Writes gpu_check_<stage>.{md,json,log} into $OUT (default bench/out/<stage>) and prints the
# report. Failures are collected, never fatal: the exit status is 0 when the stage ran to its end,
# 2 for a bad stage name. LAFS_GPU_CHECK_SMOKE=1 runs the CPU smoke mode (CI). All the logic is
# in bench/gpu_check.py; PYTHON overrides the interpreter (default python3).
cd "$(dirname "$0")/.." || exit 2
STAGE=${1:-}
case "$STAGE" in
  correctness|bench) ;;
  *) echo "usage: [OUT=dir] [LAFS_GPU_CHECK_SMOKE=1] bash bench/gpu_check.sh {correctness|bench}" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/out/$STAGE}
mkdir -p "$OUT" || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$STAGE" --out "$OUT"
