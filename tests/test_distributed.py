"""Distributed training on CPU (gloo, 2 processes): world 2 x batch b must train like world 1 x
batch 2b, and a rank that fails must end the whole run.

Tolerance: the two runs do the same arithmetic in another order (a mean over 16 rows vs the mean
of two means over 8, GEMMs blocked for another batch, the gradient all-reduce, batch-norm
statistics in two all-reduces), so they agree to float32 rounding. Measured over three steps:
losses within 1.3e-7 relative, weights within 3.4e-7 absolute, AdamW moments within 2e-6 of their
norm. Allowed: losses and weights rtol 1e-4 + atol 1e-5, moments 1e-4 of their norm; a wrong
shard, an unsynchronised DINO centre or a differently drawn augmentation moves losses by 1e-2 and
weights by ~lr (3e-3 to 5e-3), 100x more.

The trajectories use fixed-grid landmarks: a trained landmark CNN makes a run chaotic in float
rounding (the landmark gradient of bilinear sampling jumps at pixel centres, and AdamW turns
any flipped sign into a full lr step: two single-process runs that differ only in --threads
already disagree by 4e-4 in the first loss and 6e-2 in the third). Its batch norm, the one batch
statistic of training, is checked directly instead: a landmark CNN over 2 ranks x 8 images
against 1 process x 16, on its well-conditioned outputs (--threads alone moves them 0.005 px,
per-rank statistics 40 px: atol 0.02 px), running variances (1e-6 vs 0.2 relative: rtol 1e-4)
and output-layer gradients (6e-5 vs 1.4 of their largest value: 1e-3). Its inner gradients are
no test: some are zero up to rounding (a bias feeding the next batch norm), and --threads alone
changes them by 200 %.
"""
import dataclasses
import json
import multiprocessing
import os
import socket
import time

import pytest
import torch
from tiny_models import dropout_free_model
from torch import nn

from lafs_fast import views
from lafs_fast.models import create_model as _create_model
from lafs_fast.train import distributed, finetune, pretrain

B = 8  # images per rank; the world-1 reference uses 2 * B: 48 synthetic faces -> 3 steps
RTOL, ATOL = 1e-4, 1e-5
_make_views = views.make_lafs_views


def _fixed_views(x, cfg, generator=None, **kw):
    """Full-image views, no flips: pretraining views are drawn per rank (docs/training.md "Distributed
    training"), so this test takes their randomness out."""
    cfg = dataclasses.replace(cfg, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                              flip_p=0.0)
    return _make_views(x, cfg, generator=generator, **kw)


def patch(setattr_):
    setattr_(finetune, "create_model", dropout_free_model)
    setattr_(pretrain, "create_model", dropout_free_model)
    setattr_(views, "make_lafs_views", _fixed_views)


def ft_config(out_dir, batch):
    # mixup on every step (partners across ranks), erasing often: split-invariant draws are tested
    return finetune.FinetuneConfig(
        dataset="synthetic", landmarks="grid", batch_size=batch, epochs=1, warmup_epochs=0.5, lr=5e-3, eval=False,
        mixup_prob=1.0, erase_prob=0.5, out_dir=str(out_dir), log_every=1, threads=1, progress=False,
        device="cpu")


