"""The fused C++ photometric kernel (torch.ops.lafs_fast.photometric_augment) against the tensor
reference photometric.apply_photometric_reference, and the parameter draw / apply split.

Tolerances. The kernel evaluates every value with the reference's own operations, in the same
order and dtype (no FMA contraction, no fast-math): brightness, saturation, hue, grayscale and
solarize alone are bit-identical to the reference (asserted below) and ~2/3 of all values are.
What differs: the gray mean of a contrast step (torch's pairwise float32 sum vs. a double sum
here: ~1 ulp of the mean), the blur (13-tap sums in another order than conv2d, std::exp vs.
torch's vectorised exp for the weights: observed <= 4e-7 on [0, 1]). Those 1-ulp input
differences then meet the HSV hue step, whose own float32 rounding is ~1e-6 (k = n + 6h and its
neighbours are rounded at magnitudes up to 11, half-ulp 4.8e-7, several times): once the inputs
differ by one ulp the two roundings are uncorrelated, so the results can differ by ~2 x 1.5e-6,
then times <= 1.4 * 1.4 * 1.2 for the linear ops after hue: <= ~7e-6. Observed over 290M values
(12 x 160 views of 112x112, every op on, hue up to +-0.5): max 1.9e-6. float32 tolerance: 1e-5
on [0, 1] values, 2e-5 on the [-1, 1] outputs -- 5x the largest seen, ~390x below one uint8 level
(1 / 255). float64: the same chain with eps 2^-53 gives ~1.3e-14 (observed 3e-15): 1e-13 on
the [-1, 1] outputs.

The one discontinuity is solarize: a pixel within rounding of the threshold may flip between y and
1 - y in one implementation and not the other (observed: 1 in 18M values). `assert_matches`
allows exactly those pixels (both values within 2e-5 of the threshold or its mirror, solarize on
for that sample, and rare).
"""
import dataclasses
import itertools

import pytest
import torch

from lafs_fast.ops import has_kernel, photometric
from lafs_fast.ops.photometric import (
    apply_photometric,
    apply_photometric_reference,
    draw_photometric_params,
    photometric_augment,
)
from lafs_fast.views import ViewConfig, make_lafs_views

HAS_OP = has_kernel("photometric_augment", "CPU")
needs_op = pytest.mark.skipif(not HAS_OP, reason="lafs_fast._C without the photometric kernel")
CFG = ViewConfig()
THR = CFG.solarize_threshold
# atol on [-1, 1] outputs (2x the [0, 1] tolerance of the module docstring)
ATOL = {torch.float32: 2e-5, torch.float64: 1e-13}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on a shared, loaded machine every multi-threaded torch op waits for its
    threads (ms each); one thread keeps the file fast. The thread-count test sets its own."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def op(x, p, cfg=CFG):
    return torch.ops.lafs_fast.photometric_augment(
        x, p["jitter_factors"], p["jitter_order"], p["jitter"], p["grayscale"], p["blur_sigma"],
        p["blur"], p["solarize"], float(cfg.blur_sigma[1]), float(cfg.solarize_threshold))


def images(N, H=12, W=12, seed=0, dtype=torch.float32):
    return (torch.rand(N, 3, H, W, generator=gen(seed), dtype=torch.float64) * 2 - 1).to(dtype)


def params(N, seed=0, jitter=None, gray=None, blur=None, solar=None, cfg=CFG):
    """Random draws (probabilities 0.5 each), with any of the four switches forced."""
    half = torch.full((N,), 0.5)
    p = draw_photometric_params(N, half, half, dataclasses.replace(cfg, jitter_p=0.5,
                                grayscale_p=0.5), gen(seed))
    for key, v in (("jitter", jitter), ("grayscale", gray), ("blur", blur), ("solarize", solar)):
        if v is not None:
            p[key] = torch.full((N,), bool(v))
    return p


