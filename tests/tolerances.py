"""Tolerances in one place: per dtype, for comparing a fast backend with the float64 reference
(below), and for the weights of two training runs after AdamW (AdamWDrift, at the end).

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
import math

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


# ----------------------------------------------------------------------------- weights after AdamW
# Two runs of one training step (lafs_fast vs a re-statement of the release, or accumulated vs
# concatenated micro-batches) reach gradients that differ by rounding. Their WEIGHTS after AdamW
# cannot be compared with one absolute tolerance: AdamW divides the first moment by the root of the
# second, m / (sqrt(v) + eps), so at the first step an entry moves by lr * g / (|g| + eps) with
# eps = 1e-8 -- about lr whatever |g| is. A rounding difference d in a near-zero gradient is
# magnified: d / dg [g / (|g| + eps)] = eps / (|g| + eps)^2, e.g. |g| = 5e-8, d = 1.3e-9 moves the
# weight by 3.6e-6 at lr 1e-3, 2800 times d; where d >= |g| the sign can flip (up to 2 lr). Which
# entries are near zero and how large d is depends on the summation order of the machine's
# kernels (vendor, ISA, thread count), so no single tolerance fits both a tight check and every
# machine.
#
# The bound used instead, per entry, derived from the step itself (AdamWDrift): given the reference
# run's optimizer state after the step (m, v: torch.optim.AdamW's exp_avg, exp_avg_sq; step t; lr,
# weight decay wd, betas, eps of the entry's group) and both runs' gradients (|delta g| per entry,
# capped at the tolerance of the test's own gradient check: on a machine where that check passes
# the cap never acts, and a gradient that differs by more -- a bug -- cannot widen the bound):
#   * the other run's moments lie in m +- dm, v +- dv, where dm_t = b1 dm_{t-1} + (1 - b1) |delta g|
#     and dv_t = b2 dv_{t-1} + (1 - b2) (2 |g| |delta g| + delta g^2) (as |g'^2 - g^2| <= |delta g|
#     (2 |g| + |delta g|)), each plus 2 unit roundoffs of the other run's moment (lerp / mul +
#     addcmul);
#   * its update lr / (1 - b1^t) * m' / (sqrt(v' / (1 - b2^t)) + eps) is monotone in m' (up) and in
#     v' (away from zero), so over that box it ranges between the values at the four corners: the
#     largest distance of a corner's update from the reference's update is how far the updates can
#     differ (du). The box ignores that m' and v' come from the same gradients, so where
#     |delta g| is comparable to |g| it overshoots; there du is capped by |reference update| +
#     lr K_t, K_t the largest |m| / sqrt(v) AdamW can reach after t steps (Cauchy-Schwarz on the two
#     moment sums: K_t = (1 - b1) / sqrt(1 - b2) sqrt((1 - r^t) / (1 - r)) sqrt(1 - b2^t) / (1 - b1^t),
#     r = b1^2 / b2; K_1 = 1: a first step moves an entry by at most lr);
#   * the weights then differ by dw_t = (1 - lr wd) dw_{t-1} + du + the float32 rounding of the step
#     (the decay product, the update's 5 operations and the final add: 8 u (|w| + |update|), u =
#     2^-24, twice the count of roundings for headroom).
# For the EMA teacher t <- m t + (1 - m) s (lerp on one side, mul + add on the other):
# dt = m dt + (1 - m) ds + 4 u (|t| + |s|).
# Nothing here is measured on one machine: another vendor's rounding gives another delta g and so
# another bound, which still holds. A bug in the optimiser's configuration (weight decay missing or
# on the wrong tensors, another lr) moves the weights without changing the gradients, so it is not
# absorbed: where |delta g| << |g| the bound is a few ulp of the weight.
UNIT_ROUNDOFF_FP32 = 2.0 ** -24


class AdamWDrift:
    """How far the weights of a second run may be from a reference run's after AdamW steps (see
    above). Call step() after each optimizer step of the reference run with, per tracked tensor,
    (its parameter in the reference optimizer, the reference gradient, the other run's gradient,
    the gradient check's per-entry tolerance); tolerance(key) is the per-entry bound on
    |w_other - w_reference| so far."""

    def __init__(self):
        self.dm, self.dv, self.dw = {}, {}, {}

    def step(self, optimizer: torch.optim.Optimizer, entries: dict) -> None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        u = UNIT_ROUNDOFF_FP32
        for key, (param, g_ref, g_other, grad_tol) in entries.items():
            if g_ref is None:  # AdamW skips a tensor without a gradient (no decay either)
                continue
            group, state = group_of[id(param)], optimizer.state[param]
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            t = float(state["step"])
            m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
            g = g_ref.double()
            dg = torch.minimum((g_other.double() - g).abs(), torch.as_tensor(grad_tol, dtype=torch.float64))
            zero = torch.zeros_like(m)
            dm = b1 * self.dm.get(key, zero) + (1 - b1) * dg
            dv = b2 * self.dv.get(key, zero) + (1 - b2) * dg * (2 * g.abs() + dg)
            dm, dv = dm + 2 * u * (m.abs() + dm), dv + 2 * u * (v + dv)  # the other run's own rounding
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t

            def update(mm, vv):
                return lr / c1 * mm / ((vv.clamp_min(0) / c2).sqrt() + eps)

            ref = update(m, v)
            du = torch.stack([(update(m + sm * dm, v + sv * dv) - ref).abs()
                              for sm in (-1, 1) for sv in (-1, 1)]).amax(0)
            r = b1 * b1 / b2
            k_t = (1 - b1) / math.sqrt(1 - b2) * math.sqrt((1 - r ** t) / (1 - r)) * math.sqrt(c2) / c1
            du = torch.minimum(du, ref.abs() + lr * k_t)
            w = param.detach().double().abs()
            rounding = 8 * u * (w + ref.abs())
            self.dm[key], self.dv[key] = dm, dv
            self.dw[key] = (1 - lr * wd) * self.dw.get(key, zero) + du + rounding

    def tolerance(self, key) -> torch.Tensor | float:
        """Per-entry bound (float64), or 0.0 for a tensor AdamW never moved."""
        return self.dw.get(key, 0.0)


def ema_drift(teacher_drift, student_drift, momentum: float, teacher: torch.Tensor,
              student: torch.Tensor) -> torch.Tensor:
    """Bound on |t_other - t_reference| after t <- m t + (1 - m) s (see above)."""
    u = UNIT_ROUNDOFF_FP32
    return (momentum * teacher_drift + (1 - momentum) * student_drift
            + 4 * u * (teacher.detach().double().abs() + student.detach().double().abs()))


def assert_weights_within(actual: torch.Tensor, expected: torch.Tensor, bound, name: str) -> None:
    """|actual - expected| <= bound entry by entry (in float64); the message names the worst entry."""
    err = (actual.detach().double() - expected.detach().double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(err)
    excess = err - bound
    worst = int(excess.argmax())
    assert bool((excess <= 0).all()), (
        f"{name}: {int((excess > 0).sum())} of {err.numel()} entries beyond the AdamW drift bound; "
        f"worst {err.flatten()[worst].item():.3g} vs bound {bound.flatten()[worst].item():.3g}")
