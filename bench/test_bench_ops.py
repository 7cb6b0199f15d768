"""Microbenchmarks of landmark_patch_embed against its baselines, side by side in one run.

    pytest bench/test_bench_ops.py --benchmark-json=bench/ops.json && python bench/report.py bench/ops.json

Each group (shape x pass) holds: fused (this backend), reference, vectorised (one grid_sample +
F.linear), original loop (grid_sample per landmark + rearrange + Linear) and, for the forward,
the bare GEMM on ready patches (the floor). bench/report.py turns the JSON into ratio tables.
"""
import os

import pytest
import torch

from lafs_fast import ops, reference
from baselines import SavedBytes, bare_gemm, original_loop_patch_embed, vectorised_patch_embed

SHAPES = {"B32-N196-P8-C3-D384": (32, 196, 8, 3, 384), "B64-N196-P8-C3-D768": (64, 196, 8, 3, 768)}
BACKEND = os.environ.get("LAFS_BENCH_BACKEND", "cuda" if torch.cuda.is_available() else "cpu")
DEVICE = "cuda" if BACKEND in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16}[os.environ.get("LAFS_BENCH_DTYPE", "float32")]
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


def fused(images, lm, weight, bias, P):
    return ops.landmark_patch_embed(images, lm, weight, bias, patch_size=P, backend=BACKEND)


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
    benchmark.pedantic(step, rounds=5 if impl != "original_loop" else 3, warmup_rounds=1)


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
    benchmark.pedantic(step, rounds=5 if impl != "original_loop" else 3, warmup_rounds=1)
