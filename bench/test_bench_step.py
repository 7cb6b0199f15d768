"""One LAFS pretraining step: lafs_fast's fused path vs a re-creation of the original step
(step_paths.py), in the same run, with data (JPEG decode + views) in the timed region and without.

    pytest bench/test_bench_step.py --benchmark-json=bench/step.json && python bench/report.py bench/step.json

Defaults (CPU): part_fvit_mini, batch 16, 2 + 8 views, DINO out 4096. Overrides:
LAFS_STEP_MODEL, LAFS_STEP_BATCH, LAFS_STEP_AMP (none/bf16), LAFS_STEP_OUT_DIM.
bench/step_throughput.py prints the same comparison as images/s plus a profile.
"""
import contextlib
import os

import pytest
import torch

import step_paths as SP

MODEL = os.environ.get("LAFS_STEP_MODEL", "part_fvit_mini")
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


@pytest.mark.parametrize("with_data", [False, True], ids=["model-only", "with-data"])
@pytest.mark.parametrize("impl", ["fused", "original"])
def test_pretrain_step(benchmark, impl, with_data):
    SP.seed_all(0)
    net, vcfg, dino, opt = SP.make_setup(MODEL, BATCH, out_dim=OUT_DIM, device=DEVICE, original=impl == "original")
    runner = SP.StepRunner(impl, SP.face_bytes(BATCH), vcfg, with_data, DEVICE)
    benchmark.group = f"pretrain step {MODEL} batch {BATCH} ({'with data' if with_data else 'model only'})"
    benchmark.extra_info["images_per_step"] = BATCH

    def run():
        loss = runner(net, dino, opt, amp_ctx())
        sync()
        return loss

    loss = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)
    benchmark.extra_info["images_per_s"] = round(BATCH / benchmark.stats.stats.median, 2)
