"""--accum-across-epochs: optimiser steps of --accum-steps micro-batches counted over the run's
continuous stream of micro-batches, as the release's train_largescale.py (a global batch counter,
loss / acc_step, a step every acc_step-th micro-batch, :722, 842-851, 870-891): every micro-batch
is trained on, a step may span an epoch end, the run takes floor(epochs x M / A) steps (M
micro-batches an epoch) and its lr schedule is built over them. A checkpoint at an epoch end
inside a step holds the gradients and loss sums accumulated so far, so --resume continues bitwise.
Off, an epoch's last M % A micro-batches are left out (the behaviour before the option).

Tiny runs: a depth-1 Part fViT without dropout on the 48 synthetic faces, batch 9: M = 5."""
import copy
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_models import dropout_free_model

from lafs_fast.train import finetune
from lafs_fast.train.run import fit

B, M, A, E = 9, 5, 3, 3  # 48 faces // 9 = 5 micro-batches an epoch; steps of 3; 3 epochs
TINY = dict(dataset="synthetic", landmarks="grid", batch_size=B, epochs=E, accum_steps=A, accum_across_epochs=True,
            threads=1, progress=False, device="cpu", eval=False, log_every=1, warmup_epochs=0, scale=16.0,
            keep_checkpoints=20)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(finetune, "create_model", dropout_free_model)


def config(out_dir, **kw):
    cfg = finetune.FinetuneConfig(**{**TINY, "out_dir": str(out_dir), **kw})
    cfg.validate()
    return cfg


def trace_micro_batches(monkeypatch):
    """Record what each forward_backward call is handed (epoch, labels, boundary, the step it
    belongs to) and the model's inputs (images after augmentation, class targets)."""
    calls, inputs = [], []
    real_fb, real_loss = finetune.forward_backward, finetune.micro_batch_loss

    def forward_backward(run, images, labels, epoch, lam_drift, boundary):
        calls.append({"epoch": epoch, "labels": labels.clone(), "boundary": boundary, "step": run.step})
        return real_fb(run, images, labels, epoch, lam_drift, boundary)

    def micro_batch_loss(cfg, ddp_model, ddp_head, x, target, *args, **kw):
        inputs.append((x.detach().clone(), target.detach().clone()))
        return real_loss(cfg, ddp_model, ddp_head, x, target, *args, **kw)

    monkeypatch.setattr(finetune, "forward_backward", forward_backward)
    monkeypatch.setattr(finetune, "micro_batch_loss", micro_batch_loss)
    return calls, inputs


def hand_run(model, head, inputs, lr, step_after):
    """Plain PyTorch: AdamW without weight decay at a constant lr, loss / A backward on every
    micro-batch, a step (and zero_grad) after micro-batch i when step_after(i)."""
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.0)
    losses, step_losses = [], []
    for i, (x, target) in enumerate(inputs):
        if step_after(i) is None:
            continue
        logits = head(model(x), target)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
        (loss / A).backward()
        losses.append(loss.item())
        if step_after(i):
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_losses.append(sum(losses[-A:]) / A)
    return step_losses


def logged(out_dir, key="loss"):
    lines = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    by_step = {r["step"]: r[key] for r in lines if r.get("stage") == "finetune"}
    return [by_step[k] for k in sorted(by_step)]


def checkpoint(out_dir, step):
    return torch.load(os.path.join(out_dir, f"step-{step:08d}.pt"), weights_only=False)


