"""Supervised Part fViT training: from scratch (the landmark CNN learns through the op's landmark
gradient, no landmark labels) or finetuning from a LAFS / Part fViT checkpoint, few-shot or full.

    python -m lafs_fast.train finetune --help
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import config as C
from .. import ssl
from ..convert import save_model
from ..dropout import use_philox_dropout
from ..models import create_model
from ..models.heads import ArcFace, CosFace
from . import common, distributed
from ..data import to_model_input
from .data_setup import build_train_data, evaluate_model


@dataclass
class FinetuneConfig(common.RunConfig):
    """Supervised Part fViT training / finetuning (CosFace or ArcFace)."""
    out_dir: str = C.field("runs/finetune", "where checkpoints, metrics.jsonl and pictures go")
    model: str = C.field("part_fvit_tiny", "model preset (part_fvit_tiny, part_fvit_s, part_fvit_b)")
    landmarks: str = C.field("cnn", "landmarks from the landmark CNN, or a fixed grid (plain fViT)",
                             choices=["cnn", "grid"])
    init: str = C.field("", "checkpoint to start from: a lafs_fast pretrain/finetune checkpoint or "
                            "an official release file (its ViT; DINO heads are dropped)")
    landmark_init: str = C.field("", "checkpoint whose landmark CNN initialises ours (and is the "
                                     "frozen reference of the drift regulariser)")
    fewshot: int = C.field(0, "images per identity (seeded random choice); 0 = all")
    epochs: int = C.field(40, "training epochs")
    batch_size: int = C.field(32, "images per step")
    lr: float = C.field(2e-3, "peak learning rate (AdamW)")
    min_lr: float = C.field(1e-5, "final learning rate of the cosine schedule")
    warmup_epochs: float = C.field(2.0, "linear warm-up epochs")
    weight_decay: float = C.field(0.1, "AdamW weight decay of the ViT (none on biases / norms)")
    cnn_weight_decay: float = C.field(0.05, "weight decay of the landmark CNN")
    layer_decay: float = C.field(1.0, "layer-wise lr decay (LAFS finetuning: 0.58; 1 = off)")
    cnn_lr_scale: float = C.field(1.0, "lr multiplier of the landmark CNN")
    clip_grad: float = C.field(5.0, "gradient-norm clip (0 = off)")
    loss: str = C.field("cosface", "margin loss", choices=["cosface", "arcface"])
    scale: float = C.field(32.0, "margin-loss scale s (64 in the paper for large data)")
    margin: float = C.field(0.4, "margin m (CosFace 0.4, ArcFace 0.5)")
    drift_lambdas: list[float] = C.field([1000.0, 100.0, 1.0, 0.11, 0.0],
                                         "landmark-drift regulariser weights per stage")
    drift_epochs: list[int] = C.field([8, 14, 21, 28], "epochs where the drift weight steps down")
    mixup_alpha: float = C.field(0.2, "mixup Beta(alpha, alpha)")
    mixup_prob: float = C.field(0.1, "probability that a batch is mixed")
    crop_scale: float = C.field(0.9, "random resized crop minimum area (max 1)")
    erase_prob: float = C.field(0.1, "random erasing probability per image")
    eval: bool = C.field(True, "evaluate on held-out pairs at the end")

    def validate(self):
        super().validate()
        C.require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        C.require(self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}")
        C.require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        C.require(self.fewshot >= 0, f"--fewshot must be >= 0, got {self.fewshot}")
        C.require(0 < self.crop_scale <= 1, f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        C.require(len(self.drift_lambdas) == len(self.drift_epochs) + 1,
                  "--drift-lambdas needs exactly one more value than --drift-epochs")
        C.require(self.dataset in ("orl", "synthetic") or bool(self.data_path),
                  f"--data-path is required for --dataset {self.dataset}")
        if self.init:
            C.require(os.path.exists(self.init), f"--init: no such file {self.init}")
        if self.landmark_init:
            C.require(os.path.exists(self.landmark_init), f"--landmark-init: no such file {self.landmark_init}")


def drift_weight(cfg: FinetuneConfig, epoch: int) -> float:
    """lambda(epoch) of the landmark-drift regulariser: a step function (LAFS_FACTS section 4)."""
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
    if cfg.fast_dropout:
        use_philox_dropout(model)
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


def run(cfg: FinetuneConfig, log_prefix: str = "finetune") -> dict:
    """Train; under torchrun every rank calls this and returns rank 0's result."""
    with distributed.failure_guard():
        return _train(cfg, log_prefix)


