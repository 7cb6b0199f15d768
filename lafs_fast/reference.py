"""Plain-PyTorch reference of every lafs_fast op: the oracle for the tests and the fallback.

Written from the contract in docs/ops.md ("The landmark patch convention"), not from the
original code. Autograd of these functions defines the gradients every fast backend must match.

Token convention (docs/method.md section 2). For image I (C, H, W), landmark (lx, ly) in pixels and
patch size P, the token has P*P*C values:

    token[(i*P + j)*C + c] = bilinear(I[c], x = lx + i - P/2 - 0.5, y = ly + j - P/2 - 0.5)

with i, j in 0..P-1; bilinear() puts pixel k's centre at coordinate k and reads zero outside the
image (grid_sample with align_corners=False and zero padding). Non-finite landmarks read as
outside the image: a zero patch with zero gradient.

Perturbation noise (identical on every backend, up to float rounding): for output slot (b, k),
Philox 4x32-10 with key (seed mod 2^32, seed >> 32 mod 2^32) and counter (k, b, 0, 0) gives
words r0, r1 (r2, r3 unused); u1 = r0 * 2^-32 + 2^-33, u2 = r1 * 2^-32 + 2^-33 (float32);
Box-Muller: z_x = sqrt(-2 ln u1) cos(2 pi u2), z_y = sqrt(-2 ln u1) sin(2 pi u2) (float32);
the landmark used is (lx + perturb_std * z_x, ly + perturb_std * z_y), the noise computed in
float32 and added in the compute dtype (float64 for float64 images, else float32).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * m for int64 tensors a in [0, 2^32), without int64 overflow."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, ...]:
    """Philox 4x32-10 (Salmon et al., Random123) on int64 tensors holding uint32 words."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for r in range(PHILOX_ROUNDS):
        if r > 0:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def landmark_noise(seed: int, batch: int, slots: int, device=None) -> Tensor:
    """Standard-normal noise (batch, slots, 2) float32 keyed by (seed, b, k, axis)."""
    k = torch.arange(slots, dtype=torch.int64, device=device).expand(batch, slots)
    b = torch.arange(batch, dtype=torch.int64, device=device)[:, None].expand(batch, slots)
    zero = torch.zeros_like(k)
    r0, r1, _, _ = philox4x32(seed, k, b, zero, zero)
    scale = torch.tensor(2.0**-32, dtype=torch.float32)
    half = torch.tensor(2.0**-33, dtype=torch.float32)
    u1 = r0.to(torch.float32) * scale + half
    u2 = r1.to(torch.float32) * scale + half
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = torch.tensor(2.0 * math.pi, dtype=torch.float32) * u2
    return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)


