"""Microbenchmarks of landmark_patch_embed against its baselines, side by side in one run.

    pytest bench/test_bench_ops.py --benchmark-json=bench/ops.json && python bench/report.py bench/ops.json

LAFS_FAST_CPU_ISA=avx2 (or baseline) forces a lower instruction-set path of the CPU kernels;
LAFS_BENCH_ROUNDS sets the rounds per benchmark (default 5; 3 for the slow original loop). Every
benchmark records the CPU model and the path in extra_info (bench/report.py prints them).

test_target_interleaved times the two sides of each op target alternately (A B B A per round)
and keeps the median of the per-round ratios: on a shared, loaded machine the load changes
between two benchmarks but rarely within one round, so these ratios are the ones to quote there
(with `--benchmark-timer=time.process_time` and OMP_NUM_THREADS=1 they count CPU work only).
test_fusion_interleaved does the same for the fused forward against its own parts run apart
(landmark_patches, then torch.addmm) at 1 and 2 threads: fusion must never lose to composition
(target <= 0.9); the spread over the rounds (quartiles, min-max) goes with the median.

Each group (shape x pass) holds: fused (this backend), reference, vectorised (one grid_sample +
F.linear), original loop (grid_sample per landmark + rearrange + Linear) and, for the forward,
the bare GEMM on ready patches (the floor). bench/report.py turns the JSON into ratio tables.
"""
import os
import platform
import sys
import time

import pytest
import torch
from baselines import SavedBytes, bare_gemm, original_loop_patch_embed, vectorised_patch_embed

from lafs_fast import ops, reference

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from tolerances import assert_close, forward_tol, grad_tol  # noqa: E402  (the tests' tolerances)

SHAPES = {"B32-N196-P8-C3-D384": (32, 196, 8, 3, 384), "B64-N196-P8-C3-D768": (64, 196, 8, 3, 768)}
BACKEND = os.environ.get("LAFS_BENCH_BACKEND", "cuda" if torch.cuda.is_available() else "cpu")
DEVICE = "cuda" if BACKEND in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}[os.environ.get("LAFS_BENCH_DTYPE", "float32")]
ROUNDS = int(os.environ.get("LAFS_BENCH_ROUNDS", "5"))
TARGET_ROUNDS = int(os.environ.get("LAFS_BENCH_TARGET_ROUNDS", "15"))
if os.environ.get("LAFS_BENCH_SHAPE"):  # e.g. the GPU check's "256,196,8,3,768"
    SHAPES = {"B{}-N{}-P{}-C{}-D{}".format(*s): s
              for s in [tuple(int(v) for v in os.environ["LAFS_BENCH_SHAPE"].split(","))]}


def make(shape):
    B, N, P, C, D = shape
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, C, 112, 112, generator=g).to(DEVICE, DTYPE)
    lm = (torch.rand(B, N, 2, generator=g) * 111).to(DEVICE)
    weight = (torch.randn(D, P * P * C, generator=g) / (P * P * C) ** 0.5).to(DEVICE, DTYPE)
    bias = torch.zeros(D).to(DEVICE, DTYPE)
    return images, lm, weight, bias, P


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """CPU model, kernel path, threads and the machine's load (1-minute average, at the end of
    the benchmark), recorded with every benchmark."""
    isa = torch.ops.lafs_fast.cpu_isa() if hasattr(torch.ops.lafs_fast, "cpu_isa") else "n/a"
    return {"cpu_model": cpu_model(), "cpu_isa": isa, "threads": torch.get_num_threads(),
            "load_1min": round(os.getloadavg()[0], 1)}


def fused(images, lm, weight, bias, P):
    return ops.landmark_patch_embed(images, lm, weight, bias, patch_size=P, backend=BACKEND)


def composed(images, lm, weight, bias, P):
    """The fused op's parts run apart: landmark_patches on the same backend, then one GEMM."""
    patches = ops.landmark_patches(images, lm, patch_size=P, backend=BACKEND)
    out = torch.addmm(bias, patches.reshape(-1, patches.shape[-1]), weight.t())
    return out.view(patches.shape[0], patches.shape[1], -1)


