"""The instruction-set path of the multiversioned CPU kernels (AVX-512, AVX2 or the x86-64
baseline; csrc/common/multiversion.h): report it and force a lower one at run time.

The default is the best path the CPU supports, capped by LAFS_FAST_CPU_ISA (read at the first
kernel call). Every path gives the same bits; forcing one is for measuring and testing."""
from __future__ import annotations

import torch

from ._common import EXTENSION_STATUS, HAS_EXTENSION

__all__ = ["cpu_isa", "cpu_isa_supported", "set_cpu_isa"]


def _ops():
    if not HAS_EXTENSION:
        raise RuntimeError(f"the CPU path switch needs lafs_fast._C: {EXTENSION_STATUS}")
    if not hasattr(torch.ops.lafs_fast, "cpu_isa"):
        raise RuntimeError("lafs_fast._C predates the CPU path switch: rebuild it with "
                           "`pip install --no-build-isolation .`")
    return torch.ops.lafs_fast


def cpu_isa() -> str:
    """The path the CPU kernels take now: "avx512", "avx2" or "baseline"."""
    return _ops().cpu_isa()


def cpu_isa_supported() -> list[str]:
    """Every path this CPU can run, best first."""
    return list(_ops().cpu_isa_supported())


def set_cpu_isa(isa: str) -> str:
    """Use `isa` ("avx512", "avx2", "baseline") from now on; returns the previous path. A path
    this CPU lacks, or an unknown name, is an error."""
    return _ops().set_cpu_isa(isa)
