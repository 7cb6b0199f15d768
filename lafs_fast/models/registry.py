"""Named Part fViT presets: ``create_model(name, **overrides)`` and ``list_models()``."""
from __future__ import annotations

from typing import Any

from .part_fvit import PartFViT

PRESETS: dict[str, dict[str, Any]] = {
    # The released size: 64.1 M (ViT) + 2.9 M (landmark CNN) parameters.
    "part_fvit_b": dict(dim=768, depth=12, heads=11, dim_head=64, mlp_dim=2048,
                        num_landmarks=196, patch_size=8),
    "part_fvit_s": dict(dim=384, depth=6, heads=6, dim_head=64, mlp_dim=1536,
                        num_landmarks=196, patch_size=8),
    # Trains on 2 CPU cores in minutes: a half-width landmark CNN (the full-width one would cost
    # ~3x the ViT's MACs at this size) and 49 landmarks.
    "part_fvit_tiny": dict(dim=96, depth=4, heads=3, dim_head=32, mlp_dim=192,
                           num_landmarks=49, patch_size=8, cnn_width=0.5),
    # The CPU benchmark step's size (the release's step measured at dim 192, depth 4,
    # heads 3 on 2 cores): full landmark set and full-width landmark CNN.
    "part_fvit_mini": dict(dim=192, depth=4, heads=3, dim_head=64, mlp_dim=768,
                           num_landmarks=196, patch_size=8),
}


def list_models() -> list[str]:
    return sorted(PRESETS)


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The full PartFViT kwargs of a preset with overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(list_models())}")
    return {**PRESETS[name], **overrides}


def create_model(name: str, **overrides: Any) -> PartFViT:
    """A PartFViT preset; any PartFViT kwarg may be overridden (e.g. landmarks='grid')."""
    return PartFViT(**model_config(name, **overrides))
