"""The release's pretraining recipe as options: --print-config, the release config file, and the
switches it needs (per-tensor clipping, weight decay on tokens, release init, the teacher
temperature ramp). Finetune cases live in tests/test_release_recipe_finetune.py."""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lafs_fast import config as C
from lafs_fast import dino
from lafs_fast.eval.bins import EvalConfig
from lafs_fast.models import create_model
from lafs_fast.models.landmark_cnn import LandmarkCNN
from lafs_fast.train import common, finetune, pipeline, pretrain
from lafs_fast.train.__main__ import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_PRETRAIN = os.path.join(ROOT, "configs", "release", "lafs_pretrain_webface4m.yaml")


def printed(capsys, cls, argv):
    with pytest.raises(SystemExit) as e:
        C.parse(cls, argv)
    assert e.value.code == 0
    return capsys.readouterr()


# ----------------------------------------------------------------------------- --print-config
@pytest.mark.parametrize("cls", [pipeline.PipelineConfig, finetune.FinetuneConfig, pretrain.PretrainConfig,
                                 EvalConfig])
def test_print_config_round_trips_through_config(cls, capsys, tmp_path):
    """Every command: --print-config prints YAML that --config reads back to the same options."""
    flags = {pipeline.PipelineConfig: ["--seed", "7"], finetune.FinetuneConfig: ["--drift-epochs", "3,4,5,6"],
             pretrain.PretrainConfig: ["--lr", "0.002", "--clip-mode", "per_tensor"],
             EvalConfig: ["--bins", "a.bin,b.bin"]}[cls]
    out = printed(capsys, cls, flags + ["--print-config"]).out
    assert "# flag" in out
    loaded = yaml.safe_load(out)
    names = [f.name for f in __import__("dataclasses").fields(cls)]
    assert list(loaded) == names  # every option, in order
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    again = C.from_namespace(cls, _ns(cls, ["--config", str(path)]), _parser(cls), validate=False)
    direct = C.from_namespace(cls, _ns(cls, flags), _parser(cls), validate=False)
    assert C.to_dict(again) == C.to_dict(direct)


def _parser(cls):
    import argparse
    p = argparse.ArgumentParser()
    C.add_arguments(p, cls)
    return p


def _ns(cls, argv):
    return _parser(cls).parse_args(argv)


def test_print_config_through_the_cli_for_every_command(capsys):
    for command in ("pipeline", "finetune", "pretrain", "eval"):
        with pytest.raises(SystemExit) as e:
            cli_main([command, "--print-config"])
        assert e.value.code == 0, command
        out, err = capsys.readouterr()
        assert out.startswith(f"# python -m lafs_fast.train {command}: resolved options")
        assert isinstance(yaml.safe_load(out), dict)


