"""Key mapping between the release's checkpoint layout and ours, checked name by name in both
directions (found by mutation testing, docs/mutation.md): a wrong rule would load a tensor into
the wrong layer or report a misfit in names the user cannot find in the release."""
import pytest
import torch

from lafs_fast.checkpoint import CheckpointError, _official_state_dict, _release_name, map_official_keys
from lafs_fast.models import create_model

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
