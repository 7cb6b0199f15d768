"""Checkpoints: atomic save / checked load, and loading the LAFS authors' released weights.

Release key layout (github szlbiubiubiu/LAFS_CVPR2024, face_pre_pro/ViT_face.py and
mobilenet.py), after stripping DDP / DINO prefixes (``module.``, ``backbone.``, ``encoder.``):
  stn.features.{0..15}.*            MobileNetV3 trunk            -> landmark_cnn.features.*
  output_layer.1.{weight,bias}      Linear(160, 2N)              -> landmark_cnn.output_layer.1.*
  patch_to_embedding.*              Linear(P*P*C, dim)           -> patch_embed.*
  cls_token, pos_embedding                                       -> same names
  transformer.layers.{i}.0.fn.norm.*          (Residual(PreNorm(Attention)))  -> blocks.{i}.norm1.*
  transformer.layers.{i}.0.fn.fn.to_qkv.weight                  -> blocks.{i}.attn.to_qkv.weight
  transformer.layers.{i}.0.fn.fn.to_out.0.*                     -> blocks.{i}.attn.to_out.*
  transformer.layers.{i}.1.fn.norm.*          (Residual(PreNorm(FeedForward))) -> blocks.{i}.norm2.*
  transformer.layers.{i}.1.fn.fn.net.{0,3}.*                    -> blocks.{i}.mlp.fc{1,2}.*
  mlp_head.0.*                      final LayerNorm              -> norm.*
  dropped: loss.* (CosFace classifier), head.* (DINO head), *dummy_orthogonal_classifier*
"""
from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from .models.part_fvit import PartFViT


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash
    leaves either the old file or the new one, never a torn one."""
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # e.g. a path under a regular file
        raise OSError(e.errno, f"cannot create the folder of checkpoint {path}: {e.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _numpy_state_globals() -> list:
    """What an older training checkpoint's numpy random state (a uint32 array) unpickles through,
    so that `--resume`, `--landmark-init` and `--init` accept a step-*.pt written before the states
    were stored as plain lists: plain arrays and dtypes only, no arbitrary code."""
    import numpy as np
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _read_error(path: str, e: Exception) -> CheckpointError:
    """One line for a file torch.load could not read: a pickle that would call code it is not
    allowed to (refused: nothing of it ran), or a truncated / corrupt file."""
    text = str(e)
    refused = _REFUSED_GLOBAL.search(text) if "Weights only load failed" in text else None
    if refused:
        return CheckpointError(f"cannot read checkpoint {path}: refused, loading it would call "
                               f"{refused.group(1)} (code, not data: lafs_fast and release checkpoints "
                               "hold only tensors and plain values)")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return CheckpointError(f"cannot read checkpoint {path} ({os.path.getsize(path)} bytes): it is truncated, "
                           f"corrupt or not a torch checkpoint ({type(e).__name__}: {first})")


def load_checkpoint(path: str, map_location: Any = "cpu") -> dict:
    """torch.load with weights_only=True (argparse.Namespace allowed: DINO saves its args; numpy
    arrays: older training checkpoints' random states); a clear one-line CheckpointError for
    missing, truncated or corrupt files and for a pickle that would run code."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_state_globals()]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise _read_error(path, e) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


# ----------------------------------------------------------------------------- official release
_PREFIXES = ("module.", "backbone.", "encoder.")
_DROP = (re.compile(r"^loss\."), re.compile(r"^head\."), re.compile(r"dummy_orthogonal_classifier"),
         re.compile(r"^fc\."))
_RULES = [
    (re.compile(r"^stn\.features\.(.*)$"), r"landmark_cnn.features.\1"),
    (re.compile(r"^output_layer\.(.*)$"), r"landmark_cnn.output_layer.\1"),
    (re.compile(r"^patch_to_embedding\.(.*)$"), r"patch_embed.\1"),
    (re.compile(r"^(cls_token|pos_embedding)$"), r"\1"),
    (re.compile(r"^transformer\.layers\.(\d+)\.0\.fn\.norm\.(.*)$"), r"transformer.blocks.\1.norm1.\2"),
    (re.compile(r"^transformer\.layers\.(\d+)\.0\.fn\.fn\.to_qkv\.(.*)$"), r"transformer.blocks.\1.attn.to_qkv.\2"),
    (re.compile(r"^transformer\.layers\.(\d+)\.0\.fn\.fn\.to_out\.0\.(.*)$"), r"transformer.blocks.\1.attn.to_out.\2"),
    (re.compile(r"^transformer\.layers\.(\d+)\.1\.fn\.norm\.(.*)$"), r"transformer.blocks.\1.norm2.\2"),
    (re.compile(r"^transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.0\.(.*)$"), r"transformer.blocks.\1.mlp.fc1.\2"),
    (re.compile(r"^transformer\.layers\.(\d+)\.1\.fn\.fn\.net\.3\.(.*)$"), r"transformer.blocks.\1.mlp.fc2.\2"),
    (re.compile(r"^mlp_head\.0\.(.*)$"), r"norm.\1"),
]


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _official_state_dict(obj: dict, what: str) -> dict[str, Tensor]:
    """The backbone state dict of a release checkpoint: a plain state dict, or a DINO dict
    (teacher preferred: finetuning starts from it), prefixes stripped."""
    if str(obj.get("format", "")).startswith("lafs_fast."):
        raise CheckpointError(f"{what} is already in lafs_fast format ({obj['format']}), not a release "
                              "checkpoint: load it with lafs_fast.convert.load_model")
    if "teacher" in obj or "student" in obj:
        sd = obj.get("teacher") or obj["student"]
    elif isinstance(obj.get("model"), dict):
        sd = obj["model"]
    elif isinstance(obj.get("state_dict"), dict):
        sd = obj["state_dict"]
    else:
        sd = obj
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{what}: entry {k!r} is a {type(v).__name__}, not a tensor: "
                                  "not a LAFS / Part fViT checkpoint")
        out[_strip(k)] = v
    return out


