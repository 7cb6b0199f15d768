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
from ..cli import CommandError, UsageError
from ..ops import BACKENDS
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
    resume: config.BoolOrAuto = config.field(False, "continue the run in --out-dir from its newest checkpoint "
                                                    "(an error when it has none); auto: continue when there is "
                                                    "a checkpoint, else start fresh")
    overwrite: bool = config.field(False, "replace the run already in --out-dir: its metrics.jsonl, "
                                          "checkpoints and TensorBoard events are removed first")
    tensorboard: bool = config.field(False, "also write the metrics as TensorBoard event files in OUT/tb "
                                            "(pip install 'lafs_fast[tensorboard]')")
    backend: str = config.field("auto", "op backend (reference: the slow pure-PyTorch ops, also without the "
                                        "compiled kernels)", choices=list(BACKENDS))
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
        config.require(self.resume in (False, True, config.AUTO),
                       f"--resume must be true, false or auto, got {self.resume!r}")
        config.require(not (self.resume and self.overwrite),
                       "--resume and --overwrite exclude each other (--resume continues the run in "
                       "--out-dir, --overwrite replaces it)")


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
    prepare_out_dir(cfg)
    seed_everything(cfg.seed)
    return device, amp


@contextlib.contextmanager
def backend_scope(backend: str):
    """--backend for every op the run calls (the model's patch embedding included): the ops'
    "auto" resolves through LAFS_FAST_BACKEND, set for the run and restored after it."""
    if backend in ("", "auto"):
        yield
        return
    before = os.environ.get("LAFS_FAST_BACKEND")
    os.environ["LAFS_FAST_BACKEND"] = backend
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LAFS_FAST_BACKEND", None)
        else:
            os.environ["LAFS_FAST_BACKEND"] = before


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
    """Check that `path` is, or can become, a writable folder, writing nothing: a run that fails
    before its first step leaves no trace (the folder is made when the run starts writing)."""
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        reason = "Not a directory"  # the path or one of its parents is a file
    elif not os.access(probe, os.W_OK | os.X_OK):
        reason = "Permission denied"
    else:
        return path
    raise ValueError(f"output directory {path!r} is not writable: {reason}")


# ----------------------------------------------------------------------------- the out dir
# What a run writes that a later run in the same folder would mix with its own: the first two
# mark a folder as holding a run; --overwrite removes them all.
RUN_MARKS = ("metrics.jsonl", "step-*.pt")
RUN_FILES = RUN_MARKS + ("step-*.pt.head-*-of-*", "step-*.pt.grads-*-of-*", ".tmp_step-*", "best.pt",
                         os.path.join("tb", "events.out.tfevents.*"))


def run_files(out_dir: str, patterns=RUN_FILES) -> list[str]:
    return sorted(p for pat in patterns for p in glob.glob(os.path.join(out_dir, pat)))


def holds_run(out_dir: str) -> bool:
    return bool(run_files(out_dir, RUN_MARKS))


def newest_checkpoint(out_dir: str) -> Optional[str]:
    return CheckpointRing(out_dir).latest()


def resume_hint(cfg, flag: str = "--resume") -> str:
    """How to run cfg's command again with `flag`: the command line itself when known."""
    made = config.command_with(cfg, flag, drop=("resume", "overwrite"))
    return made or f"the same command with {flag} (--out-dir {cfg.out_dir})"


def prepare_out_dir(cfg: RunConfig) -> None:
    """Runs never mix in one --out-dir: a folder holding another run (metrics.jsonl or
    checkpoints) is refused unless --resume (continue it) or --overwrite (remove its files
    first); --resume with no checkpoint there is an error, --resume auto then starts fresh (and
    removes what a run that saved no checkpoint left). With --tensorboard, its package must be
    there. Rank 0 decides and removes, every rank gets its verdict (another rank may get here
    while rank 0 still writes the previous run's last checkpoint)."""
    from .._extras import MissingExtra, require_extra
    problem = None
    if distributed.info().is_main:
        try:
            if cfg.tensorboard:  # rank 0 writes the event files
                require_extra("tensorboard", "tensorboard", "--tensorboard")
            _claim_out_dir(cfg)
        except (ValueError, CommandError, MissingExtra) as e:  # bad usage, an unwritable folder
            problem = e
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise problem


def _claim_out_dir(cfg: RunConfig) -> None:
    out = cfg.out_dir
    ensure_writable_dir(out)
    latest = newest_checkpoint(out) if os.path.isdir(out) else None
    if cfg.resume is True and latest is None:
        there = "no step-*.pt checkpoint there" if os.path.isdir(out) else "the folder does not exist"
        raise UsageError(f"--resume: nothing to resume in {out} ({there})",
                         "give the --out-dir of the run to continue, or --resume auto to start fresh "
                         "when there is none")
    if not cfg.resume and not cfg.overwrite and os.path.isdir(out) and holds_run(out):
        raise UsageError(f"--out-dir {out} holds another run ({', '.join(describe_run(out))})",
                         "continue it with --resume, replace it with --overwrite, or choose another --out-dir")
    clear = cfg.overwrite or (cfg.resume == config.AUTO and latest is None)
    doomed = run_files(out) if clear and os.path.isdir(out) else []
    _refuse_removing_inputs(cfg, doomed)
    for path in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if doomed:
        names = sorted({os.path.basename(p) for p in doomed})
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        why = "--overwrite" if cfg.overwrite else "--resume auto (no checkpoint to resume)"
        print(f"{why}: removed {len(doomed)} file(s) of the earlier run in {out}: {shown}", flush=True)


def describe_run(out_dir: str) -> list[str]:
    found = []
    if os.path.exists(os.path.join(out_dir, "metrics.jsonl")):
        found.append("metrics.jsonl")
    n = len(CheckpointRing(out_dir).existing())
    if n:
        newest = os.path.basename(newest_checkpoint(out_dir))
        found.append(f"{n} checkpoint{'s' if n > 1 else ''}, the newest {newest}")
    return found


def _refuse_removing_inputs(cfg, doomed: list[str]) -> None:
    """--overwrite must not remove a file this run reads (an --init checkpoint in --out-dir)."""
    doomed_real = {os.path.realpath(p) for p in doomed}
    for name in ("init", "landmark_init"):
        path = getattr(cfg, name, "")
        if path and os.path.realpath(path) in doomed_real:
            raise UsageError(f"--{name.replace('_', '-')} {path} is a file of the run --overwrite removes",
                             "copy it out of --out-dir first, or choose another --out-dir")


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
