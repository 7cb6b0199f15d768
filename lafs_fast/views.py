"""Batched LAFS view construction: random resized crops, flips and photometric augmentation as
tensor ops on the input's device (no per-image PIL calls).

For each image the LAFS recipe (LAFS_FACTS section 3) makes G=2 global and L=8 local views; each
view is a RandomResizedCrop(112, scale (0.4, 1)) + horizontal flip (p 0.5) of the face, kept twice:
a CLEAN copy (geometry only; the frozen landmark CNN reads it) and an AUGMENTED copy (same
geometry + colour jitter, grayscale, blur, solarize; the patches are sampled from it).

Layout: every view tensor is VIEW-MAJOR: view v of image b is row ``v * B + b``. So the teacher's
two global views are the two halves of ``clean_global`` / ``aug_global``, and
``torch.cat([aug_global, aug_local])`` is the student's input in DINO's crop order.

Randomness comes from one optional ``torch.Generator``; parameters are drawn on the generator's
device (then moved to the images' device), geometry first, so the same seed gives the same crops
whether or not the photometric ops are on. Same seed + same generator device -> same views.

Deviations from the torchvision/PIL original, all deliberate:
  * the crop is resampled directly from the full image with one grid_sample call (bicubic by
    default, as the original; no antialiasing, which only matters when downscaling: LAFS crops of
    a 112 face are always upscaled); pixels are floats, not rounded to uint8 between ops;
  * Gaussian blur is a true separable Gaussian (radius ceil(3 * sigma_max)), PIL uses box blurs;
  * colour jitter follows torchvision's tensor maths (HSV hue, random op order per sample).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ViewConfig", "LafsViews", "make_lafs_views", "normalize_uint8", "sample_crop_boxes",
    "crop_resize", "color_jitter", "adjust_hue", "gaussian_blur", "photometric_augment",
    "draw_photometric_params", "apply_photometric", "apply_photometric_reference",
    "landmark_view_index", "landmarks_to_views",
]

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
BRIGHTNESS, CONTRAST, SATURATION, HUE, IDENTITY = range(5)


@dataclass(frozen=True)
class ViewConfig:
    """LAFS view recipe; defaults are the release's (LAFS_FACTS section 3)."""
    size: int = 112
    local_size: Optional[int] = None          # None -> size (the release uses 112 for both)
    n_global: int = 2
    n_local: int = 8
    global_scale: Tuple[float, float] = (0.4, 1.0)
    local_scale: Tuple[float, float] = (0.4, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    interpolation: str = "bicubic"            # or "bilinear"
    photometric: bool = True                  # False -> augmented copies equal clean ones
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_global: Tuple[float, ...] = (1.0, 0.1)   # global view g uses entry g % len
    blur_p_local: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize_p_global: Tuple[float, ...] = (0.0, 0.2)
    solarize_p_local: float = 0.0
    solarize_threshold: float = 128 / 255     # PIL ImageOps.solarize default on uint8


@dataclass
class LafsViews:
    """Views of a batch of B images, view-major (row v * B + b = view v of image b).

    clean_global, aug_global: (G*B, 3, S, S); clean_local, aug_local: (L*B, 3, S_l, S_l); all in
    [-1, 1]. boxes_*: (views*B, 4) crop boxes (x0, y0, w, h) in input pixels (pixel edges);
    flip_*: (views*B,) bool, True where the view is mirrored. params: photometric draws
    (per augmented view, globals then locals).
    """
    clean_global: Tensor
    aug_global: Tensor
    clean_local: Tensor
    aug_local: Tensor
    boxes_global: Tensor
    boxes_local: Tensor
    flip_global: Tensor
    flip_local: Tensor
    batch_size: int
    params: Dict[str, Tensor] = field(default_factory=dict)
    source: Optional[Tensor] = None   # the (B, 3, H, W) faces the views were cut from

    @property
    def n_global(self) -> int:
        return self.clean_global.shape[0] // self.batch_size

    @property
    def n_local(self) -> int:
        return self.clean_local.shape[0] // self.batch_size


# ----------------------------------------------------------------------------- helpers
def normalize_uint8(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the Part fViT input range); see data.to_model_input."""
    from .data import to_model_input
    return to_model_input(images, dtype)


def _rand(shape, generator: Optional[torch.Generator], device, dtype=torch.float32) -> Tensor:
    """Uniform [0, 1) drawn on the generator's device (a CPU generator cannot feed CUDA draws)."""
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device,
                      dtype=dtype).to(device, non_blocking=True)


