"""GELU + counter-based dropout in one pass (lafs_fast.ops.gelu_dropout): the C++ kernel on every
instruction-set path against the oracle (lafs_fast.reference.gelu_dropout), its gradients, the
non-finite and far-tail values, and the transformer MLP that uses it.

Tolerances, per dtype. float64 computes with libm's erf and exp: 1e-12. float32 uses a rational
erf whose absolute error is < 5e-7 (the kernel's comment); GELU multiplies it by x / 2 and the
dropout scale, so |error| <= 2.5e-7 * |x| * scale plus one float32 rounding (2^-24 relative);
the tests allow 4e-7 * |x| * scale + 2e-7 * |ref| + 1e-7. bf16 rounds the float32 value once: half
a unit in the last place, 2^-9 relative, plus the float32 error above; the tests allow
2^-8 * |ref| + 4e-7 * |x| * scale + 1e-7 (the unfused pair rounds twice and stays within it too).
The backward's pdf term adds an exp polynomial of < 6e-8 relative error: the same bounds hold.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lafs_fast import reference as R
from lafs_fast.models.vit import Mlp
from lafs_fast.ops import CounterDropout, counter_dropout, gelu_dropout, use_counter_dropout
from lafs_fast.ops.gelu_dropout import HAS_KERNEL

gd_module = importlib.import_module("lafs_fast.ops.gelu_dropout")   # the package re-exports the function
vit = importlib.import_module("lafs_fast.models.vit")

needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="lafs_fast._C not built")
PATHS = list(torch.ops.lafs_fast.cpu_isa_supported()) if HAS_KERNEL else []
P, SEED = 0.3, 987654321


@pytest.fixture
def restore_path():
    before = torch.ops.lafs_fast.cpu_isa()
    yield
    torch.ops.lafs_fast.set_cpu_isa(before)


def bound(x, ref, dtype, p):
    """Allowed |fast - oracle| per element (the module docstring)."""
    scale = 1.0 / (1.0 - p)
    if dtype == torch.float64:
        return 1e-12 * (1 + ref.abs())
    slack = 4e-7 * x.double().abs() * scale + 1e-7
    return slack + (2.0**-8 if dtype in (torch.bfloat16, torch.float16) else 2e-7) * ref.abs()


def oracle(x, p, seed):
    """The float64 truth: dropout(gelu(x)) from the rounded input, not rounded."""
    return R.gelu_dropout(x.double(), p, seed)


def oracle_grad(x, g, p, seed):
    xr = x.double().requires_grad_()
    (R.gelu_dropout(xr, p, seed) * g.double()).sum().backward()
    return xr.grad


def check(got, want, x, dtype, p, what):
    assert got.dtype == dtype and got.shape == x.shape, what
    err = (got.double() - want).abs()
    tol = bound(x, want, dtype, p)
    worst = (err - tol).argmax() if err.numel() else None
    assert (err <= tol).all(), f"{what}: |err| {err.flatten()[worst].item():.3g} > {tol.flatten()[worst].item():.3g} " \
        f"at x = {x.flatten()[worst].item():.6g}"


@needs_kernel
@pytest.mark.parametrize("numel", [0, 1, 7, 15, 16, 17, 33, 4099, 40000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_and_backward_match_the_oracle_on_every_path(numel, dtype, restore_path):
    gen = torch.Generator().manual_seed(numel)
    x = (torch.randn(numel, generator=gen, dtype=torch.float64) * 3).to(dtype)
    g = torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)
    want, want_grad = oracle(x, P, SEED), oracle_grad(x, g, P, SEED)
    keep = R.dropout_keep_mask(numel, P, SEED)
    for isa in PATHS:
        torch.ops.lafs_fast.set_cpu_isa(isa)
        y = torch.ops.lafs_fast.gelu_dropout(x, P, SEED)
        check(y, want, x, dtype, P, f"{isa} forward")
        assert (y[~keep] == 0).all(), f"{isa}: a dropped unit is not zero"
        dx = torch.ops.lafs_fast.gelu_dropout_backward(g, x, P, SEED)
        check(dx, want_grad, x, dtype, P, f"{isa} backward")
        assert (dx[~keep] == 0).all(), f"{isa}: a dropped unit has a gradient"


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_far_tails_and_non_finite_values_follow_torch(dtype, restore_path):
    # p = 0 keeps every unit: the op is GELU itself, compared with torch's on the values where
    # approximations fail first (the fit's ends at |x| = 4 sqrt 2, exp's underflow) and at inf/NaN.
    x = torch.tensor([-float("inf"), -1e30, -1e4, -12.7, -5.66, -5.65, -4.0, -1e-30, 0.0, 1e-30, 4.0, 5.66,
                      1e4, 1e30, float("nan")], dtype=dtype)
    for isa in PATHS:
        torch.ops.lafs_fast.set_cpu_isa(isa)
        y = torch.ops.lafs_fast.gelu_dropout(x, 0.0, 1)
        dx = torch.ops.lafs_fast.gelu_dropout_backward(torch.ones_like(x), x, 0.0, 1)
        finite = torch.isfinite(x)
        check(y[finite], oracle(x[finite], 0.0, 1), x[finite], dtype, 0.0, f"{isa} tails")
        check(dx[finite], oracle_grad(x[finite], torch.ones_like(x[finite]), 0.0, 1), x[finite], dtype, 0.0,
              f"{isa} tail gradients")
        assert y[0].isnan() and y[-1].isnan() and dx[0].isnan() and dx[-1].isnan()   # as torch
        assert y[-2] == 1e30 if dtype == torch.float32 else torch.isfinite(y[-2])
    big = torch.full((64,), float("inf"), dtype=dtype)   # a dropped inf is NaN, as torch's dropout
    y = torch.ops.lafs_fast.gelu_dropout(big, 0.5, 11)
    keep = R.dropout_keep_mask(64, 0.5, 11)
    assert torch.isnan(y[~keep]).all() and torch.isinf(y[keep]).all()


@needs_kernel
def test_non_contiguous_input_reads_logical_order():
    x = torch.randn(33, 17).t()
    assert torch.equal(gelu_dropout(x, 0.2, 5), gelu_dropout(x.contiguous(), 0.2, 5))
    g = torch.randn(33, 17).t()
    a = torch.ops.lafs_fast.gelu_dropout_backward(g, x, 0.2, 5)
    assert torch.equal(a, torch.ops.lafs_fast.gelu_dropout_backward(g.contiguous(), x.contiguous(), 0.2, 5))


@needs_kernel
def test_same_mask_as_counter_dropout_and_gradcheck_and_opcheck():
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    y = gelu_dropout(x, 0.25, 77)
    assert torch.equal(y != 0, counter_dropout(torch.ones(5, 13), 0.25, 77) != 0)
    torch.autograd.gradcheck(lambda t: gelu_dropout(t, 0.25, 77), (x,))
    torch.library.opcheck(torch.ops.lafs_fast.gelu_dropout.default, (torch.randn(3, 9, requires_grad=True), 0.1, 3))
    torch.library.opcheck(torch.ops.lafs_fast.gelu_dropout_backward.default,
                          (torch.randn(3, 9), torch.randn(3, 9), 0.1, 3))


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_bad_arguments_are_clear_errors(p):
    with pytest.raises(ValueError, match="p must be in"):
        gelu_dropout(torch.ones(3), p, 0)
    with pytest.raises(ValueError, match="floating point"):
        gelu_dropout(torch.ones(3, dtype=torch.int64), 0.1, 0)
    if HAS_KERNEL:
        with pytest.raises(RuntimeError, match="must match the input"):
            torch.ops.lafs_fast.gelu_dropout_backward(torch.ones(4), torch.ones(3), 0.1, 0)


def test_fallback_without_the_kernel_is_the_unfused_pair(monkeypatch):
    monkeypatch.setattr(gd_module, "HAS_KERNEL", False)
    x = torch.randn(6, 7)
    assert torch.equal(gelu_dropout(x, 0.2, 9), counter_dropout(F.gelu(x), 0.2, 9))


class UnfusedGELU(nn.GELU):
    """The same erf GELU, of a type the MLP does not fuse: act and drop1 run as two modules."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_fuses_in_training_with_the_unfused_modules_masks(dtype, monkeypatch):
    # The fused MLP draws the same seeds in the same order as drop1(act(.)) then drop2, so with
    # one torch seed both drop the same units: outputs and gradients agree to the op's tolerance.
    torch.manual_seed(0)
    mlp = Mlp(24, 40, dropout=0.3)
    assert use_counter_dropout(mlp) == 2 and isinstance(mlp.drop1, CounterDropout)
    x = torch.randn(3, 5, 24)
    calls = []
    monkeypatch.setattr(vit, "gelu_dropout", lambda *a: calls.append(1) or gd_module.gelu_dropout(*a))

    def run(fused):
        mlp.act = nn.GELU() if fused else UnfusedGELU()
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = mlp.train()(xi)
        out.float().square().sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in mlp.parameters()]
        mlp.zero_grad()
        return out, grads

    fused_out, fused_grads = run(True)
    assert len(calls) == 1, "the training MLP did not take the fused op"
    plain_out, plain_grads = run(False)
    assert len(calls) == 1, "an MLP with another activation took the fused op"
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_out.float(), plain_out.float(), **tol)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)
    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))   # eval: no dropout, no fusion
    assert len(calls) == 1
