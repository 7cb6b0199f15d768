"""Classification margins (CosFace, ArcFace) and the DINO projection head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .precision import float32_region


def _target_mask(labels: Tensor, logits: Tensor) -> Tensor:
    """Integer labels (B,) -> one-hot float mask; soft/one-hot labels (B, C) (mixup) pass through."""
    if labels.dim() == 1:
        return F.one_hot(labels.long(), logits.shape[1]).to(logits.dtype)
    if labels.shape != logits.shape:
        raise ValueError(f"labels must be (B,) or (B, {logits.shape[1]}), got {tuple(labels.shape)}")
    return labels.to(logits.dtype)


class _MarginHead(nn.Module):
    def __init__(self, embedding_dim: int, num_classes: int, s: float, m: float):
        super().__init__()
        if embedding_dim < 1 or num_classes < 1:
            raise ValueError(f"embedding_dim and num_classes must be >= 1, got "
                             f"{embedding_dim}, {num_classes}")
        self.embedding_dim, self.num_classes, self.s, self.m = embedding_dim, num_classes, s, m
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, emb: Tensor) -> Tensor:
        # float32 always: under bf16/fp16 autocast cos near +-1 and s=64 logits lose too much.
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return F.linear(F.normalize(emb.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def extra_repr(self) -> str:
        return f"{self.embedding_dim} -> {self.num_classes}, s={self.s}, m={self.m}"


class CosFace(_MarginHead):
    """logits = s * (cos - m * target): Wang et al. 2018; soft targets scale the margin (mixup)."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.4):
        super().__init__(embedding_dim, num_classes, s, m)

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(emb)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.margin_logits(cos, _target_mask(labels, cos))

    def margin_logits(self, cos: Tensor, t: Tensor) -> Tensor:
        """Logits from cosines and a target mask t of the same shape (1 at the label, soft under
        mixup); the one place of the CosFace maths (Partial FC calls it on its shard)."""
        return self.s * (cos - self.m * t)


class ArcFace(_MarginHead):
    """logits = s * cos(theta + m) at the target (insightface): when theta + m would pass pi
    (cos <= cos(pi - m)) the target uses cos - sin(pi - m) * m instead, keeping it monotonic;
    easy_margin applies the margin only where cos > 0."""

    def __init__(self, embedding_dim: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 easy_margin: bool = False):
        super().__init__(embedding_dim, num_classes, s, m)
        self.easy_margin = easy_margin
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.th = math.cos(math.pi - m)
        self.mm = math.sin(math.pi - m) * m

    def forward(self, emb: Tensor, labels: Tensor) -> Tensor:
        cos = self.cosine(emb)
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.margin_logits(cos, _target_mask(labels, cos))

    def margin_logits(self, cos: Tensor, t: Tensor) -> Tensor:
        """Logits from cosines and a target mask t (see CosFace.margin_logits)."""
        # clamp keeps sqrt's gradient finite at |cos| = 1
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=1e-7))
        phi = cos * self.cos_m - sin * self.sin_m
        if self.easy_margin:
            phi = torch.where(cos > 0, phi, cos)
        else:
            phi = torch.where(cos > self.th, phi, cos - self.mm)
        return self.s * (t * phi + (1.0 - t) * cos)


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| per output row; keys ``weight_g`` (out, 1) and
    ``weight_v`` (out, in) as torch's legacy weight_norm (so DINO checkpoints load). Explicit
    rather than a parametrization: deepcopy (EMA teacher) and torch.compile stay simple."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.trunc_normal_(v, std=0.02)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP in_dim -> hidden -> hidden -> bottleneck (GELU), L2-normalise, weight-normed
    Linear(bottleneck, out_dim) without bias. Keys ``mlp.{0,2,4}``, ``last_layer.weight_{g,v}``
    as in DINO. norm_last_layer fixes the gain g to 1 (not trainable). The L2 normalisation and the
    last layer run in float32 under autocast (float32 logits) unless float32_last_layer is False."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Sequential(nn.Linear(in_dim, bottleneck_dim))
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.norm_last_layer = norm_last_layer
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)
        # False: the normalisation and the last layer follow autocast (bf16/fp16 logits)
        self.float32_last_layer = True

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        if not self.float32_last_layer:
            return self.last_layer(F.normalize(x, dim=-1, p=2))
        # The logits are cosines that DINO's teacher softmax divides by 0.04: bf16 values just
        # below 1 are 2^-8 apart (fp16: 2^-11), steps of ~0.1 (fp16: ~0.012) in that exponent.
        # The cost is one (rows x bottleneck x K) GEMM in float32 (docs/precision.md).
        with float32_region(x.device.type):
            return self.last_layer(F.normalize(x.float(), dim=-1, p=2))

    def set_last_layer_trainable(self, trainable: bool) -> None:
        """Freeze (epoch 0 of DINO) or unfreeze the last layer; the gain stays fixed when
        norm_last_layer."""
        self.last_layer.weight_v.requires_grad_(trainable)
        self.last_layer.weight_g.requires_grad_(trainable and not self.norm_last_layer)
