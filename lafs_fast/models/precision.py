"""Regions that keep float32 under mixed precision (docs/precision.md: what --amp does to each
module)."""
from __future__ import annotations

import contextlib

import torch


def float32_region(device_type: str):
    """Autocast off for the block (ops run in their inputs' dtype: float32 for float32 inputs and
    weights), on devices that have autocast; a no-op elsewhere."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
