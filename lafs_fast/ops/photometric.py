"""The photometric augmentation of LAFS views: parameter draws, the plain-PyTorch maths (the
oracle) and the fused C++ op torch.ops.lafs_fast.photometric_augment with its backend choice.

Per augmented view (docs/method.md section 3): colour jitter (p 0.8; brightness, contrast, saturation,
hue in a random order per sample), grayscale (p 0.2), Gaussian blur (per-view probability),
solarize (per-view probability). Parameters are drawn first (draw_photometric_params), then
applied (apply_photometric), so the same draws can be replayed on any backend.

Deviations from the torchvision/PIL original, all deliberate: Gaussian blur is a true separable
Gaussian (radius ceil(3 * sigma_max)), PIL uses box blurs; colour jitter follows torchvision's
tensor maths (HSV hue, random op order per sample); pixels are floats, not rounded to uint8.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import env_backend, has_kernel

if TYPE_CHECKING:
    from ..views import ViewConfig

__all__ = [
    "color_jitter", "adjust_hue", "gaussian_blur", "photometric_augment",
    "draw_photometric_params", "apply_photometric", "apply_photometric_reference",
    "generator_rand", "generator_uniform",
]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE, IDENTITY = range(5)


# ----------------------------------------------------------------------------- random draws
def generator_rand(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> Tensor:
    """Uniform [0, 1) drawn on the generator's device (a CPU generator cannot feed CUDA draws),
    then moved to `device`. The views draw their geometry with it from the same generator."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device,
                      dtype=dtype).to(device, non_blocking=True)


def generator_uniform(shape, lo: float, hi: float, generator, device) -> Tensor:
    """Uniform [lo, hi), drawn as generator_rand."""
    return lo + (hi - lo) * generator_rand(shape, generator, device)


# ----------------------------------------------------------------------------- maths
def _gray(x: Tensor) -> Tensor:
    w = x.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def adjust_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Per-sample hue shift in HSV (torchvision semantics). x (N, 3, H, W) in [0, 1], hue (N,)."""
    maxc, _ = x.max(dim=1, keepdim=True)
    minc, _ = x.min(dim=1, keepdim=True)
    cr = maxc - minc
    s = cr / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    crd = torch.where(cr == 0, torch.ones_like(cr), cr)
    r, g, b = x.unbind(dim=1)
    r, g, b = r[:, None], g[:, None], b[:, None]
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    h = torch.where(is_r, bc - gc, torch.where(is_g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.remainder(h / 6.0 + hue.view(-1, 1, 1, 1).to(x.dtype), 1.0)
    # HSV -> RGB, closed form: c_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    n = x.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return maxc - maxc * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _jitter_matrices(factors: Tensor) -> Tensor:
    """(N, 5, 3, 3) per-sample matrices for brightness, contrast, saturation, hue (unused:
    identity) and identity; contrast's offset is added separately."""
    N = factors.shape[0]
    eye = torch.eye(3, dtype=factors.dtype, device=factors.device).expand(N, 3, 3)
    gray = factors.new_tensor(GRAY_WEIGHTS).expand(3, 3)   # every row = weights: gray to all
    b, c, s = (factors[:, i].view(N, 1, 1) for i in range(3))
    return torch.stack([b * eye, c * eye, s * eye + (1 - s) * gray, eye, eye], dim=1)


