"""LAFS self-supervised pretraining: the student's representation of a random subset of landmarks
must match the teacher's representation of all landmarks (DINO-style, no labels).

One step, as data (no Python loop over views):
  faces -> views.make_lafs_views (clean + augmented copies of 2 global + L local views)
  -> frozen landmark CNN on all clean copies (one batched call, no_grad)
  -> ops.multicrop_embed (student tokens of every view, teacher tokens of the global views;
     landmark shuffle/subset on the local views, coordinate perturbation on all)
  -> student ViT: global batch + local batch; teacher ViT: global batch (no_grad)
  -> DINO heads -> ssl.DINOLoss -> backward -> AdamW -> EMA teacher.

    python -m lafs_fast.train pretrain --help
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from .. import config as C
from .. import ops, ssl, views
from ..convert import save_model
from ..dropout import use_philox_dropout
from ..models import create_model
from ..models.heads import DINOHead
from . import common, distributed
from ..data import to_model_input
from .data_setup import build_train_data


@dataclass
class PretrainConfig(common.RunConfig):
    """LAFS pretraining (self-supervised, DINO-style, on unlabeled faces)."""
    out_dir: str = C.field("runs/pretrain", "where checkpoints, metrics.jsonl and pictures go")
    model: str = C.field("part_fvit_tiny", "backbone preset")
    landmarks: str = C.field("cnn", "cnn: a frozen landmark CNN from --landmark-init; grid: the "
                                    "fixed grid (DINO-on-fViT baseline)", choices=["cnn", "grid"])
    landmark_init: str = C.field("", "checkpoint holding the supervised landmark CNN (required for cnn)")
    epochs: int = C.field(20, "epochs")
    batch_size: int = C.field(32, "faces per step (each gives 2 global + n_local views)")
    n_local: int = C.field(8, "local views per face")
    local_landmarks: int = C.field(0, "landmarks per local view (0 = 36/196 of N, rounded)")
    shuffle: bool = C.field(True, "local views draw landmarks with replacement in random order")
    perturb_std: float = C.field(5.0, "sigma in pixels of the landmark coordinate perturbation")
    photometric: bool = C.field(True, "colour jitter / grayscale / blur / solarize on augmented copies")
    out_dim: int = C.field(4096, "DINO head output dimension K (100000 in the release)")
    head_hidden: int = C.field(2048, "DINO head hidden width (2048 in the release)")
    head_bottleneck: int = C.field(256, "DINO head bottleneck before the weight-normed layer (256)")
    lr: float = C.field(5e-4, "peak lr for batch 256 (scaled linearly by batch_size / 256)")
    min_lr: float = C.field(1e-6, "final lr")
    warmup_epochs: float = C.field(2.0, "lr warm-up epochs")
    weight_decay: float = C.field(0.04, "initial weight decay (cosine to --weight-decay-end)")
    weight_decay_end: float = C.field(0.4, "final weight decay")
    momentum_teacher: float = C.field(0.996, "initial EMA momentum (cosine to 1)")
    teacher_temp: float = C.field(0.04, "teacher temperature after warm-up")
    warmup_teacher_temp: float = C.field(0.04, "initial teacher temperature (0.07 for long runs)")
    warmup_teacher_temp_epochs: int = C.field(0, "teacher temperature warm-up epochs (30 in the paper)")
    student_temp: float = C.field(0.1, "student temperature")
    freeze_last_layer: int = C.field(1, "epochs with the head's last layer frozen")
    clip_grad: float = C.field(3.0, "gradient-norm clip (0 = off)")
    backend: str = C.field("auto", "op backend", choices=list(ops.BACKENDS))
    landmark_source: str = C.field("view", "view: the frozen CNN predicts landmarks on every view's clean "
                                           "copy (the release); image: once per face, mapped into each view "
                                           "through its crop and flip (10x fewer CNN calls)",
                                   choices=["view", "image"])

    def validate(self):
        super().validate()
        C.require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        C.require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        C.require(self.n_local >= 0, f"--n-local must be >= 0, got {self.n_local}")
        C.require(self.perturb_std >= 0, f"--perturb-std must be >= 0, got {self.perturb_std}")
        C.require(self.out_dim >= 2, f"--out-dim must be >= 2, got {self.out_dim}")
        if self.landmarks == "cnn":
            C.require(bool(self.landmark_init), "--landmarks cnn needs --landmark-init (a supervised "
                                                "Part fViT checkpoint); use --landmarks grid without one")
            C.require(os.path.exists(self.landmark_init), f"--landmark-init: no such file {self.landmark_init}")


class LafsPretrainer(nn.Module):
    """Student and teacher (backbone + DINO head) and the frozen landmark source."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        # The pretraining backbone has no landmark CNN: landmarks come from a frozen one (or a grid).
        self.student = create_model(cfg.model, landmarks="grid")
        if cfg.fast_dropout:
            use_philox_dropout(self.student)
        self.student_head = DINOHead(self.student.dim, cfg.out_dim, hidden_dim=cfg.head_hidden,
                                     bottleneck_dim=cfg.head_bottleneck)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        self.landmark_cnn = None
        if cfg.landmarks == "cnn":
            from ..checkpoint import load_landmark_cnn
            self.set_landmark_cnn(load_landmark_cnn(cfg.landmark_init))
        N = self.student.num_landmarks
        self.local_k = cfg.local_landmarks or max(1, round(N * 36 / 196))

    def set_landmark_cnn(self, cnn: nn.Module) -> None:
        """The frozen landmark source: eval mode, no gradients, BatchNorm folded into the convs."""
        self.landmark_cnn = cnn.eval().requires_grad_(False).fold_batchnorm_()

    def landmarks(self, clean: torch.Tensor) -> torch.Tensor:
        if self.landmark_cnn is None:
            return self.student.grid.to(clean.dtype)[None].expand(clean.shape[0], -1, -1)
        # One call on a GPU; on CPU chunks of 32 views keep oneDNN's activations in cache
        # (measured 0.20 s vs 0.34 s for 160 views at 112 px, part_fvit_tiny's CNN).
        chunk = clean.shape[0] if clean.is_cuda else 32
        with torch.no_grad():
            return torch.cat([self.landmark_cnn(c) for c in clean.split(chunk)])

    def forward(self, v: "views.LafsViews", seed: int, generator: torch.Generator):
        """(student outputs (V*B, K), teacher outputs (G*B, K)) for one batch of views."""
        cfg = self.cfg
        n_g = v.clean_global.shape[0]
        if cfg.landmark_source == "image" and self.landmark_cnn is not None and v.source is not None:
            # One CNN call per face; each view gets the face's landmarks through its geometry.
            src = self.landmarks(v.source.to(v.clean_global.dtype))
            S, Sl = v.clean_global.shape[-1], v.clean_local.shape[-1]
            lm_g = views.landmarks_to_views(src, v.boxes_global, v.flip_global, S)
            lm_l = views.landmarks_to_views(src, v.boxes_local, v.flip_local, Sl)
        else:
            # One landmark-CNN call for every view's clean copy.
            lms = self.landmarks(torch.cat([v.clean_global, v.clean_local]))
            lm_g, lm_l = lms[:n_g], lms[n_g:]
        index = views.landmark_view_index(v.clean_local.shape[0], self.student.num_landmarks, self.local_k,
                                          cfg.shuffle, generator, v.clean_local.device)
        s_pe, t_pe = self.student.patch_embed, self.teacher.patch_embed
        s_g, s_l, t_g = ops.multicrop_embed(
            v.aug_global, lm_g, v.aug_local, lm_l, s_pe.weight, s_pe.bias, t_pe.weight, t_pe.bias,
            local_index=index, patch_size=self.student.patch_size, perturb_std=cfg.perturb_std, seed=seed,
            backend=cfg.backend, check_index=False)  # index drawn above: in range, no host sync
        emb = [self.student.forward_tokens(s_g)]
        if s_l.shape[0]:
            emb.append(self.student.forward_tokens(s_l))
        student_out = self.student_head(torch.cat(emb))
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher.forward_tokens(t_g))
        return student_out, teacher_out

    def student_modules(self):
        return [self.student, self.student_head]