# ----------------------------------------------------------------------------- (a) the counting
def test_steps_span_epoch_ends_train_every_micro_batch_and_equal_a_hand_run_loop(tiny, tmp_path, monkeypatch):
    lr = 1e-3  # constant: min_lr = lr, no warm-up; no weight decay, clipping, mixup or erasing
    cfg = config(tmp_path, lr=lr, min_lr=lr, weight_decay=0.0, cnn_weight_decay=0.0, clip_grad=0.0,
                 mixup_prob=0.0, erase_prob=0.0)
    run = finetune.build_run(cfg)
    model, head = copy.deepcopy(run.model), copy.deepcopy(run.head)  # the same init
    calls, inputs = trace_micro_batches(monkeypatch)
    result = fit(run, finetune.train_one_epoch)

    assert result["steps"] == run.step == run.total_steps == E * M // A == 5
    assert len(calls) == E * M  # all 15 micro-batches, none left out
    assert [c["epoch"] for c in calls] == [e for e in range(E) for _ in range(M)]
    for e in range(E):  # each epoch's batches in its order, once each
        want = torch.cat([labels for _, labels in run.data.epoch_batches(e)])
        assert torch.equal(torch.cat([c["labels"] for c in calls if c["epoch"] == e]), want)
    # a step after every 3rd micro-batch of the stream: (epoch, micro) (0, 2), (1, 0), (1, 3), (2, 1), (2, 4)
    assert [i for i, c in enumerate(calls) if c["boundary"]] == [2, 5, 8, 11, 14]
    assert [c["step"] for c in calls] == [i // A for i in range(E * M)]

    # The same micro-batches in plain PyTorch. Both do the same float32 operations on the same
    # inputs in one thread; they may round differently only where the implementations differ
    # (foreach vs single-tensor AdamW, autograd's accumulation order), about 1e-7 relative per
    # operation. AdamW moves a weight by at most ~lr = 1e-3 per step, so 5 steps differ by far less
    # than 1e-6, while a step placed at another micro-batch (checked below) moves weights by ~1e-4.
    step_losses = hand_run(model, head, inputs, lr, lambda i: (i + 1) % A == 0)
    for (name, want), got in zip(model.state_dict().items(), run.model.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(run.head.weight, head.weight, rtol=1e-5, atol=1e-6)
    # the logged loss: the mean of a step's 3 micro-batches, also over an epoch end
    assert logged(tmp_path) == pytest.approx(step_losses, rel=1e-5)



def test_the_hand_run_loop_tells_a_step_at_another_micro_batch_apart(tiny, tmp_path, monkeypatch):
    """The tolerance of the test above is far below the effect of counting within epochs."""
    lr = 1e-3
    cfg = config(tmp_path, lr=lr, min_lr=lr, weight_decay=0.0, cnn_weight_decay=0.0, clip_grad=0.0,
                 mixup_prob=0.0, erase_prob=0.0, epochs=2)
    run = finetune.build_run(cfg)
    model, head = copy.deepcopy(run.model), copy.deepcopy(run.head)
    _, inputs = trace_micro_batches(monkeypatch)
    fit(run, finetune.train_one_epoch)
    assert len(inputs) == 9 and run.step == 3  # the 10th micro-batch could never reach a step
    within = hand_run(model, head, inputs, lr, lambda i: None if i % M >= A else (i % M + 1) % A == 0)
    assert len(within) == 2
    diff = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                          run.model.state_dict().values()))
    assert diff > 1e-4


def test_the_last_micro_batches_after_the_last_step_are_left_out(tiny, tmp_path, monkeypatch):
    """4 epochs of 5 with A = 3: 6 steps of the 20 micro-batches; the last 2 could never reach a step."""
    run = finetune.build_run(config(tmp_path, epochs=4))
    calls = []
    monkeypatch.setattr(finetune, "forward_backward", lambda r, images, labels, epoch, lam, boundary:
                        calls.append((epoch, boundary)) or torch.ones(3))
    monkeypatch.setattr(finetune, "optimizer_step", lambda *a: torch.tensor(1.0))
    records = [rec for epoch in range(4) for rec in finetune.train_one_epoch(run, epoch)]
    assert [run.micro_batches(e) for e in range(4)] == [5, 5, 5, 3]
    assert len(calls) == 18 and [e for e, _ in calls].count(3) == 3
    assert [i for i, (_, b) in enumerate(calls) if b] == [2, 5, 8, 11, 14, 17]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and [r["epoch"] for r in records] == [0, 1, 1, 2, 2, 3]
    assert run.seen == 18 * B


# ----------------------------------------------------------------------------- (b) the schedule
def test_lr_schedule_has_floor_epochs_m_over_a_steps_with_the_warm_up_in_steps(tiny, tmp_path):
    peak, final = 1e-3, 1e-5
    run = finetune.build_run(config(tmp_path, epochs=4, lr=peak, min_lr=final, warmup_epochs=1.5))
    lr = run.schedules["lr"]
    assert len(lr) == run.total_steps == 4 * M // A == 6
    warm = int(1.5 * M / A)  # 2.5 -> 2 steps: 0, then the peak
    cos = [final + 0.5 * (peak - final) * (1 + math.cos(math.pi * i / (6 - warm))) for i in range(6 - warm)]
    assert lr.tolist() == pytest.approx([0.0, peak] + cos, rel=1e-12, abs=1e-15)


