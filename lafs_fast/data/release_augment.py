"""The authors' finetuning augmentation (supervised Part fViT / LAFS finetuning), per image on
uint8 (3, H, W) tensors, built from timm and torchvision rather than re-written.

The release (image_iter.py FaceDataset, lines 187-362, used by train_largescale.py:506) does,
per image: horizontal flip (p 0.5), face RandAugment ``rand-m1-mstd0.5-inc1`` (WebFace4M;
``rand-m2-mstd0.5-inc1`` for MS1M) on a PIL image, then on the uint8 tensor
RandomResizedCrop(112, scale (0.9, 1)), ColorJitter(0.1, 0.1, 0.1, 0.1) and
RandomErasing(p 0.5, scale (0.02, 0.1), ratio (0.3, 3.3), value 0 = black).

Its RandAugment (util/rand_aa_face.py) is timm's of 2020 with the three Solarize ops
(SolarizeIncreasing, SolarizeAdd, and Solarize in the non-increasing list) removed from the op
lists; everything else (op probability 0.5, 2 ops per image, magnitude noise, fill 128, random
bilinear / bicubic resampling, the level-to-argument maps) is timm's. So this module calls
timm's ``rand_augment_transform`` with timm's increasing list minus the Solarize ops; with the
same Python / NumPy random state it gives the same image (checked against rand_aa_face, see the
differences table in docs/release.md). The erasing is torchvision's, as the release uses (timm's
RandomErasing fills in normalised space and draws the aspect differently).

Randomness: each call takes an integer seed and draws everything from it (Python, NumPy and
torch streams forked so that the caller's are untouched), so an image's augmentation depends
only on (run seed, epoch, position in the epoch order): split-invariant over ranks, repeatable
on resume, the same in a DataLoader worker as in the main process.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch
from torch import Tensor

# The face RandAugment's ops: timm's increasing list without the Solarize family (rand_aa_face).
FACE_RAND_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                        "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
FACE_RAND = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Color", "Contrast",
             "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def face_rand_augment(config_str: str = "rand-m1-mstd0.5-inc1"):
    """timm's RandAugment with the release's face op list (hparams as image_iter.py:206-209)."""
    from timm.data.auto_augment import rand_augment_transform
    if not config_str.startswith("rand"):
        raise ValueError(f"RandAugment config must start with 'rand', got {config_str!r}")
    increasing = any(part == "inc1" for part in config_str.split("-"))
    ops = list(FACE_RAND_INCREASING if increasing else FACE_RAND)
    return rand_augment_transform(config_str, {"translate_const": 117}, transforms=ops)


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): neighbouring positions get unrelated streams."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z = (z ^ (z >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 29
    return z & 0x7FFFFFFFFFFFFFFF


class ReleaseAugment:
    """uint8 (3, S, S) -> uint8 (3, S, S): flip, face RandAugment, resized crop, colour jitter,
    erasing, in the release's order. ``randaugment=''`` leaves RandAugment out."""

    def __init__(self, image_size: int = 112, randaugment: str = "rand-m1-mstd0.5-inc1",
                 crop_scale: tuple[float, float] = (0.9, 1.0), jitter: float = 0.1,
                 erase_prob: float = 0.5, erase_scale: tuple[float, float] = (0.02, 0.1),
                 flip: bool = True):
        from torchvision import transforms as T
        self.flip = flip
        self.rand_augment = face_rand_augment(randaugment) if randaugment else None
        self.tensor_ops = T.Compose([
            T.RandomResizedCrop(image_size, scale=tuple(crop_scale)),
            T.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter),
            T.RandomErasing(p=erase_prob, scale=tuple(erase_scale)),
        ])

    def __call__(self, img: Tensor, seed: int) -> Tensor:
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"ReleaseAugment needs a uint8 (3, H, W) image, got {img.dtype} {tuple(img.shape)}")
        from PIL import Image
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if self.flip and random.random() < 0.5:
                    img = img.flip(-1)
                if self.rand_augment is not None:
                    pil = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
                    img = torch.from_numpy(np.array(self.rand_augment(pil))).permute(2, 0, 1).contiguous()
                return self.tensor_ops(img)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    @staticmethod
    def item_seed(run_seed: int, epoch: int, position: int) -> int:
        return _mix_seed(run_seed, epoch, position)


def augment_batch(aug: Optional[ReleaseAugment], images: Tensor, seeds) -> Tensor:
    """Apply ``aug`` to every image of a uint8 batch with its own seed."""
    if aug is None:
        return images
    return torch.stack([aug(im, int(s)) for im, s in zip(images, seeds)])