def test_print_config_still_rejects_bad_values(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse(pretrain.PretrainConfig, ["--clip-mode", "sideways", "--print-config"])
    assert e.value.code == 2
    assert "--clip-mode" in capsys.readouterr().err


def test_print_config_prints_an_unrunnable_recipe_and_says_why(capsys, tmp_path):
    out, err = printed(capsys, pretrain.PretrainConfig, ["--landmark-init", str(tmp_path / "missing.pt"),
                                                         "--print-config"])
    assert "landmark_init:" in out
    assert "not runnable as is" in err and "missing.pt" in err


# ----------------------------------------------------------------------------- the release config
RELEASE_VALUES = dict(  # lafs_train.py's defaults (and the model it builds), one by one
    model="part_fvit_b", epochs=41, batch_size=82, lr=5e-4, min_lr=1e-6, warmup_epochs=10.0,
    weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996, teacher_temp=0.04,
    warmup_teacher_temp=0.07, warmup_teacher_temp_epochs=30, student_temp=0.1, freeze_last_layer=1,
    clip_grad=3.0, clip_mode="per_tensor", decay_tokens=True, weight_init="release", out_dim=100000,
    head_hidden=2048, head_bottleneck=256, n_local=8, local_landmarks=36, shuffle=True, perturb_std=5.0,
    landmarks="cnn", landmark_source="view", amp="fp16", workers=6, seed=0, dataset="recordio",
    fast_dropout=False, photometric=True)


def test_release_pretrain_config_prints_the_release_values(capsys):
    out, err = printed(capsys, pretrain.PretrainConfig, ["--config", RELEASE_PRETRAIN, "--print-config"])
    got = yaml.safe_load(out)
    for key, want in RELEASE_VALUES.items():
        assert got[key] == want, key
    # what the values imply, as the release computes it (lafs_train.py:411-416, 637-641)
    assert "0.0005 x 82 x W / 256: 0.000160156 at W=1, 0.000320313 at W=2" in out
    assert "teacher temperature per epoch: 0.07 -> 0.04 (warm-up 30 of 41 epochs)" in out
    assert "DINO loss pairs: 18" in out
    assert "not runnable as is" in err  # its data and landmark paths are placeholders here


def test_release_pretrain_config_names_its_source_on_every_line():
    """Each option line names the release file and line(s) it follows, or says it is a placeholder."""
    for line in open(RELEASE_PRETRAIN):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, comment = line.partition("#")
        assert comment, f"no comment on {key.strip()!r}"
        assert re.search(r"\w+\.(py|md):\d+", comment) or "placeholder" in comment or "CPU-only" in comment, line


def test_release_pretrain_model_matches_the_release_size():
    net_cfg = create_model("part_fvit_b", landmarks="grid").config
    assert (net_cfg["dim"], net_cfg["depth"], net_cfg["heads"], net_cfg["dim_head"], net_cfg["mlp_dim"],
            net_cfg["num_landmarks"], net_cfg["patch_size"]) == (768, 12, 11, 64, 2048, 196, 8)
    assert (net_cfg["dropout"], net_cfg["emb_dropout"], net_cfg["drop_path"], net_cfg["attn_scale"]) == \
        (0.1, 0.1, 0.1, "dim")


# ----------------------------------------------------------------------------- the switches
def test_teacher_temperature_ramp_and_short_runs():
    """0.07 -> 0.04 linearly over 30 epochs, then 0.04 (lafs_train.py:637-641); a run shorter than
    the ramp keeps its first epochs (the release's np.ones(41 - 30) would be np.ones(-25): a crash)."""
    full = dino.teacher_temp_schedule(0.07, 0.04, 30, 41)
    np.testing.assert_allclose(full, np.concatenate((np.linspace(0.07, 0.04, 30), np.full(11, 0.04))))
    with pytest.raises(ValueError):
        np.concatenate((np.linspace(0.07, 0.04, 30), np.ones(5 - 30) * 0.04))  # the release's maths
    short = dino.teacher_temp_schedule(0.07, 0.04, 30, 5)
    np.testing.assert_allclose(short, np.linspace(0.07, 0.04, 30)[:5])


def test_release_lr_schedule_is_dinos():
    """10 warm-up epochs from 0 to 5e-4 x global batch / 256, cosine to 1e-6 (utils.py:187-198)."""
    spe, batch = 7, 164
    got = dino.lr_schedule(41, spe, batch, 5e-4, 1e-6, warmup_epochs=10)
    warm = np.linspace(0, 5e-4 * batch / 256, 10 * spe)
    it = np.arange(41 * spe - 10 * spe)
    cos = 1e-6 + 0.5 * (5e-4 * batch / 256 - 1e-6) * (1 + np.cos(np.pi * it / len(it)))
    np.testing.assert_allclose(got, np.concatenate((warm, cos)), rtol=1e-12)


def _groups_by_name(model, head, **kw):
    groups = common.param_groups(model, 0.04, extra=head, **kw)
    names = {id(p): n for n, p in list(model.named_parameters()) + list(head.named_parameters(prefix="head"))}
    return {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}


def test_decay_tokens_is_the_releases_rule():
    """decay_tokens: exempt exactly ".bias" and 1-D tensors (utils.py:662-673), so cls_token and
    pos_embedding are decayed; the default also exempts those two."""
    model = create_model("part_fvit_tiny", landmarks="grid")
    head = torch.nn.Linear(model.dim, 5)
    release = _groups_by_name(model, head, decay_tokens=True)
    for name, p in list(model.named_parameters()) + list(head.named_parameters(prefix="head")):
        exempt = name.endswith(".bias") or p.ndim == 1
        assert release[name] == (0.0 if exempt else 0.04), name
    ours = _groups_by_name(model, head)
    assert ours["cls_token"] == ours["pos_embedding"] == 0.0
    assert {k: v for k, v in ours.items() if k not in ("cls_token", "pos_embedding")} == \
        {k: v for k, v in release.items() if k not in ("cls_token", "pos_embedding")}


def test_per_tensor_clipping_is_dinos_clip_gradients():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 5), (7,), (3, 3, 2), (2,)]]
    for p, scale in zip(params, [10.0, 0.01, 2.0, 5.0]):
        p.grad = torch.randn(p.shape) * scale
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: skipped
    before = [None if p.grad is None else p.grad.clone() for p in params]
    norm = common.clip_gradients_(params, 3.0, "per_tensor")
    clipped = 0
    for p, g in zip(params, before):
        if g is None:
            assert p.grad is None
            continue
        coef = 3.0 / (g.norm(2) + 1e-6)       # utils.py:136-140
        want = g * coef if coef < 1 else g
        clipped += bool(coef < 1)
        assert torch.equal(p.grad, want)
    assert 0 < clipped < 4
    torch.testing.assert_close(norm, torch.stack([g.norm() for g in before if g is not None]).norm())


