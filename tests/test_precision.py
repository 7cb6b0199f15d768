"""What mixed precision does to each module (docs/precision.md): under --amp bf16 the DINO head's
last layer, the DINO loss and the frozen landmark CNN stay float32; the ViT's matmuls and the
trainable landmark CNN follow autocast. In float32 runs nothing changes."""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from lafs_fast import views
from lafs_fast.dino import DINOLoss
from lafs_fast.models import LandmarkCNN
from lafs_fast.models.heads import DINOHead
from lafs_fast.train import common, pretrain

CPU = torch.device("cpu")


def bf16():
    return common.autocast(CPU, "bf16")


def test_dino_logits_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    head = DINOHead(64, 1000, hidden_dim=128, bottleneck_dim=32)
    x = torch.randn(16, 64)
    with bf16():
        out = head(x)
        hidden = head.mlp(x)  # bf16: the MLP follows autocast
    assert out.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    # exactly the float32 last layer applied to the MLP's bf16 output
    expected = F.linear(F.normalize(hidden.float(), dim=-1), head.last_layer.weight)
    assert torch.equal(out, expected)
    # the bf16 alternative rounds the cosine logits to bf16's 2^-8 spacing below 1
    head.float32_last_layer = False
    with bf16():
        low = head(x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - expected).abs().max() > 1e-3 > (out - expected).abs().max()


def test_dino_head_in_float32_is_unchanged():
    torch.manual_seed(0)
    head = DINOHead(64, 1000, hidden_dim=128, bottleneck_dim=32)
    x = torch.randn(16, 64)
    assert torch.equal(head(x), head.last_layer(F.normalize(head.mlp(x), dim=-1, p=2)))


def _convs_dtypes(cnn: nn.Module, x: torch.Tensor) -> set:
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
             for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad(), bf16():
        out = cnn(x)
    for h in hooks:
        h.remove()
    return seen, out


def test_frozen_landmark_cnn_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    cnn = LandmarkCNN(49, 112, width=0.5)
    trainable = copy.deepcopy(cnn).eval()
    frozen = cnn.freeze_()
    assert frozen.float32 and not any(p.requires_grad for p in frozen.parameters())
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    seen, out = _convs_dtypes(frozen, x)
    assert seen == {torch.float32} and out.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(out, frozen(x))  # the same landmarks as without autocast
    # the trainable CNN of finetuning follows autocast (as the release's, under its fp16 autocast)
    seen, out = _convs_dtypes(trainable, x)
    assert seen == {torch.bfloat16} and out.dtype == torch.float32  # the output layer stays float32


def _tiny_pretrainer(**kw):
    torch.manual_seed(0)
    cfg = pretrain.PretrainConfig(model="part_fvit_tiny", landmarks="grid", out_dim=64, n_local=2,
                                  device="cpu", **kw)
    net = pretrain.LafsPretrainer(cfg)
    net.set_landmark_cnn(LandmarkCNN(net.student.num_landmarks, 112, width=0.5))
    return net


def test_pretraining_step_under_amp_bf16_keeps_logits_loss_and_landmarks_float32():
    net = _tiny_pretrainer()
    assert net.landmark_cnn.float32  # set_landmark_cnn freezes it in float32
    dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes[name] = output.dtype
        return hook

    net.landmark_cnn.register_forward_hook(record("landmark CNN"))
    net.student.transformer.blocks[0].attn.register_forward_hook(record("attention"))
    net.student.transformer.blocks[0].mlp.register_forward_hook(record("block MLP"))
    net.student_head.mlp.register_forward_hook(record("head MLP"))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    v = views.make_lafs_views(x, views.ViewConfig(n_local=2), generator=torch.Generator().manual_seed(0))
    dino = DINOLoss(64, n_global=2, n_views=4, total_epochs=1)
    with bf16():
        s_out, t_out = net(v, 1, torch.Generator().manual_seed(0))
    assert s_out.dtype == t_out.dtype == torch.float32
    assert dtypes == {"landmark CNN": torch.float32, "attention": torch.bfloat16,
                      "block MLP": torch.bfloat16, "head MLP": torch.bfloat16}
    loss = pretrain.forward_loss(net, dino, v, 1, torch.Generator().manual_seed(0), 0, CPU, "bf16")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_landmark_cnn_float32_switch_is_the_only_difference():
    torch.manual_seed(1)
    cnn = LandmarkCNN(49, 112, width=0.5).freeze_()
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref = cnn(x)
        with bf16():
            same = cnn(x)
            cnn.float32 = False
            low = cnn(x)
    assert torch.equal(same, ref)
    assert not torch.equal(low, ref) and (low - ref).norm(dim=-1).mean() < 5.0
