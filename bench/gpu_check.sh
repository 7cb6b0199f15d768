#!/usr/bin/env bash
# One script for a CUDA machine: build with the CUDA kernels, run the CUDA and Triton tests, then
# the op benchmarks at (B=256, N=196, P=8, C=3, D=768) in bfloat16 for the cuda and triton
# backends (with the vectorised, original-loop and reference baselines in the same run), and the
# pretraining-step benchmark at part_fvit_b, batch 64, bf16. Tables land in $OUT (or bench/out).
#
#   bash bench/gpu_check.sh          # needs torch with CUDA, triton, nvcc (CUDA_HOME) and a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LAFS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
python -m lafs_fast.info | tee "$OUT/info.txt"
# Correctness first: every backend against the reference, on the GPU.
python -m pytest -q tests/test_ops_landmark_patch_embed.py tests/test_ops_multicrop.py 2>&1 | tee "$OUT/tests.txt" | tail -5
# Op microbenchmarks; GPU utilisation sampled alongside.
(nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader -lms 200 > "$OUT/util.txt" &) ; UTIL_PID=$!
for backend in cuda triton; do
  LAFS_BENCH_BACKEND=$backend LAFS_BENCH_DTYPE=bfloat16 LAFS_BENCH_SHAPE=256,196,8,3,768 \
    python -m pytest -q bench/test_bench_ops.py --benchmark-json="$OUT/ops_$backend.json" 2>&1 | tail -3
  python bench/report.py "$OUT/ops_$backend.json" | tee "$OUT/ops_$backend.md"
done
# The training step (fused path vs the original-style path), bf16 autocast: the pytest-benchmark
# entry at batch 64, then the throughput table (data included and excluded, with a profile) at the
# released size and batch 82 per GPU, and the step's peak memory.
LAFS_STEP_MODEL=part_fvit_b LAFS_STEP_BATCH=64 LAFS_STEP_AMP=bf16 \
  python -m pytest -q bench/test_bench_step.py --benchmark-json="$OUT/step.json" 2>&1 | tail -3
python bench/report.py "$OUT/step.json" --baseline fused | tee "$OUT/step.md"
python bench/step_throughput.py --model part_fvit_b --batch 82 --amp bf16 --steps 10 --warmup 3 \
  --out "$OUT/step_throughput.md" --json "$OUT/step_throughput.json" 2>&1 | tail -40
python bench/step_memory.py --model part_fvit_b --batch 82 --amp bf16 --out "$OUT/step_memory.md" 2>&1 | tail -8
# Loader images/s alone (decode + views on the GPU), the ceiling the data side puts on a step.
python - <<'PY' 2>&1 | tee "$OUT/loader.txt"
import sys, time, torch
sys.path.insert(0, "bench")
import step_paths as SP
from lafs_fast import views
p = SP.face_bytes(82); cfg = views.ViewConfig(n_local=8); g = torch.Generator("cuda").manual_seed(0)
for _ in range(3): SP.fused_views(SP.fused_decode(p).cuda(), cfg, g)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): SP.fused_views(SP.fused_decode(p).cuda(), cfg, g)
torch.cuda.synchronize(); print(f"decode + views on the GPU: {820 / (time.perf_counter() - t):.0f} images/s")
aug = SP.OriginalAugmentation(); t = time.perf_counter(); SP.original_data(p, aug)
print(f"original PIL pipeline, one process: {82 / (time.perf_counter() - t):.0f} images/s")
PY
pkill -f "nvidia-smi --query-gpu=utilization" || true
awk '{s+=$1; n++} END {if (n) printf "mean GPU utilisation during benchmarks: %.0f%%\n", s/n}' "$OUT/util.txt" | tee -a "$OUT/step.md"