def run(cfg: PretrainConfig, log_prefix: str = "pretrain") -> dict:
    """Pretrain; under torchrun every rank calls this and returns rank 0's result."""
    with distributed.failure_guard():
        return _train(cfg, log_prefix)


def _train(cfg: PretrainConfig, log_prefix: str) -> dict:
    device, amp = common.setup_run(cfg)
    me = distributed.info()
    data = build_train_data(cfg.dataset, cfg.data_path, 0, cfg.seed, cfg.batch_size, cfg.workers,
                            me.rank, me.world_size)
    net = LafsPretrainer(cfg).to(device)
    distributed.seed_rank_rngs(cfg.seed)  # weights are equal on every rank; dropout masks must not be
    vcfg = views.ViewConfig(size=net.student.image_size, n_local=cfg.n_local, photometric=cfg.photometric)
    n_views = vcfg.n_global + cfg.n_local
    # The centre is an EMA of the teacher's mean over the global batch (all-reduced in update_center).
    dino = ssl.DINOLoss(cfg.out_dim, n_global=vcfg.n_global, n_views=n_views, student_temp=cfg.student_temp,
                        teacher_temp=cfg.teacher_temp, warmup_teacher_temp=cfg.warmup_teacher_temp,
                        warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
                        total_epochs=cfg.epochs).to(device)
    groups = common.param_groups(net.student, cfg.weight_decay, extra=net.student_head)
    opt = common.make_adamw(groups, cfg.lr, device)
    scaler = common.make_grad_scaler(device, amp)
    steps_per_epoch = len(data)
    total = cfg.epochs * steps_per_epoch
    # The linear lr scaling rule uses the global batch (every rank's images).
    lr_sched = ssl.lr_schedule(cfg.epochs, steps_per_epoch, data.global_batch, cfg.lr, cfg.min_lr,
                               warmup_epochs=min(cfg.warmup_epochs, cfg.epochs / 2))
    wd_sched = ssl.weight_decay_schedule(cfg.epochs, steps_per_epoch, cfg.weight_decay, cfg.weight_decay_end)
    mom_sched = ssl.momentum_schedule(cfg.epochs, steps_per_epoch, cfg.momentum_teacher)
    ring = common.CheckpointRing(cfg.out_dir, cfg.keep_checkpoints)
    logger = common.JsonlLogger(os.path.join(cfg.out_dir, "metrics.jsonl"))
    # Views, the local landmark subsets and the perturbation seed come from this rank's own stream
    # (rank 0: the single-process one): LafsPretrainer and views draw per local batch, and the op
    # keys its noise by the row within the rank's batch, so the draws cannot follow the global
    # batch without changes there (see README "Distributed training").
    gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 1, me.rank, stream=2))
    step, start_epoch = 0, 0
    if cfg.resume:
        state = common.load_training_state(ring, data.global_batch, gen, scaler, per_rank_gen=True, seed=cfg.seed)
        if state:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["optimizer"])
            dino.load_state_dict(state["dino"])
            step, start_epoch = state["step"], state["epoch"]
    student_params = [p for m in net.student_modules() for p in m.parameters()]
    teacher_params = [p for m in (net.teacher, net.teacher_head) for p in m.parameters()]
    # Under torchrun: student gradients averaged over ranks; the teacher (no gradients) is the EMA
    # of the unwrapped student, identical on every rank.
    ddp_net = distributed.wrap_ddp(net)

    def save(epoch):
        common.save_training_state(ring, step, epoch, steps_per_epoch, data.global_batch, gen, scaler,
                                   net=net.state_dict(), optimizer=opt.state_dict(), dino=dino.state_dict(),
                                   config=dataclasses.asdict(cfg), model_config=net.student.config,
                                   kind="lafs_pretrain")

    bar = tqdm(total=total, initial=step, desc=log_prefix, disable=not (cfg.progress and me.is_main),
               dynamic_ncols=True)
    t_start, seen, last = time.time(), 0, {}
    ends = common.LoopEnds(cfg, logger, save, log_prefix, step)
    for epoch in range(start_epoch, cfg.epochs):
        for images, _ in data.epoch_batches(epoch, max(0, step - epoch * steps_per_epoch)):
            x = to_model_input(images.to(device, non_blocking=True))
            common.set_schedule(opt, float(lr_sched[step]), float(wd_sched[step]))
            with torch.no_grad():
                v = views.make_lafs_views(x, vcfg, generator=gen)
            seed = int(torch.randint(0, 2**62, (1,), generator=gen))
            with common.autocast(device, amp):
                s_out, t_out = ddp_net(v, seed, gen)
            loss = dino(s_out.float(), t_out.float(), epoch)
            shown = distributed.all_reduce_mean(loss.detach())  # the global batch's loss
            ssl.check_finite(shown, step=step, checkpoint=ring.latest())
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(student_params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
            ssl.cancel_last_layer_grads(net.student_head, epoch, cfg.freeze_last_layer)
            scaler.step(opt)
            scaler.update()
            ssl.ema_update_(teacher_params, student_params, float(mom_sched[step]))
            step += 1
            seen += x.shape[0] * me.world_size
            bar.update(1)
            ips = seen / max(1e-9, time.time() - t_start)
            bar.set_postfix(loss=f"{shown.item():.3f}", ips=f"{ips:.1f}")
            last = {"step": step, "epoch": epoch, "loss": shown.item(), "lr": float(lr_sched[step - 1]),
                    "momentum": float(mom_sched[step - 1]), "grad_norm": float(gnorm), "images_per_s": ips}
            if ends.after_step(step, epoch, last):
                bar.close()
                return {"steps": step, "stopped": True}
        ends.after_epoch(step, epoch)
    bar.close()
    final = os.path.join(cfg.out_dir, "teacher.pt")
    if me.is_main:
        save_model(net.teacher, final, stage="lafs_teacher")  # the backbone finetuning starts from
        logger.log(stage=log_prefix + "_done", **last, checkpoint=final)
    result = {"steps": step, "final_loss": last.get("loss"), "images_per_s": last.get("images_per_s", 0.0),
              "checkpoint": final}
    # Every rank returns rank 0's result, once teacher.pt exists (the next stage reads it).
    return distributed.broadcast_object(result)


def main(argv: Optional[list[str]] = None) -> dict:
    return run(C.parse(PretrainConfig, argv, prog="python -m lafs_fast.train pretrain"))
