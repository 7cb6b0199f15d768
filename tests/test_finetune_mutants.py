"""The finetuning loop's wiring, in one process (mutation testing, docs/mutation.md): a run
stopped mid-epoch and resumed ends bitwise where the straight run ends, also when an epoch's last
micro-batches are left out by the accumulation; the logged loss is the mean over a step's
micro-batches; what each micro-batch is handed (augmentation, targets, DDP's no_sync outside a
step's last micro-batch, the head for clipping); the per-tensor clip mode; the release's sqrt lr
rule; the errors' wording."""
import contextlib
import json

import pytest
import torch

from lafs_fast.train import finetune

TINY = dict(dataset="synthetic", batch_size=8, threads=0, progress=False, device="cpu", eval=False,
            log_every=1, warmup_epochs=0)


def config(out_dir, **kw):
    cfg = finetune.FinetuneConfig(**{**TINY, "epochs": 2, "out_dir": str(out_dir), **kw})
    cfg.validate()
    return cfg


def test_mid_epoch_resume_with_a_left_out_micro_batch_ends_where_the_straight_run_ends(tmp_path):
    # 48 faces / 5 = 9 micro-batches, 2 per step: 4 steps an epoch, the 9th micro-batch left out
    kw = dict(batch_size=5, accum_steps=2, save_every=1)
    straight = finetune.run(config(tmp_path / "a", **kw))
    assert finetune.run(config(tmp_path / "b", stop_after=6, **kw))["stopped"]  # step 6 is mid epoch 1
    resumed = finetune.run(config(tmp_path / "b", resume=True, **kw))
    assert straight["steps"] == resumed["steps"] == 8
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")
             if json.loads(line).get("stage") == "finetune"]
    assert steps[:8] == list(range(1, 9))  # 6 steps, then only the 2 left (not 8 again)
    assert resumed["landmark_shift_px"] == straight["landmark_shift_px"]  # from the same start landmarks
    a = torch.load(straight["checkpoint"], weights_only=False)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_a_step_logs_the_mean_of_its_micro_batches_and_counts_only_trained_images(tmp_path, monkeypatch):
    r = finetune.build_run(config(tmp_path, batch_size=5, accum_steps=2))
    calls = []

    def fake(run_, images, labels, epoch, lam_drift, boundary):
        calls.append((epoch, boundary))
        return torch.tensor([len(calls), 0.5, 2.0 * len(calls)])

    monkeypatch.setattr(finetune, "forward_backward", fake)
    monkeypatch.setattr(finetune, "optimizer_step", lambda *a: torch.tensor(1.5))
    records = list(finetune.train_one_epoch(r, 1))
    assert calls == [(1, False), (1, True)] * 4  # the 9th micro-batch is left out
    assert [rec["loss"] for rec in records] == [1.5, 3.5, 5.5, 7.5]
    assert records[0].keys() == {"step", "epoch", "loss", "drift", "drift_lambda", "lr", "grad_norm"}
    assert records[0]["drift"] == 0.5 and records[0]["grad_norm"] == 1.5 and records[0]["epoch"] == 1
    assert r.seen == 8 * 5 and r.step == 4


class FakeDDP(torch.nn.Module):
    """DDP's surface for the loop: the module, and no_sync as a context it records."""

    def __init__(self, module, log):
        super().__init__()
        self.module, self.log = module, log

    def forward(self, *args, **kw):
        return self.module(*args, **kw)

    @contextlib.contextmanager
    def no_sync(self):
        self.log.append(type(self.module).__name__)
        yield


def test_each_micro_batch_is_handed_its_augmentation_targets_and_loss_inputs(tmp_path, monkeypatch):
    r = finetune.build_run(config(tmp_path, accum_steps=2))
    synced, seen = [], {}
    r.ddp_model, r.ddp_head = FakeDDP(r.model, synced), FakeDDP(r.head, synced)
    real_augment, real_loss = finetune.augment, finetune.micro_batch_loss

    def augment(x, cfg, gen, rows, global_batch):
        seen["augment"] = (gen is r.generator, rows, global_batch)
        return real_augment(x, cfg, gen, rows, global_batch)

    def loss(cfg, ddp_model, ddp_head, x, target, device, amp, frozen_cnn, lam_drift, image_size):
        seen["loss"] = (cfg is r.cfg, ddp_model is r.ddp_model, device, amp, frozen_cnn is r.frozen_cnn,
                        lam_drift, image_size)
        return real_loss(cfg, ddp_model, ddp_head, x, target, device, amp, frozen_cnn, lam_drift, image_size)

    monkeypatch.setattr(finetune, "augment", augment)
    monkeypatch.setattr(finetune, "micro_batch_loss", loss)
    images, labels = next(iter(r.data.epoch_batches(0, 0)))
    finetune.forward_backward(r, images, labels, 0, 0.25, boundary=False)
    assert synced == ["PartFViT", "CosFace"]  # gradients not all-reduced inside a step
    assert seen["augment"] == (True, slice(0, 8), 8)
    assert seen["loss"] == (True, True, torch.device("cpu"), r.amp, True, 0.25, 112)
    finetune.forward_backward(r, images, labels, 0, 0.25, boundary=True)
    assert synced == ["PartFViT", "CosFace"]  # the last micro-batch of a step syncs