def assert_matches(out, ref, p, threshold=THR, max_flips=1e-4):
    """out == ref within ATOL, except rare solarize flips at the threshold (module docstring)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.is_contiguous()
    bad = (out.double() - ref.double()).abs() > ATOL[out.dtype]
    if bad.any():
        o01, r01 = (out.double() + 1) / 2, (ref.double() + 1) / 2

        def near(v):
            return torch.minimum((v - threshold).abs(), (v - (1 - threshold)).abs()) < 2e-5

        solar = p["solarize"].view(-1, 1, 1, 1).expand_as(out)
        flip = bad & near(o01) & near(r01) & solar
        assert not (bad & ~flip).any(), (
            f"max err {(out.double() - ref.double()).abs()[bad & ~flip].max().item():.3g} at "
            f"{(bad & ~flip).nonzero()[:5].tolist()}")
        assert flip.sum() <= max(1, max_flips * out.numel())


# ----------------------------------------------------------------------------- split + dispatch
def test_draw_order_unchanged_and_photometric_augment_returns_params():
    """photometric_augment == draw_photometric_params + apply_photometric, and the draws are the
    historical ones (pinned values of the first sample of seed 0)."""
    N = 6
    x = images(N)
    bp, sp = torch.full((N,), 0.5), torch.full((N,), 0.3)
    aug, p = photometric_augment(x, bp, sp, CFG, gen(3))
    q = draw_photometric_params(N, bp, sp, CFG, gen(3))
    assert p.keys() == q.keys() == {"jitter_factors", "jitter_order", "jitter", "grayscale",
                                    "blur_sigma", "blur", "solarize"}
    for k in p:
        assert torch.equal(p[k], q[k])
    assert torch.equal(aug, apply_photometric(x, q, CFG))
    # the same stream of draws as a hand-written replay of the original code
    g = gen(3)
    u = [torch.rand(N, generator=g) for _ in range(4)]
    order = torch.rand((N, 4), generator=g).argsort(dim=1)
    jitter = torch.rand(N, generator=g) < CFG.jitter_p
    gray = torch.rand(N, generator=g) < CFG.grayscale_p
    sigma = CFG.blur_sigma[0] + (CFG.blur_sigma[1] - CFG.blur_sigma[0]) * torch.rand(N, generator=g)
    blur = torch.rand(N, generator=g) < bp
    solar = torch.rand(N, generator=g) < sp
    assert torch.equal(p["jitter_factors"][:, 0], 0.6 + (1.4 - 0.6) * u[0])
    assert torch.equal(p["jitter_factors"][:, 3], -0.1 + (0.1 + 0.1) * u[3])
    for k, v in (("jitter_order", order), ("jitter", jitter), ("grayscale", gray),
                 ("blur_sigma", sigma), ("blur", blur), ("solarize", solar)):
        assert torch.equal(p[k], v), k


@needs_op
def test_auto_backend_uses_kernel_and_env_forces_reference(monkeypatch):
    x = images(8, 9, 9)
    p = params(8, seed=1, jitter=True)
    calls = []
    real = photometric.apply_photometric_reference
    monkeypatch.setattr(photometric, "apply_photometric_reference",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    auto = apply_photometric(x, p, CFG)
    assert not calls                                       # CPU float32: the kernel
    assert torch.equal(auto, op(x, p))
    x.requires_grad_(True)
    apply_photometric(x, p, CFG)                           # autograd: the reference
    assert len(calls) == 1
    x.requires_grad_(False)
    monkeypatch.setenv("LAFS_FAST_BACKEND", "reference")
    apply_photometric(x, p, CFG)
    assert len(calls) == 2
    with pytest.raises(ValueError):
        apply_photometric(x, p, CFG, backend="cuda")


# ----------------------------------------------------------------------------- kernel vs reference
@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_params_match_reference(dtype):
    N = 64
    x = images(N, 16, 16, seed=2, dtype=dtype)
    p = params(N, seed=2)
    p["jitter_factors"][:, 3] *= 5      # hue up to +-0.5: every hue sector wraps
    out, ref = op(x, p), apply_photometric_reference(x, p, CFG)
    assert_matches(out, ref, p)
    assert (out != x).flatten(1).any(1).float().mean() > 0.5     # the ops do run
    if dtype == torch.float32:   # most values are bit-identical (same ops, same order)
        assert (out == ref).float().mean() > 0.5


@needs_op
@pytest.mark.parametrize("which", ["brightness", "contrast", "saturation", "hue", "gray", "blur",
                                   "solarize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_op_alone(which, dtype):
    N = 12
    x = images(N, 11, 13, seed=3, dtype=dtype)
    p = params(N, seed=3, jitter=which in ("brightness", "contrast", "saturation", "hue"),
               gray=which == "gray", blur=which == "blur", solar=which == "solarize")
    f = p["jitter_factors"]
    neutral = torch.tensor([1.0, 1.0, 1.0, 0.0])
    keep = {"brightness": 0, "contrast": 1, "saturation": 2, "hue": 3}.get(which)
    for j in range(4):
        if j != keep:
            f[:, j] = neutral[j]
    out, ref = op(x, p), apply_photometric_reference(x, p, CFG)
    assert_matches(out, ref, p)
    assert not torch.equal(out, x)
    if which in ("brightness", "hue", "gray", "solarize"):
        # elementwise ops in the reference's order and dtype: bit-identical
        assert torch.equal(out, ref)


@needs_op
def test_forced_on_off_combinations():
    N = 16
    x = images(N, 10, 10, seed=4)
    for jitter, gray, blur, solar in itertools.product([False, True], repeat=4):
        p = params(N, seed=5, jitter=jitter, gray=gray, blur=blur, solar=solar)
        out, ref = op(x, p), apply_photometric_reference(x, p, CFG)
        assert_matches(out, ref, p)
        if not (jitter or gray or blur or solar):
            assert torch.equal(out, x)                   # untouched: the clean bytes
        else:
            assert not torch.equal(out, x)
        if gray and not solar:
            assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


@needs_op
def test_all_24_orders():
    orders = torch.tensor(list(itertools.permutations(range(4))))
    N = len(orders)
    x = images(N, 9, 9, seed=6)
    p = params(N, seed=6, jitter=True, gray=False, blur=False, solar=False)
    p["jitter_order"] = orders
    # strong factors so that the order matters
    p["jitter_factors"] = torch.tensor([1.35, 0.65, 1.2, 0.08]).expand(N, 4).clone()
    out, ref = op(x, p), apply_photometric_reference(x, p, CFG)
    assert_matches(out, ref, p)
    # different orders give different images (the kernel does follow each row's order)
    assert not torch.allclose(out[0], out[-1], atol=1e-3)
    # swapping two orders swaps the results
    p2 = dict(p, jitter_order=orders.flip(0))
    assert torch.equal(op(x.flip(0), p2), out.flip(0))


@needs_op
@pytest.mark.parametrize("hw", [(5, 7), (1, 1), (1, 9), (3, 40), (6, 6), (30, 6), (7, 7), (7, 9),
                                (23, 17)])
def test_odd_and_tiny_sizes(hw):
    """r = ceil(3 * 2.0) = 6: min(H, W) <= 6 takes the replicate path (6 is the last), 7 is the
    smallest that reflects (the reflection reaches the far edge)."""
    H, W = hw
    N = 20
    x = images(N, H, W, seed=7)
    for dtype in (torch.float32, torch.float64):
        p = params(N, seed=8, blur=True)
        xd = x.to(dtype)
        assert_matches(op(xd, p), apply_photometric_reference(xd, p, CFG), p)


@needs_op
def test_small_sigma_max_reflect_path():
    cfg = dataclasses.replace(CFG, blur_sigma=(0.1, 0.5))          # r = 2
    N = 8
    x = images(N, 4, 5, seed=9)
    p = params(N, seed=9, blur=True, cfg=cfg)
    assert_matches(op(x, p, cfg), apply_photometric_reference(x, p, cfg), p)


@needs_op
def test_non_contiguous_and_channels_last():
    N = 10
    base = images(N, 14, 15, seed=10)
    p = params(N, seed=10)
    ref = apply_photometric_reference(base, p, CFG)
    cl = base.to(memory_format=torch.channels_last)
    assert_matches(op(cl, p), ref, p)
    wide = images(N, 14, 30, seed=10)
    wide[..., ::2] = base
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    assert_matches(op(strided, p), ref, p)
    # strided / other-dtype parameters too
    q = dict(p, jitter_factors=p["jitter_factors"].double().t().contiguous().t(),
             jitter_order=p["jitter_order"].int(), blur_sigma=p["blur_sigma"].double())
    assert_matches(op(base, q), ref, p)


@needs_op
def test_empty_batch():
    x = torch.empty(0, 3, 8, 8)
    p = params(0)
    out = op(x, p)
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.float32
    assert apply_photometric(x, p, CFG).shape == (0, 3, 8, 8)


@needs_op
def test_hue_zero_exactly_skips_hue():
    """hue 0 skips the HSV round trip (not an identity in floating point) in both paths."""
    N = 8
    x = images(N, 8, 8, seed=11)
    p = params(N, seed=11, jitter=True, gray=False, blur=False, solar=False)
    p["jitter_factors"] = torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(N, 4).clone()
    out, ref = op(x, p), apply_photometric_reference(x, p, CFG)
    assert torch.equal(out, ref)
    y = (x + 1) * 0.5
    assert torch.equal(out, y * 2 - 1)          # every linear op is an exact identity here
    hsv = photometric.adjust_hue(y, torch.full((N,), 1e-30))   # a "zero" shift through HSV changes bits
    assert not torch.equal(hsv, y)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_images_hsv_branches(dtype):
    """maxc == 0 (black), cr == 0 (gray levels), and ties of the max channel (r == g, g == b)."""
    vals = [(-1.0, -1.0, -1.0), (0.2, 0.2, 0.2), (1.0, 1.0, 1.0), (0.5, 0.5, -0.3),
            (-0.3, 0.5, 0.5), (0.5, -0.3, 0.5), (0.9, -1.0, -1.0), (-1.0, -1.0, 0.1)]
    N = len(vals)
    x = torch.tensor(vals, dtype=dtype).view(N, 3, 1, 1).expand(N, 3, 6, 5).contiguous()
    for j in range(4):
        p = params(N, seed=12 + j, jitter=True, blur=j % 2 == 1, gray=False, solar=j == 2)
        p["jitter_factors"][:, 3] = torch.tensor([0.1, -0.1, 0.05, -0.07, 0.3, -0.4, 0.5, -0.5])
        out, ref = op(x, p), apply_photometric_reference(x, p, CFG)
        assert torch.isfinite(out).all()
        assert_matches(out, ref, p)


@needs_op
def test_out_of_range_input_is_clamped_like_reference():
    x = images(6, 8, 8, seed=13) * 1.3           # bicubic overshoot if not clamped upstream
    p = params(6, seed=13, jitter=True)
    assert_matches(op(x, p), apply_photometric_reference(x, p, CFG), p)


@needs_op
def test_deterministic_across_thread_counts():
    """Samples are independent: any split over threads gives the same bytes (6 samples of 96x96
    are split into chunks of 2 samples)."""
    x = images(6, 96, 96, seed=14)
    p = params(6, seed=14)
    a = op(x, p)                      # one thread (fixture)
    torch.set_num_threads(2)
    b = op(x, p)
    assert torch.equal(a, b)
    assert_matches(b, apply_photometric_reference(x, p, CFG), p)


@needs_op
def test_argument_errors():
    x = images(4, 6, 6)
    p = params(4, jitter=True)
    with pytest.raises(RuntimeError, match="permutation"):
        op(x, dict(p, jitter_order=torch.tensor([[0, 1, 2, 2]] * 4)))
    big_hue = p["jitter_factors"].clone()
    big_hue[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="hue shift"):
        op(x, dict(p, jitter_factors=big_hue))
    with pytest.raises(RuntimeError, match="factors"):
        op(x, dict(p, jitter_factors=torch.zeros(3, 4)))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(x.half(), p)
    with pytest.raises(RuntimeError, match=r"\(N, 3, H, W\)"):
        op(x[:, :2], p)


@needs_op
def test_opcheck():
    N = 6
    x = images(N, 9, 10, seed=15)
    p = params(N, seed=15)
    args = (x, p["jitter_factors"], p["jitter_order"], p["jitter"], p["grayscale"],
            p["blur_sigma"], p["blur"], p["solarize"], 2.0, THR)
    torch.library.opcheck(torch.ops.lafs_fast.photometric_augment.default, args)
    # the fake kernel: a contiguous (N, 3, H, W) result, as the real kernel, for any input layout
    xc = x.to(memory_format=torch.channels_last)
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    fargs = [mode.from_tensor(a) for a in (xc,) + args[1:8]]
    with mode:
        out = torch.ops.lafs_fast.photometric_augment.default(*fargs, 2.0, THR)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert op(xc, p).is_contiguous()


# ----------------------------------------------------------------------------- end to end
@needs_op
@pytest.mark.parametrize("local_size", [None, 12])
def test_make_lafs_views_same_with_kernel_and_reference(monkeypatch, local_size):
    faces = torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8, generator=gen(16))
    cfg = ViewConfig(size=24, local_size=local_size, n_local=4)
    fast = make_lafs_views(faces, cfg, gen(17))
    monkeypatch.setenv("LAFS_FAST_BACKEND", "reference")
    slow = make_lafs_views(faces, cfg, gen(17))
    for k in fast.params:
        assert torch.equal(fast.params[k], slow.params[k])
    p = fast.params
    G = cfg.n_global * 5
    for name, rows in (("aug_global", slice(0, G)), ("aug_local", slice(G, None))):
        a, b = getattr(fast, name), getattr(slow, name)
        assert_matches(a, b, {k: v[rows] for k, v in p.items()})
    assert torch.equal(fast.clean_global, slow.clean_global)
    assert not torch.equal(fast.aug_global, fast.clean_global)
