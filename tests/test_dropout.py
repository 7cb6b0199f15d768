"""Counter-based dropout (lafs_fast.ops.dropout): the C++ kernel against the oracle
(lafs_fast.reference.dropout), its statistics, gradients and the nn.Dropout swap."""
import math

import pytest
import torch
from torch import nn

from lafs_fast import reference as R
from lafs_fast.models import create_model
from lafs_fast.ops import dropout

needs_kernel = pytest.mark.skipif(not dropout.HAS_KERNEL, reason="lafs_fast._C not built")


@needs_kernel
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 63, 64, 65, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kernel_matches_oracle_bitwise(numel, dtype):
    # Same mask by construction and the same one multiply in the same precision: bitwise equal.
    x = torch.randn(numel, dtype=torch.float64).to(dtype)
    got = torch.ops.lafs_fast.counter_dropout(x, 0.3, 987654321)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, R.dropout(x, 0.3, 987654321))


@needs_kernel
def test_non_contiguous_input_reads_logical_order():
    x = torch.randn(33, 17).t()                       # non-contiguous
    assert torch.equal(dropout.counter_dropout(x, 0.2, 5), dropout.counter_dropout(x.contiguous(), 0.2, 5))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_scale(p):
    n = 1 << 20
    y = dropout.counter_dropout(torch.ones(n), p, 42)
    kept = (y != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 5 * sigma
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))


def test_seeds_give_independent_masks_and_repeat():
    x = torch.ones(1 << 16)
    a, b, a2 = (dropout.counter_dropout(x, 0.5, s) for s in (1, 2, 1))
    assert torch.equal(a, a2)
    agree = ((a != 0) == (b != 0)).double().mean().item()
    assert abs(agree - 0.5) < 0.01                   # independent streams agree half the time
    # neighbouring elements are not correlated (consecutive indices hash apart)
    m = (a != 0).double()
    assert abs(torch.corrcoef(torch.stack([m[:-1], m[1:]]))[0, 1].item()) < 0.02


@needs_kernel
def test_gradients_and_opcheck():
    x = torch.randn(5, 13, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: dropout.counter_dropout(t, 0.25, 77), (x,))
    y = dropout.counter_dropout(x, 0.25, 77)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, (y != 0).double() / 0.75)  # d/dx = keep / (1 - p)
    torch.library.opcheck(torch.ops.lafs_fast.counter_dropout.default,
                          (torch.randn(3, 9, requires_grad=True), 0.1, 3))


def test_reference_path_gradients():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: dropout._ReferenceDropout.apply(t, 0.4, 9), (x,))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_p_is_a_clear_error(p):
    with pytest.raises(ValueError, match="p must be in"):
        dropout.counter_dropout(torch.ones(3), p, 0)
    with pytest.raises(ValueError, match="p must be in"):
        dropout.CounterDropout(p)


def test_integer_input_is_a_clear_error():
    with pytest.raises(ValueError, match="floating point"):
        dropout.counter_dropout(torch.ones(3, dtype=torch.int64), 0.1, 0)


def test_module_swap_train_eval_and_seeding():
    torch.manual_seed(0)
    model = create_model("part_fvit_tiny", landmarks="grid")
    n_before = sum(type(m) is nn.Dropout for m in model.modules())
    assert n_before > 0 and dropout.use_counter_dropout(model) == n_before
    assert not any(type(m) is nn.Dropout for m in model.modules())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    model.eval()
    e1, e2 = model(x), model(x)
    assert torch.equal(e1, e2)                       # eval: no dropout
    model.train()
    torch.manual_seed(3)
    t1 = model(x)
    torch.manual_seed(3)
    t2 = model(x)
    assert torch.equal(t1, t2) and not torch.equal(t1, e1)


def test_dropped_non_finite_values_follow_torch():
    # y = x * factor, as torch's dropout: a dropped inf becomes NaN, a kept one stays inf.
    y = dropout.counter_dropout(torch.full((256,), float("inf")), 0.5, 11)
    keep = R.dropout_keep_mask(256, 0.5, 11)
    assert torch.isnan(y[~keep]).all() and torch.isinf(y[keep]).all()


def test_old_module_and_names_still_import_with_a_deprecation_warning():
    import importlib
    import sys
    sys.modules.pop("lafs_fast.dropout", None)
    with pytest.warns(DeprecationWarning, match="from lafs_fast.ops import counter_dropout"):
        old = importlib.import_module("lafs_fast.dropout")
    assert old.philox_dropout is dropout.counter_dropout
    assert old.PhiloxDropout is dropout.CounterDropout
    assert old.use_philox_dropout is dropout.use_counter_dropout
