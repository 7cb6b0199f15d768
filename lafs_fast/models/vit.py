"""Transformer pieces of Part fViT: attention (inner width may differ from dim), the MLP, pre-LN
blocks."""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn


def attention_scale(scale: Union[str, float], dim: int, dim_head: int) -> float:
    """"dim" -> dim ** -0.5 (the release: 768 ** -0.5), "dim_head" -> dim_head ** -0.5 (standard)."""
    if scale == "dim":
        return dim ** -0.5
    if scale == "dim_head":
        return dim_head ** -0.5
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        return float(scale)
    raise ValueError(f"attn_scale must be 'dim', 'dim_head' or a positive float, got {scale!r}")


def linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x). Under torch.compile the GEMM runs without its bias and the bias is added as
    elementwise work, which inductor fuses into the loop that follows (GELU, the residual add):
    addmm would first copy the bias into its whole output, ~4 % of the float32 eval forward's
    GEMM time (bench/embed_throughput_cpu1.md)."""
    if layer.bias is None or not torch.compiler.is_compiling():
        return layer(x)
    out = torch.matmul(x, layer.weight.t())   # under autocast: bf16, as layer(x) would be
    return out + layer.bias.to(out.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with inner width heads * dim_head (704 != 768 in the release).
    qkv is one bias-free Linear laid out [q | k | v], each (heads, dim_head), as released."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 attn_dropout: float = 0.0, scale: Union[str, float] = "dim"):
        super().__init__()
        if heads < 1 or dim_head < 1:
            raise ValueError(f"heads and dim_head must be >= 1, got {heads}, {dim_head}")
        self.heads, self.dim_head = heads, dim_head
        inner = heads * dim_head
        self.scale = attention_scale(scale, dim, dim_head)
        self.attn_dropout = attn_dropout
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)
        # False: the release's explicit softmax(q k^T) v (same maths; benchmarks' original step)
        self.fused_attn = True

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        qkv = self.to_qkv(x).view(B, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.attn_dropout if self.training else 0.0
        # On CPU in bf16/fp16 (autocast), SDPA's flash kernel is 2-6x slower than two oneDNN
        # matmuls at these sizes (N 37-197, dim_head 64; measured fwd+bwd), so take the explicit
        # path there; float32 keeps SDPA (faster at N=197, and the numerics stay as they were).
        if self.fused_attn and not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        else:
            attn = F.dropout((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1), p)
            out = attn @ v
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.dim_head)
        return self.proj_drop(linear(self.to_out, out))


class Mlp(nn.Module):
    """Linear, GELU (erf), Dropout, Linear, Dropout: the release's FeedForward, with timm Mlp's
    names (fc1, act, drop1, fc2, drop2; the same state-dict keys), its Linears through `linear`
    (the biases fused by inductor when the block is compiled)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop1(self.act(linear(self.fc1, x)))
        return self.drop2(linear(self.fc2, h))


class Block(nn.Module):
    """x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0,
                 drop_path: float = 0.0, attn_scale: Union[str, float] = "dim",
                 attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout, attn_dropout, attn_scale)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of pre-LN blocks (no final norm: Part fViT applies it to the CLS token only).
    drop_path is the same on every block, as in the release (0.1)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float = 0.0, drop_path: float = 0.0,
                 attn_scale: Union[str, float] = "dim", attn_dropout: float = 0.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(
            Block(dim, heads, dim_head, mlp_dim, dropout, drop_path, attn_scale, attn_dropout)
            for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x
