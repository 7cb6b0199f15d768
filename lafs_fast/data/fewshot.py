"""k-shot subsets: a seeded random sample of k images per identity (the release kept the first
fraction of the list instead)."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch


def fewshot_indices(labels: Union[Sequence[int], np.ndarray, torch.Tensor], k: int,
                    seed: int = 0) -> np.ndarray:
    """Sorted int64 indices: k images drawn without replacement per identity (all of them when
    an identity has fewer than k). Deterministic for (labels, k, seed)."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if lab.size == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = np.argsort(lab, kind="stable")  # groups identities, keeps image order inside
    bounds = np.flatnonzero(np.diff(lab[order])) + 1
    keep = []
    for group in np.split(order, bounds):
        keep.append(group if len(group) <= k else rng.choice(group, size=k, replace=False))
    return np.sort(np.concatenate(keep)).astype(np.int64)