def pt_config(out_dir, batch):
    return pretrain.PretrainConfig(
        dataset="synthetic", landmarks="grid", batch_size=batch, epochs=1, n_local=2, out_dim=64,
        head_hidden=64, head_bottleneck=32, local_landmarks=49, shuffle=False, perturb_std=0.0,
        photometric=False, warmup_epochs=0, lr=0.05, freeze_last_layer=0, out_dir=str(out_dir),
        log_every=1, threads=1, progress=False, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The process group's timeout (the first run's --dist-timeout: the group is made once per
# process). A rank whose peer died must not wait for it: the test requires the peer to be out
# within FAIL_BOUND_S of the failure, far below the timeout, so a peer that only ends by the
# timeout (or hangs: spawn's join limit) fails the test.
DIST_TIMEOUT_S, FAIL_BOUND_S = 45, 15


def worker(rank, world, port, root):
    """One torchrun-like rank: finetune, pretrain and a landmark-CNN step in one process group;
    then a finetune run in which rank 1 raises at its first step. Each rank writes the error
    that ended it to error{rank}.txt, and the time it raised / left the group to times{rank}.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    patch(setattr)
    times = {}
    try:
        finetune.run(dataclasses.replace(ft_config(f"{root}/ft_w2", B), dist_timeout=DIST_TIMEOUT_S))
        pretrain.run(dataclasses.replace(pt_config(f"{root}/pt_w2", B), dist_timeout=DIST_TIMEOUT_S))
        torch.save(landmark_cnn_step(rank, 2), f"{root}/cnn_rank{rank}.pt")
        if rank == 1:
            def failing(*a, **kw):
                times["raised"] = time.time()
                raise RuntimeError("injected failure on rank 1")
            finetune.augment = failing
        finetune.run(dataclasses.replace(ft_config(f"{root}/ft_fail", B), dist_timeout=DIST_TIMEOUT_S))
    except Exception as e:
        with open(f"{root}/error{rank}.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        distributed.shutdown()
        times["left"] = time.time()
        with open(f"{root}/times{rank}.json", "w") as f:
            json.dump(times, f)


def landmark_cnn_step(rank, world):
    """A landmark CNN (train mode) on this rank's rows of a fixed batch of 2 * B: its output,
    the output layer's gradients of a fixed linear loss (summed over ranks) and the running
    variances."""
    from lafs_fast.models.landmark_cnn import LandmarkCNN
    torch.manual_seed(0)
    cnn = LandmarkCNN(49, 112, width=0.5, dropout=0.0).train()
    x = torch.rand(2 * B, 3, 112, 112) * 2 - 1
    w = torch.randn(2 * B, 49, 2)
    cnn = distributed.sync_batch_norm(cnn, torch.device("cpu"))
    rows = slice(rank * 2 * B // world, (rank + 1) * 2 * B // world)
    out = cnn(x[rows])
    (out * w[rows]).sum().backward()
    grads = {n: distributed.all_reduce_sum_(p.grad) for n, p in cnn.output_layer.named_parameters()}
    stats = {n: b for n, b in cnn.named_buffers() if n.endswith("running_var")}
    return {"out": out.detach(), "grads": grads, "stats": stats}


def spawn(root, timeout=240):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, str(root))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    return [p.exitcode for p in procs]


def losses(out_dir, stage):
    """The loss of each step (the run's summary line repeats the last one)."""
    lines = [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]
    by_step = {l["step"]: l["loss"] for l in lines if l.get("stage") == stage}
    assert sum(l.get("stage") == stage for l in lines) <= len(by_step) + 1  # rank 0 alone writes
    return torch.tensor([by_step[k] for k in sorted(by_step)])


def final_state(out_dir):
    ckpts = sorted(f for f in os.listdir(out_dir) if f.startswith("step-"))
    return torch.load(os.path.join(out_dir, ckpts[-1]), weights_only=False)


def assert_tensors_close(a: dict, b: dict, what: str, atol=ATOL):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=atol, msg=lambda m: f"{what}.{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}.{k}"


@pytest.fixture
def one_thread(monkeypatch):
    threads = torch.get_num_threads()
    patch(monkeypatch.setattr)
    yield
    torch.set_num_threads(threads)


def test_world2_matches_world1_and_a_failing_rank_ends_the_run(tmp_path, one_thread):
    codes = spawn(tmp_path)
    # the last run: rank 1 raised, rank 0's collective failed at once; both exit non-zero, neither hangs
    errors = [(tmp_path / f"error{r}.txt").read_text() for r in range(2)]
    assert "injected failure on rank 1" in errors[1] and "injected" not in errors[0], errors
    assert all(c != 0 for c in codes), codes
    # ... at once: rank 0 is out of the process group within FAIL_BOUND_S of rank 1's failure
    t = [json.loads((tmp_path / f"times{r}.json").read_text()) for r in range(2)]
    waited = t[0]["left"] - t[1]["raised"]
    assert 0 <= waited < FAIL_BOUND_S < DIST_TIMEOUT_S, f"rank 0 left {waited:.1f} s after rank 1 raised"
    ref_ft = finetune.run(ft_config(tmp_path / "ft_w1", 2 * B))
    ref_pt = pretrain.run(pt_config(tmp_path / "pt_w1", 2 * B))
    assert ref_ft["steps"] == ref_pt["steps"] == 48 // (2 * B)
    assert not distributed.is_initialized()  # a plain run never starts torch.distributed

    # finetune: CosFace, augmentation + mixup drawn for the global batch; pretrain: DDP student,
    # EMA teacher, all-reduced DINO centre, lr scaled by the global batch
    for stage, w1, w2, keys in (("finetune", "ft_w1", "ft_w2", ("model", "head", "optimizer")),
                                ("pretrain", "pt_w1", "pt_w2", ("net", "dino", "optimizer"))):
        l1, l2 = losses(tmp_path / w1, stage), losses(tmp_path / w2, stage)
        assert len(l1) == len(l2) == 3
        torch.testing.assert_close(l2, l1, rtol=RTOL, atol=ATOL)
        s1, s2 = final_state(tmp_path / w1), final_state(tmp_path / w2)
        assert s1["step"] == s2["step"] == 3 and s2["world_size"] == 2 and len(s2["rng"]) == 2
        for key in keys[:2]:
            assert_tensors_close(s1[key], s2[key], f"{stage}:{key}")
        # AdamW moments too (tiny values: compared to their norm)
        m1 = [t for st in s1["optimizer"]["state"].values() for t in (st["exp_avg"], st["exp_avg_sq"])]
        m2 = [t for st in s2["optimizer"]["state"].values() for t in (st["exp_avg"], st["exp_avg_sq"])]
        assert len(m1) == len(m2) > 0
        for a, b in zip(m1, m2):
            assert (a - b).norm() <= RTOL * a.norm(), (a - b).norm() / a.norm()
    # batch norm over the global batch: the landmark CNN over 2 ranks is the one over 1
    ref, parts = landmark_cnn_step(0, 1), [torch.load(tmp_path / f"cnn_rank{r}.pt") for r in range(2)]
    assert any(isinstance(m, nn.BatchNorm2d) for m in _create_model("part_fvit_tiny").modules())
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), ref["out"], rtol=0, atol=0.02)
    for r in range(2):
        assert_tensors_close(ref["stats"], parts[r]["stats"], "landmark_cnn")
        for k, g in ref["grads"].items():
            assert (parts[r]["grads"][k] - g).abs().max() <= 1e-3 * g.abs().max(), k
    # the weights did move (so the comparison above means something)
    s = final_state(tmp_path / "pt_w1")
    assert (s["net"]["student.patch_embed.weight"] - s["net"]["teacher.patch_embed.weight"]).abs().max() > 1e-4
    assert s["dino"]["center"].abs().max() > 0


