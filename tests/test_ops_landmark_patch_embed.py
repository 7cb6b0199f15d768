"""landmark_patch_embed / landmark_patches: every backend against the reference."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import require_optional
from tolerances import GRADCHECK_NONDET_TOL, assert_close, forward_tol, grad_tol

from lafs_fast import ops, reference

HAS_CUDA = torch.cuda.is_available()
# Collected everywhere: the cuda cases are SKIPPED (with the reason) on a machine without a GPU,
# so a green CPU run still shows how many GPU cases it did not run.
FAST_BACKENDS = ["cpu", "triton", "cuda"]
NO_GPU = "no CUDA device on this machine (runs in bench/gpu_check.sh correctness)"


def device_of(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def needs(backend):
    if backend == "cuda" and not HAS_CUDA:
        pytest.skip(NO_GPU)
    if backend in ("cpu", "cuda") and not ops.has_kernel("landmark_patch_embed", backend.upper()):
        pytest.fail(f"lafs_fast._C has no {backend} kernel ({ops.EXTENSION_STATUS})")
    if backend == "triton":
        require_optional("triton")


def make_case(B=2, C=3, H=13, W=11, N=5, P=4, D=7, dtype=torch.float32, device="cpu", seed=0,
              spread=1.0):
    """Random images/weights and landmarks spread over (and slightly beyond) the image."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    lm = torch.rand(B, N, 2, generator=g, dtype=torch.float64)
    lm = (lm * (1 + 2 * spread * 0.1) - spread * 0.1) * torch.tensor([W, H], dtype=torch.float64)
    weight = torch.randn(D, P * P * C, generator=g, dtype=torch.float64) / math.sqrt(P * P * C)
    bias = torch.randn(D, generator=g, dtype=torch.float64)
    to = dict(device=device)
    return (images.to(dtype=dtype, **to), lm.to(dtype=torch.float32 if dtype != torch.float64 else dtype, **to),
            weight.to(dtype=dtype, **to), bias.to(dtype=dtype, **to))


def run(backend, images, landmarks, weight, bias, **kw):
    return ops.landmark_patch_embed(images, landmarks, weight, bias, backend=backend, **kw)


def expected(images, landmarks, weight, bias, **kw):
    """The reference in float64 from the same (already rounded) inputs."""
    d = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return ops.landmark_patch_embed(d(images), d(landmarks), d(weight), d(bias), backend="reference", **kw)


# ----------------------------------------------------------------------------- the convention
def test_reference_matches_per_landmark_grid_sample():
    """Independent check of docs/method.md section 2: one F.grid_sample per landmark, by hand."""
    images, lm, _, _ = make_case(B=2, C=3, H=12, W=10, N=6, P=4, dtype=torch.float64)
    lm[0, 0] = torch.tensor([0.0, 0.0], dtype=torch.float64)  # at the corner
    lm[1, 1] = torch.tensor([10.3, -1.7], dtype=torch.float64)  # beyond the border
    P = 4
    got = reference.landmark_patches(images, lm, patch_size=P)
    for b in range(2):
        for n in range(6):
            lx, ly = lm[b, n].tolist()
            tok = torch.empty(P * P * 3, dtype=torch.float64)
            for i in range(P):
                for j in range(P):
                    x, y = lx + i - P / 2 - 0.5, ly + j - P / 2 - 0.5
                    grid = torch.tensor([[[[(2 * x + 1) / 10 - 1, (2 * y + 1) / 12 - 1]]]], dtype=torch.float64)
                    v = F.grid_sample(images[b:b + 1], grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False)[0, :, 0, 0]
                    for c in range(3):
                        tok[(i * P + j) * 3 + c] = v[c]
            torch.testing.assert_close(got[b, n], tok, rtol=1e-12, atol=1e-12)


