"""The options every command shares: switches in every spelling (`--resume`, `--resume true`,
`--no-resume`, `resume: auto` in YAML), --help by topic, --backend on every training command,
the margin each loss defaults to, and eval's --folds."""
import dataclasses
import re

import pytest
import torch

from lafs_fast import config
from lafs_fast.eval import bins
from lafs_fast.train import finetune, pipeline, pretrain
from lafs_fast.train.__main__ import main as train_main

CONFIGS = {"finetune": finetune.FinetuneConfig, "pretrain": pretrain.PretrainConfig,
           "pipeline": pipeline.PipelineConfig, "eval": bins.EvalConfig}


def parse(argv, cls=finetune.FinetuneConfig):
    return config.parse(cls, argv, prog="python -m lafs_fast.train finetune")


@pytest.mark.parametrize("argv, resume", [
    ([], False), (["--resume"], True), (["--resume", "true"], True), (["--resume=yes"], True),
    (["--resume", "false"], False), (["--no-resume"], False), (["--resume", "auto"], "auto"),
    (["--resume", "AUTO"], "auto"), (["--resume", "--eval", "false"], True), (["--resume", "on", "--no-resume"], False),
])
def test_resume_in_every_spelling(argv, resume):
    assert parse(argv).resume == resume


@pytest.mark.parametrize("argv, value", [
    (["--eval"], True), (["--no-eval"], False), (["--eval", "0"], False), (["--eval", "off"], False),
])
def test_every_switch_takes_the_bare_form_and_no(argv, value):
    assert parse(argv).eval is value


def test_a_yaml_file_sets_resume_auto_and_a_flag_overrides_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("resume: auto\noverwrite: false\n")
    assert parse(["--config", str(path)]).resume == "auto"
    assert parse(["--config", str(path), "--no-resume"]).resume is False


def test_the_command_line_is_kept_for_messages():
    cfg = parse(["--epochs", "3", "--overwrite", "false", "--resume", "auto", "--out-dir", "runs/a b"])
    assert config.command_with(cfg, "--resume", drop=("resume", "overwrite")) == \
        "python -m lafs_fast.train finetune --epochs 3 --out-dir 'runs/a b' --resume"


def help_sections(text):
    """{section title: [flags]} of an argparse --help text."""
    sections, title = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif title and re.match(r"^  --", line):
            sections[title] += re.findall(r"--[\w-]+", line.split("  ")[1] if line.startswith("  ") else line)
    return sections


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_help_lists_every_option_under_its_topic(command, capsys):
    with pytest.raises(SystemExit) as e:
        train_main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: python -m lafs_fast.train {command} [OPTIONS]\n")
    sections = help_sections(out)
    for f in dataclasses.fields(CONFIGS[command]):
        group = config.help_group(f.name)
        assert group != "other", f"{command} --{f.name}: no topic in config.HELP_GROUPS"
        assert "--" + f.name.replace("_", "-") in sections[group], (command, f.name, group)
    topics = [t for t in sections if t != "options"]
    assert topics == [t for t in config.HELP_GROUPS if t in topics]  # in the order of HELP_GROUPS
    if command in ("finetune", "pretrain"):
        assert topics == list(config.HELP_GROUPS)
        assert "--resume [true|false|auto], --no-resume" in out
        assert "--tensorboard [true|false], --no-tensorboard" in out


# ----------------------------------------------------------------------------- margins
@pytest.mark.parametrize("loss, margin, expected", [
    ("cosface", None, 0.4), ("arcface", None, 0.5), ("arcface", 0.3, 0.3), ("cosface", 0.1, 0.1)])
@pytest.mark.parametrize("partial_fc", ["off", "on"])
def test_each_loss_has_its_own_default_margin(loss, margin, expected, partial_fc):
    cfg = finetune.FinetuneConfig(loss=loss, margin=margin, partial_fc=partial_fc)
    head = finetune.build_head(cfg, 16, 10, torch.device("cpu"))
    assert head.m == expected


def test_the_margin_flag_and_its_default():
    assert parse(["--loss", "arcface"]).margin is None
    assert parse(["--loss", "arcface", "--margin", "0.35"]).margin == 0.35


# ----------------------------------------------------------------------------- --backend
@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_backend_reference_runs_every_training_command_on_the_reference_ops(command, tmp_path, monkeypatch):
    from lafs_fast import reference
    from lafs_fast.ops import patch_embed
    calls = []
    for name in ("landmark_patch_embed", "multicrop_embed"):
        real = getattr(reference, name, None)
        if real is None:
            continue

        def spy(*args, _real=real, **kwargs):
            calls.append(_real.__name__)
            return _real(*args, **kwargs)
        monkeypatch.setattr(reference, name, spy)
        if hasattr(patch_embed.reference, name):
            monkeypatch.setattr(patch_embed.reference, name, spy)
    monkeypatch.delenv("LAFS_FAST_BACKEND", raising=False)
    extra = ["--landmarks", "grid", "--n-local", "1", "--out-dim", "16", "--head-hidden", "16",
             "--head-bottleneck", "8"] if command == "pretrain" else ["--no-eval"]
    res = train_main([command, "--dataset", "synthetic", "--batch-size", "8", "--epochs", "1", "--stop-after", "1",
                      "--progress", "false", "--device", "cpu", "--backend", "reference",
                      "--out-dir", str(tmp_path / "run"), *extra])
    assert res["stopped"] and calls, "the reference ops were not used"
    import os
    assert "LAFS_FAST_BACKEND" not in os.environ  # set for the run only


def test_backend_auto_does_not_use_the_reference_ops(tmp_path, monkeypatch):
    from lafs_fast.ops import HAS_EXTENSION, patch_embed
    if not HAS_EXTENSION:
        pytest.skip("the compiled kernels are not built: auto is the reference ops here")
    calls = []
    monkeypatch.setattr(patch_embed.reference, "landmark_patch_embed", lambda *a, **k: calls.append(1))
    monkeypatch.delenv("LAFS_FAST_BACKEND", raising=False)
    res = train_main(["finetune", "--dataset", "synthetic", "--batch-size", "8", "--epochs", "1", "--stop-after", "1",
                      "--progress", "false", "--device", "cpu", "--no-eval", "--out-dir", str(tmp_path / "run")])
    assert res["stopped"] and calls == []


# ----------------------------------------------------------------------------- eval --folds
def test_eval_folds_sets_the_k_of_the_k_fold_accuracy(tmp_path):
    from lafs_fast.convert import save_model
    from lafs_fast.models import create_model
    torch.manual_seed(0)
    path = str(tmp_path / "model.pt")
    save_model(create_model("part_fvit_tiny", depth=1).eval(), path)
    for folds in (5, 10):
        reports = train_main(["eval", "--checkpoint", path, "--folds", str(folds), "--device", "cpu"])
        assert len(reports["ORL held-out"]["fold_thresholds"]) == folds
    assert (tmp_path / "model.eval.json").exists()
