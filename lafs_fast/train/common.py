"""Pieces every training command shares: devices, AMP, optimiser groups with layer-wise lr
decay, metrics as JSON lines, rotating atomic checkpoints with everything an exact resume needs,
landmark pictures."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import random
import re
import time
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import config
from . import distributed


@dataclasses.dataclass
class RunConfig:
    """Options every training command shares: data source, machine, output, reproducibility."""
    dataset: str = config.field("orl", "training data", choices=["orl", "recordio", "folder", "synthetic"])
    data_path: str = config.field("", "train.rec prefix / image folder (unused for orl, synthetic)")
    amp: str = config.field("auto", "mixed precision: auto = bf16 on CUDA, none on CPU",
                            choices=["auto", "none", "bf16", "fp16"])
    device: str = config.field("auto", "cpu, cuda, cuda:N or auto")
    workers: int = config.field(2, "DataLoader workers (decoding); ORL is in memory and needs none")
    threads: int = config.field(0, "torch CPU threads (0 = torch's default)")
    out_dir: str = config.field("runs/train", "where checkpoints, metrics.jsonl and pictures go")
    keep_checkpoints: int = config.field(3, "checkpoints kept (oldest removed)")
    save_every: int = config.field(0, "steps between mid-epoch checkpoints (0 = only at epoch ends)")
    resume: bool = config.field(False, "continue from the newest checkpoint in out_dir")
    stop_after: int = config.field(0, "stop after this many steps, schedule unchanged (0 = run to the end)")
    seed: int = config.field(0, "random seed (data order, augmentation, init)")
    deterministic: bool = config.field(False, "deterministic algorithms only (bitwise repeatable for the "
                                              "same threads, world size and machine; slower on CUDA)")
    dist_timeout: float = config.field(600.0, "seconds a torchrun rank waits in the rendezvous or a "
                                              "collective before the run fails")
    fast_dropout: bool = config.field(True, "counter-based multithreaded dropout on CPU (lafs_fast.ops.dropout: "
                                            "same distribution, another random stream); false: torch's")
    log_every: int = config.field(10, "steps between metric lines")
    progress: bool = config.field(True, "show a progress bar")

    def validate(self):
        for name in ("save_every", "stop_after", "threads", "workers"):
            value = getattr(self, name)
            config.require(value >= 0, f"--{name.replace('_', '-')} must be >= 0, got {value}")
        config.require(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        config.require(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        config.require(self.dist_timeout > 0, f"--dist-timeout must be > 0, got {self.dist_timeout}")


def setup_run(cfg: RunConfig) -> tuple[torch.device, str]:
    """Device, CPU threads, determinism, process group (under torchrun), output folder and
    seeds of a run; returns (device, amp mode)."""
    device = distributed.resolve_cuda_device(resolve_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        set_deterministic()
    amp = ("bf16" if device.type == "cuda" else "none") if cfg.amp == "auto" else cfg.amp
    distributed.init(device, cfg.dist_timeout)
    ensure_writable_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    return device, amp


def set_deterministic() -> None:
    """Deterministic kernels only: an op without one raises (warn_only=False) rather than
    silently varying. On CPU the run is then bitwise repeatable for a fixed thread count (a
    reduction's split depends on --threads; 0 means torch's default, the core count). On CUDA:
    cuBLAS with a fixed workspace, cuDNN without autotuning, and lafs_fast.ops routes the patch
    op to its deterministic path (ops.resolve_backend)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def make_grad_scaler(device: torch.device, amp: str) -> "torch.amp.GradScaler":
    """fp16 on CUDA needs loss scaling; everywhere else a disabled scaler (a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16" and device.type == "cuda")


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
                 cnn_weight_decay: Optional[float] = None, extra: Optional[nn.Module] = None,
                 decay_tokens: bool = False):
    """AdamW groups: no decay on biases and 1-D tensors (norms), nor on cls_token and
    pos_embedding unless decay_tokens (the release decays them: its rule exempts only ".bias" and
    1-D tensors, utils.py:662-673); lr scale layer_decay ** (depth + 1 - layer) per ViT layer
    (BEiT-style layer-wise decay, which the original computed but never applied); the landmark CNN
    may get its own weight decay."""
    depth = len(model.transformer.blocks) if hasattr(model, "transformer") else 0
    groups: dict[tuple, dict] = {}
    named = list(model.named_parameters()) + (list(extra.named_parameters(prefix="head")) if extra else [])
    for name, p in named:
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        no_decay = p.ndim <= 1 or name.endswith(".bias") or (
            not decay_tokens and name in ("cls_token", "pos_embedding"))
        wd = 0.0 if no_decay else (cnn_weight_decay if cnn_weight_decay is not None and
                                   name.startswith("landmark_cnn.") else weight_decay)
        is_cnn = name.startswith("landmark_cnn.")  # its own groups: it may get its own lr scale
        key = (lid, wd, is_cnn)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": wd, "base_weight_decay": wd,
                           "lr_scale": layer_decay ** (depth + 1 - lid), "layer": lid, "landmark_cnn": is_cnn}
        groups[key]["params"].append(p)
    return list(groups.values())


CLIP_MODES = ("global", "per_tensor")


@torch.no_grad()
def clip_gradients_(params, max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip gradients in place; returns the L2 norm of all gradients before clipping (for logs).

    global: one norm over every tensor, all scaled together (torch's clip_grad_norm_).
    per_tensor: each tensor's gradient scaled by min(1, max_norm / (||g|| + 1e-6)) on its own:
    DINO's clip_gradients, which the release uses in pretraining (utils.py:132-141; the factor 1
    leaves an unclipped gradient bitwise unchanged). max_norm <= 0: no clipping, norm only."""
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    grads = [p.grad for p in params]
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if max_norm > 0:
        coefs = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
    return total


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
    """Metrics as JSON lines (one object per line, flushed), plus wall time. Off on every
    rank but 0."""

    def __init__(self, path: Optional[str], enabled: bool = True):
        enabled = enabled and distributed.info().is_main
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
    """Atomic checkpoints named step-XXXXXXXX.pt in a folder, keeping the newest `keep`.
    save_checkpoint writes a temporary file and renames it, so a kill mid-save leaves the last
    good checkpoint intact (and a stale .tmp_ file, removed by clean_stale)."""

    def __init__(self, folder: str, keep: int = 3):
        self.folder, self.keep = folder, keep

    def clean_stale(self) -> None:
        for tmp in glob.glob(os.path.join(self.folder, ".tmp_step-*")):
            with contextlib.suppress(OSError):
                os.remove(tmp)

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