def _linear_stage(x: Tensor, mats: Tensor, factors: Tensor, op: Tensor) -> Tensor:
    """Apply op[n] (brightness/contrast/saturation/identity) to sample n, then clamp to [0, 1]."""
    N = x.shape[0]
    A = mats.gather(1, op.view(N, 1, 1, 1).expand(N, 1, 3, 3)).squeeze(1)
    out = torch.einsum("nij,njhw->nihw", A, x)
    is_c = (op == CONTRAST).to(x.dtype)
    # contrast blends with the mean gray level of the current image (torchvision adjust_contrast)
    offset = is_c * (1 - factors[:, CONTRAST]) * _gray(x).mean(dim=(1, 2, 3))
    return (out + offset.view(N, 1, 1, 1)).clamp_(0.0, 1.0)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, apply: Optional[Tensor] = None) -> Tensor:
    """Per-sample ColorJitter on x (N, 3, H, W) in [0, 1].

    factors (N, 4): brightness, contrast, saturation multipliers and hue shift; order (N, 4): a
    permutation of 0..3 (BRIGHTNESS, CONTRAST, SATURATION, HUE) per sample; apply (N,) bool, False
    -> the sample is returned unchanged. The three linear ops (+ clamp) run as per-sample 3x3
    matrices; the ops before each sample's hue step run first (3 stages, padded with identity),
    then one HSV hue shift for all, then the ops after it (3 stages): hue runs once, not 4x.
    """
    N = x.shape[0]
    factors = factors.to(x.dtype)
    mats = _jitter_matrices(factors)
    q = (order == HUE).to(torch.uint8).argmax(dim=1)       # position of hue in each order
    ident = torch.full_like(q, IDENTITY)
    k = torch.arange(3, device=x.device)
    pre = torch.where(k[None] < q[:, None], order[:, :3], ident[:, None])
    j = q[:, None] + 1 + k[None]
    post = torch.where(j < 4, order.gather(1, j.clamp(max=3)), ident[:, None])
    if apply is not None:
        pre = torch.where(apply[:, None], pre, ident[:, None])
        post = torch.where(apply[:, None], post, ident[:, None])
    y = x
    for i in range(3):
        y = _linear_stage(y, mats, factors, pre[:, i])
    hue = factors[:, HUE] if apply is None else torch.where(apply, factors[:, HUE], 0.0)
    y = torch.where((hue != 0).view(N, 1, 1, 1), adjust_hue(y, hue), y)
    for i in range(3):
        y = _linear_stage(y, mats, factors, post[:, i])
    return y


