"""The pretraining loop's wiring, in one process (mutation testing, docs/mutation.md, found it
seen only by tests that run it in a subprocess): a run stopped mid-epoch and resumed ends
bitwise where the straight run ends; each metrics line carries its step's schedules; the views,
the landmark subsets and the dropout seed come from the run's own generator, not the global
stream; a rank reads its own shard; the last layer stays frozen for --freeze-last-layer epochs;
a non-finite loss names its step."""
import json

import pytest
import torch

from lafs_fast import dino, views
from lafs_fast.data.image_folder import encode_image
from lafs_fast.train import distributed, pretrain

TINY = dict(dataset="synthetic", batch_size=8, threads=0, progress=False, device="cpu", landmarks="grid",
            n_local=1, out_dim=64, head_hidden=32, head_bottleneck=16, warmup_epochs=0, log_every=1)


def config(out_dir, **kw):
    cfg = pretrain.PretrainConfig(**{**TINY, "epochs": 2, "out_dir": str(out_dir), **kw})
    cfg.validate()
    return cfg


def metrics(out_dir, stage="pretrain"):
    lines = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    return [r for r in lines if r.get("stage") == stage]


def test_a_run_stopped_mid_epoch_and_resumed_ends_where_the_straight_run_ends(tmp_path):
    straight = pretrain.run(config(tmp_path / "a"))
    pretrain.run(config(tmp_path / "b", save_every=2, stop_after=8))  # 6 steps per epoch: stops in epoch 1
    resumed = pretrain.run(config(tmp_path / "b", resume=True))
    assert straight["steps"] == resumed["steps"] == 12
    a = torch.load(straight["checkpoint"], weights_only=False)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert [r["step"] for r in metrics(tmp_path / "b")] == list(range(1, 13))  # 8 steps, then the last 4
    tail = [{k: r[k] for k in ("step", "epoch", "loss")} for r in metrics(tmp_path / "a")[8:]]
    assert [{k: r[k] for k in ("step", "epoch", "loss")} for r in metrics(tmp_path / "b")[-4:]] == tail


def test_each_metrics_line_carries_its_steps_schedules(tmp_path):
    pretrain.run(config(tmp_path, lr=8e-3, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.99,
               warmup_teacher_temp=0.06, teacher_temp=0.05, warmup_teacher_temp_epochs=1))
    lines = metrics(tmp_path)
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert [r["epoch"] for r in lines] == [0] * 6 + [1] * 6
    for r in lines:
        assert {"loss", "lr", "weight_decay", "momentum", "teacher_temp", "grad_norm"} <= r.keys()
    assert lines[0]["lr"] == pytest.approx(8e-3 * 8 / 256)  # linear scaling rule, no warm-up
    assert lines[-1]["lr"] < lines[0]["lr"]
    assert lines[0]["weight_decay"] == pytest.approx(0.04) and lines[-1]["weight_decay"] > 0.3
    assert lines[0]["momentum"] == pytest.approx(0.99) and lines[-1]["momentum"] > 0.999
    assert [r["teacher_temp"] for r in (lines[0], lines[-1])] == pytest.approx([0.06, 0.05])


def drive(cfg, perturb):
    """One epoch through train_one_epoch, recording what the views and the model are handed; with
    perturb, the global torch stream is consumed between the steps (as other code may)."""
    seen = {"view_gen": [], "model_gen": [], "seeds": []}
    real_views, real_forward = views.make_lafs_views, pretrain.LafsPretrainer.forward

    def make_views(x, vcfg, generator=None):
        seen["view_gen"].append(generator)
        if perturb:
            torch.rand(len(seen["view_gen"]))
        return real_views(x, vcfg, generator=generator)

    def forward(self, v, seed, generator, index=None):
        seen["seeds"].append(seed)
        seen["model_gen"].append(generator)
        return real_forward(self, v, seed, generator, index)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(views, "make_lafs_views", make_views)
        m.setattr(pretrain.LafsPretrainer, "forward", forward)
        r = pretrain.build_run(cfg)
        records = list(pretrain.train_one_epoch(r, 0))
    return r, records, seen


