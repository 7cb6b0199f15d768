"""Part fViT: a ViT whose tokens are P x P patches sampled around landmarks (or a fixed grid).

Token layout and sampling are those of ``lafs_fast.ops.landmark_patch_embed`` (docs/method.md
section 2, verified against the authors' release); the backend (reference / C++ / CUDA / Triton)
is chosen by ``lafs_fast.ops``, never here.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from .landmark_cnn import LandmarkCNN
from .vit import Transformer

INIT_SCHEMES = ("timm", "release")


def grid_landmarks(num_landmarks: int, image_size: int) -> Tensor:
    """(N, 2) fixed grid (plain fViT baseline), G = sqrt(N) points per side.

    Cell centres are (i + 0.5) * S / G in continuous pixel-edge coordinates; the sampling
    convention reads taps at lx + t - P/2 - 0.5 (pixel k's centre at coordinate k), so the
    landmark is placed at (i + 0.5) * S / G + 0.5: with S / G == P (14 x 14 grid, P = 8, S = 112)
    the taps land exactly on pixel centres i*P .. i*P + P - 1 and the patches tile the image.
    (The release's ``use_standcoord`` used 8i + 4, i.e. half a pixel off, blending neighbours.)
    Order: x-major (token a*G + b has x from a, y from b), the landmark path's layout. The release's
    grid path transposes its patch mosaic after sampling (ViT_face.py:748), ending y-major: these
    tokens are the release's grid tokens of the transposed image (docs/release.md, note 2).
    """
    g = int(round(math.sqrt(num_landmarks)))
    if g * g != num_landmarks:
        raise ValueError(f"landmarks='grid' needs a square num_landmarks, got {num_landmarks}")
    c = (torch.arange(g, dtype=torch.float32) + 0.5) * (image_size / g) + 0.5
    gx, gy = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((gx, gy), dim=-1).reshape(-1, 2)


class PartFViT(nn.Module):
    """Part fViT. Input (B, 3, S, S) in [-1, 1]; output the (B, dim) face embedding (final
    LayerNorm of the CLS token). ``config`` holds the constructor kwargs (for checkpoints)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 num_landmarks: int = 196, patch_size: int = 8, image_size: int = 112,
                 channels: int = 3, dropout: float = 0.1, emb_dropout: float = 0.1,
                 drop_path: float = 0.1, attn_scale: Union[str, float] = "dim",
                 landmarks: str = "cnn", cnn_width: float = 1.0):
        super().__init__()
        if landmarks not in ("cnn", "grid"):
            raise ValueError(f"landmarks must be 'cnn' or 'grid', got {landmarks!r}")
        for name, v in (("dim", dim), ("num_landmarks", num_landmarks), ("patch_size", patch_size),
                        ("image_size", image_size), ("channels", channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.config: dict[str, Any] = dict(
            dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_dim=mlp_dim,
            num_landmarks=num_landmarks, patch_size=patch_size, image_size=image_size,
            channels=channels, dropout=dropout, emb_dropout=emb_dropout, drop_path=drop_path,
            attn_scale=attn_scale, landmarks=landmarks, cnn_width=cnn_width)
        self.dim, self.num_landmarks = dim, num_landmarks
        self.patch_size, self.image_size, self.channels = patch_size, image_size, channels
        self.landmark_mode = landmarks
        if landmarks == "cnn":
            self.landmark_cnn: Optional[LandmarkCNN] = LandmarkCNN(
                num_landmarks, image_size, width=cnn_width, in_channels=channels)
        else:
            self.landmark_cnn = None
            self.register_buffer("grid", grid_landmarks(num_landmarks, image_size), persistent=False)
        self.patch_embed = nn.Linear(patch_size * patch_size * channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_landmarks + 1, dim))
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, drop_path,
                                       attn_scale)
        self.norm = nn.LayerNorm(dim)
        self._init_vit()

    def init_weights(self, scheme: str = "timm") -> "PartFViT":
        """Re-initialise every parameter. "timm" (the constructor's): trunc-normal 0.02 Linears,
        tokens and positions. "release": the authors' (face_pre_pro/ViT_face.py:611-613 and
        nothing after): pos_embedding and cls_token ~ N(0, 1), PyTorch's default Linear and
        LayerNorm init, and the landmark CNN's output layer at PyTorch's default too."""
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
        if self.landmark_cnn is not None:
            self.landmark_cnn.reset_parameters(scheme)
        if scheme == "timm":
            self._init_vit()
            return self
        for m in [self.patch_embed, self.transformer, self.norm]:
            for mod in m.modules():
                if isinstance(mod, (nn.Linear, nn.LayerNorm)):
                    mod.reset_parameters()
        nn.init.normal_(self.cls_token)
        nn.init.normal_(self.pos_embedding)
        return self

    def _init_vit(self) -> None:
        """timm-style init for the ViT part (the landmark CNN keeps its MobileNet init)."""
        for m in [self.patch_embed, self.transformer, self.norm]:
            for mod in m.modules():
                if isinstance(mod, nn.Linear):
                    nn.init.trunc_normal_(mod.weight, std=0.02)
                    if mod.bias is not None:
                        nn.init.zeros_(mod.bias)
                elif isinstance(mod, nn.LayerNorm):
                    nn.init.ones_(mod.weight)
                    nn.init.zeros_(mod.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)

    # ------------------------------------------------------------------ stages
    def predict_landmarks(self, x: Tensor) -> Tensor:
        """(B, N, 2) pixel (x, y) landmarks of images in [-1, 1] (the grid when landmarks='grid')."""
        if self.landmark_cnn is None:
            return self.grid.to(dtype=torch.float32)[None].expand(x.shape[0], -1, -1)
        return self.landmark_cnn(x)

    def embed_tokens(self, x: Tensor, landmarks: Tensor, index: Optional[Tensor] = None,
                     perturb_std: float = 0.0, seed: Optional[int] = None) -> Tensor:
        """(B, K, dim) tokens: patches around the (indexed, perturbed) landmarks times patch_embed."""
        w = self.patch_embed.weight
        if x.dtype != w.dtype:
            x = x.to(w.dtype)  # the op wants images and weights in one dtype
        return ops.landmark_patch_embed(x, landmarks, w, self.patch_embed.bias,
                                        patch_size=self.patch_size, index=index,
                                        perturb_std=perturb_std, seed=seed)

    def forward_tokens(self, tokens: Tensor) -> Tensor:
        """Transformer part: tokens (B, K, dim), K <= N -> (B, dim) embedding. Token k gets
        position k + 1 (sequence index, not landmark identity), CLS position 0."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens must be (B, K, {self.dim}), got {tuple(tokens.shape)}")
        B, K, _ = tokens.shape
        if K > self.num_landmarks:
            raise ValueError(f"tokens has K={K} slots but the model has {self.num_landmarks} "
                             "position embeddings")
        cls = self.cls_token.expand(B, -1, -1).to(tokens.dtype)
        h = torch.cat((cls, tokens), dim=1) + self.pos_embedding[:, :K + 1].to(tokens.dtype)
        h = self.transformer(self.emb_dropout(h))
        return self.norm(h[:, 0])

    def forward(self, x: Tensor, landmarks: Optional[Tensor] = None, index: Optional[Tensor] = None,
                perturb_std: float = 0.0, seed: Optional[int] = None,
                return_landmarks: bool = False):
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W), got {tuple(x.shape)}")
        S = self.image_size  # the landmark CNN and the grid place landmarks in S x S pixels
        if landmarks is None and tuple(x.shape[-2:]) != (S, S):
            raise ValueError(f"this model embeds {S} x {S} faces, got {x.shape[-2]} x {x.shape[-1]} images "
                             f"{tuple(x.shape)}: resize (or align and crop) them to {S} x {S} first")
        if landmarks is None:
            landmarks = self.predict_landmarks(x)
        emb = self.forward_tokens(self.embed_tokens(x, landmarks, index, perturb_std, seed))
        return (emb, landmarks) if return_landmarks else emb

    def vit_parameters(self):
        """Parameters of everything but the landmark CNN (for separate optimiser groups)."""
        return [p for n, p in self.named_parameters() if not n.startswith("landmark_cnn.")]
