"""The library's own GEMM rate at one shape: the yardstick for the GEMM rates inside a profiled
step or forward (bench/step_throughput.py, bench/embed_throughput.py). A GEMM inside the model
running at this rate is at the library's peak for its shape; what the model loses beyond that
is not in its GEMMs."""
from __future__ import annotations

import time

import torch

GEMM_FLOP_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_")


def gemm_peak(dtype: torch.dtype, m: int, k: int, n: int, device: str = "cpu", reps: int = 10) -> float:
    """GFLOP/s of torch.mm (m x k @ k x n) in `dtype`, best of 3 runs of `reps` calls; CPU time of
    this process on a CPU (other processes' load does not count), wall time on a GPU."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    clock = time.process_time if device == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = clock()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        best = min(best, (clock() - t0) / reps)
    return 2.0 * m * k * n / best / 1e9


def profiled_gemm_rate(events) -> tuple:
    """(GFLOP, ms, GFLOP/s) of the GEMM ops among torch.profiler key_averages() events recorded
    with with_flops=True, over their self CPU time."""
    gemms = [e for e in events if e.key in GEMM_FLOP_OPS]
    flops = sum(e.flops for e in gemms)
    ms = sum(e.self_cpu_time_total for e in gemms) / 1e3
    return flops / 1e9, ms, (flops / 1e6 / ms if ms else float("nan"))
