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
