"""torch.compile(fullgraph=True) with the inductor backend on CPU traces through every
torch.ops.lafs_fast op, called the way a user calls it (the public functions, backend "auto"),
and the compiled forward and backward equal eager's.

Why equality is bitwise: the compiled graph only routes tensors into the same C++ kernels (the
ops are opaque to inductor), so compiled and eager run the same arithmetic. The compiled
functions return the ops' outputs (no reductions around them) so that inductor has almost no
kernels of its own to compile: a cold inductor compile costs seconds per C++ kernel on 2 cores.

Then the compiled transformer blocks of `python -m lafs_fast.embed --compile`: state-dict keys
unchanged, features equal to eager's up to the stated rounding, one compilation per run.
"""
import math

import numpy as np
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


# ----------------------------------------------------------------------------- compiled blocks
# `python -m lafs_fast.embed --compile` (lafs_fast.models.compile): the ViT blocks compiled in place.
def test_compile_blocks_keeps_the_state_dict_and_compiles_once():
    from lafs_fast.models import create_model
    from lafs_fast.models.compile import compile_blocks
    model = create_model("part_fvit_tiny", landmarks="grid")
    keys = list(model.state_dict())
    assert compile_blocks(model) == len(model.transformer.blocks) == 4  # nothing compiles before a call
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    first = [b._compiled_call_impl for b in model.transformer.blocks]
    assert all(f is not None for f in first)
    compile_blocks(model)  # a block compiled already is left as it is
    assert [b._compiled_call_impl for b in model.transformer.blocks] == first


def test_compiled_blocks_add_biases_outside_the_gemm():
    """Under torch.compile the block's biased Linears trace as matmul + bias (vit.linear), the
    bias left to inductor's elementwise loops: no F.linear (whose addmm copies the bias into its
    output first); eager keeps F.linear. Same values either way."""
    from lafs_fast.models.vit import Block
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.manual_seed(0)
    block = Block(dim=16, heads=2, dim_head=8, mlp_dim=24).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        got, want = torch.compile(block, backend=capture, fullgraph=True)(x), block(x)
    calls = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.nn.functional.linear in calls            # to_qkv: no bias
    assert calls.count(torch.nn.functional.linear) == 1 and calls.count(torch.matmul) == 3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _faces(folder, n):
    from lafs_fast.data.image_folder import encode_image
    folder.mkdir()
    g = torch.Generator().manual_seed(8)
    for i in range(n):
        (folder / f"{i}.png").write_bytes(encode_image(torch.randint(0, 256, (3, 112, 112), generator=g,
                                                                     dtype=torch.uint8), "png"))
    return str(folder)


# Features are L2-normalised (|f| <= 1). float32: the fused kernels sum LayerNorm's and softmax's
# reductions in another order (measured 6e-7). bf16: eager rounds every op's output to bf16, the
# fused loops keep float32 in between: within one bf16 step at 1 (2^-8 = 3.9e-3; measured 5.5e-4).
@pytest.mark.parametrize("amp, atol", [("none", 1e-5), ("bf16", 2**-8)])
def test_embed_compile_gives_the_eager_features_with_one_compilation(amp, atol, tmp_path, tiny_model_file):
    from torch._dynamo.utils import counters

    from lafs_fast import embed
    path, _ = tiny_model_file
    faces = _faces(tmp_path / "faces", 5)  # batch 4: the last batch is padded to 4 rows, then cut
    opts = dict(images=faces, batch_size=4, workers=0, progress=False, device="cpu", amp=amp)
    eager = embed.run(path, str(tmp_path / "eager"), **opts)
    counters.clear()
    compiled = embed.run(path, str(tmp_path / "compiled"), compile_model=True, **opts)
    assert counters["stats"]["unique_graphs"] == 1  # one shape: 2 batches x (image, flipped)
    want, got = np.load(eager["features"]), np.load(compiled["features"])
    assert got.shape == want.shape == (5, 96) and np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    apart = min(np.abs(want[i] - want[j]).max() for i in range(5) for j in range(i))
    assert apart > 2 * atol  # any two faces differ by more than the tolerance: a row mix-up would fail


def test_embed_compile_bad_value_is_a_one_line_error(tmp_path, tiny_model_file, capsys):
    from lafs_fast import embed
    path, _ = tiny_model_file
    with pytest.raises(SystemExit) as e:
        embed.main(["--checkpoint", path, "--images", str(tmp_path), "--compile", "maybe"])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("python -m lafs_fast.embed: error: ") and "expected a boolean" in err[0]
