"""multicrop_embed / teacher_student_embed: every backend against landmark_patch_embed's reference."""
import pytest
import torch
from test_ops_landmark_patch_embed import FAST_BACKENDS, device_of, make_case, needs
from tolerances import assert_close, forward_tol, grad_tol

from lafs_fast import ops


def views_case(backend, dtype=torch.float32, G=2, L=3, B=2, N=6, K=4, P=4, D=5, Dt=7):
    dev = device_of(backend) if backend != "reference" else "cpu"
    g_img, g_lm, ws, bs = make_case(G * B, 3, 14, 14, N, P, D, dtype=dtype, device=dev, seed=1)
    l_img, l_lm, wt, bt = make_case(L * B, 3, 11, 13, N, P, Dt, dtype=dtype, device=dev, seed=2)
    index = torch.randint(0, N, (L * B, K), generator=torch.Generator().manual_seed(3)).to(dev)
    return g_img, g_lm, l_img, l_lm, index, ws, bs, wt, bt


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_multicrop_matches_separate_calls(backend):
    if backend != "reference":
        needs(backend)
    g_img, g_lm, l_img, l_lm, index, ws, bs, wt, bt = views_case(backend)
    ws, bs = ws.clone().requires_grad_(), bs.clone().requires_grad_()
    wt = wt[:, :].clone().requires_grad_()  # must receive no gradient
    kw = dict(patch_size=4, perturb_std=3.0, seed=99)
    s_g, s_l, t_g = ops.multicrop_embed(g_img, g_lm, l_img, l_lm, ws, bs, wt, bt, local_index=index,
                                        backend=backend, **kw)
    ref = lambda img, lm, w, b, **k: ops.landmark_patch_embed(  # noqa: E731
        img.double().cpu(), lm.double().cpu(), w.detach().double().cpu(), b.detach().double().cpu(),
        backend="reference", **k)
    tol = forward_tol(torch.float32)
    assert_close(s_g.cpu(), ref(g_img, g_lm, ws, bs, **kw), tol)
    assert_close(t_g.cpu(), ref(g_img, g_lm, wt, bt, **kw), tol)
    local_kw = {**kw, "seed": 99 ^ ops.LOCAL_SEED_SALT, "index": index.cpu()}
    assert_close(s_l.cpu(), ref(l_img, l_lm, ws, bs, **local_kw), tol)
    assert not t_g.requires_grad
    (s_g.square().sum() + s_l.sum()).backward()
    assert wt.grad is None
    ws_r = ws.detach().double().cpu().requires_grad_()
    bs_r = bs.detach().double().cpu().requires_grad_()
    r_g = ops.landmark_patch_embed(g_img.double().cpu(), g_lm.double().cpu(), ws_r, bs_r, backend="reference", **kw)
    r_l = ops.landmark_patch_embed(l_img.double().cpu(), l_lm.double().cpu(), ws_r, bs_r, backend="reference",
                                   **local_kw)
    (r_g.square().sum() + r_l.sum()).backward()
    gt = grad_tol(torch.float32)
    for a, r in ((ws, ws_r), (bs, bs_r)):
        scale = max(1.0, r.grad.abs().max().item())
        assert_close(a.grad.cpu(), r.grad, dict(rtol=gt["rtol"], atol=gt["atol"] * scale))


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_teacher_student_gradcheck_float64(backend):
    if backend != "reference":
        needs(backend)
    g_img, g_lm, _, _, _, ws, bs, wt, bt = views_case(backend, dtype=torch.float64, G=1, B=2, N=3)
    g_lm = torch.floor(g_lm) + 0.31
    # Image gradients share the code checked in test_ops_landmark_patch_embed; leaving them out
    # keeps the full Jacobian small.
    args = [g_lm.requires_grad_(), ws.requires_grad_(), bs.requires_grad_()]
    f = lambda l, w, b: torch.ops.lafs_fast.teacher_student_embed(g_img, l, w, b, wt, bt, 4, 0.0, 0, backend)[0]  # noqa
    fast = backend == "triton" and not torch.cuda.is_available()  # interpreter: see test_gradcheck_float64
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=fast)


def test_teacher_student_opcheck():
    needs("cpu")
    g_img, g_lm, _, _, _, ws, bs, wt, bt = views_case("cpu", G=1)
    torch.library.opcheck(torch.ops.lafs_fast.teacher_student_embed.default,
                          (g_img, g_lm, ws.requires_grad_(), bs, wt, bt, 4, 1.0, 5, "cpu"))


def test_multicrop_rejects_mismatched_views():
    g_img, g_lm, l_img, l_lm, index, ws, bs, wt, bt = views_case("reference")
    with pytest.raises(ValueError, match="local_images"):
        ops.multicrop_embed(g_img, g_lm, l_img.double(), l_lm, ws, bs, wt, bt, local_index=index, patch_size=4)
    with pytest.raises(ValueError, match="weight"):
        ops.multicrop_embed(g_img, g_lm, l_img, l_lm, ws, bs, wt[:, :-1], bt, local_index=index, patch_size=4)


def test_check_index_false_still_checks_cpu_indices():
    """check_index=False only spares the CUDA host sync: a CPU index is checked for free."""
    g_img, g_lm, l_img, l_lm, index, ws, bs, wt, bt = views_case("reference")
    bad = index.clone()
    bad[0, 0] = g_lm.shape[1]
    for check in (True, False):
        with pytest.raises(ValueError, match="index values"):
            ops.multicrop_embed(g_img, g_lm, l_img, l_lm, ws, bs, wt, bt, local_index=bad, patch_size=4,
                                check_index=check)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_multicrop_step_has_no_host_sync(backend):
    """The per-step multicrop call (index drawn by the caller, check_index=False) queues its work
    without a device->host sync; the default (a user's index) checks it, which syncs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (runs in bench/gpu_check.sh correctness)")
    needs(backend)
    g_img, g_lm, l_img, l_lm, index, ws, bs, wt, bt = views_case(backend)
    ws = ws.clone().requires_grad_()
    kw = dict(local_index=index, patch_size=4, perturb_std=3.0, seed=7, backend=backend)
    ops.multicrop_embed(g_img, g_lm, l_img, l_lm, ws, bs, wt, bt, check_index=False, **kw)  # warm-up, JIT
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s_g, s_l, _ = ops.multicrop_embed(g_img, g_lm, l_img, l_lm, ws, bs, wt, bt, check_index=False, **kw)
        (s_g.sum() + s_l.sum()).backward()
        with pytest.raises(RuntimeError, match="synchroniz"):
            ops.multicrop_embed(g_img, g_lm, l_img, l_lm, ws, bs, wt, bt, **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