def _uniform(shape, lo: float, hi: float, generator, device) -> Tensor:
    return lo + (hi - lo) * _rand(shape, generator, device)


# ----------------------------------------------------------------------------- geometry
def sample_crop_boxes(n: int, height: int, width: int, scale: Tuple[float, float],
                      ratio: Tuple[float, float], generator: Optional[torch.Generator] = None,
                      device=None, attempts: int = 10) -> Tensor:
    """torchvision RandomResizedCrop.get_params for n crops at once: (n, 4) float (x0, y0, w, h).

    Ten (area, log-ratio) attempts per crop; the first that fits wins; none -> the centre crop
    with the ratio clamped, as torchvision.
    """
    area = float(height * width)
    u = _rand((n, attempts, 4), generator, device)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)   # argmax returns the first maximum
    pick = lambda t: t.gather(1, first).squeeze(1)           # noqa: E731
    w, h, ui, uj = pick(w), pick(h), pick(u[..., 2]), pick(u[..., 3])
    y0 = torch.minimum(torch.floor(ui * (height - h + 1)), height - h)   # randint(0, H - h + 1)
    x0 = torch.minimum(torch.floor(uj * (width - w + 1)), width - w)
    # fallback: centre crop (depends on the image size only)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    fx, fy = (width - fw) // 2, (height - fh) // 2
    any_ok = ok.any(dim=1)
    box = torch.stack([x0, y0, w, h], dim=1)
    fallback = torch.tensor([fx, fy, fw, fh], dtype=box.dtype, device=box.device)
    return torch.where(any_ok[:, None], box, fallback)


def crop_resize(images: Tensor, boxes: Tensor, flips: Optional[Tensor], size: int,
                mode: str = "bicubic") -> Tensor:
    """Resample V crops of each image with ONE grid_sample call.

    images (B, C, H, W) float; boxes (V, B, 4) (x0, y0, w, h) in pixels (edges); flips (V, B) bool
    or None. Returns (V*B, C, size, size), view-major. Output pixel u samples input x =
    x0 + (u + 0.5) * w / size - 0.5 (pixel centres, as crop-then-resize with
    align_corners=False); flipped views read the box mirrored. The V grids are stacked along the
    output height, (B, V*size, size, 2), so the input batch is not replicated.
    """
    B, C, H, W = images.shape
    V = boxes.shape[0]
    dt = images.dtype
    bx = boxes.to(dt).transpose(0, 1)                       # (B, V, 4)
    x0, y0, w, h = bx.unbind(-1)
    sx, sy = w / W, h / H
    tx, ty = (2 * x0 + w) / W - 1, (2 * y0 + h) / H - 1
    if flips is not None:
        sx = torch.where(flips.transpose(0, 1), -sx, sx)
    un = (2 * torch.arange(size, device=images.device, dtype=dt) + 1) / size - 1
    gx = sx[..., None] * un + tx[..., None]                 # (B, V, size) along columns
    gy = sy[..., None] * un + ty[..., None]                 # (B, V, size) along rows
    grid = torch.stack([gx[:, :, None, :].expand(B, V, size, size),
                        gy[:, :, :, None].expand(B, V, size, size)], dim=-1)
    out = F.grid_sample(images, grid.reshape(B, V * size, size, 2), mode=mode,
                        padding_mode="border", align_corners=False)
    return out.view(B, C, V, size, size).permute(2, 0, 1, 3, 4).reshape(V * B, C, size, size)


