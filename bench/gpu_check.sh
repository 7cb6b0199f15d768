#!/usr/bin/env bash
# The GPU check (docs/gpu_check.md describes every stage and part):
#
#   OUT=/some/dir bash bench/gpu_check.sh all           # correctness, then bench, in one process
#                       # tree within one 600 s device call on a fresh machine, build included
#   OUT=/some/dir bash bench/gpu_check.sh correctness   # build for this machine's torch (its GPU's
#                       # architecture only; a Python.h probe first), lafs_fast.info, 2 finetune +
#                       # pretrain runs on cuda with bf16 autocast, the CUDA + Triton test groups
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
  all|correctness|bench) ;;
  *) echo "usage: [OUT=dir] [LAFS_GPU_CHECK_SMOKE=1] bash bench/gpu_check.sh {all|correctness|bench}" >&2; exit 2 ;;
esac
OUT=${OUT:-bench/out/$STAGE}
mkdir -p "$OUT" || exit 2
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$STAGE" --out "$OUT"
