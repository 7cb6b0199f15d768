"""Supervised Part fViT training: from scratch (the landmark CNN learns through the op's landmark
gradient, no landmark labels) or finetuning from a LAFS / Part fViT checkpoint, few-shot or full.

    python -m lafs_fast.train finetune --help
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import glob
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import config
from ..convert import save_model
from ..data import to_model_input
from ..dino import cosine_schedule
from ..eval.orl import OrlEvaluation
from ..eval.validator import Validator
from ..models import create_model, partial_fc
from ..models.heads import ArcFace, CosFace
from ..models.partial_fc import PartialFC
from ..ops.dropout import use_counter_dropout
from . import common, distributed
from .data_setup import build_train_data
from .run import Run, fit


@dataclass
class FinetuneConfig(common.RunConfig):
    """Supervised Part fViT training / finetuning (CosFace or ArcFace)."""
    out_dir: str = config.field("runs/finetune", "where checkpoints, metrics.jsonl and pictures go")
    model: str = config.field("part_fvit_tiny", "model preset (part_fvit_tiny, part_fvit_s, part_fvit_b)")
    landmarks: str = config.field("cnn", "landmarks from the landmark CNN, or a fixed grid (plain fViT)",
                                  choices=["cnn", "grid"])
    init: str = config.field("", "checkpoint to start from: a lafs_fast pretrain/finetune checkpoint or "
                                 "an official release file (its ViT; DINO heads are dropped)")
    landmark_init: str = config.field("", "checkpoint whose landmark CNN initialises ours (and is the "
                                          "frozen reference of the drift regulariser)")
    fewshot: int = config.field(0, "images per identity (seeded random choice); 0 = all")
    epochs: int = config.field(40, "training epochs")
    batch_size: int = config.field(32, "images per step")
    lr: float = config.field(2e-3, "peak learning rate (AdamW)")
    min_lr: float = config.field(1e-5, "final learning rate of the cosine schedule")
    warmup_epochs: float = config.field(2.0, "linear warm-up epochs")
    weight_decay: float = config.field(0.1, "AdamW weight decay of the ViT (none on biases / norms)")
    cnn_weight_decay: float = config.field(0.05, "weight decay of the landmark CNN")
    layer_decay: float = config.field(1.0, "layer-wise lr decay (LAFS finetuning: 0.58; 1 = off)")
    cnn_lr_scale: float = config.field(1.0, "lr multiplier of the landmark CNN")
    clip_grad: float = config.field(5.0, "gradient-norm clip (0 = off)")
    loss: str = config.field("cosface", "margin loss", choices=["cosface", "arcface"])
    scale: float = config.field(32.0, "margin-loss scale s (64 in the paper for large data)")
    margin: Optional[float] = config.field(None, "margin m (default: the loss's, CosFace 0.4, ArcFace 0.5)")
    # --- Partial FC (class-sharded head): see partial_fc_enabled for the auto rule
    partial_fc: str = config.field("auto", "class-sharded margin head under torchrun (Partial FC); auto: on "
                                           "when world size > 1 and classes >= 10000, or --sample-rate < 1",
                                   choices=["auto", "on", "off"])
    sample_rate: float = config.field(1.0, "Partial FC: fraction of each rank's classes in a step's softmax "
                                           "(positives always kept; 1 = all)")
    drift_lambdas: list[float] = config.field([1000.0, 100.0, 1.0, 0.11, 0.0],
                                              "landmark-drift regulariser weights per stage")
    drift_epochs: list[int] = config.field([8, 14, 21, 28], "epochs where the drift weight steps down")
    mixup_alpha: float = config.field(0.2, "mixup Beta(alpha, alpha)")
    mixup_prob: float = config.field(0.1, "probability that a batch is mixed")
    crop_scale: float = config.field(0.9, "random resized crop minimum area (max 1)")
    erase_prob: float = config.field(0.1, "random erasing probability per image")
    eval: bool = config.field(True, "evaluate on held-out pairs at the end")
    # --- the release's recipe (train_largescale.py / image_iter.py); defaults keep lafs_fast's
    augment: str = config.field("light", "light: batched crop/flip/brightness-contrast/square erasing on "
                                         "tensors; release: the release's per-image face RandAugment, "
                                         "RandomResizedCrop, ColorJitter, RandomErasing (timm / torchvision)",
                                choices=["light", "release"])
    randaugment: str = config.field("rand-m1-mstd0.5-inc1", "--augment release: timm RandAugment config "
                                                            "(release: m1 WebFace4M, m2 MS1M; '' = none)")
    color_jitter: float = config.field(0.1, "--augment release: ColorJitter brightness/contrast/saturation/hue")
    channel_order: str = config.field("rgb", "channel order stored in the RecordIO images; bgr is swapped "
                                             "at load (the release's non-MS1M records)", choices=["rgb", "bgr"])
    partition: float = config.field(1.0, "keep the first fraction of the training images (the release's "
                                         "FaceDataset partition; 1 = all)")
    num_classes: int = config.field(0, "classes of the margin head; 0 = the training set's largest label + 1. The "
                                       "head keeps every class of the set under --partition / --fewshot (the "
                                       "release's few-shot protocol); a file holding part of a larger label space "
                                       "sets it (the release's WebFace4M: 205990)")
    relabel_subset: bool = config.field(False, "renumber the classes present in the kept images 0..K-1 (a K-way head "
                                               "without rows for absent identities; not the release's protocol)")
    accum_steps: int = config.field(1, "micro-batches per optimiser step (gradient accumulation; release: 3)")
    accum_across_epochs: bool = config.field(False, "count --accum-steps micro-batches across epoch ends, as the "
                                                    "release: every micro-batch is trained on, a step may span two "
                                                    "epochs, the run takes epochs x batches / accum steps (off: an "
                                                    "epoch's last (batches mod accum) micro-batches are left out)")
    lr_rule: str = config.field("none", "none: --lr is the peak lr; sqrt: the release's rule, lr x accum "
                                        "x sqrt(336 x global batch) / 480", choices=["none", "sqrt"])
    clip_mode: str = config.field("global", "gradient clipping over all tensors or per tensor",
                                  choices=list(common.CLIP_MODES))
    decay_tokens: bool = config.field(False, "weight decay on cls_token and pos_embedding too (the release)")
    weight_init: str = config.field("timm", "init of a model not loaded from --init: timm (trunc-normal 0.02) "
                                            "or release (tokens N(0, 1), PyTorch default Linears)",
                                    choices=["timm", "release"])
    cnn_head_weight_decay: float = config.field(-1.0, "weight decay of the landmark CNN's output Linear "
                                                      "(-1 = --cnn-weight-decay; the release: 0.1)")
    val_bins: list[str] = config.field([], "verification .bin files (insightface) evaluated during training")
    val_every: int = config.field(0, "optimiser steps between --val-bins evaluations (0 = each epoch end)")

    def validate(self):
        super().validate()
        config.require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        config.require(self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}")
        config.require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        config.require(0 < self.sample_rate <= 1, f"--sample-rate must be in (0, 1], got {self.sample_rate}")
        config.require(self.sample_rate == 1 or self.partial_fc != "off",
                       "--sample-rate < 1 samples the classes of a Partial FC head: not with --partial-fc off")
        config.require(self.fewshot >= 0, f"--fewshot must be >= 0, got {self.fewshot}")
        config.require(0 < self.crop_scale <= 1, f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        config.require(0 <= self.erase_prob <= 1, f"--erase-prob must be in [0, 1], got {self.erase_prob}")
        config.require(self.color_jitter >= 0, f"--color-jitter must be >= 0, got {self.color_jitter}")
        config.require(self.accum_steps >= 1, f"--accum-steps must be >= 1, got {self.accum_steps}")
        config.require(0 < self.partition <= 1, f"--partition must be in (0, 1], got {self.partition}")
        config.require(self.num_classes >= 0, f"--num-classes must be >= 0, got {self.num_classes}")
        config.require(not (self.relabel_subset and self.num_classes),
                       "--relabel-subset sizes the head by the classes present: leave --num-classes 0 with it")
        config.require(self.val_every >= 0, f"--val-every must be >= 0, got {self.val_every}")
        config.require(self.channel_order == "rgb" or self.dataset == "recordio",
                       f"--channel-order bgr applies to --dataset recordio only, not {self.dataset}")
        for b in self.val_bins:
            config.require(os.path.isfile(b), f"--val-bins: no such file {b}")
        config.require(len(self.drift_lambdas) == len(self.drift_epochs) + 1,
                       "--drift-lambdas needs exactly one more value than --drift-epochs")
        config.require(self.dataset in ("orl", "synthetic") or bool(self.data_path),
                       f"--data-path is required for --dataset {self.dataset}")
        if self.init:
            config.require(os.path.exists(self.init), f"--init: no such file {self.init}")
        if self.landmark_init:
            config.require(os.path.exists(self.landmark_init),
                           f"--landmark-init: no such file {self.landmark_init}")


def drift_weight(cfg: FinetuneConfig, epoch: int) -> float:
    """lambda(epoch) of the landmark-drift regulariser: a step function (docs/method.md section 4)."""
    stage = sum(epoch >= e for e in cfg.drift_epochs)
    return float(cfg.drift_lambdas[stage])


def augment(x: torch.Tensor, cfg: FinetuneConfig, gen: torch.Generator, rows: Optional[slice] = None,
            total: Optional[int] = None) -> torch.Tensor:
    """Batched light augmentation on [-1, 1] tensors: resized crop (scale [crop_scale, 1]),
    horizontal flip, small brightness/contrast jitter, random erasing.

    x holds rows `rows` of a global batch of `total` images (default: all of it). Every draw is
    made for the whole global batch and sliced, so an image gets the same augmentation however
    the batch is split over ranks (and every rank's generator stays in step)."""
    from ..views import crop_resize, sample_crop_boxes
    B, _, H, W = x.shape
    n = B if total is None else total
    rows = slice(0, B) if rows is None else rows
    boxes = sample_crop_boxes(n, H, W, (cfg.crop_scale, 1.0), (3 / 4, 4 / 3), generator=gen)[rows]
    flips = (torch.rand(n, generator=gen) < 0.5)[rows]
    x = crop_resize(x, boxes[None].to(x.device), flips[None].to(x.device), H, mode="bilinear")
    u = torch.rand(n, 2, generator=gen)[rows].to(x.device)
    bright = (u[:, 0] - 0.5) * 0.2
    contrast = 1 + (u[:, 1] - 0.5) * 0.2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast[:, None, None, None] + mean + bright[:, None, None, None]).clamp(-1, 1)
    if cfg.erase_prob > 0:
        S = x.shape[-1]
        e = torch.rand(n, 5, generator=gen)[rows].to(x.device)
        side = (0.2 + 0.2 * e[:, 0]) * S
        cx, cy = e[:, 1] * S, e[:, 2] * S
        ar = torch.arange(S, device=x.device, dtype=x.dtype)
        inside = (((ar[None, :] - cx[:, None]).abs() < side[:, None] / 2)[:, None, :]
                  & ((ar[None, :] - cy[:, None]).abs() < side[:, None] / 2)[:, :, None])
        mask = inside & (e[:, 3] < cfg.erase_prob)[:, None, None]
        x = torch.where(mask[:, None], torch.zeros_like(x), x)
    return x


