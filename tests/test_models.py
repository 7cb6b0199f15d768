"""Models: landmark CNN, attention, Part fViT, heads, registry."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lafs_fast import ops
from lafs_fast.models import (
    ArcFace,
    Attention,
    CosFace,
    DINOHead,
    LandmarkCNN,
    PartFViT,
    create_model,
    grid_landmarks,
    list_models,
    normalize_landmarks,
)

torch.manual_seed(0)


def tiny(**kw):
    cfg = dict(dim=32, depth=2, heads=2, dim_head=16, mlp_dim=48, num_landmarks=16, patch_size=8,
               image_size=32, cnn_width=0.25)
    cfg.update(kw)
    return PartFViT(**cfg)


# ----------------------------------------------------------------------------- landmark CNN
@pytest.fixture(scope="module")
def model():
    return tiny().eval()


def test_landmark_cnn_shapes_and_param_count():
    with torch.device("meta"):
        full = LandmarkCNN(196, 112)
    n = sum(p.numel() for p in full.parameters())
    assert 2.8e6 < n < 3.0e6, n  # ~2.9 M as released
    assert full.out_channels == 160 and full.output_layer[1].weight.shape == (392, 160)
    cnn = LandmarkCNN(196, 112, width=0.25).eval()  # same strides, cheap to run
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert cnn.features(x).shape == (2, 40, 4, 4)
    cnn.train()  # a fresh model in eval mode has ~1e-9 activations; train-mode BN is lively
    lm = cnn(x)
    assert lm.shape == (2, 196, 2)
    # ONE min and ONE max per sample over x and y together
    flat = lm.reshape(2, -1)
    torch.testing.assert_close(flat.min(1).values, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.max(1).values, torch.full((2,), 111.0), atol=1e-4, rtol=0)
    assert (lm[..., 0].amin(1) > 0).any() or (lm[..., 1].amin(1) > 0).any()  # not per-axis


def test_landmark_cnn_se_and_blocks_follow_release_layout():
    cnn = LandmarkCNN(4, 112)
    keys = set(cnn.state_dict())
    assert "features.0.0.weight" in keys and "features.0.1.running_mean" in keys
    assert "features.4.conv.5.fc.0.weight" in keys  # first SE block (5x5, exp 72)
    assert "features.1.conv.0.weight" in keys  # pw expand even when exp == inp
    assert "features.2.conv.5.fc.0.weight" not in keys  # no SE
    assert "output_layer.1.weight" in keys and len(cnn.features) == 16


def test_landmark_cnn_channels_last_and_constant_guard():
    cnn = LandmarkCNN(8, 32, width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = cnn(x)
    cl = copy.deepcopy(cnn).to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), ref,
                               atol=1e-4, rtol=1e-4)
    out = normalize_landmarks(torch.zeros(2, 16), 112)
    assert torch.isfinite(out).all() and (out == 0).all()


# ----------------------------------------------------------------------------- attention
def manual_attention(att, x, scale):
    B, N, _ = x.shape
    q, k, v = att.to_qkv(x).chunk(3, dim=-1)
    sh = lambda t: t.view(B, N, att.heads, att.dim_head).transpose(1, 2)  # noqa: E731
    q, k, v = sh(q), sh(k), sh(v)
    a = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    return att.to_out((a @ v).transpose(1, 2).reshape(B, N, -1))


def test_attention_inner_width_and_scale():
    att = Attention(dim=24, heads=3, dim_head=16, scale="dim").eval()
    assert att.to_qkv.weight.shape == (3 * 48, 24) and att.to_qkv.bias is None
    assert att.to_out.weight.shape == (24, 48) and att.to_out.bias is not None
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(att(x), manual_attention(att, x, 24 ** -0.5), atol=1e-5, rtol=1e-5)
    att2 = Attention(dim=24, heads=3, dim_head=16, scale="dim_head").eval()
    att2.load_state_dict(att.state_dict())
    torch.testing.assert_close(att2(x), manual_attention(att, x, 16 ** -0.5), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(att(x), att2(x))
    with pytest.raises(ValueError, match="attn_scale"):
        Attention(8, 2, 4, scale="bogus")


# ----------------------------------------------------------------------------- Part fViT
def test_part_fvit_forward_and_stages(model):
    m = model
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    emb, lm = m(x, return_landmarks=True)
    assert emb.shape == (3, 32) and lm.shape == (3, 16, 2)
    tokens = m.embed_tokens(x, lm)
    torch.testing.assert_close(m.forward_tokens(tokens), emb)
    # the tokens are the op's output with the model's weights
    ref = ops.landmark_patch_embed(x, lm, m.patch_embed.weight, m.patch_embed.bias, patch_size=8)
    torch.testing.assert_close(tokens, ref)


def test_position_embedding_by_sequence_index(model):
    m = model
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    lm = m.predict_landmarks(x)
    index = torch.tensor([[5, 5, 0, 9], [1, 2, 3, 15]])
    tokens = m.embed_tokens(x, lm, index=index)
    assert tokens.shape == (2, 4, 32)
    # manual: CLS + first K+1 positions, regardless of which landmarks were picked
    h = torch.cat((m.cls_token.expand(2, -1, -1), tokens), 1) + m.pos_embedding[:, :5]
    expect = m.norm(m.transformer(h)[:, 0])
    torch.testing.assert_close(m(x, landmarks=lm, index=index), expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="position embeddings"):
        m.forward_tokens(torch.zeros(1, 17, 32))


def test_grid_landmarks_tile_the_image():
    g = grid_landmarks(16, 32)  # 4 x 4 grid, spacing 8 = P
    x = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(1, 3, 32, 32)
    patches = ops.landmark_patches(x, g[None], patch_size=8)  # (1, 16, 8*8*3)
    for n in range(16):
        a, b = divmod(n, 4)  # x-major order: x from a, y from b
        block = x[0, :, 8 * b:8 * b + 8, 8 * a:8 * a + 8]  # (C, y=j, x=i)
        expect = block.permute(2, 1, 0).reshape(-1)  # token[(i*P + j)*C + c]
        torch.testing.assert_close(patches[0, n], expect)
    m = tiny(landmarks="grid").eval()
    assert m.landmark_cnn is None
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 32)
    with pytest.raises(ValueError, match="square"):
        tiny(landmarks="grid", num_landmarks=15)


def test_end_to_end_gradient_reaches_landmark_cnn():
    m = tiny(dropout=0.0, emb_dropout=0.0, drop_path=0.0).train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m(x).pow(2).sum().backward()
    g = m.landmark_cnn.output_layer[1].weight.grad
    assert g is not None and g.abs().sum() > 0
    assert m.pos_embedding.grad.abs().sum() > 0


def test_part_fvit_rejects_bad_args():
    with pytest.raises(ValueError, match="landmarks"):
        tiny(landmarks="dense")
    with pytest.raises(ValueError, match="x must be"):
        tiny(landmarks="grid")(torch.zeros(2, 1, 32, 32))


# ----------------------------------------------------------------------------- heads
def test_cosface_logits_and_float32_under_autocast():
    head = CosFace(8, 5, s=64.0, m=0.4)
    emb = torch.randn(4, 8)
    y = torch.tensor([0, 1, 4, 2])
    cos = F.normalize(emb) @ F.normalize(head.weight).T
    expect = 64 * (cos - 0.4 * F.one_hot(y, 5))
    torch.testing.assert_close(head(emb, y), expect, atol=1e-4, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(emb.bfloat16(), y)
    assert out.dtype == torch.float32
    # soft (mixup) labels scale the margin
    soft = 0.7 * F.one_hot(y, 5) + 0.3 * F.one_hot(y.flip(0), 5)
    torch.testing.assert_close(head(emb, soft), 64 * (cos - 0.4 * soft), atol=1e-4, rtol=1e-5)


def test_arcface_margin_threshold_and_finite_grad():
    head = ArcFace(4, 3, s=10.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
    # theta = 60 deg for class 0: cos(60 + 28.6 deg)
    emb = torch.tensor([[math.cos(math.pi / 3), math.sin(math.pi / 3), 0.0, 0.0]])
    out = head(emb, torch.tensor([0]))
    torch.testing.assert_close(out[0, 0], torch.tensor(10 * math.cos(math.pi / 3 + 0.5)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 1], torch.tensor(10 * math.sin(math.pi / 3)), atol=1e-5, rtol=0)
    # theta + m > pi: target uses cos - sin(pi - m) * m (monotonic), not cos(theta + m)
    emb2 = torch.tensor([[-1.0, 0.05, 0.0, 0.0]])
    c = float(F.normalize(emb2)[0, 0])
    out2 = head(emb2, torch.tensor([0]))
    torch.testing.assert_close(out2[0, 0], torch.tensor(10 * (c - math.sin(math.pi - 0.5) * 0.5)), atol=1e-5, rtol=0)
    # exactly on the class centre: gradient stays finite
    e = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    F.cross_entropy(head(e, torch.tensor([0])), torch.tensor([0])).backward()
    assert torch.isfinite(e.grad).all()


def test_dino_head():
    h = DINOHead(16, 50, hidden_dim=32, bottleneck_dim=8)
    assert set(h.state_dict()) >= {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight",
                                   "last_layer.weight_g", "last_layer.weight_v"}
    out = h(torch.randn(3, 16))
    assert out.shape == (3, 50)
    assert not h.last_layer.weight_g.requires_grad and (h.last_layer.weight_g == 1).all()
    # weight-normed rows have norm g = 1: |logit| <= 1 for unit bottleneck input
    assert out.abs().max() <= 1 + 1e-5
    h.set_last_layer_trainable(False)
    assert not h.last_layer.weight_v.requires_grad
    h.set_last_layer_trainable(True)
    assert h.last_layer.weight_v.requires_grad and not h.last_layer.weight_g.requires_grad
    t = copy.deepcopy(h)
    torch.testing.assert_close(t(torch.ones(1, 16)), h(torch.ones(1, 16)))


# ----------------------------------------------------------------------------- registry
def count(m, cnn):
    c = sum(p.numel() for p in m.landmark_cnn.parameters())
    return (c if cnn else sum(p.numel() for p in m.parameters()) - c)


def test_registry_presets_and_errors():
    assert list_models() == ["part_fvit_b", "part_fvit_mini", "part_fvit_s", "part_fvit_tiny"]
    with torch.device("meta"):
        b = create_model("part_fvit_b")
        s = create_model("part_fvit_s")
    assert abs(count(b, False) - 64.08e6) < 0.05e6 and abs(count(b, True) - 2.87e6) < 0.05e6
    assert abs(count(s, False) - 10.79e6) < 0.05e6
    assert b.transformer.blocks[0].attn.to_qkv.weight.shape == (3 * 704, 768)
    t = create_model("part_fvit_tiny", landmarks="grid")
    assert t.num_landmarks == 49 and t.landmark_cnn is None
    with pytest.raises(ValueError, match="part_fvit_b"):
        create_model("vit_huge")


def test_fold_batchnorm_keeps_the_function():
    torch.manual_seed(0)
    cnn = LandmarkCNN(49, 112, width=0.5)
    for m in cnn.modules():  # non-trivial running statistics, as a trained CNN has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    cnn.eval()
    x = torch.rand(3, 3, 112, 112) * 2 - 1
    ref = cnn.raw(x)
    folded = copy.deepcopy(cnn).fold_batchnorm_()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # float32 rounding of w * gamma / sqrt(var + eps) over ~50 layers: ~1e-5 relative
    torch.testing.assert_close(folded.raw(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with pytest.raises(RuntimeError, match="eval mode"):
        LandmarkCNN(49, 112, width=0.5).fold_batchnorm_()


def test_unfused_attention_is_the_same_maths():
    torch.manual_seed(0)
    m = create_model("part_fvit_tiny", landmarks="grid").eval()
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    a = m(x)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    torch.testing.assert_close(m(x), a, rtol=1e-5, atol=1e-5)
