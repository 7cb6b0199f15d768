"""Triton kernels of lafs_fast (installed as lafs_fast.kernels). One file per op family, each
holding its @triton.jit kernels and their launchers; the family's module in lafs_fast/ops/
registers the launchers as torch ops. Triton is optional: nothing here imports it until an op
module is imported."""
import importlib

OP_MODULES = ("landmark_patch_embed",)


def compile_all_for_sm90(dtype: str = "fp32"):
    """Compile every Triton kernel of every op module for Hopper (sm_90) without a GPU, for
    images of `dtype` ("fp32", "bf16", "fp16", "fp64": each a separate specialisation)."""
    compiled = {}
    for name in OP_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        compiled.update({f"{name}.{k}": v for k, v in module.compile_all_for_sm90(dtype).items()})
    return compiled