def rng_state(gen: Optional[torch.Generator] = None) -> dict:
    """Every random stream of this process: python, numpy, torch CPU (+ CUDA), the run's generator.
    Plain data only (numpy's key as a list of ints), so that a checkpoint loads weights-only."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if gen is not None:
        state["gen"] = gen.get_state()
    return state


def set_rng_state(state: dict, gen: Optional[torch.Generator] = None) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]  # key: a list, or an array (older checkpoints)
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if gen is not None and "gen" in state:
        gen.set_state(state["gen"])


def save_training_state(ring: CheckpointRing, step: int, epoch: int, steps_per_epoch: int,
                        global_batch: int, gen: torch.Generator, scaler, **payload) -> None:
    """A resumable checkpoint. Collective (every rank calls it: each rank's random streams are
    gathered); rank 0 writes. `epoch` is the epoch a resume continues, step - epoch *
    steps_per_epoch batches into it; the lr / wd / momentum schedules are functions of step."""
    rngs = distributed.all_gather_object(rng_state(gen))
    if distributed.info().is_main:
        ring.save(step, {**payload, "step": step, "epoch": epoch, "step_in_epoch": step - epoch * steps_per_epoch,
                         "global_batch": global_batch, "world_size": len(rngs), "threads": torch.get_num_threads(),
                         "rng": rngs, "scaler": scaler.state_dict()})


def load_training_state(ring: CheckpointRing, global_batch: int, gen: torch.Generator, scaler,
                        per_rank_gen: bool, seed: int) -> Optional[dict]:
    """The newest checkpoint (rank 0 picks it; out_dir must be visible to every rank), with this
    rank's random streams and the AMP scaler restored; None when there is none. Raises if the
    global batch changed (the data order would not continue); another world size resumes the
    order exactly but restarts the per-rank streams (not bitwise)."""
    if distributed.info().is_main:
        ring.clean_stale()
    path = distributed.broadcast_object(ring.latest())
    if not path:
        return None
    from ..checkpoint import CheckpointError, load_checkpoint
    try:  # weights-only like every load: a step-*.pt planted in out_dir cannot run code
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; move it away to resume from the checkpoint before it") from e
    if state.get("global_batch", global_batch) != global_batch:
        raise ValueError(f"{path} was written with a global batch of {state['global_batch']} images "
                         f"(--batch-size x world size), this run has {global_batch}: the data order "
                         "would not continue; resume with the same global batch")
    rngs = state["rng"]
    if isinstance(rngs, dict):  # older checkpoints: one process, generator stored apart
        rngs = [{**rngs, "gen": state["gen"]}]
    me = distributed.info()
    if len(rngs) == me.world_size:
        set_rng_state(rngs[me.rank], gen)
    else:
        warnings.warn(f"{path} was written by {len(rngs)} ranks, this run has {me.world_size}: "
                      "the data order continues exactly, the per-rank random streams restart")
        set_rng_state(rngs[0], gen)
        distributed.seed_rank_rngs(seed + state["step"])
        if per_rank_gen and me.rank:
            gen.manual_seed(distributed.rank_seed(seed + state["step"], me.rank, stream=2))
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if me.is_main:
        print(f"resumed from {path} at step {state['step']}")
    return state


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
