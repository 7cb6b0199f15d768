"""insightface verification .bin files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...): a pickle of
(list of encoded images, list of is-same flags), image 2k and 2k+1 forming pair k.

Loaded with a restricted unpickler (lists, tuples, bytes, bools and numpy arrays only), so a
.bin cannot run code on load.
"""
from __future__ import annotations

import io
import pickle
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..data.image_folder import decode_image_bytes, encode_image

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "bool_"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("builtins", "bytearray"), ("__builtin__", "bytearray"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a .bin")


def _not_a_bin(path: str, why: str) -> ValueError:
    return ValueError(f"{path} is not an insightface verification .bin (a pickle of "
                      f"(list of encoded images, list of is-same flags)): {why}")


def load_bin(path: str, image_size: int = 112) -> tuple[Tensor, Tensor]:
    """-> (uint8 images (2n, 3, S, S), bool is_same (n,)); pair k = images 2k, 2k + 1."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        raise _not_a_bin(path, "the file is empty")
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:
        raise _not_a_bin(path, f"unpickling failed ({e})") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise _not_a_bin(path, f"top level is {type(obj).__name__}, not a pair")
    bins, issame = obj
    issame = np.asarray(issame).astype(bool).reshape(-1)
    if not isinstance(bins, (list, tuple)) or len(bins) != 2 * len(issame):
        raise _not_a_bin(path, f"{len(bins) if hasattr(bins, '__len__') else '?'} images for "
                               f"{len(issame)} pairs (need 2 per pair)")
    images = torch.empty(len(bins), 3, image_size, image_size, dtype=torch.uint8)
    for i, b in enumerate(bins):
        if isinstance(b, np.ndarray):
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)):
            raise _not_a_bin(path, f"entry {i} is {type(b).__name__}, not encoded image bytes")
        try:  # a verification set cannot skip one image of a pair: a clear error instead
            images[i] = decode_image_bytes(b, image_size)
        except ValueError as e:
            raise ValueError(f"{path}: image {i} (pair {i // 2}) cannot be decoded: {e}") from e
    return images, torch.from_numpy(issame)


def write_bin(path: str, images_uint8: Sequence[Tensor], is_same: Sequence[bool],
              encoding: str = "png") -> None:
    """Write a .bin in the insightface layout (for tests and small custom sets)."""
    if len(images_uint8) != 2 * len(is_same):
        raise ValueError(f"need 2 images per pair: {len(images_uint8)} images, {len(is_same)} pairs")
    bins = [encode_image(im, encoding) for im in images_uint8]
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(x) for x in is_same]), f, protocol=pickle.HIGHEST_PROTOCOL)