class Batches:
    """What step_plan reads of the training data: its micro-batches per epoch and global batch."""
    def __init__(self, n, global_batch):
        self.n, self.global_batch = n, global_batch

    def __len__(self):
        return self.n


@pytest.mark.parametrize("across, steps, warm", [(True, 56, 8), (False, 34, 5)])
def test_the_release_one_percent_one_shot_run_takes_56_steps(across, steps, warm):
    """docs/protocol.md: 34 epochs of 5 micro-batches of 400, steps of 3 -> floor(170 / 3) = 56
    steps with 5 x 5 / 3 -> 8 of warm-up (off: 34 steps of 3, 5 of warm-up)."""
    cfg = finetune.FinetuneConfig(dataset="synthetic", epochs=34, accum_steps=3, accum_across_epochs=across,
                                  warmup_epochs=5, lr=1e-3, min_lr=1e-6)
    steps_per_epoch, micro_per_epoch, lr = finetune.step_plan(cfg, Batches(5, 400))
    assert (steps_per_epoch, micro_per_epoch) == (1, 5 if across else 3)
    assert len(lr) == steps and lr.argmax() == warm - 1 and lr[warm - 1] == pytest.approx(1e-3)
    assert lr[0] == 0.0 and lr[warm] == pytest.approx(1e-3)  # the cosine starts at the peak


def test_a_run_shorter_than_one_step_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"--accum-steps 16 exceeds the 15 batches of the run \(3 epochs of 5\)"):
        finetune.build_run(config(tmp_path, accum_steps=16))
    run = finetune.build_run(config(tmp_path / "b", accum_steps=7))  # more than an epoch, less than the run
    assert run.total_steps == 2 and run.steps_per_epoch == 0


# ----------------------------------------------------------------------------- (c) exact resume
RESUME = dict(mixup_prob=0.5, erase_prob=0.5, warmup_epochs=0.6, clip_grad=0.5)  # every random stream matters


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """The uninterrupted runs (one per head), made on first use, keeping every checkpoint: step 1
    at epoch 0's end with 2 micro-batches pending, step 3 at epoch 1's end with 1 pending, step 5
    at the end."""
    return {}, tmp_path_factory


@pytest.fixture
def straight(tiny, straight_runs):
    runs, factory = straight_runs

    def get(partial_fc="off"):
        if partial_fc not in runs:
            out = factory.mktemp(f"straight_{partial_fc}")
            runs[partial_fc] = out, finetune.run(config(out, partial_fc=partial_fc, **RESUME))
        return runs[partial_fc]
    return get


def assert_same_end(a, b, partial_fc):
    assert logged(a) == logged(b)  # exact floats, every step
    sa, sb = checkpoint(a, 5), checkpoint(b, 5)
    for key in ("model", "head"):
        assert sa[key].keys() == sb[key].keys()
        for k in sa[key]:
            x, y = sa[key][k], sb[key][k]
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (key, k)  # bitwise
    for i, st in sa["optimizer"]["state"].items():
        for n, t in st.items():
            assert torch.equal(t, sb["optimizer"]["state"][i][n]), (i, n)
    if partial_fc == "on":
        ha, hb = torch.load(f"{a}/step-00000005.pt.head-0-of-1"), torch.load(f"{b}/step-00000005.pt.head-0-of-1")
        assert torch.equal(ha["weight"], hb["weight"]) and torch.equal(ha["optimizer"]["exp_avg"],
                                                                       hb["optimizer"]["exp_avg"])
    ma, mb = (torch.load(d / "model.pt", weights_only=False)["model"] for d in (a, b))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("partial_fc", ["off", "on"])
