"""One LAFS pretraining step: lafs_fast's fused path vs a re-creation of the original step
(step_paths.py) and, when LAFS_RELEASE names a checkout of the authors' release, the release's
own step (release_step.py), in the same run, with data (JPEG decode + views) in the timed region
and without.

    LAFS_RELEASE=../LAFS_CVPR2024 pytest bench/test_bench_step.py --benchmark-json=bench/step.json
    python bench/report.py bench/step.json

Defaults (CPU): part_fvit_mini, batch 16, 2 + 8 views, DINO out 4096. Overrides:
LAFS_STEP_MODEL, LAFS_STEP_BATCH, LAFS_STEP_AMP (none/bf16), LAFS_STEP_OUT_DIM.
bench/step_throughput.py prints the same comparison as images/s (interleaved) plus a profile.
"""
import contextlib
import os

import pytest
import release_step as R
import step_paths as SP
import torch

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
@pytest.mark.parametrize("impl", ["fused", "original", "release"])
def test_pretrain_step(benchmark, impl, with_data):
    SP.seed_all(0)
    benchmark.group = f"pretrain step {MODEL} batch {BATCH} ({'with data' if with_data else 'model only'})"
    benchmark.extra_info["images_per_step"] = BATCH
    if impl == "release":
        try:
            rel = R.load_release(os.environ.get("LAFS_RELEASE", ""))
        except R.ReleaseUnavailable as e:
            pytest.skip(f"the release's own step needs its checkout: {e}")
        import step_throughput as ST
        try:
            dims = ST.model_dims(MODEL)
        except ValueError as e:
            pytest.skip(str(e))
        step = R.ReleaseStep(rel, batch=BATCH, out_dim=OUT_DIM, device=DEVICE, amp=AMP, **dims)
        data = R.ReleaseData(rel, SP.face_bytes(BATCH))
        cached = [im.to(DEVICE) for im in data()]

        def run():
            images = [im.to(DEVICE) for im in data()] if with_data else cached
            loss = torch.tensor(step(images)["loss"])
            sync()
            return loss
    else:
        net, vcfg, dino, opt = SP.make_setup(MODEL, BATCH, out_dim=OUT_DIM, device=DEVICE,
                                             original=impl == "original")
        runner = SP.StepRunner(impl, SP.face_bytes(BATCH), vcfg, with_data, DEVICE)

        def run():
            loss = runner(net, dino, opt, amp_ctx())
            sync()
            return loss

    loss = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert torch.isfinite(loss)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = round(BATCH / benchmark.stats.stats.median, 2)