def map_official_keys(sd: dict[str, Tensor], what: str = "checkpoint") -> dict[str, Tensor]:
    """Release names -> lafs_fast names (dropping heads and classifiers)."""
    if any(k.startswith("global_token.") for k in sd):
        raise CheckpointError(f"{what} is the release's 'global token' variant (CLS replaced by a "
                              "projection of the landmark CNN features); it is not Part fViT and "
                              "is not supported")
    out, unknown = {}, []
    for k, v in sd.items():
        if any(p.search(k) for p in _DROP):
            continue
        for pat, rep in _RULES:
            if pat.match(k):
                out[pat.sub(rep, k)] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{what}: {len(unknown)} key(s) of unknown layout, e.g. {unknown[:5]}")
    return out


def _infer_config(sd: dict[str, Tensor], what: str, dim_head: int = 64) -> dict[str, Any]:
    need = ["patch_embed.weight", "pos_embedding", "cls_token", "norm.weight",
            "transformer.blocks.0.attn.to_qkv.weight", "transformer.blocks.0.mlp.fc1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{what}: missing ViT keys (release names) "
                              f"{[_release_name(k) for k in missing]}")
    dim, patch_dim = sd["patch_embed.weight"].shape
    channels = 3
    p = int(round(math.sqrt(patch_dim / channels)))
    if p * p * channels != patch_dim:
        raise CheckpointError(f"{what}: patch_to_embedding takes {patch_dim} inputs, not P*P*3")
    depth = 1 + max(int(m.group(1)) for k in sd
                    if (m := re.match(r"transformer\.blocks\.(\d+)\.", k)))
    inner = sd["transformer.blocks.0.attn.to_qkv.weight"].shape[0] // 3
    if inner % dim_head:
        raise CheckpointError(f"{what}: attention width {inner} is not a multiple of dim_head {dim_head}")
    return dict(dim=int(dim), depth=depth, heads=inner // dim_head, dim_head=dim_head,
                mlp_dim=int(sd["transformer.blocks.0.mlp.fc1.weight"].shape[0]),
                num_landmarks=int(sd["pos_embedding"].shape[1]) - 1, patch_size=p, image_size=112,
                channels=channels, dropout=0.1, emb_dropout=0.1, drop_path=0.1, attn_scale="dim",
                landmarks="cnn")