def test_a_checkpoint_inside_a_step_at_an_epoch_end_resumes_bitwise(straight, tmp_path, partial_fc):
    ref, result = straight(partial_fc)
    assert result["steps"] == 5
    state = checkpoint(ref, 3)
    assert state["epoch"] == 2 and state["pending"]["micro"] == 1 and state["pending"]["world_size"] == 1
    grads = torch.load(f"{ref}/step-00000003.pt.grads-0-of-1")["grads"]
    assert "head.weight" in grads and any(k.startswith("model.") for k in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    assert "pending" not in checkpoint(ref, 5) and not os.path.exists(f"{ref}/step-00000005.pt.grads-0-of-1")

    # stopped after step 4 (mid epoch 2, no checkpoint there): --resume continues from step 3's
    out = tmp_path / "stopped"
    kw = dict(partial_fc=partial_fc, **RESUME)
    assert finetune.run(config(out, stop_after=4, **kw))["stopped"]
    assert sorted(f for f in os.listdir(out) if f.startswith("step-") and ".head-" not in f) == [
        "step-00000001.pt", "step-00000001.pt.grads-0-of-1", "step-00000003.pt", "step-00000003.pt.grads-0-of-1"]
    resumed = finetune.run(config(out, resume=True, **kw))
    assert resumed["steps"] == 5
    assert resumed["landmark_shift_px"] == result["landmark_shift_px"]
    assert_same_end(ref, out, partial_fc)


def test_resume_from_epoch_zeros_end_and_from_a_step_mid_epoch_is_bitwise(straight, tmp_path):
    ref, _ = straight()
    kw = RESUME
    # step 1's checkpoint alone (2 micro-batches pending) with its gradient file
    out = tmp_path / "from1"
    out.mkdir()
    for f in ("step-00000001.pt", "step-00000001.pt.grads-0-of-1"):
        shutil.copy(ref / f, out)
    assert finetune.run(config(out, resume=True, **kw))["steps"] == 5
    assert logged(out) == logged(ref)[1:]
    sa, sb = checkpoint(ref, 5), checkpoint(out, 5)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    # --stop-after 2 with --save-every 2: step 2 ends on epoch 1's first micro-batch
    out = tmp_path / "mid"
    assert finetune.run(config(out, stop_after=2, save_every=2, **kw))["stopped"]
    assert checkpoint(out, 2)["epoch"] == 1 and "pending" not in checkpoint(out, 2)
    finetune.run(config(out, resume=True, save_every=2, **kw))
    sc = checkpoint(out, 5)
    assert all(torch.equal(sa["model"][k], sc["model"][k]) for k in sa["model"])
    assert logged(out) == logged(ref)


def test_gradient_files_leave_with_their_checkpoint_and_with_overwrite(tiny, tmp_path):
    out = tmp_path / "run"
    finetune.run(config(out, keep_checkpoints=1))
    assert sorted(f for f in os.listdir(out) if f.startswith("step-")) == ["step-00000005.pt"]
    finetune.run(config(out, keep_checkpoints=2, epochs=2, overwrite=True))  # ends at step 3, 1 pending
    assert sorted(f for f in os.listdir(out) if f.startswith("step-")) == [
        "step-00000001.pt", "step-00000001.pt.grads-0-of-1", "step-00000003.pt"]
    stale = out / "step-00000003.pt.grads-0-of-1"
    stale.write_bytes(b"")  # as if from an earlier run in this folder
    finetune.run(config(out, stop_after=1, overwrite=True))
    assert not stale.exists()


# ----------------------------------------------------------------------------- resume errors
def copy_step(ref, out, step=3, grads=True):
    out.mkdir()
    shutil.copy(ref / f"step-{step:08d}.pt", out)
    if grads:
        shutil.copy(ref / f"step-{step:08d}.pt.grads-0-of-1", out)


def test_a_pending_checkpoint_resumed_with_other_counting_is_refused_in_one_line(straight, tmp_path):
    ref, _ = straight()
    copy_step(ref, tmp_path / "a")
    with pytest.raises(ValueError, match=r"holds 1 micro-batches of a step in progress, this run "
                                         r"\(--accum-steps 3\) expects 0: resume with the --accum-steps") as e:
        finetune.build_run(config(tmp_path / "a", resume=True, accum_across_epochs=False))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"--accum-steps 2 --accum-across-epochs\) expects 4"):
        finetune.build_run(config(tmp_path / "a", resume=True, accum_steps=2))


