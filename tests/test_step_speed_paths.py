"""Speed paths of the pretraining step that must not change its maths: attention under bf16
autocast on CPU takes the explicit matmul path (SDPA's CPU flash kernel is slow in bf16) and
agrees with float32 SDPA to bf16 rounding; float32 keeps SDPA."""
import torch
import torch.nn.functional as F

from lafs_fast.models.vit import Attention


def _count_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_attention_bf16_on_cpu_is_explicit_and_matches_float32(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(192, heads=3, dim_head=64).eval()
    x = torch.randn(4, 37, 192)
    calls = _count_sdpa(monkeypatch)
    ref = attn(x)
    assert len(calls) == 1  # float32: SDPA, as before
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn(xb)
    assert len(calls) == 1, "bf16 on CPU must not call SDPA"
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, atol=3e-2, rtol=3e-2)
    # gradients flow through the explicit path and agree with float32's
    got.float().sum().backward()
    xr = x.clone().requires_grad_()
    attn(xr).sum().backward()
    cos = F.cosine_similarity(xb.grad.flatten(), xr.grad.flatten(), dim=0)
    assert cos > 0.999, cos


def test_attention_bf16_explicit_path_honours_attn_dropout():
    torch.manual_seed(0)
    attn = Attention(64, heads=2, dim_head=32, attn_dropout=0.5).train()
    x = torch.randn(2, 9, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = attn(x), attn(x)
    assert not torch.equal(a, b)  # dropout on the attention weights is drawn each call
    attn.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(attn(x), attn(x))
