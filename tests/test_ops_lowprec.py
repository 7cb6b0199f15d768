"""bf16 / fp16 gradients of landmark_patch_embed on every backend (reference in the low dtype,
cpu, Triton (interpreter on CPU), cuda) against the float64 reference from the same rounded
inputs, with the tolerances of tests/tolerances.py (stated and justified there); and the
landmark CNN's output in float32 under autocast."""
import pytest
import torch
from conftest import require_optional
from test_ops_landmark_patch_embed import device_of, make_case, needs
from tolerances import LOWPREC_UNIT, assert_close, grad_tol, lowprec_grad_tol

from lafs_fast import ops, reference

BACKENDS = ["reference", "cpu", "triton", "cuda"]
LOW = [torch.bfloat16, torch.float16]
CASES = {  # B, C, H, W, N, P, D; landmarks partly beyond the border (spread=2)
    "small": (2, 3, 15, 13, 6, 8, 17),
    "wide": (3, 3, 28, 28, 20, 8, 64),
}


def _grads(backend, dtype, case, index=None, perturb_std=0.0):
    B, C, H, W, N, P, D = case
    dev = device_of(backend) if backend != "reference" else "cpu"
    images, lm, weight, bias = make_case(B, C, H, W, N, P, D, dtype=dtype, device=dev, spread=2, seed=3)
    leaves = [t.clone().requires_grad_() for t in (images, lm, weight, bias)]
    kw = dict(patch_size=P, index=None if index is None else index.to(dev), perturb_std=perturb_std, seed=5)
    out = ops.landmark_patch_embed(*leaves, backend=backend, **kw)
    assert out.dtype == dtype
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(g.to(dev))
    # the oracle: float64 reference on the same (already rounded) values
    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref_kw = {**kw, "index": index}
    ref = ops.landmark_patch_embed(*ref_leaves, backend="reference", **ref_kw)
    ref.backward(g.double())
    patches = reference.landmark_patches(ref_leaves[0].detach(), ref_leaves[1].detach(), index, P,
                                         perturb_std, 5)
    return leaves, ref_leaves, g.double(), patches


def _check(dtype, leaves, ref_leaves, g, patches):
    images, lm, weight, bias = leaves
    r_images, r_lm, r_weight, r_bias = ref_leaves
    assert images.grad.dtype == dtype and weight.grad.dtype == dtype and bias.grad.dtype == dtype
    assert lm.grad.dtype == torch.float32
    assert_close(images.grad.cpu(), r_images.grad, lowprec_grad_tol(dtype, r_images.grad), msg="grad images")
    assert_close(bias.grad.cpu(), r_bias.grad, lowprec_grad_tol(dtype, r_bias.grad), msg="grad bias")
    lt = grad_tol(torch.float32)
    scale = max(1.0, r_lm.grad.abs().max().item())
    assert_close(lm.grad.cpu(), r_lm.grad, dict(rtol=lt["rtol"], atol=lt["atol"] * scale), msg="grad landmarks")
    # grad_weight: per-entry bound 2u |g| + 2u sum_m |grad_out[m, d] patch[m, f]| (tolerances.py)
    u = LOWPREC_UNIT[dtype]
    G, Pm = g.reshape(-1, g.shape[-1]).abs(), patches.reshape(-1, patches.shape[-1]).abs()
    bound = 2 * u * r_weight.grad.abs() + 2 * u * (G.t() @ Pm)
    err = (weight.grad.cpu().double() - r_weight.grad).abs()
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert worst <= 1.0, f"grad weight: error reaches {worst:.2f} of its bound"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_low_precision_gradients(backend, dtype, case):
    if backend != "reference":
        needs(backend)
    _check(dtype, *_grads(backend, dtype, CASES[case]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_low_precision_gradients_index_and_noise(backend, dtype):
    """The multicrop local-view form: an index with repeats and perturbed landmarks."""
    if backend != "reference":
        needs(backend)
    index = torch.tensor([[5, 5, 0, 3], [1, 1, 1, 1]])
    _check(dtype, *_grads(backend, dtype, CASES["small"], index=index, perturb_std=2.0))


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_backends_agree_with_each_other(dtype):
    """reference (low dtype), cpu and Triton: pairwise within twice the oracle tolerance."""
    needs("cpu")
    require_optional("triton")
    got = {b: _grads(b, dtype, CASES["small"])[0] for b in ("reference", "cpu", "triton")}
    for name, i in (("images", 0), ("bias", 3)):
        a = got["reference"][i].grad.cpu()
        for b in ("cpu", "triton"):
            tol = lowprec_grad_tol(dtype, a.double())
            assert_close(got[b][i].grad.cpu(), a, dict(rtol=2 * tol["rtol"], atol=2 * tol["atol"]),
                         msg=f"{b} vs reference: grad {name}")


# ----------------------------------------------------------------------------- landmark CNN
def test_landmark_cnn_output_is_float32_under_autocast():
    """Under bf16 autocast the landmark CNN's final Linear and the normalisation run in float32:
    a bf16 Linear output quantises landmarks by up to ~1 px at 112 px (2^-8 of the raw range)."""
    from lafs_fast.models.landmark_cnn import LandmarkCNN, normalize_landmarks
    torch.manual_seed(0)
    cnn = LandmarkCNN(num_landmarks=49, image_size=112, width=0.25).eval()
    torch.nn.init.normal_(cnn.output_layer[1].weight, 0, 0.5)  # a spread-out head, as trained
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        raw = cnn.raw(x)
        lm = cnn(x)
        feats = cnn.features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))
    assert raw.dtype == torch.float32 and lm.dtype == torch.float32
    # exactly the float32 Linear of the (autocast) features, then the normalisation
    with torch.no_grad():
        expect = normalize_landmarks(cnn.output_layer(feats.float()), 112)
        bf16_head = normalize_landmarks(cnn.output_layer(feats.float()).bfloat16().float(), 112)
    torch.testing.assert_close(lm, expect, rtol=1e-5, atol=1e-4)
    # the old path (head output rounded to bf16) would have moved landmarks by > 0.05 px
    assert (bf16_head - expect).abs().max() > 0.05
