"""Microbenchmarks of the transformer MLP's GELU + dropout: the fused op against its parts, side
by side in one run (forward and backward, float32 and bf16).

    OMP_NUM_THREADS=1 pytest bench/test_bench_gelu_dropout.py --benchmark-timer=time.process_time \
        --benchmark-json=bench/gelu_dropout.json

Each group (pass x dtype) holds: fused (torch.ops.lafs_fast.gelu_dropout and its backward), unfused
(F.gelu then torch.ops.lafs_fast.counter_dropout: what the MLP ran before), and torch (F.gelu then
F.dropout, the release's modules). The activation is the pretraining step's widest one: the
global views of part_fvit_mini (32 x 197 tokens, MLP width 768). test_fused_over_unfused_interleaved
times fused and unfused alternately (A B B A per round) and stores the median ratio and its
quartiles in extra_info, the figure to quote on a shared machine.
"""
import time

import pytest
import torch
import torch.nn.functional as F

import lafs_fast.ops  # noqa: F401  (registers the ops)
from lafs_fast.ops.gelu_dropout import HAS_KERNEL

pytestmark = pytest.mark.skipif(not HAS_KERNEL, reason="lafs_fast._C not built")
SHAPE, P = (32 * 197, 768), 0.1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def forward_impls():
    return {
        "fused": lambda x: torch.ops.lafs_fast.gelu_dropout(x, P, 5),
        "unfused": lambda x: torch.ops.lafs_fast.counter_dropout(F.gelu(x), P, 5),
        "torch": lambda x: F.dropout(F.gelu(x), P, True),
    }


def backward_impls(x):
    keep = (torch.ops.lafs_fast.counter_dropout(torch.ones_like(x), P, 5) != 0).to(x.dtype) / (1 - P)
    return {
        "fused": lambda g: torch.ops.lafs_fast.gelu_dropout_backward(g, x, P, 5),
        "unfused": lambda g: torch.ops.aten.gelu_backward(torch.ops.lafs_fast.counter_dropout(g, P, 5), x),
        "torch": lambda g: torch.ops.aten.gelu_backward(g * keep, x),   # dropout's backward: g * mask
    }


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(SHAPE, generator=g) * 2).to(dtype), torch.randn(SHAPE, generator=g).to(dtype)


def pick(pass_, dtype_name):
    x, grad = inputs(DTYPES[dtype_name])
    return (forward_impls(), x) if pass_ == "forward" else (backward_impls(x), grad)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("pass_", ["forward", "backward"])
@pytest.mark.parametrize("impl", ["fused", "unfused", "torch"])
def test_gelu_dropout(benchmark, pass_, dtype_name, impl):
    impls, arg = pick(pass_, dtype_name)
    benchmark.group = f"gelu_dropout {pass_} {dtype_name} {SHAPE[0]}x{SHAPE[1]}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(impls[impl], args=(arg,), rounds=15, warmup_rounds=2)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("pass_", ["forward", "backward"])
def test_fused_over_unfused_interleaved(benchmark, pass_, dtype_name):
    impls, arg = pick(pass_, dtype_name)
    fa, fb = impls["fused"], impls["unfused"]
    torch.testing.assert_close(fa(arg).float(), fb(arg).float(), rtol=1.6e-2, atol=1e-2)  # the same function
    timer = getattr(benchmark, "_timer", time.perf_counter)
    ratios = []

    def timed(f):
        t0 = timer()
        f(arg)
        return timer() - t0

    def one_round():
        a = timed(fa)
        b = timed(fb) + timed(fb)
        a += timed(fa)
        ratios.append(a / b)

    benchmark.group = f"gelu_dropout fused / unfused {pass_} {dtype_name}"
    benchmark.pedantic(one_round, rounds=21, warmup_rounds=1)
    ratios.sort()
    benchmark.extra_info.update({"ratio_median": round(ratios[len(ratios) // 2], 3),
                                 "ratio_q1": round(ratios[len(ratios) // 4], 3),
                                 "ratio_q3": round(ratios[3 * len(ratios) // 4], 3),
                                 "threads": torch.get_num_threads()})
