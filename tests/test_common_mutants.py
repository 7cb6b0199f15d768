"""The shared training helpers where mutation testing (docs/mutation.md) found the suite blind:
the precision a run resolves, what deterministic mode switches, how a used out-dir is described
and which inputs --overwrite refuses to remove, the checkpoint's metadata, resuming an older
checkpoint and resuming on another world size (a fake rank 1 of 2 in one process), the metrics'
time field and the landmark picture."""
import json
import os
import time

import pytest
import torch

from lafs_fast.cli import UsageError
from lafs_fast.train import common, distributed, finetune

TINY = dict(dataset="synthetic", batch_size=8, threads=0, progress=False, device="cpu", eval=False)


@pytest.mark.parametrize("amp, resolved", [("auto", "none"), ("bf16", "bf16"), ("none", "none")])
def test_setup_run_resolves_the_precision(tmp_path, amp, resolved):
    cfg = finetune.FinetuneConfig(**TINY, amp=amp, out_dir=str(tmp_path))
    device, got = common.setup_run(cfg)
    assert device == torch.device("cpu") and got == resolved


@pytest.fixture
def deterministic_state(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.benchmark = True
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


def test_deterministic_mode_raises_on_nondeterministic_kernels_and_fixes_cuda_settings(deterministic_state):
    common.set_deterministic()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("n, text", [(1, "1 checkpoint, the newest step-00000003.pt"),
                                     (2, "2 checkpoints, the newest step-00000004.pt")])
def test_a_used_out_dir_is_described_with_its_checkpoints(tmp_path, n, text):
    ring = common.CheckpointRing(str(tmp_path))
    for step in range(3, 3 + n):
        ring.save(step, {"step": step})
    assert common.describe_run(str(tmp_path)) == [text]


def test_overwrite_refuses_to_remove_the_landmark_checkpoint_the_run_reads(tmp_path):
    (tmp_path / "step-00000001.pt").write_bytes(b"x")
    cfg = finetune.FinetuneConfig(**TINY, out_dir=str(tmp_path), landmark_init=str(tmp_path / "step-00000001.pt"))
    with pytest.raises(UsageError, match=r"^--landmark-init .*step-00000001\.pt is a file of the run --overwrite "
                                         r"removes \(copy it out of --out-dir first, or choose another --out-dir\)$"):
        common._refuse_removing_inputs(cfg, [str(tmp_path / "step-00000001.pt")])


def test_metrics_time_is_seconds_to_the_millisecond(tmp_path):
    log = common.JsonlLogger(str(tmp_path / "m.jsonl"))
    time.sleep(0.0137)  # a time with more than three decimals to round
    log.log(stage="x")
    t = json.loads(open(tmp_path / "m.jsonl").readline())["time"]
    assert round(t, 3) == t


def test_a_checkpoint_records_its_place_in_the_epoch_and_the_thread_count(tmp_path):
    ring = common.CheckpointRing(str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    common.save_training_state(ring, 7, 1, 5, 8, gen, torch.amp.GradScaler("cpu", enabled=False))
    state = torch.load(ring.latest(), weights_only=False)
    assert state["step_in_epoch"] == 2 and state["threads"] == torch.get_num_threads()


def write_state(tmp_path, rng, **extra):
    ring = common.CheckpointRing(str(tmp_path))
    ring.save(4, {"step": 4, "epoch": 0, "global_batch": 8, "rng": rng, **extra})
    return ring


def test_an_older_checkpoint_with_the_generator_stored_apart_restores_it(tmp_path):
    gen = torch.Generator().manual_seed(5)
    gen.manual_seed(5)
    torch.rand(3, generator=gen)
    rng = common.rng_state()
    ring = write_state(tmp_path, {k: v for k, v in rng.items() if k != "gen"}, gen=gen.get_state())
    fresh = torch.Generator().manual_seed(0)
    common.load_training_state(ring, 8, fresh, torch.amp.GradScaler("cpu", enabled=False), False, 0)
    assert torch.equal(fresh.get_state(), gen.get_state())


@pytest.mark.parametrize("per_rank", [False, True])
def test_rank_1_resuming_a_one_rank_checkpoint(tmp_path, monkeypatch, per_rank):
    saved = torch.Generator().manual_seed(9)
    ring = write_state(tmp_path, [common.rng_state(saved)])
    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: obj)
    torch_state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(0)
    try:
        with pytest.warns(UserWarning, match="written by 1 ranks, this run has 2"):
            common.load_training_state(ring, 8, gen, torch.amp.GradScaler("cpu", enabled=False), per_rank, 3)
        global_seed = torch.initial_seed()
    finally:
        torch.set_rng_state(torch_state)
    assert global_seed == distributed.rank_seed(3 + 4, 1, stream=1)  # this rank's own global stream
    if per_rank:  # a stream of its own (pretraining: views per rank)
        assert gen.initial_seed() != saved.initial_seed()
    else:  # in step with rank 0's (finetuning: augmentation of the global batch)
        assert torch.equal(gen.get_state(), saved.get_state())


def test_the_landmark_picture_shows_faces_dots_and_is_doubled(tmp_path):
    from PIL import Image
    gray = torch.full((2, 1, 8, 8), -0.5)  # one channel, grey 64
    now = torch.tensor([[[2.0, 2.0]], [[5.0, 5.0]]])
    start = torch.tensor([[[6.0, 2.0]], [[2.0, 6.0]]])
    common.save_landmark_png(str(tmp_path / "lm.png"), gray, now, start, nrow=2)
    png = torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / "lm.png")))
    assert png.shape == (2 * (8 + 4), 2 * (2 * 8 + 6), 3)  # make_grid padding 2, then 2x in both axes

    def pixel(img, x, y):  # image img's pixel (x, y) in the doubled grid
        return png[2 * (2 + y), 2 * (2 + img * 10 + x)].tolist()

    assert pixel(0, 4, 6) == [64, 64, 64]
    assert pixel(0, 2, 2) == [255, 0, 0] and pixel(1, 5, 5) == [255, 0, 0]
    assert pixel(0, 6, 2) == [0, 0, 255] and pixel(1, 2, 6) == [0, 0, 255]
    assert pixel(1, 6, 2) == [64, 64, 64] and pixel(0, 2, 6) == [64, 64, 64]  # each image only its own dots


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    cfg = finetune.FinetuneConfig(**TINY, out_dir=str(tmp_path), resume=True)
    with pytest.raises(UsageError) as e:
        common._claim_out_dir(cfg)
    assert str(e.value) == (f"--resume: nothing to resume in {tmp_path} (no step-*.pt checkpoint there) (give the "
                            "--out-dir of the run to continue, or --resume auto to start fresh when there is none)")


