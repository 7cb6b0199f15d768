"""5-point face alignment: a least-squares similarity transform to the 112 x 112 ArcFace template
and a bilinear warp with a zero border, batched on any torch device.

Coordinates are in pixels with pixel k's centre at k (OpenCV's and insightface's convention): a
matrix M (2 x 3) maps a source point (x, y) to M @ (x, y, 1) in the aligned image, and the
aligned image at integer (x, y) reads the source at M^-1 (x, y), as cv2.warpAffine does.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

# insightface's 96 x 112 template (left eye, right eye, nose tip, left / right mouth corner);
# shifting x by 8 centres it in 112 x 112: the ArcFace template every IJB protocol aligns to.
TEMPLATE_96x112 = ((30.2946, 51.6963), (65.5318, 51.5014), (48.0252, 71.7366),
                   (33.5493, 92.3655), (62.7299, 92.2041))
ARCFACE_TEMPLATE = tuple((x + 8.0, y) for x, y in TEMPLATE_96x112)
ALIGNED_SIZE = 112


def arcface_template(dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """(5, 2) landmark positions of the aligned 112 x 112 face."""
    return torch.tensor(ARCFACE_TEMPLATE, dtype=dtype, device=device)


def estimate_similarity(src: Tensor, dst: Tensor) -> Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking
    src points to dst points: (B, K, 2) and (B, K, 2) or (K, 2) -> (B, 2, 3), float64.

    This is Umeyama's solution (skimage's SimilarityTransform.estimate): in 2-D, rotation plus
    scale is multiplication by one complex number a, and the least-squares a over centred points
    z (src) and w (dst) is sum(conj(z) w) / sum(|z|^2). Points that all coincide fix no
    transform: their rows are NaN."""
    src = torch.as_tensor(src).to(torch.float64)
    dst = torch.as_tensor(dst).to(device=src.device, dtype=torch.float64)
    if src.dim() == 2:
        src = src[None]
    if dst.dim() == 2:
        dst = dst.expand(src.shape[0], -1, -1)
    if src.dim() != 3 or src.shape[-1] != 2 or src.shape != dst.shape or src.shape[1] < 2:
        raise ValueError(f"src and dst must be (B, K, 2) with K >= 2 (dst may be (K, 2)), got "
                         f"{tuple(src.shape)} and {tuple(dst.shape)}")
    src_mean, dst_mean = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    zx, zy = (src - src_mean).unbind(-1)
    wx, wy = (dst - dst_mean).unbind(-1)
    var = (zx * zx + zy * zy).sum(1)
    a_re = (zx * wx + zy * wy).sum(1) / var   # scale * cos(angle)
    a_im = (zx * wy - zy * wx).sum(1) / var   # scale * sin(angle)
    nan = torch.full_like(var, float("nan"))
    a_re, a_im = torch.where(var > 0, a_re, nan), torch.where(var > 0, a_im, nan)
    linear = torch.stack([torch.stack([a_re, -a_im], -1), torch.stack([a_im, a_re], -1)], -2)
    shift = dst_mean[:, 0] - (linear @ src_mean[:, 0, :, None])[..., 0]
    return torch.cat([linear, shift[..., None]], -1)


def apply_affine(matrix: Tensor, points: Tensor) -> Tensor:
    """(B, 2, 3) matrices applied to (B, K, 2) points."""
    return points @ matrix[:, :, :2].transpose(1, 2) + matrix[:, None, :, 2]


def invert_affine(matrix: Tensor) -> Tensor:
    """Inverse of (B, 2, 3) affine matrices (as (B, 2, 3))."""
    full = torch.cat([matrix, matrix.new_tensor([0.0, 0.0, 1.0]).expand(matrix.shape[0], 1, 3)], 1)
    return torch.linalg.inv(full)[:, :2]