def _release_name(key: str) -> str:
    for pat, rep in [(r"^landmark_cnn\.features\.", "stn.features."),
                     (r"^landmark_cnn\.output_layer\.", "output_layer."),
                     (r"^patch_embed\.", "patch_to_embedding."), (r"^norm\.", "mlp_head.0."),
                     (r"\.blocks\.(\d+)\.norm1\.", r".layers.\1.0.fn.norm."),
                     (r"\.blocks\.(\d+)\.attn\.to_qkv\.", r".layers.\1.0.fn.fn.to_qkv."),
                     (r"\.blocks\.(\d+)\.attn\.to_out\.", r".layers.\1.0.fn.fn.to_out.0."),
                     (r"\.blocks\.(\d+)\.norm2\.", r".layers.\1.1.fn.norm."),
                     (r"\.blocks\.(\d+)\.mlp\.fc1\.", r".layers.\1.1.fn.fn.net.0."),
                     (r"\.blocks\.(\d+)\.mlp\.fc2\.", r".layers.\1.1.fn.fn.net.3.")]:
        key = re.sub(pat, rep, key)
    return key


def _cnn_width(sd: dict[str, Tensor]) -> float:
    """Width multiplier from the widest layer (960 * w, rounded up to 8: the finest estimate; the
    stem's 16 * w is rounded to 8 too, so 0.25 and 0.5 look alike there); the release is 1.0."""
    wide = sd.get("landmark_cnn.features.15.conv.0.weight")
    if wide is None:
        raise CheckpointError("landmark CNN weights lack stn.features.15.conv.0.weight (its widest layer): "
                              "not the release's MobileNetV2 landmark CNN")
    return wide.shape[0] / 960.0


def load_state_dict_checked(model: torch.nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """load_state_dict(strict=True) with messages in release names and shapes side by side."""
    _check_part(model.state_dict(), sd, "", what)
    model.load_state_dict(sd, strict=True)


def load_official(path: str, landmark_cnn_path: Optional[str] = None) -> PartFViT:
    """A PartFViT (eval mode) from a release checkpoint: a supervised Part fViT state dict, or
    a LAFS / DINO pretraining checkpoint ({'teacher', 'student', ...}) whose backbone has no
    landmark CNN -- then the CNN comes from landmark_cnn_path (a supervised Part fViT
    checkpoint) or stays randomly initialised (with a warning). Sizes are inferred from the
    tensor shapes (dim_head = 64 as released); attention scale = dim ** -0.5 as released."""
    sd = map_official_keys(_official_state_dict(load_checkpoint(path), path), path)
    cfg = _infer_config(sd, path)
    cnn_keys = {k: v for k, v in sd.items() if k.startswith("landmark_cnn.")}
    if landmark_cnn_path is not None:
        other = map_official_keys(_official_state_dict(load_checkpoint(landmark_cnn_path),
                                                       landmark_cnn_path), landmark_cnn_path)
        if cnn_keys:
            warnings.warn(f"{path} has its own landmark CNN; using the one of {landmark_cnn_path}")
        cnn_keys = {k: v for k, v in other.items() if k.startswith("landmark_cnn.")}
        if not cnn_keys:
            raise CheckpointError(f"{landmark_cnn_path} holds no landmark CNN (stn.* / output_layer.*)")
        sd = {k: v for k, v in sd.items() if not k.startswith("landmark_cnn.")}
        sd.update(cnn_keys)
    if cnn_keys:
        if "landmark_cnn.features.0.0.weight" not in cnn_keys:
            raise CheckpointError("landmark CNN weights lack stn.features.0.0.weight")
        cfg["cnn_width"] = _cnn_width(cnn_keys)
        out = cnn_keys.get("landmark_cnn.output_layer.1.weight")
        if out is not None and out.shape[0] != 2 * cfg["num_landmarks"]:
            raise CheckpointError(f"landmark CNN predicts {out.shape[0] // 2} landmarks but the ViT "
                                  f"has {cfg['num_landmarks']} position embeddings (+ CLS)")
    model = PartFViT(**cfg)
    if not cnn_keys:
        warnings.warn(f"{path} has no landmark CNN (a LAFS / DINO backbone) and no "
                      "landmark_cnn_path was given: the landmark CNN is RANDOMLY initialised")
        sd = {**{k: v for k, v in model.state_dict().items() if k.startswith("landmark_cnn.")}, **sd}
    load_state_dict_checked(model, sd, path)
    return model.eval()


# ----------------------------------------------------------------------------- partial loading
def _any_state_dict(obj: dict, path: str) -> dict[str, Tensor]:
    """lafs_fast names from either format: ours ({'model', 'config'} from save_model, or a finetune
    training checkpoint's {'model', 'model_config'}) or a release checkpoint."""
    if isinstance(obj.get("model"), dict) and ("config" in obj or "model_config" in obj):
        return dict(obj["model"])
    return map_official_keys(_official_state_dict(obj, path), path)


def load_backbone_into(model: PartFViT, path: str, part: str = "vit") -> None:
    """Load one part of a checkpoint (ours or the release's) into a PartFViT:
    part='vit' -> everything but the landmark CNN (e.g. LAFS teacher weights, DINO head and
    classifier dropped); part='landmark_cnn' -> only the landmark CNN. Strict within the part."""
    if part not in ("vit", "landmark_cnn"):
        raise ValueError(f"part must be 'vit' or 'landmark_cnn', got {part!r}")
    obj = load_checkpoint(path)
    sd = _any_state_dict(obj, path)
    try:
        if part == "landmark_cnn":
            if model.landmark_cnn is None:
                raise ValueError("part='landmark_cnn' but the model uses a fixed grid (landmarks='grid')")
            sub = {k[len("landmark_cnn."):]: v for k, v in sd.items() if k.startswith("landmark_cnn.")}
            if not sub:
                raise CheckpointError(f"{path} holds no landmark CNN (stn.* / output_layer.*)")
            _load_prefixed(model.landmark_cnn, sub, "landmark_cnn.", path)
        else:
            sub = {k: v for k, v in sd.items() if not k.startswith("landmark_cnn.")}
            target = {k: v for k, v in model.state_dict().items() if not k.startswith("landmark_cnn.")}
            _check_part(target, sub, "", path)
            model.load_state_dict(sub, strict=False)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_config_difference(obj, model)}") from None


