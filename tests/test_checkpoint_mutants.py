"""Checkpoint reading, checked where mutation testing (docs/mutation.md) found the suite blind: the
key mapping between the release's layout and ours name by name in both directions (a wrong rule
loads a tensor into the wrong layer), the settings inferred from a release file, which file and
which keys every error names (in release names), the formats a backbone loads from, and the
temporary file a killed save leaves behind."""
import ast
import os

import pytest
import torch

from lafs_fast.checkpoint import (
    CheckpointError,
    _cnn_width,
    _official_state_dict,
    _read_error,
    _release_name,
    load_backbone_into,
    load_checkpoint,
    load_landmark_cnn,
    load_official,
    load_state_dict_checked,
    map_official_keys,
    save_checkpoint,
)
from lafs_fast.convert import save_model
from lafs_fast.models import PartFViT, create_model
from lafs_fast.train.common import CheckpointRing

# ours -> the release's name (vit_pytorch-style PreNorm / Residual nesting, MobileNetV2 "stn")
RELEASE_NAMES = {
    "landmark_cnn.features.0.0.weight": "stn.features.0.0.weight",
    "landmark_cnn.output_layer.1.weight": "output_layer.1.weight",
    "patch_embed.weight": "patch_to_embedding.weight",
    "norm.weight": "mlp_head.0.weight",
    "cls_token": "cls_token", "pos_embedding": "pos_embedding",
    "transformer.blocks.1.norm1.bias": "transformer.layers.1.0.fn.norm.bias",
    "transformer.blocks.1.attn.to_qkv.weight": "transformer.layers.1.0.fn.fn.to_qkv.weight",
    "transformer.blocks.1.attn.to_out.bias": "transformer.layers.1.0.fn.fn.to_out.0.bias",
    "transformer.blocks.1.norm2.weight": "transformer.layers.1.1.fn.norm.weight",
    "transformer.blocks.1.mlp.fc1.weight": "transformer.layers.1.1.fn.fn.net.0.weight",
    "transformer.blocks.12.mlp.fc2.bias": "transformer.layers.12.1.fn.fn.net.3.bias",
}


@pytest.mark.parametrize("ours, release", sorted(RELEASE_NAMES.items()))
def test_release_name_and_back(ours, release):
    assert _release_name(ours) == release
    t = torch.zeros(1)
    assert map_official_keys({release: t}) == {ours: t}


def test_every_key_of_a_model_maps_to_the_release_and_back():
    sd = create_model("part_fvit_tiny").state_dict()
    release = {_release_name(k): v for k, v in sd.items()}
    assert len(release) == len(sd)
    back = map_official_keys(release)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)


def test_official_state_dict_prefers_teacher_and_strips_prefixes():
    t, s = torch.ones(1), torch.zeros(1)
    sd = _official_state_dict({"teacher": {"module.backbone.cls_token": t},
                               "student": {"module.cls_token": s}}, "x.pt")
    assert sd == {"cls_token": t}
    assert _official_state_dict({"student": {"encoder.cls_token": s}}, "x.pt") == {"cls_token": s}
    assert _official_state_dict({"model": {"cls_token": t}}, "x.pt") == {"cls_token": t}
    assert _official_state_dict({"state_dict": {"cls_token": s}}, "x.pt") == {"cls_token": s}
    with pytest.raises(CheckpointError, match=r"x\.pt: entry 'epoch' is a int, not a tensor"):
        _official_state_dict({"epoch": 3}, "x.pt")


def test_heads_and_classifiers_are_dropped_and_unknown_keys_named():
    t = torch.zeros(1)
    kept = map_official_keys({"cls_token": t, "loss.weight": t, "head.last_layer.weight": t,
                              "fc.weight": t, "x.dummy_orthogonal_classifier.w": t})
    assert kept == {"cls_token": t}
    with pytest.raises(CheckpointError, match=r"c\.pt: 2 key\(s\) of unknown layout, e\.g\. \['a', 'b'\]"):
        map_official_keys({"a": t, "b": t}, "c.pt")
    with pytest.raises(CheckpointError, match="'global token' variant"):
        map_official_keys({"global_token.weight": t})


# ----------------------------------------------------------------------------- loading whole models
def odd_vit(**kw):
    """A Part fViT the release's layout can describe (dim_head 64) with a patch size other than
    the default 8, so that an inferred setting left at its default shows."""
    torch.manual_seed(0)
    cfg = dict(dim=128, depth=1, heads=2, dim_head=64, mlp_dim=64, num_landmarks=49, patch_size=6,
               cnn_width=0.25)
    return PartFViT(**{**cfg, **kw})