def warp_affine(images: Tensor, matrix: Tensor, size: Union[int, tuple[int, int]] = ALIGNED_SIZE) -> Tensor:
    """cv2.warpAffine(image, M, size, INTER_LINEAR, BORDER_CONSTANT 0) for a batch, with exact
    (not 1/32-pixel fixed-point) bilinear weights: images (B, C, H, W) uint8 or float, matrix
    (B, 2, 3) source -> output pixels. Returns float32 (B, C, h, w) on the images' device, in
    the images' value range (uint8 input gives floats in [0, 255]).

    Source positions are computed in float64 and the four neighbours gathered directly (not
    through grid_sample's float32 normalised coordinates, which round a position in a
    3,000-pixel image by ~1e-4 px): the same face comes out of a window of the image as of the
    whole image."""
    h, w = (size, size) if isinstance(size, int) else size
    if images.dim() != 4 or matrix.shape != (images.shape[0], 2, 3):
        raise ValueError(f"images must be (B, C, H, W) and matrix (B, 2, 3), got "
                         f"{tuple(images.shape)} and {tuple(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError("warp matrices must be finite")
    B, C, H, W = images.shape
    inv = invert_affine(matrix.to(torch.float64)).to(images.device)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=images.device),
                            torch.arange(w, dtype=torch.float64, device=images.device), indexing="ij")
    src = apply_affine(inv, torch.stack([xs, ys], -1).reshape(1, -1, 2).expand(B, -1, -1))
    corner = src.floor()
    frac = (src - corner).to(torch.float32)
    corner = corner.clamp(-2, max(H, W) + 1).long()  # far-off positions read zeros either way
    flat = images.reshape(B, C, H * W)
    out = torch.zeros(B, C, h * w, dtype=torch.float32, device=images.device)
    for dy in (0, 1):
        wy = frac[..., 1] if dy else 1 - frac[..., 1]
        yi = corner[..., 1] + dy
        for dx in (0, 1):
            wx = frac[..., 0] if dx else 1 - frac[..., 0]
            xi = corner[..., 0] + dx
            inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
            index = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1))[:, None, :].expand(B, C, -1)
            out += flat.gather(2, index).to(torch.float32) * (wy * wx * inside)[:, None, :]
    return out.reshape(B, C, h, w)


def align_faces(images: Tensor, landmarks: Tensor, size: int = ALIGNED_SIZE) -> Tensor:
    """Faces (B, C, H, W) with their 5 points (B, 5, 2) -> aligned float32 (B, C, 112, 112)."""
    if size != ALIGNED_SIZE:
        raise ValueError(f"the ArcFace template is defined for {ALIGNED_SIZE} x {ALIGNED_SIZE}, got {size}")
    matrix = estimate_similarity(landmarks, arcface_template(device=images.device))
    if not torch.isfinite(matrix).all():
        raise ValueError("landmarks of some face all coincide (or are not finite): no alignment")
    return warp_affine(images, matrix, size)


def source_window(matrix: np.ndarray, height: int, width: int,
                  size: int = ALIGNED_SIZE) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """The part of a (height x width) source image that warping with `matrix` (2, 3) to
    size x size reads: ((x0, y0, x1, y1), the matrix for the window cut out of the image).

    Bilinear reads pixels floor(x) and floor(x) + 1 around every point the output pixels map to;
    the window covers those that lie inside the image (all else reads zero either way). Warping
    the window gives the same face as warping the whole image, and moves far fewer bytes (an IJB
    loose crop can be 3,000 x 3,000 pixels for a 200-pixel face)."""
    m = np.asarray(matrix, dtype=np.float64)
    inv = np.linalg.inv(np.vstack([m, [0.0, 0.0, 1.0]]))[:2]
    corners = np.array([[0, 0, 1], [size - 1, 0, 1], [0, size - 1, 1], [size - 1, size - 1, 1]], dtype=np.float64)
    src = corners @ inv.T
    lo, hi = np.floor(src.min(0)) - 1, np.floor(src.max(0)) + 3
    x0 = int(min(max(lo[0], 0), width - 1))
    y0 = int(min(max(lo[1], 0), height - 1))
    x1 = int(min(max(hi[0], x0 + 1), width))
    y1 = int(min(max(hi[1], y0 + 1), height))
    shifted = m.copy()
    shifted[:, 2] += m[:, :2] @ np.array([x0, y0], dtype=np.float64)
    return (x0, y0, x1, y1), shifted


def read_five_points(path: str, require_score: bool = False) -> tuple[list[str], np.ndarray, Optional[np.ndarray]]:
    """A 5-point file: one face per line, `<name> x1 y1 ... x5 y5 [score]` (insightface's
    <target>_name_5pts_score.txt; points in the order of the template: eyes, nose, mouth
    corners). -> (names, (N, 5, 2) float64 points, (N,) float32 scores or None when no line
    has one). Blank lines and lines starting with '#' are skipped."""
    names, points, scores = [], [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) not in (11, 12) or (require_score and len(fields) != 12):
                want = ("12 (name, 10 coordinates, score)" if require_score
                        else "11 or 12 (name, 10 coordinates[, score])")
                raise ValueError(f"{path}:{n}: expected {want} fields, got {len(fields)}")
            try:
                values = [float(v) for v in fields[1:]]
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{path}:{n}: coordinates and score must be finite numbers")
            names.append(fields[0])
            points.append(values[:10])
            scores.append(values[10] if len(values) == 11 else float("nan"))
    if not names:
        raise ValueError(f"{path} lists no faces")
    sc = np.asarray(scores, dtype=np.float32)
    if np.isnan(sc).all():
        sc = None
    elif np.isnan(sc).any():
        raise ValueError(f"{path}: some lines have a score and some do not")
    return names, np.asarray(points, dtype=np.float64).reshape(-1, 5, 2), sc
