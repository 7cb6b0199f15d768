"""The lafs_fast ops, one module per op family; each holds the family's argument checks, backend
choice, fake kernels and autograd (schemas: csrc/lafs_ops.cpp; kernels: csrc/cpu, csrc/cuda and
the Triton kernels in lafs_fast.kernels; oracle: lafs_fast.reference).

  patch_embed   landmark_patch_embed, landmark_patches, multicrop_embed
  photometric   photometric_augment (the LAFS views' colour jitter, grayscale, blur, solarize)
  dropout       counter_dropout, CounterDropout, use_counter_dropout
  cpu_isa       cpu_isa, cpu_isa_supported, set_cpu_isa (the CPU kernels' instruction-set path;
                lafs_fast.ops.cpu_isa is the function, `from lafs_fast.ops.cpu_isa import ...`
                reaches the module)

Importing this package loads lafs_fast._C (when built) and registers the ops' Python parts.
"""
from ._common import BACKENDS, EXTENSION_STATUS, HAS_EXTENSION, BackendUnavailable, has_kernel, require_compiled
from .cpu_isa import cpu_isa, cpu_isa_supported, set_cpu_isa
from .dropout import CounterDropout, counter_dropout, use_counter_dropout
from .patch_embed import LOCAL_SEED_SALT, landmark_patch_embed, landmark_patches, multicrop_embed, resolve_backend
from .photometric import apply_photometric, draw_photometric_params, photometric_augment

__all__ = [
    "landmark_patch_embed", "landmark_patches", "multicrop_embed", "photometric_augment",
    "draw_photometric_params", "apply_photometric", "counter_dropout", "CounterDropout",
    "use_counter_dropout", "cpu_isa", "cpu_isa_supported", "set_cpu_isa", "BackendUnavailable",
    "require_compiled", "has_kernel", "resolve_backend", "HAS_EXTENSION", "EXTENSION_STATUS",
    "BACKENDS", "LOCAL_SEED_SALT",
]