def ref(images, lm, weight, bias, P):
    return ops.landmark_patch_embed(images, lm, weight, bias, patch_size=P, backend="reference")


IMPLS = {"fused": fused, "reference": ref, "vectorised": vectorised_patch_embed,
         "original_loop": original_loop_patch_embed}


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS) + ["bare_gemm"])
def test_forward(benchmark, shape, impl):
    images, lm, weight, bias, P = make(SHAPES[shape])
    benchmark.group = f"forward {shape}"
    if impl == "bare_gemm":
        patches = reference.landmark_patches(images, lm, patch_size=P)
        args, fn = (patches, weight, bias), bare_gemm
    else:
        args, fn = (images, lm, weight, bias, P), IMPLS[impl]

    def step():
        with torch.no_grad():
            out = fn(*args)
        sync()
        return out

    benchmark.extra_info["traffic_floor_MB"] = round(traffic_floor(images, lm, weight, P) / 2**20, 1)
    benchmark.extra_info.update(machine_info())
    benchmark.pedantic(step, rounds=ROUNDS if impl != "original_loop" else 3, warmup_rounds=1)


def traffic_floor(images, lm, weight, P):
    """Bytes a perfect forward must move: read the images (or the taps, if fewer), landmarks and
    weight once, write the tokens once."""
    B, C = images.shape[:2]
    N, D = lm.shape[1], weight.shape[0]
    es = images.element_size()
    taps = min(images.numel(), B * N * (P + 1) * (P + 1) * C) * es
    return taps + lm.numel() * lm.element_size() + weight.numel() * es + B * N * D * es


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, shape, impl):
    """Gradients for landmarks, weight and bias (Part fViT training: images need none)."""
    images, lm, weight, bias, P = make(SHAPES[shape])
    benchmark.group = f"forward+backward {shape}"
    leaves = [t.requires_grad_() for t in (lm, weight, bias)]
    grad = torch.randn(images.shape[0], lm.shape[1], weight.shape[0], device=DEVICE, dtype=DTYPE)

    def step():
        for t in leaves:
            t.grad = None
        out = IMPLS[impl](images, lm, weight, bias, P)
        out.backward(grad)
        sync()

    with SavedBytes() as saved:  # memory kept for backward, measured once
        out = IMPLS[impl](images, lm, weight, bias, P)
    benchmark.extra_info["saved_for_backward_MB"] = round(saved.bytes / 2**20, 2)
    benchmark.extra_info["output_MB"] = round(out.numel() * out.element_size() / 2**20, 2)
    del out
    benchmark.extra_info.update(machine_info())
    benchmark.pedantic(step, rounds=ROUNDS if impl != "original_loop" else 3, warmup_rounds=1)


# target -> (numerator, denominator, goal, sense): see bench/report.py TARGETS
TARGETS = {"forward": ("fused", "bare_gemm", 1.15, "<="),
           "forward+backward": ("vectorised", "fused", 1.4, ">="),
           "fusion": ("fused", "composed", 0.9, "<=")}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("target", ["forward", "forward+backward"])
def test_target_interleaved(benchmark, shape, target):
    """The two sides of one op target timed alternately, A B B A in every round; the ratio of
    each round's sums, median and quartiles over the rounds, go to extra_info."""
    interleaved(benchmark, shape, target)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("threads", [1, 2])
