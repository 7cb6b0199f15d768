"""Pieces every training command shares: devices, AMP, optimiser groups with layer-wise lr
decay, metrics as JSON lines, rotating atomic checkpoints, landmark pictures."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import random
import re
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import config as C


@dataclasses.dataclass
class RunConfig:
    """Options every training command shares: data source, machine, output, reproducibility."""
    dataset: str = C.field("orl", "training data", choices=["orl", "recordio", "folder", "synthetic"])
    data_path: str = C.field("", "train.rec prefix / image folder (unused for orl, synthetic)")
    amp: str = C.field("auto", "mixed precision: auto = bf16 on CUDA, none on CPU",
                       choices=["auto", "none", "bf16", "fp16"])
    device: str = C.field("auto", "cpu, cuda, cuda:N or auto")
    workers: int = C.field(2, "DataLoader workers (decoding); ORL is in memory and needs none")
    threads: int = C.field(0, "torch CPU threads (0 = torch's default)")
    out_dir: str = C.field("runs/train", "where checkpoints, metrics.jsonl and pictures go")
    keep_checkpoints: int = C.field(3, "checkpoints kept (oldest removed)")
    resume: bool = C.field(False, "continue from the newest checkpoint in out_dir")
    seed: int = C.field(0, "random seed (data order, augmentation, init)")
    log_every: int = C.field(10, "steps between metric lines")
    progress: bool = C.field(True, "show a progress bar")


def setup_run(cfg: RunConfig) -> tuple[torch.device, str]:
    """Device, CPU threads, output folder and seeds of a run; returns (device, amp mode)."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp = ("bf16" if device.type == "cuda" else "none") if cfg.amp == "auto" else cfg.amp
    ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    return device, amp


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible")
    return dev


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast, or a no-op for amp='none' (and for fp16 on CPU, which it lacks)."""
    if amp == "none" or (amp == "fp16" and device.type == "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def ensure_writable_dir(path: str) -> str:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output directory {path!r} is not writable: {e.strerror}") from None
    return path


# ----------------------------------------------------------------------------- optimiser
_LAYER = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """0 for the token embedding (and landmark CNN), i + 1 for block i, depth + 1 for the rest."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith(("patch_embed", "cls_token", "pos_embedding", "landmark_cnn")):
        return 0
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 cnn_weight_decay: Optional[float] = None, extra: Optional[nn.Module] = None):
    """AdamW groups: no decay on biases and 1-D tensors (norms, tokens); lr scale
    layer_decay ** (depth + 1 - layer) per ViT layer (BEiT-style layer-wise decay, which the
    original computed but never applied); the landmark CNN may get its own weight decay."""
    depth = len(model.transformer.blocks) if hasattr(model, "transformer") else 0
    groups: dict[tuple, dict] = {}
    named = list(model.named_parameters()) + (list(extra.named_parameters(prefix="head")) if extra else [])
    for name, p in named:
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in ("cls_token", "pos_embedding")
        wd = 0.0 if no_decay else (cnn_weight_decay if cnn_weight_decay is not None and
                                   name.startswith("landmark_cnn.") else weight_decay)
        key = (lid, wd)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": wd, "base_weight_decay": wd,
                           "lr_scale": layer_decay ** (depth + 1 - lid), "layer": lid}
        groups[key]["params"].append(p)
    return list(groups.values())


def make_adamw(groups, lr: float, device: torch.device, betas=(0.9, 0.999)):
    """Fused AdamW on CUDA, the multi-tensor (foreach) one on CPU."""
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **kw)


def set_schedule(optimizer, lr: float, weight_decay: Optional[float] = None) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if weight_decay is not None and g.get("base_weight_decay", 1.0) > 0:
            g["weight_decay"] = weight_decay


# ----------------------------------------------------------------------------- logging
class JsonlLogger:
    """Metrics as JSON lines (one object per line, flushed), plus wall time."""

    def __init__(self, path: Optional[str], enabled: bool = True):
        self.path, self.enabled, self.t0 = path, enabled and path is not None, time.time()
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, **record) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time() - self.t0, 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")


# ----------------------------------------------------------------------------- checkpoints
class CheckpointRing:
    """Atomic checkpoints named step-XXXXXXXX.pt in a folder, keeping the newest `keep`."""

    def __init__(self, folder: str, keep: int = 3):
        self.folder, self.keep = folder, keep

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step:08d}.pt")

    def existing(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.folder, "step-*.pt")))

    def latest(self) -> Optional[str]:
        found = self.existing()
        return found[-1] if found else None

    def save(self, step: int, state: dict) -> str:
        from ..checkpoint import save_checkpoint
        path = self.path(step)
        save_checkpoint(path, state)
        for old in self.existing()[:-self.keep]:
            os.remove(old)
        return path


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- pictures
def save_landmark_png(path: str, images: torch.Tensor, landmarks: torch.Tensor,
                      start: Optional[torch.Tensor] = None, nrow: int = 4) -> None:
    """Faces (B, C, H, W) in [-1, 1] with landmarks drawn: red now, blue where they started."""
    from PIL import Image
    from torchvision.utils import draw_keypoints, make_grid

    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    drawn = []
    for i in range(imgs.shape[0]):
        im = imgs[i]
        if start is not None:
            im = draw_keypoints(im, start[i:i + 1].detach().float().cpu(), colors="blue", radius=1)
        im = draw_keypoints(im, landmarks[i:i + 1].detach().float().cpu(), colors="red", radius=1)
        drawn.append(im)
    grid = make_grid(torch.stack(drawn), nrow=nrow, padding=2)
    # Upscale 2x so that the dots are visible.
    grid = grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy()).save(path)
