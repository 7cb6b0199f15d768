"""Datasets. Every dataset returns (uint8 (3, S, S) CHW tensor, int label): cheap to store,
collate and augment in batch on tensors; ``to_model_input`` turns a batch into the models' float
[-1, 1] input ((x / 255 - 0.5) / 0.5) in one place."""
import torch
from torch import Tensor


def to_model_input(batch: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, 3, H, W) (or (3, H, W)) -> float in [-1, 1]; float input is assumed already there."""
    if batch.dtype == torch.uint8:
        return batch.to(dtype).div_(127.5).sub_(1.0)
    if not batch.is_floating_point():
        raise ValueError(f"batch must be uint8 or float, got {batch.dtype}")
    return batch.to(dtype)


from .fewshot import fewshot_indices  # noqa: E402,F401
from .image_folder import ImageFolderDataset, decode_image_bytes, resize_uint8  # noqa: E402,F401
from .orl import ORLFaces, load_orl, orl_split, orl_verification_pairs, read_pnm  # noqa: E402,F401
from .recordio import RecordIODataset, RecordIOReader, write_recordio  # noqa: E402,F401
from .synthetic import SyntheticFaces, synthetic_faces  # noqa: E402,F401