def gaussian_blur(x: Tensor, sigma: Tensor, apply: Optional[Tensor] = None,
                  sigma_max: float = 2.0) -> Tensor:
    """Per-sample separable Gaussian blur, one grouped conv per axis; reflect padding.

    sigma (N,); samples with apply False get a delta kernel (unchanged). Kernel radius
    ceil(3 * sigma_max) for every sample so the batch shares one conv.
    """
    N, C, H, W = x.shape
    r = int(math.ceil(3 * sigma_max))
    d = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    sig = sigma.to(x.dtype).clamp_min(1e-6).view(N, 1)
    k = torch.exp(-0.5 * (d / sig) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    if apply is not None:
        delta = (d == 0).to(x.dtype).expand(N, -1)
        k = torch.where(apply.view(N, 1), k, delta)
    k = k.repeat_interleave(C, dim=0)                      # (N*C, 2r+1)
    mode = "reflect" if min(H, W) > r else "replicate"
    y = F.pad(x.reshape(1, N * C, H, W), (r, r, r, r), mode=mode)
    y = F.conv2d(y, k.view(N * C, 1, 1, 2 * r + 1), groups=N * C)
    y = F.conv2d(y, k.view(N * C, 1, 2 * r + 1, 1), groups=N * C)
    return y.view(N, C, H, W)


# ----------------------------------------------------------------------------- draws and the oracle
def draw_photometric_params(n: int, blur_p: Tensor, solarize_p: Tensor, cfg: ViewConfig,
                            generator: Optional[torch.Generator] = None,
                            device=None) -> Dict[str, Tensor]:
    """Draw the photometric parameters of n views (on the generator's device, then moved to
    `device`); blur_p / solarize_p (n,) are each view's probabilities. Keys: jitter_factors (n, 4)
    float32 (brightness, contrast, saturation multipliers, hue shift), jitter_order (n, 4) int64
    (a permutation of BRIGHTNESS..HUE), jitter, grayscale, blur, solarize (n,) bool, blur_sigma
    (n,) float32. The draw order is fixed: same seed -> same parameters."""
    N, dev = n, device
    f = torch.stack([
        generator_uniform(N, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, generator, dev),
        generator_uniform(N, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, generator, dev),
        generator_uniform(N, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, generator, dev),
        generator_uniform(N, -cfg.hue, cfg.hue, generator, dev)], dim=1)
    order = generator_rand((N, 4), generator, dev).argsort(dim=1)   # random op order (torchvision)
    jitter = generator_rand(N, generator, dev) < cfg.jitter_p
    gray = generator_rand(N, generator, dev) < cfg.grayscale_p
    sigma = generator_uniform(N, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, dev)
    blur = generator_rand(N, generator, dev) < blur_p
    solar = generator_rand(N, generator, dev) < solarize_p
    return dict(jitter_factors=f, jitter_order=order, jitter=jitter, grayscale=gray,
                blur_sigma=sigma, blur=blur, solarize=solar)


def apply_photometric_reference(x: Tensor, params: Dict[str, Tensor], cfg: ViewConfig) -> Tensor:
    """Plain-PyTorch photometric ops (the oracle of the C++ kernel; used on non-CPU devices, for
    other dtypes, under autograd and without lafs_fast._C). x (N, 3, S, S) in [-1, 1]; params as
    draw_photometric_params. Per sample: y = (x + 1) / 2; colour jitter in the sample's op order
    (each linear op clamps to [0, 1]; contrast blends with the mean gray of the current image);
    grayscale; Gaussian blur; solarize (y >= threshold -> 1 - y); y * 2 - 1. Samples with no op on
    return x bit-exactly."""
    N = x.shape[0]
    jitter, gray, blur, solar = (params[k] for k in ("jitter", "grayscale", "blur", "solarize"))
    y = (x + 1) * 0.5
    y = color_jitter(y, params["jitter_factors"], params["jitter_order"], jitter)
    y = torch.where(gray.view(N, 1, 1, 1), _gray(y).expand_as(y), y)
    y = gaussian_blur(y, params["blur_sigma"], blur, sigma_max=cfg.blur_sigma[1])
    y = torch.where(solar.view(N, 1, 1, 1) & (y >= cfg.solarize_threshold), 1 - y, y)
    touched = (jitter | gray | blur | solar).view(N, 1, 1, 1)
    # untouched samples keep the clean bytes (the [0, 1] round trip is not exact)
    return torch.where(touched, y * 2 - 1, x)


# ----------------------------------------------------------------------------- the op
def _register_compiled_op() -> None:
    """Fake (meta) kernel of the C++ op (schema in csrc/lafs_ops.cpp) for torch.compile / opcheck."""
    def fake(x, factors, order, jitter, grayscale, blur_sigma, blur, solarize, sigma_max,
             solarize_threshold):
        torch._check(x.dim() == 4 and x.shape[1] == 3, lambda: "x must be (N, 3, H, W)")
        torch._check(x.dtype in (torch.float32, torch.float64),
                     lambda: f"x must be float32 or float64, got {x.dtype}")
        return x.new_empty(x.shape)   # contiguous, as the kernel's output

    torch.library.register_fake("lafs_fast::photometric_augment")(fake)


if has_kernel("photometric_augment", "CPU"):
    _register_compiled_op()


def apply_photometric(x: Tensor, params: Dict[str, Tensor], cfg: ViewConfig,
                      backend: str = "auto") -> Tensor:
    """Apply drawn photometric parameters to views x (N, 3, S, S) in [-1, 1] (see
    apply_photometric_reference for the semantics).

    backend "auto": the fused C++ kernel (torch.ops.lafs_fast.photometric_augment: one
    cache-resident pass per sample, parallel over samples) for float32/float64 CPU tensors that do
    not need a gradient, when lafs_fast._C has it and LAFS_FAST_BACKEND is not "reference";
    otherwise the tensor reference. "reference" / "cpu" force one (cpu raises if impossible).
    The two agree to ~1e-6 in float32 (most values bit-identical; tolerances derived in
    tests/test_views_photometric.py), except that a pixel within rounding of the solarize
    threshold may land on the other side of it.
    """
    if backend not in ("auto", "reference", "cpu"):
        raise ValueError(f"backend must be auto, reference or cpu, got {backend!r}")
    usable = (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
              and not (x.requires_grad and torch.is_grad_enabled()))
    has_op = has_kernel("photometric_augment", "CPU")
    if backend == "auto":
        backend = "cpu" if (usable and env_backend("auto") != "reference" and has_op) else "reference"
    elif backend == "cpu" and not (usable and has_op):
        raise RuntimeError("backend='cpu' needs lafs_fast._C with the photometric kernel and a "
                           "float32/float64 CPU tensor that does not require grad")
    if backend == "reference":
        return apply_photometric_reference(x, params, cfg)
    return torch.ops.lafs_fast.photometric_augment(
        x, params["jitter_factors"], params["jitter_order"], params["jitter"],
        params["grayscale"], params["blur_sigma"], params["blur"], params["solarize"],
        float(cfg.blur_sigma[1]), float(cfg.solarize_threshold))


def photometric_augment(x: Tensor, blur_p: Tensor, solarize_p: Tensor, cfg: ViewConfig,
                        generator: Optional[torch.Generator] = None
                        ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Augmented copies of clean views x (N, 3, S, S) in [-1, 1]; blur_p / solarize_p (N,) are
    each sample's probabilities (they depend on its view). Returns (aug in [-1, 1], params):
    draw_photometric_params, then apply_photometric."""
    params = draw_photometric_params(x.shape[0], blur_p, solarize_p, cfg, generator, x.device)
    return apply_photometric(x, params, cfg), params
