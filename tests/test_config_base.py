"""--config files with a base: `base: other.yaml` (relative to the file) extends another file;
its keys override the base's, mappings merge key by key, --print-config shows the result."""
import dataclasses
import os

import pytest
import yaml

from lafs_fast import config
from lafs_fast.config import ConfigFileError, load_config_file
from lafs_fast.train import finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "configs", "release")


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_a_file_overrides_its_base_and_keeps_the_rest(tmp_path):
    write(tmp_path / "base.yaml", "epochs: 3\nlr: 0.25\nbatch_size: 8\nmixup_prob: 0.5\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nepochs: 5\nbatch-size: 16\n")
    cfg = config.parse(finetune.FinetuneConfig, ["--config", child])
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.mixup_prob) == (5, 0.25, 16, 0.5)
    # flags still win over both files
    cfg = config.parse(finetune.FinetuneConfig, ["--config", child, "--epochs", "7", "--lr", "0.5"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (7, 0.5, 16)


def test_bases_chain_through_relative_paths_and_mappings_merge_key_by_key(tmp_path):
    write(tmp_path / "shared" / "root.yaml", "a: 1\nopts: {x: 1, inner: {p: 1, q: 2}}\nlist: [1, 2]\n")
    write(tmp_path / "shared" / "mid.yaml", "base: root.yaml\nb: 2\nopts: {inner: {q: 20, r: 30}}\n")
    leaf = write(tmp_path / "runs" / "leaf.yaml", "base: ../shared/mid.yaml\na: 10\nlist: [3]\nopts: {y: 2}\n")
    got = load_config_file(leaf)
    assert got.values == {"a": 10, "b": 2, "list": [3], "opts": {"x": 1, "y": 2, "inner": {"p": 1, "q": 20, "r": 30}}}
    assert got.files == [str(tmp_path / "runs" / "../shared/root.yaml"), str(tmp_path / "runs" / "../shared/mid.yaml"),
                         leaf]
    assert got.source["a"] == (leaf, "a") and got.source["b"][0].endswith("mid.yaml")


def test_a_missing_base_is_an_error_naming_both_files(tmp_path, capsys):
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\nepochs: 5\n")
    with pytest.raises(ConfigFileError, match=r"child\.yaml: its base 'nowhere\.yaml' does not exist .*nowhere\.yaml"):
        load_config_file(child)
    with pytest.raises(SystemExit) as e:
        config.parse(finetune.FinetuneConfig, ["--config", child])
    assert e.value.code == 2
    assert "--config: " in capsys.readouterr().err


@pytest.mark.parametrize("base", ["", "[a.yaml]", "3"])
def test_a_base_that_is_not_a_file_name_is_an_error(tmp_path, base):
    child = write(tmp_path / "child.yaml", f"base: {base}\n")
    with pytest.raises(ConfigFileError, match="'base' must name a YAML file"):
        load_config_file(child)


def test_a_cycle_of_bases_is_an_error_not_a_recursion(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\nepochs: 1\n")
    write(tmp_path / "b.yaml", "base: sub/c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "base: ../a.yaml\n")
    with pytest.raises(ConfigFileError, match=r"form a cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml$"):
        load_config_file(a)
    itself = write(tmp_path / "self.yaml", "base: self.yaml\n")
    with pytest.raises(ConfigFileError, match="form a cycle"):
        load_config_file(itself)


def test_an_unknown_option_in_a_base_names_the_base(tmp_path, capsys):
    write(tmp_path / "base.yaml", "bogus_option: 1\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nepochs: 2\n")
    with pytest.raises(SystemExit):
        config.parse(finetune.FinetuneConfig, ["--config", child])
    assert f"--config: unknown option 'bogus_option' in {tmp_path / 'base.yaml'}" in capsys.readouterr().err


def test_print_config_shows_every_resolved_option_and_where_it_came_from(tmp_path, capsys):
    base = write(tmp_path / "base.yaml", "epochs: 3\nlr: 0.25\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nepochs: 5\n")
    with pytest.raises(SystemExit) as e:
        config.parse(finetune.FinetuneConfig, ["--config", child, "--batch-size", "4", "--print-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(f"resolved options (defaults < {base} < {child} < flags)")
    assert f"epochs: 5  # from {child}" in out and f"lr: 0.25  # from {base}" in out
    assert "batch_size: 4  # flag" in out
    resolved = config.parse(finetune.FinetuneConfig, ["--config", child, "--batch-size", "4"])
    assert yaml.safe_load(out) == dataclasses.asdict(resolved)


def test_the_k_shot_release_configs_differ_from_the_full_one_in_data_label_space_and_validation_only():
    full = dataclasses.asdict(config.parse(finetune.FinetuneConfig, ["--config", f"{RELEASE}/lafs_finetune_full.yaml"]))
    for k, val_every in ((1, 85), (2, 171)):
        path = f"{RELEASE}/lafs_finetune_{k}shot.yaml"
        assert yaml.safe_load(open(path))["base"] == "lafs_finetune_full.yaml"
        shot = dataclasses.asdict(config.parse(finetune.FinetuneConfig, ["--config", path]))
        assert {key for key in full if full[key] != shot[key]} == {"data_path", "val_every", "num_classes"}
        assert (shot["data_path"], shot["val_every"]) == (f"/data/webface4m_{k}shot/train", val_every)
        assert shot["num_classes"] == 205990  # the full label space, whatever identities the file holds