def test_loop_baseline_matches_reference():
    images, lm, _, _ = make_case(B=3, C=2, H=9, W=14, N=7, P=8, dtype=torch.float64, spread=3)
    torch.testing.assert_close(reference.landmark_patches_loop(images, lm, 8),
                               reference.landmark_patches(images, lm, patch_size=8), rtol=1e-12, atol=1e-12)


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    out = reference.philox4x32(0x299F31D0A4093822, t(0x243F6A88), t(0x85A308D3), t(0x13198A2E), t(0x03707344))
    assert [int(o) for o in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]
    out = reference.philox4x32(0, t(0), t(0), t(0), t(0))
    assert [int(o) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_noise_statistics():
    z = reference.landmark_noise(seed=12345, batch=64, slots=196)
    assert z.shape == (64, 196, 2)
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.std().item() - 1) < 4 / math.sqrt(2 * n)
    corr = torch.corrcoef(z.reshape(-1, 2).T)[0, 1].item()  # x and y independent
    assert abs(corr) < 4 / math.sqrt(n / 2)
    assert not torch.equal(z, reference.landmark_noise(seed=12346, batch=64, slots=196))


# ----------------------------------------------------------------------------- backends vs reference
SHAPES = [  # B, C, H, W, N, P, D
    (2, 3, 13, 11, 5, 4, 7),
    (1, 1, 16, 16, 1, 8, 1),
    (3, 3, 20, 17, 4, 8, 17),
    (1, 3, 24, 19, 3, 16, 5),
    (2, 1, 9, 23, 6, 4, 17),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}N{}P{}D{}".format(*s))
