"""One folder per identity (jpg / png / pgm ...), labels by sorted folder name; plus the image
decoding helpers shared by the RecordIO and .bin readers (uint8 (3, H, W) tensors)."""
from __future__ import annotations

import io
import os
import re
import warnings
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .orl import read_pnm

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp")


def resize_uint8(img: Tensor, size: int) -> Tensor:
    """uint8 (C, H, W) -> (C, size, size), bilinear with antialias (a no-op at the right size)."""
    if img.shape[-2:] == (size, size):
        return img
    out = F.interpolate(img[None].float(), size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)[0]
    return out.round().clamp(0, 255).to(torch.uint8)


def _to_rgb(img: Tensor) -> Tensor:
    if img.shape[0] == 1:
        return img.expand(3, -1, -1).contiguous()
    if img.shape[0] == 4:
        return img[:3].contiguous()
    return img


def _decode_failure(error: Exception) -> str:
    """PIL's reason without the repr of the in-memory file it was given."""
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip()
    if text.startswith("cannot identify image file"):
        return "unrecognised image format"
    return text or type(error).__name__


def decode_image_bytes(data: Union[bytes, bytearray, memoryview],
                       image_size: Optional[int] = None) -> Tensor:
    """Encoded JPEG / PNG / PGM / PPM bytes -> uint8 (3, H, W) RGB (grey replicated), optionally
    resized to image_size x image_size. Raises ValueError on undecodable data."""
    data = bytes(data)
    try:
        if data[:2] in (b"P5", b"P6"):
            arr = read_pnm(data)
            img = torch.from_numpy(arr.copy())
            img = img[None] if img.dim() == 2 else img.permute(2, 0, 1)
        else:  # PIL: torchvision.io's codecs are deprecated (0.29)
            from PIL import Image
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"))
            img = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    except Exception as e:  # PIL raises OSError / SyntaxError variants for corrupt data
        raise ValueError(f"could not decode image ({len(data)} bytes): {_decode_failure(e)}") from e
    img = _to_rgb(img)
    return resize_uint8(img, image_size) if image_size else img


def encode_image(img: Tensor, encoding: str = "png", quality: int = 95) -> bytes:
    """uint8 (C, H, W) -> PNG or JPEG bytes (for the test / small-set writers)."""
    from PIL import Image
    if encoding not in ("png", "jpeg"):
        raise ValueError(f"encoding must be 'png' or 'jpeg', got {encoding!r}")
    img = torch.as_tensor(img)
    if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"images must be uint8 (1 or 3, H, W), got {img.dtype} {tuple(img.shape)}")
    arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=encoding.upper(), **({"quality": quality} if encoding == "jpeg" else {}))
    return buf.getvalue()