# A rank that hangs instead of dying (alive, its sockets open) is only found by the timeout:
# --dist-timeout must bound the collective its peers wait in.
HANG_TIMEOUT_S = 4


def hanging_worker(rank, world, port, root):
    """Finetuning on 2 ranks in which rank 1 stops at its first step without dying (it sleeps);
    rank 0 writes the error that ended it and the time, rank 1 the time it stopped."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    patch(setattr)
    if rank == 1:
        def hang(*a, **kw):
            with open(f"{root}/hung.txt", "w") as f:
                f.write(str(time.time()))
            time.sleep(600)
        finetune.augment = hang
    try:
        finetune.run(dataclasses.replace(ft_config(f"{root}/hang", B), dist_timeout=HANG_TIMEOUT_S))
    except Exception as e:
        with open(f"{root}/error{rank}.txt", "w") as f:
            json.dump({"time": time.time(), "error": f"{type(e).__name__}: {e}"}, f)
        raise


def test_a_hanging_rank_fails_its_peer_after_dist_timeout(tmp_path, one_thread):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=hanging_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        procs[0].join(HANG_TIMEOUT_S + 120)
        assert not procs[0].is_alive(), "rank 0 waited for the hanging rank beyond --dist-timeout"
        assert procs[0].exitcode != 0 and procs[1].is_alive()  # rank 1 still hangs
    finally:
        for p in procs:
            p.kill()
            p.join(10)
    failed = json.loads((tmp_path / "error0.txt").read_text())
    waited = failed["time"] - float((tmp_path / "hung.txt").read_text())
    assert HANG_TIMEOUT_S - 1 <= waited < HANG_TIMEOUT_S + 30, (waited, failed["error"])
