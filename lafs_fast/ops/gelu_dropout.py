"""GELU then counter-based dropout in one pass: torch.ops.lafs_fast.gelu_dropout, the transformer
MLP's `drop1(act(fc1(x)))` when act is the erf GELU and drop1 a CounterDropout.

Why: on a CPU both are compute-bound passes over the MLP's widest activation (erf, the mask hash,
bf16 conversions), run once more each in the backward. One pass computes each value once: per
(6304, 768) activation on one Zen 4 core, bf16 forward 5.0 -> 3.7 ms and backward 7.0 -> 5.3 ms,
float32 5.6 -> 3.0 ms and 13.9 -> 4.4 ms (bench/test_bench_ops.py, gelu_dropout group).

Numerics: the mask is counter_dropout's for the same (seed, shape), so the fused and unfused MLP
drop the same units; GELU's erf is a float32 rational approximation (abs error < 5e-7, the
kernel's comment) rounded once to the input dtype, where the unfused pair rounds twice. float64
(gradcheck) computes with libm's erf and exp. Oracle: lafs_fast.reference.gelu_dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import has_kernel
from .dropout import _check_p, counter_dropout

__all__ = ["gelu_dropout"]

HAS_KERNEL = has_kernel("gelu_dropout", "CPU")


def _register_compiled_op() -> None:
    """Fake kernels and autograd of the C++ ops (schemas in csrc/lafs_ops.cpp)."""
    @torch.library.register_fake("lafs_fast::gelu_dropout")
    def _fake(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("lafs_fast::gelu_dropout_backward")
    def _fake_backward(grad, x, p, seed):
        torch._check(grad.shape == x.shape and grad.dtype == x.dtype,
                     lambda: f"gelu_dropout_backward: grad {tuple(grad.shape)} {grad.dtype} must match "
                             f"the input {tuple(x.shape)} {x.dtype}")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup(ctx, inputs, output):
        x, ctx.p, ctx.seed = inputs
        ctx.save_for_backward(x)

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.lafs_fast.gelu_dropout_backward(grad.contiguous(), x, ctx.p, ctx.seed), None, None

    torch.library.register_autograd("lafs_fast::gelu_dropout", backward, setup_context=setup)


if HAS_KERNEL:
    _register_compiled_op()


def gelu_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """counter_dropout(gelu(x), p, seed) (erf GELU), in one pass on CPU; differentiable in x."""
    _check_p(p)
    if not x.is_floating_point():
        raise ValueError(f"gelu_dropout input must be floating point, got {x.dtype}")
    if HAS_KERNEL and x.device.type == "cpu":
        return torch.ops.lafs_fast.gelu_dropout(x, float(p), int(seed))
    return counter_dropout(F.gelu(x), p, seed)