def _config_difference(obj: dict, model: torch.nn.Module) -> str:
    """For a misfit: how the checkpoint's recorded model config (ours only) differs from the
    model's, e.g. a checkpoint of another preset."""
    theirs, ours = obj.get("model_config") or obj.get("config"), getattr(model, "config", None)
    if not isinstance(theirs, dict) or not isinstance(ours, dict):
        return ""
    diff = [f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in ours if k in theirs and theirs[k] != ours[k]]
    return ("\n  the checkpoint was made for another model (another preset?): checkpoint vs model: "
            + ", ".join(diff)) if diff else ""


def _check_part(own: dict, sd: dict, prefix: str, what: str) -> None:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        msg = [f"{what} does not fit the model:"]
        if missing:
            msg.append(f"  missing {len(missing)}: {[_release_name(prefix + k) for k in missing[:6]]}")
        if unexpected:
            msg.append(f"  unexpected {len(unexpected)}: {[_release_name(prefix + k) for k in unexpected[:6]]}")
        for k, got, want in bad[:6]:
            msg.append(f"  {_release_name(prefix + k)}: checkpoint {got} vs model {want}")
        raise CheckpointError("\n".join(msg))


def _load_prefixed(module: torch.nn.Module, sd: dict, prefix: str, what: str) -> None:
    _check_part(module.state_dict(), sd, prefix, what)
    module.load_state_dict(sd, strict=True)


def load_landmark_cnn(path: str, image_size: int = 112):
    """A standalone LandmarkCNN (eval mode) from a checkpoint holding one (ours or the
    release's supervised Part fViT); N and width inferred from the shapes."""
    from .models.landmark_cnn import LandmarkCNN
    obj = load_checkpoint(path)
    if isinstance(obj.get("config"), dict):
        image_size = int(obj["config"].get("image_size", image_size))
    sd = _any_state_dict(obj, path)
    sub = {k[len("landmark_cnn."):]: v for k, v in sd.items() if k.startswith("landmark_cnn.")}
    if "output_layer.1.weight" not in sub or "features.0.0.weight" not in sub:
        raise CheckpointError(f"{path} holds no landmark CNN (stn.* / output_layer.*)")
    cnn = LandmarkCNN(sub["output_layer.1.weight"].shape[0] // 2, image_size,
                      width=_cnn_width({"landmark_cnn." + k: v for k, v in sub.items()}))
    _load_prefixed(cnn, sub, "landmark_cnn.", path)
    return cnn.eval()