def read_image_file(path: str, image_size: Optional[int] = None) -> Tensor:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_image_bytes(data, image_size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


class CorruptDataWarning(UserWarning):
    """A training item that cannot be read was skipped."""


class SkipCorrupt:
    """Item access that survives bad data: ``ds[i]`` is item i or, when it cannot be read (a
    corrupt or truncated file / record), the next readable item (wrapping around) with that
    item's own label. Only ``max_skip`` failed reads in a row raise (a ValueError naming the
    source), as does a dataset with nothing readable left.

    A bad item is named in one warning line and flagged in shared memory, which DataLoader
    workers share with the main process and with the next epoch's workers: it is passed over
    for free afterwards, warned about once per run, and counted where the training loop can read
    it -- ``num_corrupt`` (found so far), ``bad_keys`` (their paths / record keys) and
    ``count_corrupt(indices)`` (how many of an epoch's items were bad).

    Subclasses define __len__, ``load(i)`` (raises ValueError / OSError for a bad item),
    ``item_key(i)``, set ``max_skip``, ``source`` and ``item_kind``, and call
    ``track_corrupt(len(self), known_bad)`` once their items are known."""

    max_skip: int = 64
    source: str = ""
    item_kind: str = "item"

    def track_corrupt(self, num_items: int, known_bad=()) -> None:
        """known_bad: keys found bad before any read that are not items (counted, not indexed)."""
        self._bad = torch.zeros(num_items, dtype=torch.uint8).share_memory_()
        self._known_bad = set(known_bad)

    @property
    def bad_keys(self) -> set:
        return self._known_bad | {self.item_key(int(i)) for i in self._bad.nonzero().flatten()}

    @property
    def num_corrupt(self) -> int:
        return len(self._known_bad) + int(self._bad.sum())

    def count_corrupt(self, indices) -> int:
        """How many of these items are known to be corrupt (an epoch's: the ones it lacked)."""
        return int(self._bad[torch.as_tensor(indices, dtype=torch.long)].sum())

    def mark_corrupt(self, i: int) -> bool:
        """Flag item i; False when it was flagged already (by this or another process)."""
        if self._bad[i]:
            return False
        self._bad[i] = 1
        return True

    def corrupt_reason(self, key, error: Exception) -> str:
        return str(error)

    def __getitem__(self, i: int):
        n, tries, last = len(self), 0, None
        for step in range(n):
            j = (i + step) % n
            if self._bad[j]:
                continue
            try:
                return self.load(j)
            except (ValueError, KeyError, OSError) as e:
                tries, last = tries + 1, e
                if self.mark_corrupt(j):
                    key = self.item_key(j)
                    # One line (no source line under it): the item, why, and the count so far.
                    warnings.warn_explicit(
                        f"{type(self).__name__}: skipping corrupt {self.item_kind} {key}: "
                        f"{self.corrupt_reason(key, e)}; {self.num_corrupt} corrupt so far",
                        CorruptDataWarning, filename="lafs_fast.data", lineno=0, module=__name__)
            if tries >= self.max_skip:
                break
        raise ValueError(f"no readable {self.item_kind} from index {i} of {self.source}: {tries} read(s) in a "
                         f"row failed, {self.num_corrupt} bad in all (last error: {last})")


class ImageFolderDataset(SkipCorrupt, Dataset):
    """root/<identity>/<image>: items (uint8 (3, S, S), label), label = rank of the folder name
    among the non-empty identity folders (sorted). Empty folders are skipped with one warning
    and counted in ``num_empty``; undecodable files are skipped and counted when read
    (``SkipCorrupt``: ``bad_keys`` holds their paths, ``load(i)`` reads without skipping)."""

    item_kind = "image"

    def __init__(self, root: str, image_size: int = 112, max_skip: int = 64):
        if not os.path.isdir(root):
            raise ValueError(f"root {root!r} is not a directory")
        self.root, self.image_size = root, image_size
        self.source, self.max_skip = root, max_skip
        self.classes: list[str] = []
        self.empty: list[str] = []
        paths, labels = [], []
        for name in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                self.empty.append(name)
                continue
            label = len(self.classes)
            self.classes.append(name)
            paths += [os.path.join(folder, f) for f in files]
            labels += [label] * len(files)
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the identity folders of {root} "
                             f"({len(self.empty)} empty identity folder(s)); expected root/<identity>/<image>")
        if self.empty:
            warnings.warn(f"ImageFolderDataset: skipped {len(self.empty)} empty identity folder(s) "
                          f"in {root}, e.g. {self.empty[:3]}")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.track_corrupt(len(paths))

    @property
    def num_empty(self) -> int:
        return len(self.empty)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def item_key(self, i: int) -> str:
        return self.paths[i]

    def corrupt_reason(self, key, error: Exception) -> str:
        text = str(error)  # read_image_file's message starts with the path the warning names
        return text[len(f"{key}: "):] if text.startswith(f"{key}: ") else text

    def load(self, i: int):
        """Image i or an exception (ValueError / OSError) -- no skipping."""
        return read_image_file(self.paths[i], self.image_size), int(self.labels[i])