# ----------------------------------------------------------------------------- photometric
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
        _uniform(N, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness, generator, dev),
        _uniform(N, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast, generator, dev),
        _uniform(N, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation, generator, dev),
        _uniform(N, -cfg.hue, cfg.hue, generator, dev)], dim=1)
    order = _rand((N, 4), generator, dev).argsort(dim=1)   # random op order, like torchvision
    jitter = _rand(N, generator, dev) < cfg.jitter_p
    gray = _rand(N, generator, dev) < cfg.grayscale_p
    sigma = _uniform(N, cfg.blur_sigma[0], cfg.blur_sigma[1], generator, dev)
    blur = _rand(N, generator, dev) < blur_p
    solar = _rand(N, generator, dev) < solarize_p
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


_PHOTOMETRIC_OP = "lafs_fast::photometric_augment"


@torch.compiler.assume_constant_result   # constant once _C is loaded; lets fullgraph compile trace
def _has_photometric_kernel() -> bool:
    """Whether lafs_fast._C has the CPU photometric kernel (the package's __init__ imports
    lafs_fast.ops, which loads _C, before this module)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_PHOTOMETRIC_OP, "CPU")
    except RuntimeError:   # the op is not defined: no extension, or one built before it existed
        return False


def _register_photometric_fake() -> None:
    """Fake (meta) kernel of lafs_fast::photometric_augment for torch.compile / opcheck."""
    if not hasattr(torch.ops.lafs_fast, "photometric_augment"):
        return

    def fake(x, factors, order, jitter, grayscale, blur_sigma, blur, solarize, sigma_max,
             solarize_threshold):
        torch._check(x.dim() == 4 and x.shape[1] == 3, lambda: "x must be (N, 3, H, W)")
        torch._check(x.dtype in (torch.float32, torch.float64),
                     lambda: f"x must be float32 or float64, got {x.dtype}")
        return x.new_empty(x.shape)   # contiguous, as the kernel's output

    try:
        torch.library.register_fake(_PHOTOMETRIC_OP)(fake)
    except RuntimeError:   # already registered (module reloaded)
        pass


_register_photometric_fake()


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
    if backend == "auto":
        backend = "cpu" if (usable and os.environ.get("LAFS_FAST_BACKEND") != "reference"
                            and _has_photometric_kernel()) else "reference"
    elif backend == "cpu" and not (usable and _has_photometric_kernel()):
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


# ----------------------------------------------------------------------------- LAFS views
def make_lafs_views(images: Tensor, cfg: ViewConfig = ViewConfig(),
                    generator: Optional[torch.Generator] = None,
                    out_dtype: Optional[torch.dtype] = None) -> LafsViews:
    """Build the LAFS views of a batch of aligned faces (B, 3, H, W), uint8 or float in [-1, 1].

    Work happens on images.device in float32 (float64 kept). Output view-major: row v*B + b is view
    v of image b (global views: v = 0..G-1, so the teacher's two views are the two halves).
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = normalize_uint8(images)
    elif images.is_floating_point():
        x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    else:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    B, _, H, W = x.shape
    G, L, dev = cfg.n_global, cfg.n_local, x.device
    S, Sl = cfg.size, cfg.local_size or cfg.size

    # geometry first (same seed -> same crops with or without photometric ops)
    boxes_g = sample_crop_boxes(G * B, H, W, cfg.global_scale, cfg.ratio, generator, dev)
    boxes_l = sample_crop_boxes(L * B, H, W, cfg.local_scale, cfg.ratio, generator, dev)
    flip_g = _rand(G * B, generator, dev) < cfg.flip_p
    flip_l = _rand(L * B, generator, dev) < cfg.flip_p

    if S == Sl:   # one grid_sample for all views
        clean = crop_resize(x, torch.cat([boxes_g, boxes_l]).view(G + L, B, 4),
                            torch.cat([flip_g, flip_l]).view(G + L, B), S, cfg.interpolation)
        clean_g, clean_l = clean[:G * B], clean[G * B:]
    else:
        clean_g = crop_resize(x, boxes_g.view(G, B, 4), flip_g.view(G, B), S, cfg.interpolation)
        clean_l = crop_resize(x, boxes_l.view(L, B, 4), flip_l.view(L, B), Sl, cfg.interpolation)
    if cfg.interpolation == "bicubic":   # bicubic overshoots
        clean_g, clean_l = clean_g.clamp(-1, 1), clean_l.clamp(-1, 1)

    params: Dict[str, Tensor] = {}
    if cfg.photometric:
        def per_view(p_global, p_local):
            pg = [p_global[g % len(p_global)] for g in range(G)]
            return torch.tensor(pg, device=dev).repeat_interleave(B), \
                torch.full((L * B,), float(p_local), device=dev)
        bg, bl = per_view(cfg.blur_p_global, cfg.blur_p_local)
        sg, sl = per_view(cfg.solarize_p_global, cfg.solarize_p_local)
        if S == Sl:
            aug, params = photometric_augment(torch.cat([clean_g, clean_l]), torch.cat([bg, bl]),
                                              torch.cat([sg, sl]), cfg, generator)
            aug_g, aug_l = aug[:G * B], aug[G * B:]
        else:
            aug_g, pg = photometric_augment(clean_g, bg, sg, cfg, generator)
            aug_l, pl = photometric_augment(clean_l, bl, sl, cfg, generator)
            params = {k: torch.cat([pg[k], pl[k]]) for k in pg}
    else:
        aug_g, aug_l = clean_g.clone(), clean_l.clone()

    cast = (lambda t: t.to(out_dtype)) if out_dtype is not None else (lambda t: t)  # noqa: E731
    return LafsViews(cast(clean_g), cast(aug_g), cast(clean_l), cast(aug_l),
                     boxes_g, boxes_l, flip_g, flip_l, B, params, source=x)


# ----------------------------------------------------------------------------- landmarks
def landmarks_to_views(landmarks: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Map landmarks of the source faces into their views (the inverse of crop_resize's geometry).

    landmarks (B, N, 2) pixel (x, y) in the source (pixel k's centre = k); boxes (V*B, 4) and
    flips (V*B,) view-major as in LafsViews; returns (V*B, N, 2) in view pixels. A point at source x
    lands at u = (x + 0.5 - x0) * size / w - 0.5, mirrored to size - 1 - u in flipped views.
    Points outside the crop land outside [0, size - 1] (their patches read zeros).
    """
    B = landmarks.shape[0]
    V = boxes.shape[0] // B
    lm = landmarks.to(boxes.dtype).repeat(V, 1, 1)               # row v*B + b = image b
    x0, y0, w, h = (c[:, None] for c in boxes.unbind(-1))
    u = (lm[..., 0] + 0.5 - x0) * (size / w) - 0.5
    v = (lm[..., 1] + 0.5 - y0) * (size / h) - 0.5
    u = torch.where(flips[:, None], (size - 1) - u, u)
    return torch.stack([u, v], dim=-1).to(landmarks.dtype)


# ----------------------------------------------------------------------------- landmark index
def landmark_view_index(batch: int, num_landmarks: int, subset: Optional[int] = None,
                        shuffle: bool = True, generator: Optional[torch.Generator] = None,
                        device=None) -> Tensor:
    """(batch, K) int64 landmark indices for one view of each image (K = subset or N).

    shuffle on: K indices drawn uniformly WITH replacement, in random order (the LAFS local views:
      36 of 196), so position embeddings no longer identify landmarks.
    shuffle off, K < N: K distinct indices, sorted (landmark order kept; the "without shuffle"
      ablation).  shuffle off, K == N: arange(N) (the global views).
    """
    N = num_landmarks
    K = N if subset is None else int(subset)
    if K < 1 or N < 1:
        raise ValueError(f"need subset >= 1 and num_landmarks >= 1, got {K}, {N}")
    gdev = generator.device if generator is not None else device
    if shuffle:
        idx = torch.randint(0, N, (batch, K), generator=generator, device=gdev)
    elif K == N:
        return torch.arange(N, device=device).expand(batch, N).contiguous()
    elif K > N:
        raise ValueError(f"subset {K} > num_landmarks {N} needs shuffle (draws with replacement)")
    else:
        r = torch.rand((batch, N), generator=generator, device=gdev)
        idx = r.argsort(dim=1)[:, :K].sort(dim=1).values
    return idx.to(device)
