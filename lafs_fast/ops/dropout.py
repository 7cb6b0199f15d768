"""Counter-based dropout: torch.ops.lafs_fast.counter_dropout and a drop-in nn.Dropout.

Counter-based: the mask of element i is a pure function of (seed, flat index i, p), an integer
hash (the mask function: lafs_fast.reference.dropout_keep_mask), not a draw from a stream.

Why: torch's CPU dropout draws its mask with bernoulli_, which off Intel CPUs is one serial
mt19937 draw per element; in a small ViT pretraining step on a 2-core AMD EPYC that was ~12-19 %
of the step. A counter-based mask lets the kernel run on every core, vectorised, and the backward
recomputes the mask instead of saving it.

Numerics: the same distribution as nn.Dropout (keep probability 1 - p, p quantised to 2^-32), a
different random stream. `use_counter_dropout(model)` swaps a model's nn.Dropout modules (a
switch: `--fast-dropout false` keeps torch's). On CUDA tensors the module uses torch's dropout,
already a fused kernel there. Oracle: lafs_fast.reference.dropout.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import reference
from ._common import has_kernel

__all__ = ["counter_dropout", "CounterDropout", "use_counter_dropout"]

HAS_KERNEL = has_kernel("counter_dropout", "CPU")


def _register_compiled_op() -> None:
    """Fake kernel and autograd of the C++ op (schema in csrc/lafs_ops.cpp)."""
    @torch.library.register_fake("lafs_fast::counter_dropout")
    def _fake(x, p, seed):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def setup(ctx, inputs, output):
        _, ctx.p, ctx.seed = inputs

    def backward(ctx, grad):
        # same mask, same scale: d(x * keep * s)/dx = keep * s
        return torch.ops.lafs_fast.counter_dropout(grad.contiguous(), ctx.p, ctx.seed), None, None

    torch.library.register_autograd("lafs_fast::counter_dropout", backward, setup_context=setup)


if HAS_KERNEL:
    _register_compiled_op()


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def counter_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """x * keep / (1 - p), keep = reference.dropout_keep_mask(seed); differentiable in x."""
    _check_p(p)
    if not x.is_floating_point():
        raise ValueError(f"dropout input must be floating point, got {x.dtype}")
    if HAS_KERNEL and x.device.type == "cpu":
        return torch.ops.lafs_fast.counter_dropout(x, float(p), int(seed))
    return _ReferenceDropout.apply(x, p, seed)


class _ReferenceDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        ctx.p, ctx.seed = p, seed
        return reference.dropout(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, grad):
        return reference.dropout(grad.contiguous(), ctx.p, ctx.seed), None, None


class CounterDropout(nn.Module):
    """nn.Dropout with the counter-based CPU kernel; the seed of each call comes from torch's
    default CPU generator, so torch.manual_seed makes runs repeatable."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        _check_p(p)
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            # CUDA: torch's fused kernel. Under torch.compile the seed below would be a
            # data-dependent int (fullgraph fails); inductor generates its own dropout code.
            return nn.functional.dropout(x, self.p, True)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        return counter_dropout(x, self.p, seed)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_counter_dropout(model: nn.Module) -> int:
    """Replace every nn.Dropout in `model` by CounterDropout(p) in place; returns how many."""
    n = 0
    for name, child in list(model.named_children()):
        if type(child) is nn.Dropout:
            setattr(model, name, CounterDropout(child.p))
            n += 1
        else:
            n += use_counter_dropout(child)
    return n