def test_the_head_reaches_the_clipping(tmp_path, monkeypatch):
    r = finetune.build_run(config(tmp_path))
    got = []
    monkeypatch.setattr(finetune, "clip_gradients", lambda cfg, params, head=None: got.append(head) or
                        torch.tensor(0.0))
    images, labels = next(iter(r.data.epoch_batches(0, 0)))
    monkeypatch.setattr(finetune, "forward_backward", lambda *a: torch.zeros(3))
    next(finetune.train_one_epoch(r, 0))
    assert got == [r.head]


def test_per_tensor_clip_mode_reaches_the_clipping(tmp_path):
    cfg = config(tmp_path, clip_grad=1.0, clip_mode="per_tensor")
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
    finetune.clip_gradients(cfg, [a, b])
    torch.testing.assert_close(torch.stack([a.grad.norm(), b.grad.norm()]), torch.ones(2), rtol=1e-5, atol=1e-5)


def test_the_release_sqrt_lr_rule_sets_the_peak(tmp_path):
    finetune.run(config(tmp_path, lr=0.1, lr_rule="sqrt", epochs=1))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first = [rec for rec in lines if rec.get("stage") == "finetune"][0]
    assert first["lr"] == pytest.approx(finetune.release_sqrt_lr(0.1, 8, 1))


def test_build_run_names_its_stage_and_keeps_eight_fixed_images(tmp_path):
    r = finetune.build_run(config(tmp_path))
    assert r.stage == "finetune" and r.fixed.shape == (8, 3, 112, 112)


class Stop(Exception):
    pass


def test_the_channel_order_reaches_the_data(tmp_path, monkeypatch):
    got = {}

    def data(*args, **kw):
        got.update(kw)
        raise Stop

    monkeypatch.setattr(finetune, "build_train_data", data)
    with pytest.raises(Stop):
        finetune.build_run(finetune.FinetuneConfig(**{**TINY, "out_dir": str(tmp_path), "channel_order": "bgr"}))
    assert got["channel_order"] == "bgr"


def test_errors_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"^--accum-steps 7 exceeds the 6 batches of an epoch$"):
        finetune.build_run(config(tmp_path / "a", accum_steps=7))
    r = finetune.build_run(config(tmp_path / "b"))
    monkeypatch.setattr(finetune, "micro_batch_loss", lambda *a: (torch.tensor(float("nan"), requires_grad=True),) * 3)
    images, labels = next(iter(r.data.epoch_batches(0, 0)))
    with pytest.raises(FloatingPointError, match=r"^non-finite loss at step 0 \(epoch 3\); the last good "
                                                 r"checkpoint is None$"):
        finetune.forward_backward(r, images, labels, 3, 0.0, boundary=True)


def test_partial_fc_in_one_process_trains_with_row_targets_and_mixup(tmp_path):
    res = finetune.run(config(tmp_path, partial_fc="on", mixup_prob=1.0, epochs=1))
    assert res["steps"] == 6 and torch.isfinite(torch.tensor(res["final_loss"]))


def test_fixed_images_are_eight_of_a_dataset_with_more_classes(tmp_path):
    r = finetune.build_run(config(tmp_path, dataset="orl"))  # 30 training identities
    assert r.fixed.shape == (8, 3, 112, 112)


def grads_of(*shapes_and_values):
    out = []
    for shape, value in shapes_and_values:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.full(shape, float(value))
        out.append(p)
    return out


@pytest.mark.parametrize("mode, max_norm", [("global", 0.0), ("global", 0.5), ("per_tensor", 0.5)])
def test_clipping_with_a_partial_fc_shard(tmp_path, mode, max_norm):
    from lafs_fast.models.partial_fc import PartialFC
    head = PartialFC(4, 10, rank=0, world_size=1)
    head.weight.grad = torch.full((10, 4), 0.5)  # norm 3.162
    (rest,) = grads_of(((3,), 1.0))  # norm 1.732
    cfg = config(tmp_path, clip_mode=mode, clip_grad=max_norm)
    total = finetune.clip_gradients(cfg, [rest, head.weight], head)
    assert float(total) == pytest.approx((10 * 4 * 0.25 + 3) ** 0.5, rel=1e-5)
    norms = [float(rest.grad.norm()), float(head.weight.grad.norm())]
    if max_norm == 0:  # no clipping
        assert norms == pytest.approx([3 ** 0.5, 10 ** 0.5], rel=1e-5)
    elif mode == "global":  # one factor for all
        assert sum(n * n for n in norms) ** 0.5 == pytest.approx(0.5, rel=1e-4)
    else:  # each tensor on its own
        assert norms == pytest.approx([0.5, 0.5], rel=1e-4)
