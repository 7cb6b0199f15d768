"""One LAFS pretraining step: lafs_fast's fused path vs a re-creation of the original step, in
the same run, with and without view construction (data) in the timed region.

    pytest bench/test_bench_step.py --benchmark-json=bench/step.json && python bench/report.py bench/step.json

Defaults (CPU): part_fvit_tiny, batch 16, 2 + 8 views, DINO out 4096. Overrides:
LAFS_STEP_MODEL, LAFS_STEP_BATCH, LAFS_STEP_AMP (none/bf16), LAFS_STEP_OUT_DIM.
"""
import contextlib
import os

import pytest
import torch

import step_paths as SP

MODEL = os.environ.get("LAFS_STEP_MODEL", "part_fvit_tiny")
BATCH = int(os.environ.get("LAFS_STEP_BATCH", "16"))
OUT_DIM = int(os.environ.get("LAFS_STEP_OUT_DIM", "4096"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AMP = os.environ.get("LAFS_STEP_AMP", "bf16" if DEVICE == "cuda" else "none")


def amp_ctx():
    if AMP == "none":
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("with_data", [False, True], ids=["model-only", "with-views"])
@pytest.mark.parametrize("impl", ["fused", "original"])
def test_pretrain_step(benchmark, impl, with_data):
    net, vcfg, dino, opt, faces = SP.make_setup(MODEL, BATCH, out_dim=OUT_DIM, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    make_views = SP.fused_views if impl == "fused" else SP.original_views
    step = SP.fused_step if impl == "fused" else SP.original_step
    v0 = make_views(faces, vcfg, gen)
    benchmark.group = f"pretrain step {MODEL} batch {BATCH} ({'with views' if with_data else 'model only'})"
    benchmark.extra_info["images_per_step"] = BATCH

    def run():
        v = make_views(faces, vcfg, gen) if with_data else v0
        loss = step(net, v, dino, opt, amp_ctx(), gen)
        sync()
        return loss

    loss = benchmark.pedantic(run, rounds=6, warmup_rounds=1)
    assert torch.isfinite(loss)
    benchmark.extra_info["images_per_s"] = round(BATCH / benchmark.stats.stats.median, 2)