def _mix32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 integer hash on int64 tensors holding uint32 words."""
    x = x ^ (x >> 16)
    x = _mulhilo32(x, 0x7FEB352D)[1]
    x = x ^ (x >> 15)
    x = _mulhilo32(x, 0x846CA68B)[1]
    return x ^ (x >> 16)


def _splitmix64(z: int) -> int:
    m = 0xFFFFFFFFFFFFFFFF
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def dropout_keep_mask(numel: int, p: float, seed: int, device=None) -> Tensor:
    """Keep mask (numel,) bool of lafs_fast's counter-based dropout: with (k0, k1) the 32-bit
    halves of splitmix64(seed), element i (flat, contiguous order) is kept iff
    mix32(mix32(lo32(i) ^ k0) ^ hi32(i) ^ k1) >= round(p * 2^32) (mix32 = lowbias32)."""
    key = _splitmix64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    k0, k1 = key & _MASK32, key >> 32
    i = torch.arange(numel, dtype=torch.int64, device=device)
    h = _mix32(_mix32((i & _MASK32) ^ k0) ^ (i >> 32) ^ k1)
    return h >= min(int(round(p * 2.0**32)), _MASK32)


def dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """The oracle of torch.ops.lafs_fast.counter_dropout: x * (keep ? 1 / (1 - p) : 0), computed in
    float64 for float64 inputs and float32 otherwise (so a dropped inf / NaN gives NaN, as torch's
    dropout does)."""
    keep = dropout_keep_mask(x.numel(), p, seed, x.device).view(x.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    factor = torch.where(keep, torch.tensor(1.0 / (1.0 - p), dtype=acc), torch.tensor(0.0, dtype=acc))
    return (x.to(acc) * factor).to(x.dtype)


def compute_dtype(images: Tensor) -> torch.dtype:
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def select_landmarks(landmarks: Tensor, index: Optional[Tensor], perturb_std: float, seed: int,
                     dtype: torch.dtype) -> Tensor:
    """The (B, K, 2) landmarks actually sampled: index gather, then perturbation."""
    lm = landmarks.to(dtype)
    if index is not None:
        lm = torch.gather(lm, 1, index.long()[..., None].expand(-1, -1, 2))
    if perturb_std > 0:
        noise = float(perturb_std) * landmark_noise(seed, lm.shape[0], lm.shape[1], lm.device)
        lm = lm + noise.to(dtype)
    return lm


def patch_offsets(patch_size: int, dtype: torch.dtype, device=None) -> Tensor:
    """Offsets i - P/2 - 0.5 of the patch taps from the landmark (exact in any float dtype)."""
    return torch.arange(patch_size, dtype=dtype, device=device) - (patch_size / 2 + 0.5)


def landmark_patches(images: Tensor, landmarks: Tensor, index: Optional[Tensor] = None,
                     patch_size: int = 8, perturb_std: float = 0.0, seed: int = 0) -> Tensor:
    """Bilinear patches (B, K, P*P*C) in the LAFS token layout (module docstring)."""
    B, C, H, W = images.shape
    P = patch_size
    dtype = compute_dtype(images)
    lm = select_landmarks(landmarks, index, perturb_std, seed, dtype)  # (B, K, 2)
    K = lm.shape[1]
    finite = torch.isfinite(lm).all(dim=-1)  # (B, K)
    # Non-finite landmarks are moved far outside: zero patch; torch.where gives zero gradient.
    lm = torch.where(finite[..., None], lm, torch.full_like(lm, -4.0 * P - 8.0))
    off = patch_offsets(P, dtype, images.device)
    # Clamping to [-2, size+1] keeps every value and gradient (taps there are all outside) and
    # keeps floor() of huge coordinates inside int64.
    x = (lm[..., 0, None] + off).clamp(-2.0, W + 1.0)  # (B, K, P): x of tap i
    y = (lm[..., 1, None] + off).clamp(-2.0, H + 1.0)  # (B, K, P): y of tap j
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    wx1, wy1 = x - x0, y - y0
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    x0i, y0i = x0.long(), y0.long()
    flat = images.to(dtype).reshape(B, C, H * W)
    out = torch.zeros(B, K, P, P, C, dtype=dtype, device=images.device)
    for dx, wx in ((0, wx0), (1, wx1)):
        xi = x0i + dx
        vx = (xi >= 0) & (xi < W)
        for dy, wy in ((0, wy0), (1, wy1)):
            yi = y0i + dy
            vy = (yi >= 0) & (yi < H)
            valid = vx[..., :, None] & vy[..., None, :]  # (B, K, P_i, P_j)
            lin = yi.clamp(0, H - 1)[..., None, :] * W + xi.clamp(0, W - 1)[..., :, None]
            vals = torch.gather(flat, 2, lin.reshape(B, 1, K * P * P).expand(B, C, -1))
            vals = vals.reshape(B, C, K, P, P).permute(0, 2, 3, 4, 1)  # (B, K, P_i, P_j, C)
            w = (wx[..., :, None] * wy[..., None, :] * valid)[..., None]
            out = out + w * vals
    return out.reshape(B, K, P * P * C).to(images.dtype)


def landmark_patch_embed(images: Tensor, landmarks: Tensor, weight: Tensor,
                         bias: Optional[Tensor] = None, index: Optional[Tensor] = None,
                         patch_size: int = 8, perturb_std: float = 0.0, seed: int = 0) -> Tensor:
    """Tokens (B, K, D) = landmark_patches(...) @ weight.T + bias, accumulated in the compute dtype."""
    dtype = compute_dtype(images)
    patches = landmark_patches(images.to(dtype), landmarks, index, patch_size, perturb_std, seed)
    out = torch.nn.functional.linear(patches, weight.to(dtype),
                                     None if bias is None else bias.to(dtype))
    return out.to(images.dtype)


def landmark_patches_loop(images: Tensor, landmarks: Tensor, patch_size: int = 8) -> Tensor:
    """The original LAFS recipe, kept as an independent check and a benchmark baseline:
    one F.grid_sample per landmark over a P x P grid, then the mosaic rearrange
    'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' (here on a mosaic of N patches in a row).
    """
    B, C, H, W = images.shape
    P = patch_size
    N = landmarks.shape[1]
    off = patch_offsets(P, landmarks.dtype, landmarks.device)
    # grid_sample's x index is the last dim; LAFS's first patch index i runs along x, so the
    # sampled patch is stored transposed: rows of the (P, P) grid are j (y), columns are i (x).
    gx = off[None, :].expand(P, P)  # [j, i] -> offset i
    gy = off[:, None].expand(P, P)  # [j, i] -> offset j
    patches = []
    for n in range(N):
        px = landmarks[:, n, 0, None, None] + gx
        py = landmarks[:, n, 1, None, None] + gy
        grid = torch.stack(((2 * px + 1) / W - 1, (2 * py + 1) / H - 1), dim=-1)  # (B, P, P, 2)
        s = torch.nn.functional.grid_sample(images, grid.to(images.dtype), mode="bilinear",
                                            padding_mode="zeros", align_corners=False)
        patches.append(s.transpose(2, 3))  # (B, C, P_i, P_j)
    mosaic = torch.cat(patches, dim=2)  # (B, C, N*P, P): h = N, w = 1
    return mosaic.reshape(B, C, N, P, P).permute(0, 2, 3, 4, 1).reshape(B, N, P * P * C)