def test_forward_and_grads_float32(backend, shape):
    needs(backend)
    B, C, H, W, N, P, D = shape
    images, lm, weight, bias = make_case(B, C, H, W, N, P, D, device=device_of(backend), spread=2)
    leaves = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    out = run(backend, *leaves, patch_size=P)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref = ops.landmark_patch_embed(*ref_leaves, patch_size=P, backend="reference")
    assert out.shape == (B, N, D) and out.dtype == images.dtype
    assert_close(out.cpu(), ref, forward_tol(torch.float32))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    out.backward(g)
    ref.backward(g.double().cpu())
    for name, a, r in zip(("images", "landmarks", "weight", "bias"), leaves, ref_leaves):
        scale = max(1.0, r.grad.abs().max().item())
        tol = grad_tol(torch.float32)
        assert_close(a.grad.cpu(), r.grad, dict(rtol=tol["rtol"], atol=tol["atol"] * scale), msg=f"grad {name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision(backend, dtype):
    needs(backend)
    images, lm, weight, bias = make_case(2, 3, 15, 13, 6, 8, 17, dtype=dtype, device=device_of(backend))
    out = run(backend, images, lm, weight, bias, patch_size=8)
    assert out.dtype == dtype
    assert_close(out.cpu(), expected(images, lm, weight, bias, patch_size=8), forward_tol(dtype))
    patches = ops.landmark_patches(images, lm, patch_size=8, backend=backend)
    ref = ops.landmark_patches(images.double().cpu(), lm.double().cpu(), patch_size=8, backend="reference")
    assert_close(patches.cpu(), ref, forward_tol(dtype))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("with_index", [False, True])
def test_gradcheck_float64(backend, with_index):
    needs(backend)
    images, lm, weight, bias = make_case(2, 2, 7, 9, 3, 4, 5, dtype=torch.float64, device=device_of(backend))
    # gradcheck's finite differences need landmarks away from integer tap positions.
    lm = torch.floor(lm) + 0.37
    index = torch.tensor([[2, 0, 2, 1], [1, 1, 0, 2]], device=lm.device) if with_index else None
    args = [t.requires_grad_() for t in (images, lm, weight, bias)]
    # The Triton interpreter runs ~1000x slower than compiled code: there the Jacobian is
    # checked through random projections (fast_mode), which still fails on any wrong gradient.
    fast = backend == "triton" and not HAS_CUDA
    # On a GPU the image gradient is summed with atomics (cuda and triton): gradcheck's second
    # backward may differ in the last bits, so its reentrancy check gets a stated tolerance
    # (tolerances.GRADCHECK_NONDET_TOL) instead of bitwise equality.
    nondet = GRADCHECK_NONDET_TOL if device_of(backend) == "cuda" else 0.0
    check = dict(eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast, nondet_tol=nondet)
    f = lambda i, l, w, b: run(backend, i, l, w, b, patch_size=4, index=index, perturb_std=0.5, seed=7)  # noqa
    assert torch.autograd.gradcheck(f, args, **check)
    fp = lambda i, l: ops.landmark_patches(i, l, patch_size=4, index=index, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fp, args[:2], **check)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_inputs(backend):
    needs(backend)
    dev = device_of(backend)
    images, lm, weight, bias = make_case(2, 3, 16, 14, 5, 4, 9, device=dev)
    ref = expected(images, lm, weight, bias, patch_size=4)
    cl = images.contiguous(memory_format=torch.channels_last)
    sliced = torch.randn(2, 5, 20, 30, device=dev)[:, 1:4, 2:18, 3:31:2]  # strided in C, H, W
    sliced.copy_(images)
    lm_nc = torch.stack((lm[..., 0], lm[..., 1]), dim=0).permute(1, 2, 0)  # non-contiguous view
    w_nc = weight.t().contiguous().t()
    for imgs in (cl, sliced):
        out = run(backend, imgs, lm_nc, w_nc, bias, patch_size=4)
        assert_close(out.cpu(), ref, forward_tol(torch.float32))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_border_huge_and_non_finite_landmarks(backend):
    needs(backend)
    dev = device_of(backend)
    images, lm, weight, bias = make_case(2, 3, 10, 12, 8, 4, 6, device=dev)
    special = torch.tensor([[0.0, 0.0], [11.0, 9.0], [-1.0, 4.0], [12.0, 3.5], [1e30, 2.0],
                            [float("nan"), 3.0], [4.0, float("inf")], [-1e9, -1e9]])
    lm[0] = special.to(dev)
    lm[1, :2] = torch.tensor([[-2.5, 5.5], [13.49, 10.51]]).to(dev)
    leaves = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    out = run(backend, *leaves, patch_size=4)
    assert torch.isfinite(out).all()
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref = ops.landmark_patch_embed(*ref_leaves, patch_size=4, backend="reference")
    assert_close(out.cpu(), ref, forward_tol(torch.float32))
    # Far-away and non-finite landmarks give exactly the bias.
    for n in (4, 5, 6, 7):
        assert_close(out[0, n].cpu(), bias.cpu(), forward_tol(torch.float32))
    out.sum().backward()
    ref.sum().backward()
    for a, r in zip(leaves, ref_leaves):
        assert torch.isfinite(a.grad).all()
        assert_close(a.grad.cpu(), r.grad, dict(rtol=1e-4, atol=1e-4 * max(1, r.grad.abs().max().item())))
    assert (leaves[1].grad[0, 4:] == 0).all()


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_index_with_repeats_and_perturbation(backend):
    needs(backend)
    dev = device_of(backend)
    images, lm, weight, bias = make_case(3, 3, 18, 15, 6, 8, 11, device=dev)
    index = torch.tensor([[5, 5, 0, 3], [1, 1, 1, 1], [0, 2, 4, 5]], device=dev)
    leaves = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    kw = dict(patch_size=8, index=index, perturb_std=5.0, seed=2024)
    out = run(backend, *leaves, **kw)
    assert out.shape == (3, 4, 11)
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref = ops.landmark_patch_embed(*ref_leaves, **{**kw, "index": index.cpu()}, backend="reference")
    assert_close(out.cpu(), ref, forward_tol(torch.float32))
    # Repeated slots get independent noise: the same landmark twice gives two different tokens.
    assert not torch.allclose(out[1, 0], out[1, 1])
    out.sum().backward()
    ref.sum().backward()
    for a, r in zip(leaves, ref_leaves):
        assert_close(a.grad.cpu(), r.grad, dict(rtol=1e-4, atol=1e-4 * max(1, r.grad.abs().max().item())))
    # Landmarks no slot uses get no gradient.
    assert (leaves[1].grad[1, [0, 2, 3, 4, 5]] == 0).all()


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_seed_semantics(backend):
    if backend != "reference":
        needs(backend)
    dev = device_of(backend) if backend != "reference" else "cpu"
    images, lm, weight, bias = make_case(2, 3, 16, 16, 4, 4, 5, device=dev)
    a = run(backend, images, lm, weight, bias, patch_size=4, perturb_std=2.0, seed=11)
    b = run(backend, images, lm, weight, bias, patch_size=4, perturb_std=2.0, seed=11)
    c = run(backend, images, lm, weight, bias, patch_size=4, perturb_std=2.0, seed=12)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.manual_seed(0)
    d = run(backend, images, lm, weight, bias, patch_size=4, perturb_std=2.0)  # seed drawn by torch
    torch.manual_seed(0)
    e = run(backend, images, lm, weight, bias, patch_size=4, perturb_std=2.0)
    torch.testing.assert_close(d, e, rtol=0, atol=0)


def test_perturbation_moves_landmarks_by_sigma():
    """The sampled landmark is landmark + sigma * z: recover z from a linear-ramp image."""
    B, N, H, W, sigma = 8, 64, 200, 200, 5.0
    xs = torch.arange(W, dtype=torch.float64).expand(H, W)
    images = torch.stack((xs, xs.t()))[None].expand(B, 2, H, W).contiguous()  # channel 0 = x, 1 = y
    lm = torch.full((B, N, 2), 100.0, dtype=torch.float64)
    p = reference.landmark_patches(images, lm, patch_size=2, perturb_std=sigma, seed=5)
    # tap (i=1, j=1) sits at landmark + 0.5 - 1 + ... : offset = 1 - 1 - 0.5 = -0.5
    moved = p.reshape(B, N, 2, 2, 2)[:, :, 1, 1, :] + 0.5
    delta = (moved - 100.0) / sigma
    torch.testing.assert_close(delta.float(), reference.landmark_noise(5, B, N), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- torch integration
@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_opcheck(backend):
    needs(backend)
    images, lm, weight, bias = make_case(2, 3, 9, 10, 4, 4, 6, device=device_of(backend))
    index = torch.tensor([[0, 3, 3], [2, 1, 0]], device=images.device)
    for args in [(images, lm, weight, bias, None, 4, 0.0, 0),
                 (images.requires_grad_(), lm.requires_grad_(), weight.requires_grad_(), None, index, 4, 1.5, 3)]:
        torch.library.opcheck(torch.ops.lafs_fast.landmark_patch_embed.default, args)
    torch.library.opcheck(torch.ops.lafs_fast.landmark_patches.default, (images, lm, index, 4, 1.0, 9))


def test_opcheck_triton():
    needs("triton")
    ops.patch_embed.register_triton_ops()
    images, lm, weight, bias = make_case(1, 2, 7, 8, 3, 4, 5, device=device_of("triton"))
    torch.library.opcheck(torch.ops.lafs_fast.landmark_patch_embed_triton.default,
                          (images, lm, weight, bias, None, 4, 0.0, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    needs("cpu")
    images, lm, weight, bias = make_case(2, 3, 12, 12, 5, 4, 6)
    lin = torch.nn.Linear(6, 3)

    def f(images, lm, weight, bias):
        tokens = ops.landmark_patch_embed(images, lm, weight, bias, patch_size=4, perturb_std=1.0, seed=3,
                                          backend="cpu")
        return lin(tokens).square().mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    loss = compiled(*leaves)
    loss.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    f(*ref_leaves).backward()
    torch.testing.assert_close(loss, f(images, lm, weight, bias))
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad)


# ----------------------------------------------------------------------------- sizes and errors
@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_empty_inputs(backend):
    if backend != "reference":
        needs(backend)
    dev = device_of(backend) if backend != "reference" else "cpu"
    images, lm, weight, bias = make_case(2, 3, 8, 8, 3, 4, 5, device=dev)
    out = run(backend, images[:0], lm[:0], weight, bias, patch_size=4)
    assert out.shape == (0, 3, 5)
    out = run(backend, images, lm, weight, bias, patch_size=4, index=torch.zeros(2, 0, dtype=torch.long, device=dev))
    assert out.shape == (2, 0, 5)


BAD = [
    (dict(images=torch.zeros(3, 8, 8)), ValueError, "images"),
    (dict(images=torch.zeros(2, 3, 8, 8, dtype=torch.int32)), ValueError, "images"),
    (dict(landmarks=torch.zeros(2, 4, 3)), ValueError, "landmarks"),
    (dict(landmarks=torch.zeros(3, 4, 2)), ValueError, "landmarks batch"),
    (dict(landmarks=torch.zeros(2, 4, 2, dtype=torch.int64)), ValueError, "landmarks"),
    (dict(weight=torch.zeros(5, 47)), ValueError, "weight"),
    (dict(weight=torch.zeros(5, 48, dtype=torch.float64)), ValueError, "weight"),
    (dict(bias=torch.zeros(4)), ValueError, "bias"),
    (dict(index=torch.tensor([[0, 4], [1, 2]])), ValueError, "index values"),
    (dict(index=torch.tensor([[0, -1], [1, 2]])), ValueError, "index values"),
    (dict(index=torch.tensor([[0, 1]])), ValueError, "index"),
    (dict(index=torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)), ValueError, "index must be int64"),
    (dict(perturb_std=-1.0), ValueError, "perturb_std"),
    (dict(perturb_std=float("nan")), ValueError, "perturb_std"),
    (dict(patch_size=0), ValueError, "patch_size"),
    (dict(seed=-3, perturb_std=1.0), ValueError, "seed"),
    (dict(backend="gpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("bad,exc,words", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_name_the_problem(bad, exc, words):
    args = dict(images=torch.zeros(2, 3, 8, 8), landmarks=torch.zeros(2, 4, 2), weight=torch.zeros(5, 48),
                bias=torch.zeros(5), patch_size=4)
    args.update(bad)
    with pytest.raises(exc, match=words):
        ops.landmark_patch_embed(args.pop("images"), args.pop("landmarks"), args.pop("weight"), args.pop("bias"),
                                 **args)


def test_cuda_kernels_registered_when_built_with_cuda():
    from lafs_fast._build_info import BUILD_INFO
    assert ops.has_kernel("landmark_patch_embed", "CPU")
    assert ops.has_kernel("landmark_patch_embed", "CUDA") == BUILD_INFO["with_cuda"]
    if BUILD_INFO["with_cuda"]:
        for op in ("landmark_patch_embed_backward", "landmark_patches", "landmark_patches_backward"):
            assert ops.has_kernel(op, "CUDA"), op


SM90_DTYPES = ["fp32", "bf16", "fp16", "fp64"]


@pytest.fixture(scope="module")
def sm90_compiles():
    """One subprocess (outside the interpreter) compiles every kernel for sm_90 in each dtype's
    specialisation: dtype -> sorted kernel names, or the error."""
    require_optional("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, traceback\n"
            "from lafs_fast.kernels import compile_all_for_sm90 as c\n"
            "out = {}\n"
            f"for d in {SM90_DTYPES!r}:\n"
            "    try:\n"
            "        out[d] = sorted(c(d))\n"
            "    except Exception:\n"
            "        out[d] = traceback.format_exc()[-3000:]\n"
            "print('SM90 ' + json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("SM90 ")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    import json
    return json.loads(lines[-1][5:])


@pytest.mark.parametrize("dtype", SM90_DTYPES)
def test_triton_kernels_compile_for_sm90(dtype, sm90_compiles):
    """Every Triton kernel compiles for Hopper (sm_90) without a GPU, outside the interpreter, in
    each images dtype's specialisation (bf16/fp16: tensor-core tl.dot; fp32: ieee FMA dot; fp64)."""
    got = sm90_compiles[dtype]
    assert isinstance(got, list) and len(got) == 5, got


def test_triton_launches_are_device_guarded():
    """Triton launches on the current CUDA device: every launch goes through _launch, which
    enters the tensors' device first (a no-op context on CPU)."""
    require_optional("triton")
    from lafs_fast.kernels import landmark_patch_embed as tk
    guard = tk._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(tk._device_guard(torch.device("cpu")), torch.cuda.device)
    import inspect
    src = inspect.getsource(tk)
    launches = src.count("_launch(_")
    assert launches == 5 and src.count(", images.device)[") == launches
    assert "wrap_triton(" not in src.replace("torch.library.wrap_triton(kernel)", "")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: the same results as on cuda:0."""
    needs(backend)
    case = make_case(2, 3, 13, 11, 5, 4, 7)
    leaves0 = [t.cuda(0).requires_grad_() for t in case]
    leaves1 = [t.cuda(1).requires_grad_() for t in case]
    with torch.cuda.device(0):
        out0 = run(backend, *leaves0, patch_size=4)
        out1 = run(backend, *leaves1, patch_size=4)
        out0.sum().backward()
        out1.sum().backward()
    assert out1.device == torch.device("cuda", 1)
    assert_close(out1.cpu(), out0.cpu(), forward_tol(torch.float32))
    for a, b in zip(leaves0, leaves1):
        assert_close(b.grad.cpu(), a.grad.cpu(), grad_tol(torch.float32))
