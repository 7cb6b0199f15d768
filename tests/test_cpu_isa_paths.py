"""Every instruction-set path of the CPU kernels (csrc/common/multiversion.h: avx512, avx2,
baseline; the best one the CPU supports is the default) against the references, forced one at
a time through torch.ops.lafs_fast.set_cpu_isa, plus the switch itself (LAFS_FAST_CPU_ISA,
`python -m lafs_fast.info`).

Why the paths must also agree bitwise with each other: no path contracts a*b+c into an FMA and
all run the same operations in the same order, only in wider registers (multiversion.h), and the
GEMMs around the sampling do not depend on the path. A path that drifts by an ulp has changed
the arithmetic, not just the width.
"""
import os
import platform
import subprocess
import sys
import time

import pytest
import torch
from test_ops_landmark_patch_embed import make_case
from test_views_photometric import CFG, assert_matches, params
from test_views_photometric import images as photo_images
from test_views_photometric import op as photo_op
from tolerances import assert_close, forward_tol, grad_tol

from lafs_fast import ops, reference
from lafs_fast.ops.dropout import counter_dropout
from lafs_fast.ops.photometric import apply_photometric_reference

HAS_EXT = ops.HAS_EXTENSION
pytestmark = pytest.mark.skipif(not HAS_EXT, reason=f"lafs_fast._C not built ({ops.EXTENSION_STATUS})")
ALL_PATHS = ["avx512", "avx2", "baseline"]
# A _C built before the path switch has no cpu_isa ops: test_the_extension_has_the_path_switch
# fails then (and the per-path tests, which need the baseline path).
HAS_SWITCH = HAS_EXT and hasattr(torch.ops.lafs_fast, "cpu_isa")
SUPPORTED = list(torch.ops.lafs_fast.cpu_isa_supported()) if HAS_SWITCH else []
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread_and_restore_path():
    """Small tensors (one thread is faster on a loaded machine), and the path set back after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = torch.ops.lafs_fast.cpu_isa() if HAS_SWITCH else None
    yield
    torch.set_num_threads(threads)
    if before is not None:
        torch.ops.lafs_fast.set_cpu_isa(before)


def on_each_path(fn):
    """{path: fn()} with each supported path forced in turn."""
    out = {}
    for isa in SUPPORTED:
        torch.ops.lafs_fast.set_cpu_isa(isa)
        assert torch.ops.lafs_fast.cpu_isa() == isa
        out[isa] = fn()
    return out


def assert_paths_equal(results):
    """Every path's tensors bitwise equal to the baseline path's."""
    base = results["baseline"]
    for isa, got in results.items():
        for i, (a, b) in enumerate(zip(got, base)):
            assert torch.equal(a, b), f"{isa} differs from baseline in output {i}: max " \
                f"{(a.double() - b.double()).abs().max().item():.3g}"


# ----------------------------------------------------------------------------- the switch
def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_the_extension_has_the_path_switch():
    assert HAS_SWITCH, "lafs_fast._C has no lafs_fast::cpu_isa op: it predates csrc/cpu/cpu_isa.cpp, rebuild it"


def test_supported_paths_follow_the_cpu_flags():
    assert SUPPORTED[-1] == "baseline" and SUPPORTED == [p for p in ALL_PATHS if p in SUPPORTED]
    if platform.machine() != "x86_64" or not sys.platform.startswith("linux"):
        assert SUPPORTED == ["baseline"]
        return
    flags = cpu_flags()
    assert ("avx2" in SUPPORTED) == ("avx2" in flags)
    assert ("avx512" in SUPPORTED) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
    # the default is the best path unless LAFS_FAST_CPU_ISA caps it
    out = run_python("import torch, lafs_fast.ops; print(torch.ops.lafs_fast.cpu_isa())",
                     LAFS_FAST_CPU_ISA="")
    assert out.strip() == SUPPORTED[0]


def test_set_cpu_isa_returns_previous_and_rejects_bad_names():
    for isa in SUPPORTED:
        prev = torch.ops.lafs_fast.cpu_isa()
        assert torch.ops.lafs_fast.set_cpu_isa(isa) == prev
        assert torch.ops.lafs_fast.cpu_isa() == isa
    with pytest.raises(RuntimeError, match="avx512, avx2, baseline.*'sse9'"):
        torch.ops.lafs_fast.set_cpu_isa("sse9")
    for isa in set(ALL_PATHS) - set(SUPPORTED):
        with pytest.raises(RuntimeError, match="does not support"):
            torch.ops.lafs_fast.set_cpu_isa(isa)


def test_python_helpers_report_and_force_the_same_path_as_the_ops():
    assert ops.cpu_isa_supported() == SUPPORTED
    for isa in SUPPORTED:
        prev = ops.cpu_isa()
        assert ops.set_cpu_isa(isa) == prev
        assert ops.cpu_isa() == torch.ops.lafs_fast.cpu_isa() == isa
    with pytest.raises(RuntimeError, match="avx512, avx2, baseline.*'sse9'"):
        ops.set_cpu_isa("sse9")


def run_python(code, **env):
    e = {**os.environ, **env}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def run_python_both(code, **env):
    """(stdout, stderr) of a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, r.stderr