def test_views_seeds_and_subsets_come_from_the_runs_own_generator(tmp_path):
    r, records, seen = drive(config(tmp_path / "a"), perturb=False)
    _, _, again = drive(config(tmp_path / "b"), perturb=True)
    assert len(records) == 6 and r.step == 6
    assert all(g is r.generator for g in seen["view_gen"] + seen["model_gen"])
    assert all(isinstance(s, int) and 0 <= s < 2**62 for s in seen["seeds"])
    assert len(set(seen["seeds"])) == 6
    assert again["seeds"] == seen["seeds"]  # the global stream does not reach them
    assert r.seen == 6 * 8  # images trained on (the images/s figure)


def test_build_run_names_its_stage_and_a_step_runs_in_its_precision(tmp_path, monkeypatch):
    r = pretrain.build_run(config(tmp_path / "a", amp="bf16"))
    assert r.stage == "pretrain" and r.device == torch.device("cpu") and r.amp == "bf16"
    seen, real = [], pretrain.LafsPretrainer.forward

    def forward(self, *args, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(self, *args, **kw)

    monkeypatch.setattr(pretrain.LafsPretrainer, "forward", forward)
    next(pretrain.train_one_epoch(r, 0))
    assert seen == [(True, torch.bfloat16)]


class Stop(Exception):
    pass


def test_each_rank_reads_its_own_shard(tmp_path, monkeypatch):
    got = {}

    def data(*args):
        got["rank_world"] = args[6:8]
        raise Stop

    monkeypatch.setattr(distributed, "info", lambda: distributed.DistInfo(rank=1, world_size=2))
    monkeypatch.setattr(pretrain, "build_train_data", data)
    with pytest.raises(Stop):
        pretrain.build_run(config(tmp_path))
    assert got["rank_world"] == (1, 2)


def test_a_folder_dataset_is_read_from_data_path(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        folder = tmp_path / "faces" / f"id{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(encode_image(torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8,
                                                                     generator=g)))
    r = pretrain.build_run(config(tmp_path / "out", dataset="folder", data_path=str(tmp_path / "faces"),
                                  workers=0))
    assert r.steps_per_epoch == 1 and r.data.global_batch == 8
    images, labels = next(iter(r.data.epoch_batches(0, 0)))  # through a DataLoader
    assert images.shape[0] == 8 and sorted(labels.tolist()) == [0] * 4 + [1] * 4


@pytest.mark.parametrize("epoch, frozen", [(1, True), (2, False)])
def test_the_last_layer_stays_frozen_for_freeze_last_layer_epochs(tmp_path, epoch, frozen):
    r = pretrain.build_run(config(tmp_path, freeze_last_layer=2))
    x = torch.rand(8, 3, 112, 112) * 2 - 1
    v = views.make_lafs_views(x, r.view_config, generator=r.generator)
    loss = pretrain.forward_loss(r.model, r.dino_loss, v, 1, r.generator, epoch, r.device, r.amp)
    before = r.model.student_head.last_layer.weight_v.detach().clone()
    pretrain.update(r.model, r.optimizer, r.scaler, loss, epoch, 0.996)
    assert torch.equal(r.model.student_head.last_layer.weight_v, before) == frozen


def test_a_non_finite_loss_names_its_step(tmp_path, monkeypatch):
    real = pretrain.forward_loss
    calls = []

    def poisoned(*args, **kw):
        loss = real(*args, **kw)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(pretrain, "forward_loss", poisoned)
    r = pretrain.build_run(config(tmp_path))
    r.save_state(0)  # a checkpoint to point the user back to
    with pytest.raises(dino.NonFiniteLossError, match=r"non-finite loss nan at epoch 0 step 2: stopping\..* "
                                                      r"Last checkpoint: .*step-00000000\.pt\.$"):
        list(pretrain.train_one_epoch(r, 0))
