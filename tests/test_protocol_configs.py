"""configs/release/ for the release's pretraining data: the published checkpoint's setting (1-shot
WebFace4M) and lafs_train.py's own default (MS1MV3 with the MS1MV3 landmark CNN). Each is the full
WebFace4M recipe with its data and landmark CNN changed, and says so in --print-config."""
import os
import subprocess
import sys

import pytest
import yaml

from lafs_fast import config as C
from lafs_fast.train import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "configs", "release")
NEW = {"lafs_pretrain_webface4m_1shot.yaml": ("/data/webface4m_1shot/train", "runs/part_fvit_webface4m/model.pt"),
       "lafs_pretrain_ms1mv3.yaml": ("/data/ms1m-retinaface-t1/train", "runs/part_fvit_ms1mv3/model.pt")}


def printed(name, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse(pretrain.PretrainConfig, ["--config", os.path.join(RELEASE, name), "--print-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    return out, yaml.safe_load(out)


@pytest.mark.parametrize("name", sorted(NEW))
def test_print_config_shows_the_data_and_landmark_cnn(name, capsys):
    data_path, landmark_init = NEW[name]
    out, resolved = printed(name, capsys)
    assert f"data_path: {data_path}  # from " in out
    assert f"landmark_init: {landmark_init}  # from " in out
    assert resolved["dataset"] == "recordio" and resolved["landmarks"] == "cnn"
    # everything else is lafs_train.py's defaults, as the full-WebFace4M recipe
    _, base = printed("lafs_pretrain_webface4m.yaml", capsys)
    differs = {k for k in resolved if resolved[k] != base[k]}
    same_cnn = base["landmark_init"] == landmark_init  # 1-shot: the WebFace4M Part fViT, as the full recipe
    assert differs == ({"data_path"} if same_cnn else {"data_path", "landmark_init"})


def test_each_changed_value_names_its_release_source():
    ms1m = open(os.path.join(RELEASE, "lafs_pretrain_ms1mv3.yaml")).read()
    assert "lafs_train.py:109" in ms1m and "lafs_train.py:112" in ms1m
    one_shot = open(os.path.join(RELEASE, "lafs_pretrain_webface4m_1shot.yaml")).read()
    assert "README.md:99-103" in one_shot and "README.md:50-54" in one_shot
    for text in (ms1m, one_shot):
        lines = [l for l in text.splitlines() if l.startswith(("data_path:", "landmark_init:"))]
        assert len(lines) == 2 and all("DIFFERS" in l for l in lines)


def test_print_config_from_the_command_line():
    cmd = [sys.executable, "-m", "lafs_fast.train", "pretrain", "--config",
           os.path.join(RELEASE, "lafs_pretrain_ms1mv3.yaml"), "--print-config"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "data_path: /data/ms1m-retinaface-t1/train" in done.stdout
    assert "landmark_init: runs/part_fvit_ms1mv3/model.pt" in done.stdout
    assert "no such file runs/part_fvit_ms1mv3/model.pt" in done.stderr  # a placeholder, said so
