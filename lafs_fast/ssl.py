"""Deprecated: the DINO objective moved to `lafs_fast.dino` (this name shadowed Python's `ssl`
inside the package). Kept for one release; import `lafs_fast.dino` instead."""
import warnings

from .dino import *  # noqa: F401,F403
from .dino import __all__  # noqa: F401

warnings.warn("lafs_fast.ssl is deprecated; import lafs_fast.dino (same names)", DeprecationWarning,
              stacklevel=2)