def build_model(cfg: FinetuneConfig, device):
    from ..checkpoint import load_backbone_into
    model = create_model(cfg.model, landmarks=cfg.landmarks)
    if cfg.weight_init != "timm":
        model.init_weights(cfg.weight_init)
    if cfg.fast_dropout:
        use_counter_dropout(model)
    if cfg.init:
        load_backbone_into(model, cfg.init, part="vit")
    if cfg.landmark_init and model.landmark_cnn is not None:
        load_backbone_into(model, cfg.landmark_init, part="landmark_cnn")
    return model.to(device)


def mixup(x: torch.Tensor, target: torch.Tensor, alpha: float, gen: torch.Generator,
          rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix rows `rows` of the global batch with partners drawn over the whole global batch:
    lam ~ Beta(alpha, alpha) and the pairing come from the shared generator (same on every rank),
    partners held by other ranks arrive by all_gather (split-invariant, like augment)."""
    lam = float(np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen))).beta(alpha, alpha))
    x_all, t_all = distributed.all_gather_cat(x), distributed.all_gather_cat(target)
    perm = torch.randperm(x_all.shape[0], generator=gen)[rows].to(x.device)
    return lam * x + (1 - lam) * x_all[perm], lam * target + (1 - lam) * t_all[perm]


# ----------------------------------------------------------------------------- the release's recipe
def release_sqrt_lr(lr: float, global_batch: int, accum_steps: int) -> float:
    """The release's peak lr (train_largescale.py:472): lr x accum / 480 x sqrt(global batch / 336)
    x 336, with global batch = GPUs x per-GPU batch of one micro-batch."""
    return lr * accum_steps / 480.0 * math.sqrt(global_batch / 336.0) * 336.0


def peak_lr(cfg: FinetuneConfig, global_batch: int) -> float:
    return release_sqrt_lr(cfg.lr, global_batch, cfg.accum_steps) if cfg.lr_rule == "sqrt" else cfg.lr


def make_param_groups(cfg: FinetuneConfig, model, head) -> list[dict]:
    """AdamW groups of the ViT, the landmark CNN and the head (common.param_groups), with the
    landmark CNN's lr multiplier and, when --cnn-head-weight-decay >= 0, the CNN's output Linear
    weight in its own group (the release's prefix rule gives 0.05 to 'stn.*' only, so its
    output_layer gets the ViT's 0.1: train_largescale.py:141-149)."""
    groups = common.param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.cnn_weight_decay, extra=head,
                                 decay_tokens=cfg.decay_tokens)
    for g in groups:
        if g["landmark_cnn"]:  # the CNN only: not the tokens and patch embedding of layer 0
            g["lr_scale"] *= cfg.cnn_lr_scale
    if cfg.cnn_head_weight_decay >= 0 and model.landmark_cnn is not None:
        w = model.landmark_cnn.output_layer[1].weight
        for g in groups:
            if any(p is w for p in g["params"]):
                g["params"] = [p for p in g["params"] if p is not w]
                groups.append({**g, "params": [w], "weight_decay": cfg.cnn_head_weight_decay,
                               "base_weight_decay": cfg.cnn_head_weight_decay})
                break
        groups = [g for g in groups if g["params"]]
    return groups


def build_train_augment(cfg: FinetuneConfig, image_size: int):
    """The per-image augmentation of --augment release (None for the batched light one)."""
    if cfg.augment != "release":
        return None
    from ..data.release_augment import ReleaseAugment
    return ReleaseAugment(image_size, cfg.randaugment, (cfg.crop_scale, 1.0), cfg.color_jitter, cfg.erase_prob)


def micro_batch_loss(cfg: FinetuneConfig, ddp_model, ddp_head, x: torch.Tensor, target: torch.Tensor,
                     device, amp: str, frozen_cnn=None, lam_drift: float = 0.0, image_size: int = 112):
    """One micro-batch's forward: (margin-loss cross-entropy, drift term, total) -- the total is
    what backward sees before the 1 / --accum-steps scaling."""
    with common.autocast(device, amp):
        emb, lms = ddp_model(x, return_landmarks=True)
        loss = margin_loss(ddp_head, emb, target)
    drift = torch.zeros((), device=device)
    if frozen_cnn is not None and lam_drift > 0:
        with torch.no_grad():
            ref_lm = frozen_cnn(x)
        S1 = image_size - 1
        drift = F.mse_loss(lms.float() / S1, ref_lm.float() / S1)
    return loss, drift, loss + lam_drift * drift


def optimizer_step(cfg: FinetuneConfig, opt, scaler, params, head=None) -> torch.Tensor:
    """Unscale, clip (--clip-grad, --clip-mode; 0 = none), step, zero the gradients; returns the
    gradient norm before clipping."""
    scaler.unscale_(opt)
    gnorm = clip_gradients(cfg, params, head)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return gnorm


# ----------------------------------------------------------------------------- Partial FC
PARTIAL_FC_AUTO_CLASSES = 10_000


def partial_fc_enabled(cfg: FinetuneConfig, num_classes: int, world_size: int) -> bool:
    """--partial-fc auto: on when world size > 1 and classes >= 10000 (there the shard saves
    (W-1)/W of the head's 16 bytes per weight -- weight, gradient, AdamW moments -- and the per-step
    traffic is two (global batch x dim) tensors instead of the (classes x dim) gradient
    all-reduce), or when --sample-rate < 1 (sampling needs it)."""
    if cfg.partial_fc != "auto":
        return cfg.partial_fc == "on"
    return cfg.sample_rate < 1 or (world_size > 1 and num_classes >= PARTIAL_FC_AUTO_CLASSES)


DEFAULT_MARGINS = {"cosface": 0.4, "arcface": 0.5}  # CosFace's and ArcFace's papers


def margin_of(cfg: FinetuneConfig) -> float:
    """--margin, or the loss's own default when it is not given."""
    return DEFAULT_MARGINS[cfg.loss] if cfg.margin is None else cfg.margin


def build_head(cfg: FinetuneConfig, dim: int, num_classes: int, device):
    """The margin head: replicated CosFace / ArcFace, or this rank's Partial FC shard."""
    if partial_fc_enabled(cfg, num_classes, distributed.info().world_size):
        return PartialFC(dim, num_classes, loss=cfg.loss, s=cfg.scale, m=margin_of(cfg),
                         sample_rate=cfg.sample_rate, seed=cfg.seed).to(device)
    Head = CosFace if cfg.loss == "cosface" else ArcFace
    return Head(dim, num_classes, s=cfg.scale, m=margin_of(cfg)).to(device)


def class_targets(head, y: torch.Tensor, num_classes: int, rows: slice, global_batch: int) -> torch.Tensor:
    """What mixup mixes: one-hot classes (B, C), or for Partial FC one-hot *rows of the global
    batch* (B, global batch), so that no (B, C) tensor is built or all-gathered."""
    if isinstance(head, PartialFC):
        return F.one_hot(torch.arange(rows.start, rows.stop, device=y.device), global_batch).float()
    return F.one_hot(y, num_classes).float()


def head_targets(head, target: torch.Tensor, y: torch.Tensor):
    """Partial FC: the (possibly mixed) row targets -> (labels (B, 2), weights (B, 2)) of the rows'
    classes; the replicated head takes the class targets as they are."""
    if not isinstance(head, PartialFC):
        return target
    y_all = distributed.all_gather_cat(y)
    w, idx = target.topk(min(2, target.shape[1]), dim=1)
    labels = y_all[idx]
    labels = torch.where(w > 0, labels, labels[:, :1])  # unmixed rows: no second class
    return labels, w


def margin_loss(ddp_head, emb: torch.Tensor, target) -> torch.Tensor:
    """Mean cross-entropy of the margin logits (the Partial FC head computes it itself)."""
    if isinstance(target, tuple):
        return ddp_head(emb, *target)
    logits = ddp_head(emb, target)
    return torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()


def clip_gradients(cfg: FinetuneConfig, params, head=None) -> torch.Tensor:
    """common.clip_gradients_, with a Partial FC shard's norm summed over ranks."""
    if not isinstance(head, PartialFC):
        return common.clip_gradients_(params, cfg.clip_grad, cfg.clip_mode)
    rest = [p for p in params if p is not head.weight]
    max_norm = cfg.clip_grad if cfg.clip_grad > 0 else math.inf
    if cfg.clip_mode == "global":
        return partial_fc.clip_grad_norm_(rest, head, max_norm)
    n_rest = common.clip_gradients_(rest, cfg.clip_grad, cfg.clip_mode)
    n_head = partial_fc.clip_grad_norm_([], head, max_norm)
    return torch.sqrt(n_rest.float() ** 2 + n_head.to(n_rest.device) ** 2)


# ----------------------------------------------------------------------------- the run
@dataclass
class FinetuneRun(Run):
    """A finetuning run: the shared parts, the margin head, the drift regulariser's frozen
    landmark CNN and the faces whose landmarks are drawn at the end."""
    head: Optional[nn.Module] = None         # CosFace / ArcFace, or this rank's Partial FC shard
    ddp_head: Optional[nn.Module] = None     # its DDP wrapper (a Partial FC shard is not wrapped)
    frozen_cnn: Optional[nn.Module] = None   # the drift regulariser's reference (None: no drift term)
    fixed: Optional[torch.Tensor] = None     # 8 training faces, their landmarks pictured
    start_landmarks: Optional[torch.Tensor] = None
    rows: Optional[slice] = None             # this rank's rows of the global batch
    params: list = dataclasses.field(default_factory=list)  # what gradient clipping sees
    micro_per_epoch: int = 0                 # batches of an epoch in the run's stream of micro-batches
    sums: Optional[torch.Tensor] = None      # (loss, drift, total) summed over the step being accumulated

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.micro_per_epoch // self.cfg.accum_steps

    def micro_batches(self, epoch: int) -> int:
        """The epoch's micro-batches that are trained on: all of its part of the stream up to the
        run's last optimiser step."""
        stream_end = self.total_steps * self.cfg.accum_steps
        return max(0, min(self.micro_per_epoch, stream_end - epoch * self.micro_per_epoch))

    def pending(self, epoch: int) -> int:
        """Micro-batches accumulated towards step self.step + 1 when epoch `epoch` begins (0 but at
        an epoch end inside a step of --accum-across-epochs)."""
        trained = min(epoch * self.micro_per_epoch, self.total_steps * self.cfg.accum_steps)
        return max(0, trained - self.step * self.cfg.accum_steps)

    def save_state(self, epoch: int) -> None:
        path = self.ring.path(self.step)
        head_sd, opt_sd = partial_fc.checkpoint_parts(self.head, self.optimizer, path)  # + shard files
        pending = save_pending_accumulation(self, epoch, path)  # + gradient files
        self.write_checkpoint(epoch, model=self.model.state_dict(), head=head_sd, optimizer=opt_sd,
                              start_landmarks=self.start_landmarks, config=dataclasses.asdict(self.cfg),
                              model_config=self.model.config, kind="finetune", **pending)
        if self.is_main:  # shard and gradient files of checkpoints the ring removed
            partial_fc.prune_shards(self.cfg.out_dir)
            prune_pending_grads(self.cfg.out_dir)

    def finish(self) -> dict:
        """A summary line, the landmark pictures and model.pt."""
        last, model = self.last, self.model
        result = {"steps": self.step, "train_images_per_s": last.get("images_per_s", 0.0),
                  "final_loss": last.get("loss", math.nan),
                  "checkpoint": os.path.join(self.cfg.out_dir, "model.pt")}
        self.logger.log(stage=self.stage, **last, loader_images_per_s=self.data.loader_images_per_s())
        model.eval()
        with torch.no_grad():
            end_landmarks = model.predict_landmarks(self.fixed).cpu()
        common.save_landmark_png(os.path.join(self.cfg.out_dir, "landmarks.png"), self.fixed, end_landmarks,
                                 self.start_landmarks)
        result["landmark_shift_px"] = (end_landmarks - self.start_landmarks).norm(dim=-1).mean().item()
        save_model(model, result["checkpoint"], stage="finetune")
        return result


# ----------------------------------------------------------------------------- an accumulation over an epoch end
def pending_grads_path(checkpoint: str, rank: int, world_size: int) -> str:
    return f"{checkpoint}.grads-{rank}-of-{world_size}"


def _named_params(run: FinetuneRun) -> Iterator[tuple[str, nn.Parameter]]:
    """Every trained tensor by a stable name: the model's, then the head's (a Partial FC shard's own rows)."""
    for part, module in (("model", run.model), ("head", run.head)):
        for name, p in module.named_parameters():
            yield f"{part}.{name}", p


def save_pending_accumulation(run: FinetuneRun, epoch: int, checkpoint: str) -> dict:
    """The checkpoint entry of the micro-batches accumulated towards the next step when epoch
    `epoch` begins ({} when none are): their count and loss sums; each rank's gradients so far
    (DDP has not averaged them yet) go to its own file beside the checkpoint. Collective."""
    micro = run.pending(epoch)
    if not micro:
        return {}
    from ..checkpoint import save_checkpoint
    me = distributed.info()
    grads = {name: p.grad.detach().cpu() for name, p in _named_params(run) if p.grad is not None}
    save_checkpoint(pending_grads_path(checkpoint, me.rank, me.world_size), {"grads": grads})
    # every rank's file is on disk before rank 0 writes the checkpoint (write_checkpoint gathers first)
    return {"pending": {"micro": micro, "sums": run.sums.detach().cpu().clone(), "world_size": me.world_size}}


def restore_pending_accumulation(run: FinetuneRun, state: dict, checkpoint: str) -> None:
    """--resume: the gradients and loss sums of micro-batches accumulated at the checkpoint (a
    step spanning its epoch end), so that the step completes as in a run never stopped."""
    from ..checkpoint import CheckpointError, load_checkpoint
    record = state.get("pending", {"micro": 0})
    expected = run.pending(state["epoch"])
    if record["micro"] != expected and (run.cfg.accum_across_epochs or "pending" in state):
        across = " --accum-across-epochs" if run.cfg.accum_across_epochs else ""
        raise ValueError(f"{checkpoint} holds {record['micro']} micro-batches of a step in progress, this run "
                         f"(--accum-steps {run.cfg.accum_steps}{across}) expects {expected}: resume with the "
                         "--accum-steps and --accum-across-epochs it was written with")
    if not expected:
        return
    me = distributed.info()
    if record["world_size"] != me.world_size:
        raise ValueError(f"{checkpoint} holds the gradients of a step in progress on {record['world_size']} ranks, "
                         f"this run has {me.world_size}: resume with {record['world_size']} ranks")
    path = pending_grads_path(checkpoint, me.rank, me.world_size)
    if not os.path.exists(path):
        raise CheckpointError(f"{checkpoint}: its gradient file {path} is missing (every rank's file must sit "
                              "beside the checkpoint)")
    grads = load_checkpoint(path)["grads"]
    for name, p in _named_params(run):
        p.grad = grads[name].to(p.device) if name in grads else None
    run.sums = record["sums"].to(run.device)


def prune_pending_grads(folder: str) -> None:
    """Remove gradient files whose checkpoint is gone (rotated out of the ring, or never written)."""
    for f in glob.glob(os.path.join(folder, "step-*.pt.grads-*-of-*")):
        if not os.path.exists(f.split(".grads-")[0]):
            with contextlib.suppress(OSError):
                os.remove(f)


def step_plan(cfg: FinetuneConfig, data) -> tuple[int, int, np.ndarray]:
    """(optimiser steps of an epoch, batches of an epoch in the run's stream of micro-batches, lr
    per step). Steps of --accum-steps micro-batches within an epoch: len // accum steps, the
    epoch's last len % accum batches left out. --accum-across-epochs: one stream of epochs x len
    micro-batches, floor(epochs x len / accum) steps, warmup_epochs x len / accum of them warm-up
    (the release's counting, train_largescale.py:722, 729-733, 870-891)."""
    accum, batches = cfg.accum_steps, len(data)
    peak, warmup = peak_lr(cfg, data.global_batch), min(cfg.warmup_epochs, cfg.epochs / 2)
    if not cfg.accum_across_epochs:
        if batches < accum:
            raise ValueError(f"--accum-steps {accum} exceeds the {batches} batches of an epoch")
        steps_per_epoch = batches // accum
        lr = cosine_schedule(peak, cfg.min_lr, cfg.epochs, steps_per_epoch, warmup_epochs=warmup)
        return steps_per_epoch, steps_per_epoch * accum, lr
    total = cfg.epochs * batches // accum
    if total < 1:
        raise ValueError(f"--accum-steps {accum} exceeds the {cfg.epochs * batches} batches of the run "
                         f"({cfg.epochs} epochs of {batches})")
    lr = cosine_schedule(peak, cfg.min_lr, total, 1, warmup_epochs=warmup * batches / accum)  # per step
    return batches // accum, batches, lr


def drift_reference(cfg: FinetuneConfig, model) -> Optional[nn.Module]:
    """The drift regulariser pulls the trainable landmark CNN towards a frozen copy of its start
    (None when there is no loaded landmark CNN or no drift weight)."""
    if model.landmark_cnn is not None and (cfg.landmark_init or cfg.init) and max(cfg.drift_lambdas) > 0:
        return copy.deepcopy(model.landmark_cnn).eval().requires_grad_(False)
    return None


def build_run(cfg: FinetuneConfig, stage: str = "finetune") -> FinetuneRun:
    """Model, data, head, optimiser, lr schedule, the resumed state, DDP wrappers."""
    device, amp = common.setup_run(cfg)
    me = distributed.info()
    model = build_model(cfg, device)
    data = build_train_data(cfg.dataset, cfg.data_path, cfg.fewshot, cfg.seed, cfg.batch_size, cfg.workers,
                            me.rank, me.world_size, channel_order=cfg.channel_order, partition=cfg.partition,
                            transform=build_train_augment(cfg, model.image_size),
                            num_classes=cfg.num_classes, relabel_subset=cfg.relabel_subset)
    head = build_head(cfg, model.dim, data.num_classes, device)
    frozen_cnn = drift_reference(cfg, model)
    distributed.seed_rank_rngs(cfg.seed)  # weights are equal on every rank; dropout masks must not be
    opt = common.make_adamw(make_param_groups(cfg, model, head), cfg.lr, device)
    steps_per_epoch, micro_per_epoch, lr = step_plan(cfg, data)  # steps of --accum-steps micro-batches
    # One generator, in step on every rank: augmentation and mixup draw for the global batch.
    run = FinetuneRun(cfg=cfg, stage=stage, device=device, amp=amp, data=data, model=model, optimizer=opt,
                      scaler=common.make_grad_scaler(device, amp),
                      generator=torch.Generator().manual_seed(cfg.seed + 1), steps_per_epoch=steps_per_epoch,
                      schedules={"lr": lr}, head=head, frozen_cnn=frozen_cnn, micro_per_epoch=micro_per_epoch,
                      sums=torch.zeros(3, device=device),
                      rows=slice(me.rank * cfg.batch_size, (me.rank + 1) * cfg.batch_size))
    state = run.resume(per_rank_generator=False)
    if state:
        model.load_state_dict(state["model"])
        partial_fc.load_head(state, run.ring.path(state["step"]), head, opt)  # either head, any world size
        run.start_landmarks = state.get("start_landmarks")
    run.fixed = data.sample_images(8).to(device)
    if run.start_landmarks is None:
        with torch.no_grad():
            run.start_landmarks = model.eval().predict_landmarks(run.fixed).cpu()
    model.train()
    # Under torchrun: batch-norm statistics over the global batch, gradients averaged over ranks.
    run.model = distributed.sync_batch_norm(model, device)
    run.ddp_model = distributed.wrap_ddp(run.model)
    run.ddp_head = head if isinstance(head, PartialFC) else distributed.wrap_ddp(head)  # shards: not DDP
    run.params = list(run.model.parameters()) + list(head.parameters())
    opt.zero_grad(set_to_none=True)
    if state:
        restore_pending_accumulation(run, state, run.ring.path(state["step"]))
    return run


def forward_backward(run: FinetuneRun, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                     lam_drift: float, boundary: bool) -> torch.Tensor:
    """One micro-batch: augmentation, mixup, forward, backward (gradients all-reduced on the
    last micro-batch of a step only). Returns the global batch's (loss, drift, total); every
    rank stops together on a non-finite one."""
    cfg, data = run.cfg, run.data
    x = to_model_input(images.to(run.device, non_blocking=True))
    y = labels.to(run.device)
    common.set_schedule(run.optimizer, float(run.schedules["lr"][run.step]))
    if data.transform is None:
        x = augment(x, cfg, run.generator, run.rows, data.global_batch)
    target = class_targets(run.head, y, data.num_classes, run.rows, data.global_batch)
    if cfg.mixup_prob > 0 and torch.rand((), generator=run.generator).item() < cfg.mixup_prob:
        x, target = mixup(x, target, cfg.mixup_alpha, run.generator, run.rows)
    target = head_targets(run.head, target, y)
    sync = contextlib.ExitStack()
    if not boundary and hasattr(run.ddp_model, "no_sync"):
        sync.enter_context(run.ddp_model.no_sync())
        sync.enter_context(run.ddp_head.no_sync())
    with sync:
        loss, drift, total_loss = micro_batch_loss(cfg, run.ddp_model, run.ddp_head, x, target, run.device,
                                                   run.amp, run.frozen_cnn, lam_drift, run.model.image_size)
        run.scaler.scale(total_loss / cfg.accum_steps).backward()
    shown = distributed.all_reduce_mean(torch.stack([loss.detach(), drift.detach(), total_loss.detach()]))
    if not torch.isfinite(shown).all():
        raise FloatingPointError(f"non-finite loss at step {run.step} (epoch {epoch}); the last good "
                                 f"checkpoint is {run.ring.latest()}")
    return shown


def train_one_epoch(run: FinetuneRun, epoch: int) -> Iterator[dict]:
    """The optimiser steps that end in epoch `epoch`, each of --accum-steps consecutive
    micro-batches of the run's stream; yields each step's metrics. The stream holds an epoch's
    first len - len % accum batches (no step spans an epoch end), or with --accum-across-epochs
    all of them: a step may begin in the epoch before, and the batches after the run's last
    step are left out."""
    cfg, accum = run.cfg, run.cfg.accum_steps
    lam_drift = drift_weight(cfg, epoch)
    first = epoch * run.micro_per_epoch  # the epoch's first micro-batch in the stream
    skip = max(0, run.step * accum - first)  # done before a checkpoint mid-epoch
    for micro, (images, labels) in enumerate(run.data.epoch_batches(epoch, skip), start=skip):
        if micro >= run.micro_batches(epoch):
            break
        boundary = (first + micro + 1) % accum == 0
        run.sums += forward_backward(run, images, labels, epoch, lam_drift, boundary)
        run.seen += images.shape[0] * distributed.info().world_size
        if not boundary:
            continue
        gnorm = optimizer_step(cfg, run.optimizer, run.scaler, run.params, run.head)
        shown, run.sums = run.sums / accum, torch.zeros(3, device=run.device)
        run.step += 1
        yield {"step": run.step, "epoch": epoch, "loss": shown[0].item(), "drift": shown[1].item(),
               "drift_lambda": lam_drift, "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(gnorm)}


def default_hooks(run: FinetuneRun) -> list:
    """Rank 0: --val-bins validation during training, the held-out ORL evaluation at the end."""
    if not run.is_main:
        return []
    cfg, hooks = run.cfg, []
    validator = Validator(cfg.val_bins, run.model.image_size, cfg.out_dir, run.logger, resume=run.step > 0,
                          every=cfg.val_every)  # a resumed run keeps its best.pt
    if validator:
        hooks.append(validator)
    if cfg.eval:
        hooks.append(OrlEvaluation(cfg.out_dir))
    return hooks


def run(cfg: FinetuneConfig, log_prefix: str = "finetune") -> dict:
    """Train; under torchrun every rank calls this and returns rank 0's result."""
    with distributed.failure_guard(), common.backend_scope(cfg.backend):
        training = build_run(cfg, log_prefix)
        return fit(training, train_one_epoch, default_hooks(training))


def main(argv: Optional[list[str]] = None) -> dict:
    return run(config.parse(FinetuneConfig, argv, prog="python -m lafs_fast.train finetune"))