def test_global_clipping_is_clip_grad_norm():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    b = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    for p, q in zip(a, b):
        p.grad = torch.randn(4, 4) * 3
        q.grad = p.grad.clone()
    n1 = common.clip_gradients_(a, 1.0, "global")
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert torch.equal(n1, n2) and all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="clip mode"):
        common.clip_gradients_(a, 1.0, "per_layer")


def test_release_init():
    """pos_embedding, cls_token ~ N(0, 1); Linears at PyTorch's default (kaiming-uniform weights and
    biases within 1/sqrt(fan_in)); landmark CNN output layer likewise, its SE Linears N(0, 0.01)."""
    torch.manual_seed(0)
    model = create_model("part_fvit_s").init_weights("release").requires_grad_(False)
    assert 0.9 < float(model.pos_embedding.std()) < 1.1 and abs(float(model.pos_embedding.mean())) < 0.05
    assert 0.7 < float(model.cls_token.std()) < 1.3
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.startswith("landmark_cnn.features"):
            bound = 1 / math.sqrt(mod.in_features)
            assert float(mod.weight.abs().max()) <= bound + 1e-7, name
            # uniform on [-bound, bound]: std bound / sqrt(3)
            assert abs(float(mod.weight.std()) / (bound / math.sqrt(3)) - 1) < 0.15, name
            if mod.bias is not None:
                assert float(mod.bias.abs().max()) <= bound + 1e-7 and float(mod.bias.abs().max()) > 0, name
    se = [m for n, m in model.landmark_cnn.features.named_modules() if isinstance(m, torch.nn.Linear)]
    assert se and all(abs(float(m.weight.std()) - 0.01) < 0.002 for m in se)
    # the default ("timm") keeps trunc-normal 0.02 and a N(0, 0.01) landmark output layer
    torch.manual_seed(0)
    timm = create_model("part_fvit_s").requires_grad_(False)
    assert abs(float(timm.pos_embedding.std()) - 0.02) < 0.003
    assert abs(float(timm.landmark_cnn.output_layer[1].weight.std()) - 0.01) < 0.001
    assert float(timm.landmark_cnn.output_layer[1].bias.abs().max()) == 0.0
    with pytest.raises(ValueError, match="init scheme"):
        timm.init_weights("xavier")


def test_landmark_cnn_release_init_gives_the_output_layer_pytorch_default():
    torch.manual_seed(0)
    a = LandmarkCNN(16, 112, width=0.25)
    torch.manual_seed(1)
    a.reset_parameters("release")
    out = a.output_layer[1].requires_grad_(False)
    assert float(out.bias.abs().max()) > 0 and float(out.weight.abs().max()) <= 1 / math.sqrt(out.in_features)


def test_pretrainer_release_init_and_switches():
    cfg = pretrain.PretrainConfig(model="part_fvit_tiny", landmarks="grid", out_dim=64, head_hidden=32,
                                  head_bottleneck=16, weight_init="release", decay_tokens=True)
    torch.manual_seed(0)
    net = pretrain.LafsPretrainer(cfg)
    assert float(net.student.pos_embedding.detach().std()) > 0.5
    v = net.student_head.last_layer.weight_v.detach()
    assert float(v.abs().max()) <= 1 / math.sqrt(16) + 1e-7 and float(v.std()) > 0.1  # nn.Linear default
    # the teacher starts as the student
    for s, t in zip(net.student_parameters(), net.teacher_parameters()):
        assert torch.equal(s, t)
    opt = pretrain.make_optimizer(net, torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(net.student.cls_token) in decayed and id(net.student.pos_embedding) in decayed


def test_pretrain_runs_with_the_release_switches(tmp_path):
    """A tiny pretraining run end to end with per-tensor clipping, decayed tokens and release init."""
    cfg = pretrain.PretrainConfig(dataset="synthetic", batch_size=8, threads=0, progress=False, device="cpu",
                                  landmarks="grid", epochs=2, n_local=2, out_dim=64, head_hidden=32,
                                  head_bottleneck=16, warmup_epochs=0.5, warmup_teacher_temp=0.07,
                                  warmup_teacher_temp_epochs=30, clip_mode="per_tensor", decay_tokens=True,
                                  weight_init="release", stop_after=3, out_dir=str(tmp_path))
    cfg.validate()
    res = pretrain.run(cfg)
    assert res["steps"] == 3 and res["stopped"]


# ----------------------------------------------------------------------------- the loop's wiring
def _dino_cosine(base, final, epochs, niter, warmup_epochs=0.0):
    """DINO's utils.cosine_scheduler, re-stated: linear warm-up from 0, then a cosine to final."""
    warm = np.linspace(0, base, int(warmup_epochs * niter))
    it = np.arange(epochs * niter - len(warm))
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / len(it)))))


