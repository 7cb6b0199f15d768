"""lafs_fast: fast LAFS (landmark-based facial self-supervised learning) and Part fViT."""
import glob as _glob
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _adopt_installed_build():
    """Find the compiled parts when this copy of the package has none.

    `python -m lafs_fast.train` run at the repository root imports the SOURCE tree (the current
    directory comes first on sys.path), which holds no `_C` and no `kernels` subpackage after a
    non-editable `pip install .`. Then submodule imports fall through to the installed copy
    (appended to __path__) and its `_build_info` is the one that describes the `_C` in use.
    An editable install builds `_C` in place, so nothing changes there. Returns the folder
    adopted, or None."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _glob.glob(_os.path.join(here, "_C.*")):
        return None
    for entry in _sys.path:
        candidate = _os.path.join(_os.path.abspath(entry or _os.getcwd()), "lafs_fast")
        if _os.path.realpath(candidate) == _os.path.realpath(here):
            continue
        if _glob.glob(_os.path.join(candidate, "_C.*")):
            __path__.append(candidate)  # noqa: F821  (the package's own __path__)
            info = _os.path.join(candidate, "_build_info.py")
            if _os.path.isfile(info):
                import importlib.util
                spec = importlib.util.spec_from_file_location(__name__ + "._build_info", info)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                _sys.modules[spec.name] = module
            return candidate
    return None


COMPILED_FROM = _adopt_installed_build()

from . import ops, reference  # noqa: F401,E402  (ops loads _C and registers the ops' Python parts)
from .ops import landmark_patch_embed, landmark_patches  # noqa: F401,E402
