"""Batched LAFS view construction: random resized crops and flips as tensor ops on the input's
device (no per-image PIL calls), the photometric augmentation of the views (lafs_fast.ops.photometric),
and the landmarks mapped into the views.

For each image the LAFS recipe (docs/method.md section 3) makes G=2 global and L=8 local views; each
view is a RandomResizedCrop(112, scale (0.4, 1)) + horizontal flip (p 0.5) of the face, kept twice:
a CLEAN copy (geometry only; the frozen landmark CNN reads it) and an AUGMENTED copy (same
geometry + colour jitter, grayscale, blur, solarize; the patches are sampled from it).

Layout: every view tensor is VIEW-MAJOR: view v of image b is row ``v * B + b``. So the teacher's
two global views are the two halves of ``clean_global`` / ``aug_global``, and
``torch.cat([aug_global, aug_local])`` is the student's input in DINO's crop order.

Randomness comes from one optional ``torch.Generator``; parameters are drawn on the generator's
device (then moved to the images' device), geometry first, so the same seed gives the same crops
whether or not the photometric ops are on. Same seed + same generator device -> same views.

Deviation from the torchvision/PIL original, deliberate: the crop is resampled directly from the
full image with one grid_sample call (bicubic by default, as the original; no antialiasing, which
only matters when downscaling: LAFS crops of a 112 face are always upscaled); pixels are floats,
not rounded to uint8 between ops. The photometric deviations: lafs_fast.ops.photometric.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import photometric
from .ops.photometric import generator_rand

__all__ = [
    "ViewConfig", "LafsViews", "make_lafs_views", "normalize_uint8", "sample_crop_boxes",
    "crop_resize", "landmark_view_index", "landmarks_to_views",
]



@dataclass(frozen=True)
class ViewConfig:
    """LAFS view recipe; defaults are the release's (docs/method.md section 3)."""
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


# ----------------------------------------------------------------------------- geometry
def sample_crop_boxes(n: int, height: int, width: int, scale: Tuple[float, float],
                      ratio: Tuple[float, float], generator: Optional[torch.Generator] = None,
                      device=None, attempts: int = 10) -> Tensor:
    """torchvision RandomResizedCrop.get_params for n crops at once: (n, 4) float (x0, y0, w, h).

    Ten (area, log-ratio) attempts per crop; the first that fits wins; none -> the centre crop
    with the ratio clamped, as torchvision.
    """
    area = float(height * width)
    u = generator_rand((n, attempts, 4), generator, device)
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
    flip_g = generator_rand(G * B, generator, dev) < cfg.flip_p
    flip_l = generator_rand(L * B, generator, dev) < cfg.flip_p

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
            aug, params = photometric.photometric_augment(
                torch.cat([clean_g, clean_l]), torch.cat([bg, bl]), torch.cat([sg, sl]), cfg, generator)
            aug_g, aug_l = aug[:G * B], aug[G * B:]
        else:
            aug_g, pg = photometric.photometric_augment(clean_g, bg, sg, cfg, generator)
            aug_l, pl = photometric.photometric_augment(clean_l, bl, sl, cfg, generator)
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


# ----------------------------------------------------------------------------- moved names
_MOVED_TO_PHOTOMETRIC = (
    "GRAY_WEIGHTS", "BRIGHTNESS", "CONTRAST", "SATURATION", "HUE", "IDENTITY", "color_jitter",
    "adjust_hue", "gaussian_blur", "photometric_augment", "draw_photometric_params",
    "apply_photometric", "apply_photometric_reference",
)


def __getattr__(name: str):
    """The photometric names this module held before they moved to lafs_fast.ops.photometric:
    served from there for one more release, with a DeprecationWarning."""
    if name in _MOVED_TO_PHOTOMETRIC:
        warnings.warn(f"lafs_fast.views.{name} moved: use lafs_fast.ops.photometric.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(photometric, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
