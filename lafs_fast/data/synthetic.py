"""A tiny synthetic face-like dataset for tests and smoke runs (deterministic, no files).

Each identity has its own face geometry (oval size, eye / mouth positions, skin tone, a
low-frequency texture); each image of it adds a small shift, a brightness change and noise.
Identities are thus separable, but not trivially by one pixel.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


def synthetic_faces(num_identities: int, images_per_identity: int, image_size: int = 112,
                    seed: int = 0) -> tuple[Tensor, Tensor]:
    """uint8 images (M, 3, S, S) and int64 labels (M,), M = identities x images per identity."""
    if num_identities < 1 or images_per_identity < 1 or image_size < 8:
        raise ValueError(f"need num_identities, images_per_identity >= 1 and image_size >= 8, got "
                         f"{num_identities}, {images_per_identity}, {image_size}")
    g = torch.Generator().manual_seed(seed)
    S = image_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    images, labels = [], []
    for ident in range(num_identities):
        r = torch.rand(12, generator=g)
        tone = 0.3 + 0.5 * torch.rand(3, generator=g)
        tex = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(S, S),
                                              mode="bilinear", align_corners=False)[0]
        for _ in range(images_per_identity):
            dx, dy = (torch.rand(2, generator=g) - 0.5) * 0.12
            x, y = xx - dx, yy - dy
            face = ((x / (0.55 + 0.2 * r[0])) ** 2 + (y / (0.7 + 0.2 * r[1])) ** 2) < 1
            img = tone[:, None, None] * face + 0.25 * tex * face
            ex, ey = 0.2 + 0.15 * r[2], -0.25 + 0.15 * r[3]
            er = 0.06 + 0.05 * r[4]
            for sx in (-1, 1):
                eye = ((x - sx * ex) ** 2 + (y - ey) ** 2) < er ** 2
                img = torch.where(eye, torch.full_like(img, 0.05 + 0.2 * float(r[5])), img)
            mouth = ((x / (0.15 + 0.2 * r[6])) ** 2 + ((y - 0.4 - 0.15 * r[7]) / 0.05) ** 2) < 1
            img = torch.where(mouth, torch.tensor([0.6, 0.15, 0.15])[:, None, None] * (0.6 + r[8]), img)
            nose = (x.abs() < 0.03 + 0.05 * r[9]) & (y > -0.1) & (y < 0.15 + 0.1 * r[10])
            img = torch.where(nose, img * 0.7, img)
            img = img * (0.85 + 0.3 * torch.rand(1, generator=g)) + 0.03 * torch.randn(3, S, S, generator=g)
            images.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
            labels.append(ident)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class SyntheticFaces(Dataset):
    """(uint8 (3, S, S), label) pairs generated once at construction."""

    def __init__(self, num_identities: int = 8, images_per_identity: int = 4, image_size: int = 112,
                 seed: int = 0):
        self.images, self.labels = synthetic_faces(num_identities, images_per_identity,
                                                   image_size, seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])