def save_release(model, path, drop=()):
    torch.save({_release_name(k): v for k, v in model.state_dict().items()
                if not k.startswith(drop or ("\0",))}, path)
    return str(path)


def test_load_official_infers_the_release_settings(tmp_path):
    model = odd_vit()
    loaded = load_official(save_release(model, tmp_path / "r.pth"))
    assert loaded.config == {**model.config, "image_size": 112}
    assert loaded.config["patch_size"] == 6 and loaded.config["drop_path"] == 0.1
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_load_official_errors_name_the_file_they_are_about(tmp_path):
    sd = {_release_name(k): v for k, v in odd_vit().state_dict().items()}
    torch.save({**sd, "mystery.weight": torch.zeros(1)}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match=r"unknown\.pth: 1 key\(s\) of unknown layout"):
        load_official(str(tmp_path / "unknown.pth"))
    torch.save({k: v for k, v in sd.items() if not k.startswith("mlp_head")}, tmp_path / "nonorm.pth")
    with pytest.raises(CheckpointError, match=r"nonorm\.pth: missing ViT keys .*'mlp_head\.0\.weight'"):
        load_official(str(tmp_path / "nonorm.pth"))
    torch.save({**sd, "patch_to_embedding.weight": torch.zeros(128, 50)}, tmp_path / "p.pth")
    with pytest.raises(CheckpointError, match=r"p\.pth: patch_to_embedding takes 50 inputs, not P\*P\*3"):
        load_official(str(tmp_path / "p.pth"))
    good = save_release(odd_vit(), tmp_path / "good.pth")
    with pytest.raises(CheckpointError, match=r"unknown\.pth: 1 key\(s\) of unknown layout"):
        load_official(good, landmark_cnn_path=str(tmp_path / "unknown.pth"))


def test_landmark_cnn_from_another_checkpoint_must_predict_as_many_landmarks(tmp_path):
    vit = save_release(odd_vit(), tmp_path / "vit.pth", drop=("landmark_cnn.",))
    other = save_release(odd_vit(num_landmarks=25), tmp_path / "cnn25.pth")
    with pytest.raises(CheckpointError, match=r"^landmark CNN predicts 25 landmarks but the ViT has 49 "
                                              r"position embeddings \(\+ CLS\)$"):
        load_official(vit, landmark_cnn_path=other)
    no_cnn = save_release(odd_vit(), tmp_path / "nocnn.pth", drop=("landmark_cnn.",))
    with pytest.raises(CheckpointError, match=r"nocnn\.pth holds no landmark CNN"):
        load_official(vit, landmark_cnn_path=no_cnn)


def test_a_backbone_without_landmark_cnn_loads_with_a_warning(tmp_path):
    vit = save_release(odd_vit(), tmp_path / "vit.pth", drop=("landmark_cnn.",))
    with pytest.warns(UserWarning, match=r"vit\.pth has no landmark CNN \(a LAFS / DINO backbone\) and no "
                                         r"landmark_cnn_path was given: the landmark CNN is RANDOMLY initialised"):
        load_official(vit)


def test_cnn_width_needs_the_widest_layer():
    with pytest.raises(CheckpointError, match=r"lack stn\.features\.15\.conv\.0\.weight"):
        _cnn_width({"landmark_cnn.features.0.0.weight": torch.zeros(8, 3, 3, 3)})
    assert _cnn_width({"landmark_cnn.features.15.conv.0.weight": torch.zeros(240, 1)}) == 0.25


def test_misfit_names_at_most_six_keys_of_each_kind_in_release_names():
    model = odd_vit()
    own = model.state_dict()
    blocks = [k for k in own if k.startswith("landmark_cnn.features.")][:16]
    sd = {k: v for k, v in own.items() if k not in blocks[:8]}
    sd.update({f"landmark_cnn.features.{90 + i}.weight": torch.zeros(1) for i in range(8)})
    sd.update({k: torch.zeros(7) for k in blocks[8:16]})
    with pytest.raises(CheckpointError) as e:
        load_state_dict_checked(model, sd, "m.pt")
    lines = str(e.value).splitlines()
    assert lines[0] == "m.pt does not fit the model:"
    missing = ast.literal_eval(lines[1].split("missing 8: ", 1)[1])
    unexpected = ast.literal_eval(lines[2].split("unexpected 8: ", 1)[1])
    assert missing == [_release_name(k) for k in blocks[:6]] and missing[0].startswith("stn.features.")
    assert unexpected == [f"stn.features.{90 + i}.weight" for i in range(6)]
    assert lines[3:] == [f"  {_release_name(k)}: checkpoint (7,) vs model {tuple(own[k].shape)}"
                         for k in blocks[8:14]]


