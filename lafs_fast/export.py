"""ONNX export of a Part fViT with its landmark CNN, for serving.

    python -m lafs_fast.export --checkpoint runs/pipeline/3_finetune/model.pt --out model.onnx

The graph: image (B, 3, S, S) float32 in [-1, 1] (uint8 RGB / 127.5 - 1) -> landmark CNN ->
patches around the landmarks by ONE grid_sample (plain PyTorch, no lafs_fast custom op) ->
patch embedding -> transformer -> "embedding" (B, dim), not normalised (L2-normalise, and add the
flipped image's embedding first if you want evaluation's flip-sum). With --landmarks-output the
graph also returns "landmarks" (B, N, 2) in pixels. The batch axis is dynamic. opset >= 16 (the
first with GridSample).

Patch convention (reference.py): token[(i*P + j)*C + c] = bilinear(I[c], lx + i - P/2 - 0.5,
ly + j - P/2 - 0.5), pixel k's centre at k, zero outside: grid_sample with align_corners=False
and zero padding at x_norm = (2x + 1) / W - 1. Landmarks that are not finite (not produced by a
trained CNN) are not special-cased here, unlike the training op.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cli, config
from ._extras import require_extra
from .models.part_fvit import PartFViT
from .reference import patch_offsets


def grid_sample_patches(images: Tensor, landmarks: Tensor, patch_size: int) -> Tensor:
    """(B, N, P*P*C) patches in the token layout with one grid_sample: the sampling grid is
    (B, N, P*P, 2), output row n is landmark n, column i*P + j is tap (i along x, j along y)."""
    B, C, H, W = images.shape
    P = patch_size
    off = patch_offsets(P, landmarks.dtype, landmarks.device)
    ox = off[:, None].expand(P, P).reshape(P * P)  # column i*P + j -> offset i (x)
    oy = off[None, :].expand(P, P).reshape(P * P)  # -> offset j (y)
    px = landmarks[..., 0:1] + ox  # (B, N, P*P)
    py = landmarks[..., 1:2] + oy
    grid = torch.stack(((2 * px + 1) / W - 1, (2 * py + 1) / H - 1), dim=-1)
    s = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros",
                      align_corners=False)  # (B, C, N, P*P)
    return s.permute(0, 2, 3, 1).reshape(B, landmarks.shape[1], P * P * C)


class ExportablePartFViT(nn.Module):
    """PartFViT's inference forward with the patch op replaced by grid_sample_patches (the same
    function: tests/test_embed_export.py checks it against the model)."""

    def __init__(self, model: PartFViT, return_landmarks: bool = False):
        super().__init__()
        self.model = model.eval()
        self.return_landmarks = return_landmarks

    def forward(self, x: Tensor):
        m = self.model
        lm = m.predict_landmarks(x)
        patches = grid_sample_patches(x, lm, m.patch_size)
        emb = m.forward_tokens(m.patch_embed(patches))
        return (emb, lm) if self.return_landmarks else emb


def export_onnx(model: PartFViT, out: str, opset: int = 17, return_landmarks: bool = False,
                example_batch: int = 2) -> str:
    """Write `out` (an .onnx file); returns its path."""
    if opset < 16:
        raise ValueError(f"--opset must be >= 16 (GridSample), got {opset}")
    require_extra("onnx", "onnx", "ONNX export")
    wrapped = ExportablePartFViT(model.float().cpu(), return_landmarks).eval()
    S = model.image_size
    x = torch.zeros(example_batch, model.channels, S, S).uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    outputs = ["embedding", "landmarks"] if return_landmarks else ["embedding"]
    axes = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        # Expected and harmless here: the exporter's notice that it is the TorchScript one, and the
        # tracer's note that the model's shape checks are constants of the trace.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        # the TorchScript exporter (dynamo=False): no onnxscript needed, and it handles SDPA
        torch.onnx.export(wrapped, (x,), out, input_names=["image"], output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    return out


PROG = "python -m lafs_fast.export"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=config.SwitchHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="lafs_fast model file or official release checkpoint")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16)")
    p.add_argument("--landmark-cnn", default=None, help="release checkpoint whose landmark CNN completes "
                                                        "a LAFS / DINO backbone")
    config.add_bool_argument(p, "landmarks_output", False, "also output the (B, N, 2) landmarks")
    config.add_bool_argument(p, "check", False, "run the file in onnxruntime and compare with PyTorch "
                                                "(onnxruntime: the onnx extra)")
    return p


def check_arguments(a: argparse.Namespace) -> None:
    """Bad usage found before any work (nothing is written)."""
    if not os.path.isfile(a.checkpoint):
        raise cli.UsageError(f"--checkpoint: no such file {a.checkpoint!r}",
                             "give the model.pt a training run wrote, or a release checkpoint")
    if a.landmark_cnn and not os.path.isfile(a.landmark_cnn):
        raise cli.UsageError(f"--landmark-cnn: no such file {a.landmark_cnn!r}", "give a release checkpoint")
    if a.opset < 16:
        raise cli.UsageError(f"--opset must be >= 16, got {a.opset}", "GridSample, which the graph uses, "
                                                                      "needs opset 16; the default is 17")
    folder = os.path.dirname(os.path.abspath(a.out))
    if os.path.isdir(a.out) or not os.path.isdir(folder):
        what = "is a directory" if os.path.isdir(a.out) else f"folder {folder!r} does not exist"
        raise cli.UsageError(f"--out {a.out!r}: {what}", "give a file path such as model.onnx in an existing folder")


def run(a: argparse.Namespace) -> int:
    check_arguments(a)
    require_extra("onnx", "onnx", "ONNX export")  # torch.onnx writes the file through it
    if a.check:
        require_extra("onnxruntime", "onnx", "--check")
    from .checkpoint import CheckpointError
    from .convert import load_any_model
    try:
        model = load_any_model(a.checkpoint, a.landmark_cnn)
    except (CheckpointError, ValueError) as e:
        raise cli.UsageError(str(e)) from None
    except OSError as e:
        raise cli.UsageError(f"cannot read {a.checkpoint}: {e.strerror or e}", "check its permissions") from None
    # Written beside the target and renamed: a failed export leaves no partial file behind.
    partial = f"{a.out}.partial-{os.getpid()}"
    try:
        export_onnx(model, partial, a.opset, a.landmarks_output)
        os.replace(partial, a.out)
    except OSError as e:
        raise cli.RunError(f"could not write {a.out}: {e.strerror or e}", "check the free space and "
                                                                          "permissions of its folder") from None
    except Exception as e:  # the exporter's own errors (an op it cannot convert)
        raise cli.RunError(f"ONNX export of {a.checkpoint} failed: {type(e).__name__}: {e}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    S = model.image_size
    msg = f"wrote {a.out}: image (batch, {model.channels}, {S}, {S}) -> embedding (batch, {model.dim})"
    if a.check:
        try:
            diff = check_onnx(model, a.out)
        except Exception as e:  # onnxruntime cannot load or run the file
            raise cli.RunError(f"wrote {a.out}, but onnxruntime could not run it: {type(e).__name__}: {e}") from None
        msg += f"; onnxruntime vs PyTorch: max abs difference {diff:.2e}"
    print(msg)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    return cli.run(PROG, run, a)


def check_onnx(model: PartFViT, path: str, batch: int = 3) -> float:
    """Max |onnxruntime - PyTorch| of the embeddings of `batch` random images."""
    import numpy as np
    import onnxruntime as ort
    S = model.image_size
    x = torch.rand(batch, model.channels, S, S, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"image": x.numpy()})[0]
    return float(np.abs(got - ref).max())


if __name__ == "__main__":
    sys.exit(main())