@pytest.mark.parametrize("n, shown", [(4, "a0.pt, a1.pt, a2.pt, a3.pt"), (5, "a0.pt, a1.pt, a2.pt, a3.pt, ...")])
def test_overwrite_names_at_most_four_removed_files(tmp_path, capsys, monkeypatch, n, shown):
    files = [str(tmp_path / f"a{i}.pt") for i in range(n)]
    for f in files:
        open(f, "w").close()
    monkeypatch.setattr(common, "run_files", lambda out: files)
    common._claim_out_dir(finetune.FinetuneConfig(**TINY, out_dir=str(tmp_path), overwrite=True))
    assert capsys.readouterr().out == f"--overwrite: removed {n} file(s) of the earlier run in {tmp_path}: {shown}\n"


def test_autocast_is_bf16_or_nothing_on_cpu():
    with common.autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    for amp in ("fp16", "none"):  # CPU autocast has no fp16 in the recipe: a no-op
        with common.autocast(torch.device("cpu"), amp):
            assert not torch.is_autocast_enabled("cpu")


def test_adamw_on_cpu_is_the_foreach_implementation():
    opt = common.make_adamw([{"params": [torch.nn.Parameter(torch.zeros(2))]}], 1e-3, torch.device("cpu"))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_param_groups_skip_frozen_parameters_and_need_no_head():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].weight.requires_grad_(False)
    groups = common.param_groups(model, 0.05)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == 5 and all(p is not model[1].weight for p in params)


def test_set_schedule_on_groups_without_a_base_decay():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0, weight_decay=0.0)
    common.set_schedule(opt, 0.5, 0.1)
    assert opt.param_groups[0]["lr"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.1


def test_seed_everything_seeds_numpy_with_the_seed():
    import numpy as np
    common.seed_everything(5)
    a = np.random.rand()
    np.random.seed(5)
    assert a == np.random.rand()


def test_a_cuda_device_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device cuda:0: no CUDA GPU is visible$"):
        common.resolve_device("cuda:0")
