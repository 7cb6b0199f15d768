"""Per-dtype tolerances for comparing a fast backend with the float64 reference, in one place.

Why these numbers: a token is a sum of P*P*C (<= 768 in the tests) products of bilinear
samples (each a 4-term convex combination) and weights of order 1/sqrt(P*P*C). In float32 each
product and partial sum carries ~6e-8 relative error, so a sum of n terms of unit scale drifts by
about sqrt(n) * 6e-8 * |partial sums| -- far below 1e-5 for n = 768; 2e-5 relative + 2e-5
absolute leaves headroom for different summation orders (tiled GEMMs). bfloat16 keeps 8
significant bits (relative rounding 2^-9 ~ 2e-3) on the inputs and on the output, and the
kernels read bf16 inputs exactly, so the output error is dominated by one rounding of the result
(2^-8 relative) plus accumulation-order effects: 1.6e-2 relative, 1e-2 absolute. float16 keeps 11
bits: 2e-3 relative, 2e-3 absolute. Gradients accumulate over many more terms (every token that
touches a pixel or a weight), so they get 5x the forward tolerance.
"""
import torch

FORWARD = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def forward_tol(dtype):
    return FORWARD[dtype]


def grad_tol(dtype):
    t = FORWARD[dtype]
    return dict(rtol=5 * t["rtol"], atol=5 * t["atol"])


def assert_close(actual, expected, tol, msg=""):
    """Compare in float64 so that the tolerance, not a dtype cast, decides."""
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=msg or None)


# gradcheck's reentrancy check (a second backward must give the same Jacobian) on a GPU: the
# cuda and triton backends sum the IMAGE gradient with atomics, so the order of the float64
# additions varies between the two backwards. A pixel in the gradcheck cases gets at most a few
# hundred terms of magnitude <= ~10, so reordering moves its sum by < 300 * 10 * 2^-53 ~ 3e-13;
# 1e-12 accepts that and still rejects any real nondeterminism (a missed or doubled term is
# >= 1e-3 there). The CPU kernels and the Triton interpreter are deterministic (tolerance 0).
GRADCHECK_NONDET_TOL = 1e-12

# Low-precision (bf16/fp16) GRADIENTS against the float64 reference from the same rounded
# inputs. u is the unit roundoff (bf16: 8 significant bits, u = 2^-8 = 3.9e-3; fp16: 11 bits,
# u = 2^-11 = 4.9e-4). Every backend accumulates in float32 (or wider) and returns the image,
# weight and bias gradients in the input dtype: one final rounding, error <= u |g|, plus
# float32 accumulation (~1e-7 relative, negligible). Hence rtol = 2u and, for entries near 0
# (cancellation), atol = 2u * max |g| over the tensor. Measured on CPU (reference, cpu, Triton
# interpreter): <= 1.0u relative to the entry.
# grad_weight = grad_out^T @ patches: the fused kernels round the sampled patch values to the
# input dtype before the GEMM (Triton's bf16/fp16 tl.dot tile, the CUDA backend's bf16 patch
# workspace for cuBLAS), an error of u relative to each TERM, not to the sum: for an entry the
# bound is u * sum_m |grad_out[m, d] * patch[m, f]| (= u * (|G|^T |P|)), which under
# cancellation is far above u |g| (measured: Triton interpreter 2.7u * max|g|, 0.6 of an entry).
# So grad_weight's tolerance is per entry: 2u |g| + 2u (|G|^T |P|) (test_ops_lowprec).
# Landmark gradients stay float32 (landmarks are float32): sums of float32 grad_patches (exact
# products of low-precision grad_out and weight, float32 accumulation) times image differences:
# float32 gradient tolerance (grad_tol(float32), atol scaled by max |g|; measured 7e-7 * max|g|).
LOWPREC_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def lowprec_grad_tol(dtype, reference_grad):
    """rtol and atol for a low-precision image or bias gradient (atol scaled by max |g|)."""
    u = LOWPREC_UNIT[dtype]
    scale = float(reference_grad.abs().max()) if reference_grad.numel() else 1.0
    return dict(rtol=2 * u, atol=2 * u * scale)