def test_pretrain_loop_hands_each_step_its_schedules_temperature_and_a_training_teacher(tmp_path, monkeypatch):
    """What pretrain.run gives every step, seen where it is used: lr and weight decay on the
    optimizer's groups when AdamW steps, the EMA momentum, the teacher temperature of the epoch
    (the --warmup-teacher-temp ramp), the student temperature, and both networks in train mode
    (the release never puts the teacher in eval: its dropout and drop-path stay active).
    Expected values from DINO's formulas, not from lafs_fast.dino. Every value differs from its
    default and the lr warm-up (3 epochs) is cut to half the run (2 of 4)."""
    cfg = pretrain.PretrainConfig(dataset="synthetic", batch_size=24, threads=1, progress=False, device="cpu",
                                  landmarks="grid", epochs=4, n_local=1, out_dim=64, head_hidden=32,
                                  head_bottleneck=16, lr=4e-3, min_lr=1e-4, warmup_epochs=3.0,
                                  weight_decay=0.03, weight_decay_end=0.3, momentum_teacher=0.99,
                                  teacher_temp=0.05, warmup_teacher_temp=0.08, warmup_teacher_temp_epochs=3,
                                  student_temp=0.2, log_every=100, out_dir=str(tmp_path))
    seen = {"groups": [], "momentum": [], "temp": [], "student_temp": [], "train_mode": []}

    def before_adamw(opt, args, kwargs):
        seen["groups"].append([(g["lr"], g["weight_decay"], g["base_weight_decay"]) for g in opt.param_groups])

    real_ema, real_temp = pretrain.ema_update_, dino.DINOLoss.teacher_temp
    real_forward = pretrain.LafsPretrainer.forward
    real_loss = dino.DINOLoss.forward

    def ema(teacher, student, momentum):
        seen["momentum"].append(float(momentum))
        return real_ema(teacher, student, momentum)

    def loss(self, student_out, teacher_out, epoch):  # once per step: the temperature it divides by
        seen["temp"].append((int(epoch), real_temp(self, epoch)))
        seen["student_temp"].append(self.student_temp)
        return real_loss(self, student_out, teacher_out, epoch)

    def forward(self, *args, **kw):
        nets = (self.student, self.student_head, self.teacher, self.teacher_head)
        seen["train_mode"].append(all(m.training for net in nets for m in net.modules()))
        return real_forward(self, *args, **kw)

    monkeypatch.setattr(pretrain, "ema_update_", ema)  # the name the loop calls
    monkeypatch.setattr(dino.DINOLoss, "forward", loss)
    monkeypatch.setattr(pretrain.LafsPretrainer, "forward", forward)
    handle = register_optimizer_step_pre_hook(before_adamw)
    try:
        res = pretrain.run(cfg)
    finally:
        handle.remove()
    spe, total = 2, 8  # 48 synthetic faces / 24 per step, 4 epochs
    assert res["steps"] == total and len(seen["groups"]) == len(seen["momentum"]) == total
    lr = _dino_cosine(4e-3 * 24 / 256, 1e-4, 4, spe, warmup_epochs=2)
    wd = _dino_cosine(0.03, 0.3, 4, spe)
    momentum = _dino_cosine(0.99, 1.0, 4, spe)
    temps = [0.08, 0.065, 0.05, 0.05]  # linspace(0.08, 0.05, 3), then 0.05
    for step, groups in enumerate(seen["groups"]):
        assert all(g[0] == pytest.approx(lr[step], rel=1e-9) for g in groups), step
        assert all(g[1] == (pytest.approx(wd[step], rel=1e-9) if g[2] > 0 else 0.0) for g in groups), step
        assert any(g[2] > 0 for g in groups) and any(g[2] == 0 for g in groups)
    np.testing.assert_allclose(seen["momentum"], momentum, rtol=1e-12)
    assert [e for e, _ in seen["temp"]] == [s // spe for s in range(total)]
    np.testing.assert_allclose([t for _, t in seen["temp"]], [temps[s // spe] for s in range(total)], rtol=1e-12)
    assert set(seen["student_temp"]) == {0.2}
    assert len(seen["train_mode"]) == total and all(seen["train_mode"])