def test_fusion_interleaved(benchmark, shape, threads):
    """Fused forward / (landmark_patches + torch.addmm), interleaved, at a given thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        interleaved(benchmark, shape, "fusion")
    finally:
        torch.set_num_threads(before)


def interleaved(benchmark, shape, target):
    images, lm, weight, bias, P = make(SHAPES[shape])
    num, den, goal, sense = TARGETS[target]
    benchmark.group = f"target {target} {shape}"
    if target in ("forward", "fusion"):
        patches = reference.landmark_patches(images, lm, patch_size=P)
        impls = {**IMPLS, "composed": composed}

        def side(impl):
            def run():
                with torch.no_grad():
                    if impl == "bare_gemm":
                        bare_gemm(patches, weight, bias)
                    else:
                        impls[impl](images, lm, weight, bias, P)
                sync()
            return run
    else:
        leaves = [t.requires_grad_() for t in (lm, weight, bias)]
        grad = torch.randn(images.shape[0], lm.shape[1], weight.shape[0], device=DEVICE, dtype=DTYPE)

        def side(impl):
            def run():
                for t in leaves:
                    t.grad = None
                IMPLS[impl](images, lm, weight, bias, P).backward(grad)
                sync()
            return run
    fa, fb = side(num), side(den)
    # the clock pytest-benchmark was told to use (--benchmark-timer); a private attribute
    timer = getattr(benchmark, "_timer", time.perf_counter)
    ratios = []

    def timed(f):
        t0 = timer()
        f()
        return timer() - t0

    def one_round():
        a = timed(fa)
        b = timed(fb) + timed(fb)
        a += timed(fa)
        ratios.append(a / b)

    fa(), fb()  # warm-up
    benchmark.pedantic(one_round, rounds=TARGET_ROUNDS, warmup_rounds=0)
    ratios.sort()
    q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
    benchmark.extra_info.update(
        {"ratio": f"{num} / {den}", "goal": f"{sense} {goal}", "ratio_median": round(q(0.5), 3),
         "ratio_q1": round(q(0.25), 3), "ratio_q3": round(q(0.75), 3),
         "ratio_min": round(ratios[0], 3), "ratio_max": round(ratios[-1], 3), "rounds": len(ratios)})
    benchmark.extra_info.update(machine_info())


@pytest.mark.parametrize("impl", ["vectorised", "original_loop"])
def test_baselines_compute_the_op(impl):
    """The baselines are the same function as the fused op (forward and the three gradients the
    forward+backward benchmark takes), so the timings compare equal work: checked against the
    float64 reference on a small case with landmarks over and beyond the border, and the forward
    on the first benchmark shape."""
    g = torch.Generator().manual_seed(3)
    B, N, P, C, D = 3, 11, 8, 3, 17
    images = torch.randn(B, C, 21, 19, generator=g)
    lm = torch.rand(B, N, 2, generator=g) * 30 - 5
    weight = torch.randn(D, P * P * C, generator=g) / (P * P * C) ** 0.5
    bias = torch.randn(D, generator=g)
    grad = torch.randn(B, N, D, generator=g)
    leaves = [t.clone().requires_grad_() for t in (lm, weight, bias)]
    out = IMPLS[impl](images, *leaves, P)
    out.backward(grad)
    ref_leaves = [t.double().requires_grad_() for t in (lm, weight, bias)]
    ref = ops.landmark_patch_embed(images.double(), *ref_leaves, patch_size=P, backend="reference")
    ref.backward(grad.double())
    assert_close(out, ref, forward_tol(torch.float32))
    for name, a, r in zip(("landmarks", "weight", "bias"), leaves, ref_leaves):
        tol = grad_tol(torch.float32)
        scale = max(1.0, r.grad.abs().max().item())
        assert_close(a.grad, r.grad, dict(rtol=tol["rtol"], atol=tol["atol"] * scale), msg=name)
    if impl == "vectorised":  # the benchmark's own inputs (the loop is too slow for a test)
        images, lm, weight, bias, P = (t.cpu() if isinstance(t, torch.Tensor) else t
                                       for t in make(next(iter(SHAPES.values()))))
        if images.dtype == torch.float32:
            with torch.no_grad():
                got = vectorised_patch_embed(images, lm, weight, bias, P)
                want = ops.landmark_patch_embed(images, lm, weight, bias, patch_size=P,
                                                backend="cpu" if ops.HAS_EXTENSION else "reference")
            assert_close(got, want, forward_tol(torch.float32))
