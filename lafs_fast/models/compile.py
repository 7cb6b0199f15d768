"""Regional compilation of the transformer blocks with torch.compile (inductor), for inference:
`python -m lafs_fast.embed --compile`.

compile_blocks(model) compiles each vit.Block in place (nn.Module.compile: the module, its
parameters and its state-dict keys stay what they are), with static shapes: one graph per input
shape and autocast dtype, shared by all blocks (their parameters are graph inputs). Inductor fuses
each block's elementwise work (LayerNorm, the bf16 casts, attention's scale and softmax, the
head merge, GELU, the residual adds) into a few C++ loops between the oneDNN GEMMs. Measured on the
eval forward of part_fvit_b and the cost of compiling: docs/performance.md.

Inductor's pattern matcher is off: in bf16 on a CPU it would rewrite the explicit attention that
vit.Attention takes there back into SDPA, whose CPU flash kernel is the slower one at these sizes.

Not used for training: compiled blocks did not make the pretraining step faster
(bench/step_profile.md, "measured and not kept"). A training-mode block still compiles, with
torch's dropout in place of the counter-based one (CounterDropout under torch.compile).
"""
from __future__ import annotations

from torch import nn

from .vit import Block

__all__ = ["compile_blocks", "COMPILE_OPTIONS"]

COMPILE_OPTIONS = {"pattern_matcher": False}


def compile_blocks(model: nn.Module) -> int:
    """Compile every vit.Block of `model` in place; returns how many. The compilation itself
    happens at the first call of each input shape. A block compiled already is left as it is."""
    blocks = [b for b in model.modules() if isinstance(b, Block)]
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(dynamic=False, options=COMPILE_OPTIONS)
    return len(blocks)