# ----------------------------------------------------------------------------- loading parts
def test_training_and_wrapped_release_checkpoints_load_into_a_backbone(tmp_path):
    src, dst = odd_vit(), odd_vit()
    with torch.no_grad():
        src.cls_token.fill_(0.5)
    torch.save({"model": src.state_dict(), "model_config": src.config}, tmp_path / "ft.pt")  # finetune state
    load_backbone_into(dst, str(tmp_path / "ft.pt"))
    torch.testing.assert_close(dst.cls_token, src.cls_token)
    with torch.no_grad():
        src.cls_token.fill_(-1.0)
    torch.save({"model": {_release_name(k): v for k, v in src.state_dict().items()}}, tmp_path / "wrapped.pth")
    load_backbone_into(dst, str(tmp_path / "wrapped.pth"))
    torch.testing.assert_close(dst.cls_token, src.cls_token)


@pytest.mark.parametrize("key", ["model_config", "config"])
def test_a_checkpoint_of_another_preset_says_which_settings_differ(tmp_path, key):
    small, big = odd_vit(), odd_vit(dim=192, mlp_dim=96)
    torch.save({"model": small.state_dict(), key: small.config}, tmp_path / "small.pt")
    with pytest.raises(CheckpointError) as e:
        load_backbone_into(big, str(tmp_path / "small.pt"))
    assert str(e.value).splitlines()[-1] == ("  the checkpoint was made for another model (another preset?): "
                                             "checkpoint vs model: dim 128 vs 192, mlp_dim 64 vs 96")


def test_a_misfit_of_the_same_preset_does_not_blame_the_preset(tmp_path):
    model = odd_vit()
    sd = dict(model.state_dict(), extra=torch.zeros(1))
    torch.save({"model": sd, "config": model.config}, tmp_path / "same.pt")
    with pytest.raises(CheckpointError) as e:
        load_backbone_into(model, str(tmp_path / "same.pt"))
    assert str(e.value) == "same.pt does not fit the model:\n  unexpected 1: ['extra']".replace(
        "same.pt", str(tmp_path / "same.pt"))


def test_partial_loading_errors_name_the_file_and_the_part(tmp_path):
    model = odd_vit()
    bad = save_release(model, tmp_path / "bad.pth")
    torch.save({**torch.load(bad), "mystery.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pth: 1 key\(s\) of unknown layout"):
        load_backbone_into(model, bad)
    grid = odd_vit(landmarks="grid")
    with pytest.raises(ValueError, match=r"^part='landmark_cnn' but the model uses a fixed grid \(landmarks='grid'\)$"):
        load_backbone_into(grid, save_release(model, tmp_path / "r.pth"), part="landmark_cnn")
    sd = dict(model.state_dict())
    sd["landmark_cnn.features.99.weight"] = torch.zeros(1)
    torch.save({"model": sd, "config": model.config}, tmp_path / "cnn.pt")
    with pytest.raises(CheckpointError, match=r"cnn\.pt does not fit the model:\n  unexpected 1: "
                                              r"\['stn\.features\.99\.weight'\]"):
        load_backbone_into(model, str(tmp_path / "cnn.pt"), part="landmark_cnn")
    with pytest.raises(CheckpointError, match=r"cnn\.pt does not fit the model:\n  unexpected 1: "
                                              r"\['stn\.features\.99\.weight'\]"):
        load_landmark_cnn(str(tmp_path / "cnn.pt"))
    with pytest.raises(CheckpointError, match=r"bad\.pth: 1 key\(s\) of unknown layout"):
        load_landmark_cnn(bad)


def test_standalone_landmark_cnn_takes_its_image_size_from_the_config(tmp_path):
    model = odd_vit(image_size=96)
    save_model(model, str(tmp_path / "m96.pt"))
    assert load_landmark_cnn(str(tmp_path / "m96.pt")).image_size == 96
    cfg = {k: v for k, v in model.config.items() if k != "image_size"}
    torch.save({"model": model.state_dict(), "config": cfg}, tmp_path / "nosize.pt")
    assert load_landmark_cnn(str(tmp_path / "nosize.pt"), image_size=80).image_size == 80


# ----------------------------------------------------------------------------- reading files
def test_already_converted_checkpoint_is_pointed_to_the_right_loader():
    with pytest.raises(CheckpointError, match=r"^x\.pt is already in lafs_fast format \(lafs_fast\.model/1\), not a "
                                              r"release checkpoint: load it with lafs_fast\.convert\.load_model$"):
        _official_state_dict({"format": "lafs_fast.model/1"}, "x.pt")
    t = torch.ones(1)
    assert _official_state_dict({"teacher": {"module.cls_token": t}}, "x.pt") == {"cls_token": t}


def test_map_official_keys_messages():
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"^checkpoint: 7 key\(s\) of unknown layout, e\.g\. "
                                              r"\['a0', 'a1', 'a2', 'a3', 'a4'\]$"):
        map_official_keys({f"a{i}": t for i in range(7)})
    with pytest.raises(CheckpointError, match=r"^g\.pth is the release's 'global token' variant \(CLS replaced by a "
                                              r"projection of the landmark CNN features\); it is not Part fViT and "
                                              r"is not supported$"):
        map_official_keys({"global_token.weight": t}, "g.pth")


