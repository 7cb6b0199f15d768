"""Landmark CNN of Part fViT: a MobileNetV3-Large trunk regressing N (x, y) landmarks.

Submodule names follow the authors' release so that its state dict maps by prefix only:
release ``stn.features.*`` -> ``features.*`` and ``output_layer.*`` -> ``output_layer.*``
(``features[0]`` = stem conv/BN/h-swish, ``features[1..15]`` = bottlenecks whose ``conv`` is a
9-slot Sequential: pw conv, BN, act, dw conv, BN, SE-or-Identity, act, pw-linear conv, BN).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from .precision import float32_region

# k, exp, out, se, nonlinearity, stride -- the 15 standard MobileNetV3-Large bottlenecks.
MOBILENETV3_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Round channels UP to a multiple of 8 (the release rounds with ceil, not to nearest)."""
    return int(math.ceil(x / divisor) * divisor)


class SqueezeExcite(nn.Module):
    """SE with Linear layers (no bias) and a hard sigmoid; keys ``fc.0`` / ``fc.2`` as released."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Hardsigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        # mean over H, W works for both contiguous and channels_last inputs.
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class Bottleneck(nn.Module):
    """Inverted residual; SE sits after the depthwise conv + BN and before the nonlinearity."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, exp: int, se: bool, nl: str):
        super().__init__()
        act = nn.ReLU if nl == "RE" else nn.Hardswish
        self.use_residual = stride == 1 and inp == out
        self.conv = nn.Sequential(
            nn.Conv2d(inp, exp, 1, 1, 0, bias=False),
            nn.BatchNorm2d(exp),
            act(inplace=True),
            nn.Conv2d(exp, exp, kernel, stride, (kernel - 1) // 2, groups=exp, bias=False),
            nn.BatchNorm2d(exp),
            SqueezeExcite(exp) if se else nn.Identity(),
            act(inplace=True),
            nn.Conv2d(exp, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def normalize_landmarks(raw: Tensor, image_size: int, eps: float = 1e-12) -> Tensor:
    """(B, 2N) raw outputs -> (B, N, 2) pixels: ONE min and ONE max per sample over x and y
    together, scaled to [0, S - 1]. eps only guards an exactly constant output (the release
    divides by 0); it is tiny because a fresh model in eval mode has ranges of ~1e-9."""
    lo = raw.amin(dim=1, keepdim=True)
    hi = raw.amax(dim=1, keepdim=True)
    theta = (raw - lo) / (hi - lo).clamp_min(eps) * (image_size - 1)
    return theta.view(raw.shape[0], -1, 2)


class LandmarkCNN(nn.Module):
    """MobileNetV3-Large trunk (no 960/1280 head) -> GAP -> Dropout(0.5) -> Linear(160, 2N).

    Input: (B, 3, S, S) in [-1, 1] (contiguous or channels_last). Output: (B, N, 2) pixel (x, y),
    [..., 0] along the width. ``width`` scales every channel count (1.0 = the release).
    """

    def __init__(self, num_landmarks: int = 196, image_size: int = 112, width: float = 1.0,
                 in_channels: int = 3, dropout: float = 0.5):
        super().__init__()
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.num_landmarks = num_landmarks
        self.image_size = image_size
        stem = make_divisible(16 * width)
        layers: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem),
            nn.Hardswish(inplace=True))]
        c = stem
        for k, exp, out, se, nl, s in MOBILENETV3_LARGE:
            o = make_divisible(out * width)
            layers.append(Bottleneck(c, o, k, s, make_divisible(exp * width), se, nl))
            c = o
        self.features = nn.Sequential(*layers)
        self.out_channels = c
        self.output_layer = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, 2 * num_landmarks))
        # True: the trunk too runs in float32 under autocast (freeze_ sets it for a frozen source)
        self.float32 = False
        self.reset_parameters()
        # Channels-last convolutions run ~1.8x faster on CPU (oneDNN) and suit tensor cores.
        self.to(memory_format=torch.channels_last)

    def reset_parameters(self, scheme: str = "timm") -> None:
        """The trunk always gets the release's MobileNet init (face_pre_pro/mobilenet.py:315-328:
        kaiming fan_out convs, unit BN, N(0, 0.01) for the SE linears). The output layer: N(0, 0.01),
        bias 0 under "timm" (lafs_fast's default, a choice of this project); PyTorch's default
        Linear init under "release", because the release builds it outside the MobileNet
        (ViT_face.py:599-602) where that init never reaches it."""
        if scheme not in ("timm", "release"):
            raise ValueError(f"init scheme must be 'timm' or 'release', got {scheme!r}")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if scheme == "release":
            self.output_layer[1].reset_parameters()

    def raw(self, x: Tensor) -> Tensor:
        """The un-normalised (B, 2N) regression output."""
        x = x.contiguous(memory_format=torch.channels_last)
        trunk = float32_region(x.device.type) if self.float32 else contextlib.nullcontext()
        with trunk:
            feats = self.features(x.float() if self.float32 else x).mean(dim=(2, 3))
        # The head runs in its weights' dtype (float32) even under autocast: a bf16 output would
        # quantise the landmarks by up to ~1 px at 112 px after the min-max normalisation. It is
        # one small Linear (C x 2N), so the cost is nil.
        with float32_region(x.device.type):
            return self.output_layer(feats.to(self.output_layer[-1].weight.dtype))

    def freeze_(self) -> "LandmarkCNN":
        """This CNN as a frozen landmark source (LAFS pretraining): eval mode, no gradients,
        BatchNorm folded, and float32 under autocast as the release runs it (its CNN call sits
        outside autocast, lafs_train.py:535-565): bf16 would move its landmarks by more than
        0.05 px on average (docs/precision.md)."""
        self.eval().requires_grad_(False).fold_batchnorm_()
        self.float32 = True
        return self

    @torch.no_grad()
    def fold_batchnorm_(self) -> "LandmarkCNN":
        """Fold every BatchNorm into the convolution before it (a frozen CNN in eval mode: the
        same function up to float rounding, ~1e-6 relative, and one pass less per layer).
        Irreversible: only for a frozen copy (LAFS pretraining's landmark source)."""
        if self.training:
            raise RuntimeError("fold_batchnorm_ needs eval mode (BatchNorm uses its running stats)")
        from torch.nn.utils.fusion import fuse_conv_bn_eval
        for seq in [m for m in self.modules() if isinstance(m, nn.Sequential)]:
            mods = list(seq)
            for i in range(len(mods) - 1):
                if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                    seq[i] = fuse_conv_bn_eval(mods[i], mods[i + 1])
                    seq[i + 1] = nn.Identity()
        return self.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        return normalize_landmarks(self.raw(x).float(), self.image_size)