@pytest.mark.parametrize("isa", ALL_PATHS)
def test_environment_forces_the_path_or_caps_it_with_a_warning_and_info_names_it(isa):
    """A path the CPU has is used as asked, silently; one it lacks (e.g. avx512 on an AVX2-only
    CPU) is capped at the best it has, with a warning saying so. Which branch runs depends on the
    CPU: every path is supported on an AVX-512 machine, so there the cap cannot be exercised."""
    code = ("import torch, lafs_fast.ops, lafs_fast.info as I; "
            "print(torch.ops.lafs_fast.cpu_isa()); I.main()")
    stdout, stderr = run_python_both(code, LAFS_FAST_CPU_ISA=isa)
    out = stdout.splitlines()
    used = isa if isa in SUPPORTED else SUPPORTED[0]
    assert out[0] == used
    line = [s for s in out if s.strip().startswith("cpu_isa")]
    assert line and line[0].split()[1] == used, out
    warning = f"LAFS_FAST_CPU_ISA={isa} is not supported by this CPU; using {used}"
    assert (warning in stderr) == (isa not in SUPPORTED), stderr


def test_forcing_a_path_changes_the_code_that_runs():
    """The paths agree bitwise (see the module docstring), so only their speed tells them apart:
    set_cpu_isa must switch the kernels, not just what cpu_isa() reads back. The dropout kernel
    over 1M floats on one thread, CPU time of this thread (other processes' load does not count),
    the best of 5 interleaved rounds: the baseline path (SSE2, 4 lanes) against each wider one
    (8 or 16 lanes). Measured on an AMD EPYC (Zen 4): avx512 1.7 ms, avx2 2.6 ms, baseline 14.3 ms
    per call; at least 2x is asked."""
    if SUPPORTED == ["baseline"]:
        assert platform.machine() != "x86_64" or not sys.platform.startswith("linux"), SUPPORTED
        return  # one path: nothing to switch (checked by test_supported_paths_follow_the_cpu_flags)
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    best = {}
    for _ in range(5):
        for isa in SUPPORTED:
            torch.ops.lafs_fast.set_cpu_isa(isa)
            t0 = time.thread_time()
            for _ in range(5):
                counter_dropout(x, 0.3, 1)
            best[isa] = min(best.get(isa, float("inf")), time.thread_time() - t0)
    for isa in SUPPORTED[:-1]:
        assert best["baseline"] >= 2 * best[isa], best


