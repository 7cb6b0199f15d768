"""Optional parts of lafs_fast and the packages they need, installed as pip extras:

    pip install 'lafs_fast[onnx]'         ONNX export (onnx) and its --check (onnxruntime)
    pip install 'lafs_fast[tensorboard]'  TensorBoard event files of the training metrics
    pip install 'lafs_fast[plot]'         python -m lafs_fast.plot (matplotlib)

A feature asks for its package with require_extra, which names the extra to install instead of
failing deep inside another library.
"""
from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed (or does not import)."""


def install_hint(extra: str) -> str:
    return f"pip install 'lafs_fast[{extra}]'"


def require_extra(module: str, extra: str, feature: str = "") -> ModuleType:
    """Import `module` for `feature`, or raise MissingExtra with one line naming the extra:
    "ONNX export needs the onnx extra (pip install 'lafs_fast[onnx]')"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        feature = feature or f"this feature ({module})"
        top = module.split(".")[0]
        if isinstance(e, ModuleNotFoundError) and (e.name is None or e.name.split(".")[0] == top):
            raise MissingExtra(f"{feature} needs the {extra} extra ({install_hint(extra)})") from None
        # installed but broken, e.g. a compiled part built for another version
        raise MissingExtra(f"{feature} needs {module}, which is installed but fails to import: {e} "
                           f"(reinstall it: pip install --force-reinstall 'lafs_fast[{extra}]')") from None