def _train(cfg: FinetuneConfig, log_prefix: str) -> dict:
    device, amp = common.setup_run(cfg)
    me = distributed.info()
    data = build_train_data(cfg.dataset, cfg.data_path, cfg.fewshot, cfg.seed, cfg.batch_size, cfg.workers,
                            me.rank, me.world_size)
    model = build_model(cfg, device)
    Head = CosFace if cfg.loss == "cosface" else ArcFace
    head = Head(model.dim, data.num_classes, s=cfg.scale, m=cfg.margin).to(device)
    # The drift regulariser pulls the trainable landmark CNN towards a frozen copy of its start.
    frozen_cnn = None
    if model.landmark_cnn is not None and (cfg.landmark_init or cfg.init) and max(cfg.drift_lambdas) > 0:
        frozen_cnn = copy.deepcopy(model.landmark_cnn).eval().requires_grad_(False)
    distributed.seed_rank_rngs(cfg.seed)  # weights are equal on every rank; dropout masks must not be
    groups = common.param_groups(model, cfg.weight_decay, cfg.layer_decay, cfg.cnn_weight_decay, extra=head)
    for g in groups:
        if g["layer"] == 0 and any(p is q for p in g["params"] for q in (model.landmark_cnn.parameters()
                                                                         if model.landmark_cnn else [])):
            g["lr_scale"] *= cfg.cnn_lr_scale
    opt = common.make_adamw(groups, cfg.lr, device)
    scaler = common.make_grad_scaler(device, amp)
    steps_per_epoch = len(data)
    total = cfg.epochs * steps_per_epoch
    lr_sched = ssl.cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, steps_per_epoch,
                                   warmup_epochs=min(cfg.warmup_epochs, cfg.epochs / 2))
    ring = common.CheckpointRing(cfg.out_dir, cfg.keep_checkpoints)
    logger = common.JsonlLogger(os.path.join(cfg.out_dir, "metrics.jsonl"))
    # One generator, in step on every rank: augmentation and mixup draw for the global batch.
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, start_epoch, start_landmarks = 0, 0, None
    if cfg.resume:
        state = common.load_training_state(ring, data.global_batch, gen, scaler, per_rank_gen=False, seed=cfg.seed)
        if state:
            model.load_state_dict(state["model"])
            head.load_state_dict(state["head"])
            opt.load_state_dict(state["optimizer"])
            step, start_epoch = state["step"], state["epoch"]
            start_landmarks = state.get("start_landmarks")
    fixed = data.sample_images(8).to(device)
    if start_landmarks is None:
        with torch.no_grad():
            start_landmarks = model.eval().predict_landmarks(fixed).cpu()
    model.train()
    # Under torchrun: batch-norm statistics over the global batch, gradients averaged over ranks.
    model = distributed.sync_batch_norm(model, device)
    ddp_model, ddp_head = distributed.wrap_ddp(model), distributed.wrap_ddp(head)
    rows = slice(me.rank * cfg.batch_size, (me.rank + 1) * cfg.batch_size)

    def save(epoch):
        common.save_training_state(ring, step, epoch, steps_per_epoch, data.global_batch, gen, scaler,
                                   model=model.state_dict(), head=head.state_dict(), optimizer=opt.state_dict(),
                                   start_landmarks=start_landmarks, config=dataclasses.asdict(cfg),
                                   model_config=model.config, kind="finetune")

    t_start, seen = time.time(), 0
    ends = common.LoopEnds(cfg, logger, save, log_prefix, step)
    bar = tqdm(total=total, initial=step, desc=log_prefix, disable=not (cfg.progress and me.is_main),
               dynamic_ncols=True)
    last = {}
    for epoch in range(start_epoch, cfg.epochs):
        lam_drift = drift_weight(cfg, epoch)
        for images, labels in data.epoch_batches(epoch, max(0, step - epoch * steps_per_epoch)):
            x = to_model_input(images.to(device, non_blocking=True))
            y = labels.to(device)
            common.set_schedule(opt, float(lr_sched[step]))
            x = augment(x, cfg, gen, rows, data.global_batch)
            target = F.one_hot(y, data.num_classes).float()
            if cfg.mixup_prob > 0 and torch.rand((), generator=gen).item() < cfg.mixup_prob:
                x, target = mixup(x, target, cfg.mixup_alpha, gen, rows)
            with common.autocast(device, amp):
                emb, lms = ddp_model(x, return_landmarks=True)
                logits = ddp_head(emb, target)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
            drift = torch.zeros((), device=device)
            if frozen_cnn is not None and lam_drift > 0:
                with torch.no_grad():
                    ref_lm = frozen_cnn(x)
                S1 = model.image_size - 1
                drift = F.mse_loss(lms.float() / S1, ref_lm.float() / S1)
            total_loss = loss + lam_drift * drift
            # The global batch's values: logged, and every rank stops together on a non-finite one.
            shown = distributed.all_reduce_mean(torch.stack([loss.detach(), drift.detach(), total_loss.detach()]))
            if not torch.isfinite(shown).all():
                raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}); the last good "
                                         f"checkpoint is {ring.latest()}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(total_loss).backward()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()),
                                                   cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
            scaler.step(opt)
            scaler.update()
            step += 1
            seen += x.shape[0] * me.world_size
            bar.update(1)
            ips = seen / max(1e-9, time.time() - t_start)
            bar.set_postfix(loss=f"{shown[0].item():.3f}", ips=f"{ips:.1f}")
            last = {"step": step, "epoch": epoch, "loss": shown[0].item(), "drift": shown[1].item(),
                    "drift_lambda": lam_drift, "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                    "images_per_s": ips}
            if ends.after_step(step, epoch, last):
                bar.close()
                return {"steps": step, "stopped": True}
        ends.after_epoch(step, epoch)
    bar.close()
    result = {"steps": step, "train_images_per_s": last.get("images_per_s", 0.0),
              "final_loss": last.get("loss", math.nan), "checkpoint": os.path.join(cfg.out_dir, "model.pt")}
    if me.is_main:  # pictures, the final model and the evaluation: rank 0 only
        logger.log(stage=log_prefix, **last, loader_images_per_s=data.loader_images_per_s())
        model.eval()
        with torch.no_grad():
            end_landmarks = model.predict_landmarks(fixed).cpu()
        common.save_landmark_png(os.path.join(cfg.out_dir, "landmarks.png"), fixed, end_landmarks, start_landmarks)
        result["landmark_shift_px"] = (end_landmarks - start_landmarks).norm(dim=-1).mean().item()
        save_model(model, result["checkpoint"], stage="finetune")
        if cfg.eval:
            result["eval"] = evaluate_model(model, device, cfg.out_dir)
        logger.log(stage=log_prefix + "_done", **{k: v for k, v in result.items() if k != "eval"})
    # Every rank returns rank 0's result, once model.pt exists (the pipeline's next stage reads it).
    return distributed.broadcast_object(result)


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = C.parse(FinetuneConfig, argv, prog="python -m lafs_fast.train finetune")
    return run(cfg)