def test_bad_environment_value_is_a_clear_error():
    code = ("import torch, lafs_fast.ops\n"
            "try:\n    torch.ops.lafs_fast.counter_dropout(torch.ones(4), 0.5, 1)\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    out = run_python(code, LAFS_FAST_CPU_ISA="avx9000")
    assert "ERR" in out and "LAFS_FAST_CPU_ISA" in out and "avx9000" in out


# ----------------------------------------------------------------------------- landmark ops
# (B, C, H, W, N, P, D): the specialised kernels (P 4/8/16 x C 1/3), the generic one (P 5, C 2),
# odd sizes, landmarks spread over and beyond the image (spread 2: 20 % outside on each side).
SHAPES = [
    (3, 3, 37, 41, 23, 8, 13),
    (2, 1, 29, 31, 17, 8, 5),
    (2, 3, 45, 40, 9, 16, 7),
    (1, 1, 33, 35, 11, 16, 3),
    (2, 3, 21, 19, 13, 4, 9),
    (2, 1, 17, 23, 7, 4, 6),
    (2, 2, 19, 22, 7, 5, 11),
    (1, 3, 7, 9, 5, 8, 4),   # image smaller than the patch
]
SHAPE_IDS = ["B{}C{}H{}W{}N{}P{}D{}".format(*s) for s in SHAPES]


def border_landmarks(lm, H, W, P):
    """Put landmarks exactly on, just inside and beyond the borders and at the corners."""
    lm = lm.clone()
    h = P / 2 + 0.5  # a patch whose first tap is on pixel 0 has its landmark here
    cases = [(0.0, 0.0), (W - 1.0, H - 1.0), (h, h), (W - 1 - h, H - 1 - h), (h - 1e-3, H / 2),
             (-P, H / 2), (W + P, 3.0), (W / 2, -0.5), (-1e6, 1e6)]
    for n, (x, y) in enumerate(cases[: lm.shape[1]]):
        lm[0, n, 0], lm[0, n, 1] = x, y
    return lm


def layouts(images):
    """The same images contiguous, channels-last and as a strided view."""
    B, C, H, W = images.shape
    big = torch.zeros(B, C + 2, H + 3, 2 * W + 1, dtype=images.dtype)
    view = big[:, 1:C + 1, 2:H + 2, 1::2]
    view.copy_(images)
    return {"contiguous": images, "channels_last": images.contiguous(memory_format=torch.channels_last),
            "strided": view}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_landmark_forward_and_gradients_on_every_path(shape, layout):
    B, C, H, W, N, P, Dm = shape
    images, lm, weight, bias = make_case(B, C, H, W, N, P, Dm, spread=2, seed=sum(shape))
    lm = border_landmarks(lm, H, W, P)
    imgs = layouts(images)[layout]
    g = torch.randn(B, N, Dm, generator=torch.Generator().manual_seed(1))
    gp = torch.randn(B, N, P * P * C, generator=torch.Generator().manual_seed(2))

    ref_leaves = [t.double().requires_grad_() for t in (images, lm, weight, bias)]
    ref = ops.landmark_patch_embed(*ref_leaves, patch_size=P, backend="reference")
    ref.backward(g.double())
    ref_patches = reference.landmark_patches(images.double(), lm.double(), patch_size=P)

    def run():
        # all four gradients (the image gradient takes the general per-tap path) ...
        leaves = [t.clone().requires_grad_() for t in (imgs, lm, weight, bias)]
        out = ops.landmark_patch_embed(*leaves, patch_size=P, backend="cpu")
        out.backward(g)
        # ... and without it (training: the separable fast path for inner patches)
        lm2, w2, b2 = (t.clone().requires_grad_() for t in (lm, weight, bias))
        out2 = ops.landmark_patch_embed(imgs, lm2, w2, b2, patch_size=P, backend="cpu")
        out2.backward(g)
        patches = ops.landmark_patches(imgs, lm, patch_size=P, backend="cpu")
        g_img, g_lm = torch.ops.lafs_fast.landmark_patches_backward(
            gp, imgs, lm, None, P, 0.0, 0, [True, True])
        return [out, out2, patches, g_img, g_lm] + [t.grad for t in leaves] + [lm2.grad, w2.grad, b2.grad]

    results = on_each_path(run)
    ref_pb = [t.double().requires_grad_() for t in (images, lm)]
    reference.landmark_patches(*ref_pb, patch_size=P).backward(gp.double())
    names = ["images", "landmarks", "weight", "bias"]
    for isa, got in results.items():
        out, out2, patches, g_img, g_lm = got[:5]
        assert_close(out, ref, forward_tol(torch.float32), msg=f"{isa} forward")
        assert_close(out2, ref, forward_tol(torch.float32), msg=f"{isa} forward")
        assert_close(patches, ref_patches, forward_tol(torch.float32), msg=f"{isa} patches")
        grads = list(zip(names, got[5:9], ref_leaves)) + list(zip(names[1:], got[9:], ref_leaves[1:]))
        grads += [("patch images", g_img, ref_pb[0]), ("patch landmarks", g_lm, ref_pb[1])]
        for name, a, r in grads:
            tol = grad_tol(torch.float32)
            scale = max(1.0, r.grad.abs().max().item())
            assert_close(a, r.grad, dict(rtol=tol["rtol"], atol=tol["atol"] * scale),
                         msg=f"{isa} grad {name}")
    assert_paths_equal(results)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_landmark_other_dtypes_on_every_path(dtype):
    images, lm, weight, bias = make_case(2, 3, 30, 27, 12, 8, 10, dtype=dtype, spread=2)
    ref = ops.landmark_patch_embed(images.double(), lm.double(), weight.double(), bias.double(),
                                   patch_size=8, backend="reference")

    def run():
        leaves = [t.clone().requires_grad_() for t in (lm, weight, bias)]
        out = ops.landmark_patch_embed(images, *leaves, patch_size=8, backend="cpu")
        out.float().sum().backward()
        return [out] + [t.grad for t in leaves]

    results = on_each_path(run)
    for isa, got in results.items():
        assert got[0].dtype == dtype
        assert_close(got[0], ref, forward_tol(dtype), msg=isa)
    assert_paths_equal(results)


def test_landmark_index_and_perturbation_on_every_path():
    images, lm, weight, bias = make_case(3, 3, 40, 36, 6, 8, 11, spread=2)
    index = torch.tensor([[5, 5, 0, 3, 2], [1, 1, 1, 1, 4], [0, 2, 4, 5, 5]])
    kw = dict(patch_size=8, index=index, perturb_std=3.0, seed=2024)
    ref_leaves = [t.double().requires_grad_() for t in (lm, weight, bias)]
    ref = ops.landmark_patch_embed(images.double(), *ref_leaves, backend="reference", **kw)
    ref.sum().backward()

    def run():
        leaves = [t.clone().requires_grad_() for t in (lm, weight, bias)]
        out = ops.landmark_patch_embed(images, *leaves, backend="cpu", **kw)
        out.sum().backward()
        return [out] + [t.grad for t in leaves]

    results = on_each_path(run)
    for isa, got in results.items():
        assert_close(got[0], ref, forward_tol(torch.float32), msg=isa)
        for a, r in zip(got[1:], ref_leaves):
            assert_close(a, r.grad, dict(rtol=1e-4, atol=1e-4 * max(1, r.grad.abs().max().item())), msg=isa)
    assert_paths_equal(results)


# ----------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dropout_bitwise_equal_to_oracle_on_every_path(dtype):
    # lengths around the vector widths (8 / 16 lanes) and the threads' chunk (16384)
    for numel in (1, 7, 15, 16, 17, 33, 16385, 70001):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(numel),
                        dtype=torch.float64).to(dtype)
        want = reference.dropout(x, 0.3, 987654321)
        torch.set_num_threads(2)
        for isa, (got,) in on_each_path(lambda: [counter_dropout(x, 0.3, 987654321)]).items():
            assert torch.equal(got, want), f"{isa} {dtype} numel {numel}"
    # non-contiguous input: the mask follows the logical (contiguous) order
    x = torch.randn(37, 19).t()
    for isa, (got,) in on_each_path(lambda: [counter_dropout(x, 0.2, 5)]).items():
        assert torch.equal(got, reference.dropout(x.contiguous(), 0.2, 5)), isa


