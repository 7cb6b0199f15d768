"""The DINO head's promises that the model and precision tests leave implicit: DINO's default
sizes, the one- and two-layer MLPs, the 0.02 initialisation (the last layer's direction vector
included: its norm sets how far an optimiser step turns the weight), the gain's (out, 1) shape
that DINO checkpoints carry, and the L2 normalisation along the feature axis on both the
float32-logit path and the autocast-following one, for 2-D and 3-D inputs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lafs_fast.models.heads import DINOHead, WeightNormLinear


def linear_shapes(head):
    return [tuple(m.weight.shape) for m in head.mlp if isinstance(m, nn.Linear)]


def test_dino_defaults_are_three_layers_2048_hidden_256_bottleneck():
    head = DINOHead(8, 16)
    assert linear_shapes(head) == [(2048, 8), (2048, 2048), (256, 2048)]
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert tuple(head.last_layer.weight_v.shape) == (16, 256)


@pytest.mark.parametrize("nlayers, shapes", [(1, [(5, 8)]), (2, [(12, 8), (5, 12)]),
                                             (4, [(12, 8), (12, 12), (12, 12), (5, 12)])])
def test_mlp_depth_follows_nlayers(nlayers, shapes):
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=5, nlayers=nlayers)
    assert linear_shapes(head) == shapes
    x = torch.randn(3, 8)
    expected = head.last_layer(F.normalize(head.mlp(x), dim=-1))
    torch.testing.assert_close(head(x), expected)


def test_nlayers_below_one_is_refused_by_name():
    with pytest.raises(ValueError, match=r"nlayers must be >= 1, got 0"):
        DINOHead(8, 16, nlayers=0)


def test_linear_weights_start_as_truncated_normal_with_std_0_02():
    torch.manual_seed(0)
    head = DINOHead(64, 512, hidden_dim=256, bottleneck_dim=128)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            assert 0.018 < m.weight.std().item() < 0.022
            assert m.weight.abs().max().item() <= 2.0  # truncated at +-2 (absolute, as timm / DINO)
            assert torch.count_nonzero(m.bias) == 0
    assert 0.018 < head.last_layer.weight_v.std().item() < 0.022


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
def test_weight_norm_gain_has_torch_weight_norms_shape():
    ours = WeightNormLinear(6, 4)
    legacy = nn.utils.weight_norm(nn.Linear(6, 4, bias=False))
    assert ours.weight_g.shape == legacy.weight_g.shape == (4, 1)
    assert ours.weight_v.shape == legacy.weight_v.shape
    torch.testing.assert_close(ours.weight.norm(dim=1), torch.ones(4))


@pytest.mark.parametrize("float32_last_layer", [True, False])
@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8)])
def test_forward_normalises_each_feature_vector(float32_last_layer, shape):
    torch.manual_seed(1)
    head = DINOHead(8, 7, hidden_dim=12, bottleneck_dim=5)
    head.float32_last_layer = float32_last_layer
    x = torch.randn(shape)
    z = head.mlp(x)
    expected = F.linear(z / z.pow(2).sum(-1, keepdim=True).sqrt(), head.last_layer.weight)
    torch.testing.assert_close(head(x), expected)
    # each row's logits are cosines with unit-norm class vectors: bounded by one
    assert head(x).abs().max() <= 1 + 1e-6
