"""lafs_fast: fast LAFS (landmark-based facial self-supervised learning) and Part fViT."""
from . import ops, reference  # noqa: F401  (ops registers torch.ops.lafs_fast.* when _C is built)
from .ops import landmark_patch_embed, landmark_patches  # noqa: F401

__version__ = "0.1.0"
