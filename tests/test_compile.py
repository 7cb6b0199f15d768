"""torch.compile(fullgraph=True) with the inductor backend on CPU traces through every
torch.ops.lafs_fast op, called the way a user calls it (the public functions, backend "auto"),
and the compiled forward and backward equal eager's.

Why equality is bitwise: the compiled graph only routes tensors into the same C++ kernels (the
ops are opaque to inductor), so compiled and eager run the same arithmetic. The compiled
functions return the ops' outputs (no reductions around them) so that inductor has almost no
kernels of its own to compile: a cold inductor compile costs seconds per C++ kernel on 2 cores.
"""
import math

import pytest
import torch

from lafs_fast import ops, views
from lafs_fast.ops import photometric
from lafs_fast.ops.dropout import counter_dropout

pytestmark = pytest.mark.slow  # inductor's C++ compiles: ~5-40 s per test on a cold cache


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    """The compiled kernels, not a fallback: auto must resolve to the C++ ops here."""
    monkeypatch.delenv("LAFS_FAST_BACKEND", raising=False)
    if not ops.has_kernel("landmark_patch_embed", "CPU"):
        pytest.fail(f"lafs_fast._C has no CPU kernel ({ops.EXTENSION_STATUS})")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_(f):
    return torch.compile(f, fullgraph=True, backend="inductor", dynamic=False)


def case(B=2, C=3, H=12, W=10, N=5, P=4, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, C, H, W, generator=g)
    lm = torch.rand(B, N, 2, generator=g) * torch.tensor([W, H]) * 1.1 - 0.5
    weight = torch.randn(D, P * P * C, generator=g) / math.sqrt(P * P * C)
    bias = torch.randn(D, generator=g)
    return images, lm, weight, bias


def grads_of(f, inputs, cotangents_seed=1):
    """Outputs of f and the gradients of <outputs, fixed random cotangents> for every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = f(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(cotangents_seed)
    cot = [torch.randn(o.shape, generator=g) for o in outs]
    trained = [(o, c) for o, c in zip(outs, cot) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in trained], leaves, [c for _, c in trained], allow_unused=True)
    return [o.detach() for o in outs], list(grads)


def assert_same(compiled, eager):
    (co, cg), (eo, eg) = compiled, eager
    assert len(co) == len(eo) and len(cg) == len(eg)
    for a, b in zip(co, eo):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for i, (a, b) in enumerate(zip(cg, eg)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert b.abs().max() > 0, f"input {i}: zero gradient proves nothing"
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"gradient of input {i}")


def test_landmark_patch_embed_compiles():
    images, lm, weight, bias = case()
    index = torch.tensor([[0, 4, 4], [2, 1, 3]])

    def f(images, lm, weight, bias):
        return ops.landmark_patch_embed(images, lm, weight, bias, patch_size=4, index=index,
                                        perturb_std=1.5, seed=3)

    assert_same(grads_of(compile_(f), (images, lm, weight, bias)), grads_of(f, (images, lm, weight, bias)))


def test_landmark_patches_compiles():
    images, lm, _, _ = case(seed=1)

    def f(images, lm):
        return ops.landmark_patches(images, lm, patch_size=4, perturb_std=0.5, seed=7)

    assert_same(grads_of(compile_(f), (images, lm)), grads_of(f, (images, lm)))


def test_multicrop_embed_compiles():
    gi, glm, sw, sb = case(B=4, H=12, W=12, seed=2)     # 2 global views x 2 images
    li, llm, _, _ = case(B=4, H=8, W=8, seed=3)          # 2 local views x 2 images
    g = torch.Generator().manual_seed(4)
    tw, tb = torch.randn(7, sw.shape[1], generator=g), torch.randn(7, generator=g)
    local_index = torch.randint(0, 5, (4, 3), generator=g)

    def f(gi, glm, li, llm, sw, sb):
        return ops.multicrop_embed(gi, glm, li, llm, sw, sb, tw, tb, local_index=local_index, patch_size=4,
                                   perturb_std=1.0, seed=5)

    inputs = (gi, glm, li, llm, sw, sb)
    compiled, eager = grads_of(compile_(f), inputs), grads_of(f, inputs)
    assert compiled[0][2].shape == (4, 5, 7) and not compiled[0][2].requires_grad  # teacher tokens
    assert_same(compiled, eager)


def test_photometric_augment_compiles():
    cfg = views.ViewConfig(size=8)
    g = torch.Generator().manual_seed(5)
    x = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    params = photometric.draw_photometric_params(6, torch.full((6,), 0.5), torch.full((6,), 0.5), cfg, g, x.device)

    def f(x):
        return photometric.apply_photometric(x, params, cfg)   # auto: the C++ kernel (no autograd: views are data)

    got, want = compile_(f)(x), f(x)
    assert not torch.equal(want, x)   # the augmentation did something
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(want, photometric.apply_photometric_reference(x, params, cfg), rtol=1e-5, atol=1e-5)


def test_dropout_compiles():
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(6))

    def f(x):
        return counter_dropout(x, 0.25, 11)

    compiled, eager = grads_of(compile_(f), (x,)), grads_of(f, (x,))
    assert_same(compiled, eager)
    kept = eager[0][0] != 0
    assert 0 < kept.float().mean() < 1
    # the gradient is the same mask and scale as the forward
    torch.testing.assert_close(compiled[1][0] != 0, kept | (x == 0))


def test_dropout_module_compiles_in_a_model():
    """A model with CounterDropout in training mode compiles with fullgraph (the module's seed is
    drawn as a Python int in eager mode; compiled, it is torch's dropout, the same distribution)."""
    from lafs_fast.ops.dropout import CounterDropout
    model = torch.nn.Sequential(CounterDropout(0.5)).train()
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    y = compile_(model)(x)
    kept = y != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(y[kept], 2 * x[kept])