def test_a_corrupt_file_is_named_with_what_torch_said(tmp_path):
    path = tmp_path / "c.pt"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match=r"^cannot read checkpoint .*c\.pt \(16 bytes\): it is truncated, corrupt "
                                              r"or not a torch checkpoint \(UnpicklingError: \S.+\)$"):
        load_checkpoint(str(path))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo ran > ran.txt",))


def test_planted_code_is_refused_even_where_the_environment_forces_unsafe_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # honoured only where weights_only is not given
    torch.save({"model": {}, "x": RunsCode()}, tmp_path / "step-00000001.pt")
    with pytest.raises(CheckpointError, match=r"refused, loading it would call (posix|os)\.system"):
        load_checkpoint(str(tmp_path / "step-00000001.pt"))
    assert not (tmp_path / "ran.txt").exists()


class Killed(BaseException):
    """The process dying between writing the temporary file and renaming it."""


def test_a_save_killed_before_the_rename_leaves_a_temp_file_the_ring_cleans(tmp_path, monkeypatch):
    folder = tmp_path / "run"

    def killed(src, dst):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        m.setattr(os, "unlink", lambda path: None)  # a killed process cleans nothing up
        with pytest.raises(Killed):
            save_checkpoint(str(folder / "step-00000007.pt"), {"w": torch.zeros(2)})
    left = os.listdir(folder)
    assert len(left) == 1 and left[0].startswith(".tmp_step-00000007.pt."), left  # beside its target, hidden
    ring = CheckpointRing(str(folder))
    assert ring.latest() is None
    ring.clean_stale()
    assert os.listdir(folder) == []


def test_exact_wording_of_the_landmark_cnn_and_entry_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"^landmark CNN weights lack stn\.features\.15\.conv\.0\.weight \(its "
                                              r"widest layer\): not the release's MobileNetV2 landmark CNN$"):
        _cnn_width({})
    with pytest.raises(CheckpointError, match=r"^x\.pt: entry 'n' is a int, not a tensor: not a LAFS / Part fViT "
                                              r"checkpoint$"):
        _official_state_dict({"n": 1}, "x.pt")
    sd = {_release_name(k): v for k, v in odd_vit().state_dict().items() if k != "landmark_cnn.features.0.0.weight"}
    torch.save(sd, tmp_path / "nostem.pth")
    with pytest.raises(CheckpointError, match=r"^landmark CNN weights lack stn\.features\.0\.0\.weight$"):
        load_official(str(tmp_path / "nostem.pth"))
    torch.save({**sd, "stn.features.0.0.weight": torch.zeros(8, 3, 3, 3), "mlp_head.0.weight": torch.zeros(5)},
               tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"^.*shape\.pth does not fit the model:\n  mlp_head\.0\.weight: "
                                              r"checkpoint \(5,\) vs model \(128,\)$"):
        load_official(str(tmp_path / "shape.pth"))


def test_an_error_without_text_gives_no_filler():
    e = _read_error(__file__, RuntimeError(""))
    assert str(e).endswith("corrupt or not a torch checkpoint (RuntimeError: )")