# ----------------------------------------------------------------------------- photometric
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hw", [(12, 12), (7, 45), (33, 17), (3, 5)])
def test_photometric_on_every_path(dtype, hw):
    H, W = hw
    x = photo_images(16, H, W, seed=H * W, dtype=dtype)
    x[0, :, 0, 0] = torch.tensor([-1.5, 1.7, 0.0], dtype=dtype)  # outside [-1, 1]: clamped
    p = params(16, seed=H + W)
    p["blur"][:8] = True  # blur on half (the vertical / horizontal tap passes)
    ref = apply_photometric_reference(x, p, CFG)
    x_nc = torch.zeros(16, 3, H, 2 * W, dtype=dtype)[..., ::2]
    x_nc.copy_(x)
    results = on_each_path(lambda: [photo_op(x, p), photo_op(x_nc, p)])
    for isa, (out, out_nc) in results.items():
        assert_matches(out, ref, p)
        assert torch.equal(out, out_nc), isa
    assert_paths_equal(results)


def test_landmark_gradients_do_not_depend_on_the_thread_count():
    """Fixed row groups and in-order partial sums (landmark_patch_embed_cpu.cpp): one thread and
    two give the same bits, on every path."""
    images, lm, weight, bias = make_case(8, 3, 40, 36, 50, 8, 24, spread=2)
    g = torch.randn(8, 50, 24, generator=torch.Generator().manual_seed(4))

    def grads():
        leaves = [t.clone().requires_grad_() for t in (lm, weight, bias)]
        ops.landmark_patch_embed(images, *leaves, patch_size=8, backend="cpu").backward(g)
        return [t.grad for t in leaves]

    for threads in (1, 2):
        torch.set_num_threads(threads)
        results = on_each_path(grads)
        if threads == 1:
            first = results
        for isa in results:
            for a, b in zip(results[isa], first[isa]):
                assert torch.equal(a, b), f"{isa}: {threads} threads differ from 1"