def test_a_missing_gradient_file_or_another_world_size_is_named(straight, tmp_path):
    from lafs_fast.checkpoint import CheckpointError
    ref, _ = straight()
    copy_step(ref, tmp_path / "a", grads=False)
    with pytest.raises(CheckpointError, match=r"its gradient file .*step-00000003.pt.grads-0-of-1 is missing"):
        finetune.build_run(config(tmp_path / "a", resume=True))
    copy_step(ref, tmp_path / "b")
    state = checkpoint(tmp_path / "b", 3)
    state["pending"]["world_size"] = 2
    torch.save(state, tmp_path / "b" / "step-00000003.pt")
    with pytest.raises(ValueError, match="step in progress on 2 ranks, this run has 1: resume with 2 ranks"):
        finetune.build_run(config(tmp_path / "b", resume=True))


# ----------------------------------------------------------------------------- (d) the option off
def test_off_an_epoch_takes_m_div_a_steps_and_leaves_its_last_micro_batches_out(tiny, tmp_path, monkeypatch):
    cfg = config(tmp_path, accum_across_epochs=False)
    run = finetune.build_run(cfg)
    assert len(run.schedules["lr"]) == run.total_steps == E * (M // A) == 3
    calls, _ = trace_micro_batches(monkeypatch)
    assert fit(run, finetune.train_one_epoch)["steps"] == 3
    assert [c["epoch"] for c in calls] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # micro-batches 3, 4 of each left out
    assert [i for i, c in enumerate(calls) if c["boundary"]] == [2, 5, 8]
    for e in range(E):
        want = torch.cat([labels for _, labels in run.data.epoch_batches(e)][:A])
        assert torch.equal(torch.cat([c["labels"] for c in calls if c["epoch"] == e]), want)
    assert [f for f in os.listdir(tmp_path) if ".grads-" in f] == []
    assert all("pending" not in checkpoint(tmp_path, s) for s in (1, 2, 3))


def test_the_option_is_a_switch_off_by_default():
    from lafs_fast import config as cfgmod
    assert finetune.FinetuneConfig().accum_across_epochs is False

    def parse(*flags):
        return cfgmod.parse(finetune.FinetuneConfig, ["--dataset", "synthetic", "--threads", "1", *flags])
    assert parse("--accum-across-epochs").accum_across_epochs is True
    assert parse("--accum-across-epochs", "--no-accum-across-epochs").accum_across_epochs is False


# ----------------------------------------------------------------------------- two ranks
def two_rank_worker(rank, world, port, root):
    """2 CPU ranks, Partial FC (each rank's own class rows), steps of 4 micro-batches of 2 x 4
    faces: 6 micro-batches an epoch, step 1 ends at micro-batch 3 and 2 are pending at epoch 0's
    end. A straight run, and one stopped after step 2 and resumed from step 1's checkpoint."""
    from lafs_fast.train import distributed
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    finetune.create_model = dropout_free_model
    kw = dict(batch_size=4, epochs=2, accum_steps=4, partial_fc="on", dist_timeout=60, **RESUME)
    try:
        finetune.run(config(f"{root}/straight", **kw))
        finetune.run(config(f"{root}/resumed", stop_after=2, **kw))
        finetune.run(config(f"{root}/resumed", resume=True, **kw))
    except Exception as e:
        with open(f"{root}/error{rank}.txt", "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        raise
    finally:
        distributed.shutdown()


@pytest.mark.slow  # two spawned ranks, three short runs each (~20 s on 2 cores)
def test_two_ranks_keep_each_ranks_pending_gradients_and_resume_bitwise(tmp_path):
    from test_partial_fc import run_two_ranks
    run_two_ranks(two_rank_worker, tmp_path, timeout=600)
    a, b = tmp_path / "straight", tmp_path / "resumed"
    state = checkpoint(b, 1)
    assert state["pending"] == {"micro": 2, "world_size": 2, "sums": state["pending"]["sums"]}
    g0, g1 = (torch.load(f"{b}/step-00000001.pt.grads-{r}-of-2")["grads"] for r in range(2))
    assert g0.keys() == g1.keys() and "head.weight" in g0
    assert not torch.equal(g0["model.cls_token"], g1["model.cls_token"])  # local: DDP averages at the step
    assert logged(a) == logged(b) and len(logged(a)) == 3
    sa, sb = checkpoint(a, 3), checkpoint(b, 3)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    for r in range(2):
        ha, hb = (torch.load(f"{d}/step-00000003.pt.head-{r}-of-2") for d in (a, b))
        assert torch.equal(ha["weight"], hb["weight"]) and torch.equal(ha["optimizer"]["exp_avg"],
                                                                       hb["optimizer"]["exp_avg"])
