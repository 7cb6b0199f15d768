"""What every op family shares: loading lafs_fast._C, asking which kernels it has, the
LAFS_FAST_BACKEND choice, and the refusal to train on the slow reference ops by accident."""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def _load_extension():
    """Import lafs_fast._C; return (loaded, reason). A binary built for another torch refuses."""
    try:
        from .._build_info import BUILD_INFO
    except ImportError:
        return False, "lafs_fast._C is not built (pip install --no-build-isolation .)"
    if BUILD_INFO["torch_version"] != torch.__version__:
        raise ImportError(
            f"lafs_fast._C was built against torch {BUILD_INFO['torch_version']} but torch "
            f"{torch.__version__} is installed: rebuild it with `pip install --no-build-isolation .` "
            "(or `-e .`) in this environment.")
    try:
        from .. import _C  # noqa: F401  (registers torch.ops.lafs_fast.*)
    except ImportError as e:
        return False, f"lafs_fast._C failed to import: {e}"
    return True, "built" + (" with CUDA" if BUILD_INFO["with_cuda"] else " without CUDA")


HAS_EXTENSION, EXTENSION_STATUS = _load_extension()


class BackendUnavailable(RuntimeError):
    """The compiled kernels are missing and the user did not ask for the reference ops."""


def require_compiled(backend: Optional[str] = None) -> None:
    """Training stops here rather than quietly running the slow reference ops without `_C`.

    Passes when `_C` is loaded, or when the user asked for the reference ops by name: `backend`
    (a command's --backend) or LAFS_FAST_BACKEND=reference."""
    asked = backend if backend not in (None, "", "auto") else os.environ.get("LAFS_FAST_BACKEND", "")
    if HAS_EXTENSION or asked == "reference":
        return
    raise BackendUnavailable(
        f"the compiled kernels are unavailable ({EXTENSION_STATUS}). Build them in this environment "
        "with `pip install --no-build-isolation -e .` and check with `python -m lafs_fast.info`, or "
        "run the slow reference ops on purpose with LAFS_FAST_BACKEND=reference.")


# A constant once _C is loaded: torch.compile(fullgraph=True) must not trace into the pybind call.
@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether torch.ops.lafs_fast.<op> has a kernel for a dispatch key ("CPU", "CUDA"); False
    when _C is missing or was built before the op existed."""
    if not HAS_EXTENSION:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"lafs_fast::{op}", dispatch_key)
    except RuntimeError:  # the op is not defined
        return False


def env_backend(backend: str) -> str:
    """`backend` with "auto" replaced by LAFS_FAST_BACKEND when that is set; both checked."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("LAFS_FAST_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"LAFS_FAST_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return backend
