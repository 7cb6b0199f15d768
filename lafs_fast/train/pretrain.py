"""LAFS self-supervised pretraining: the student's representation of a random subset of landmarks
must match the teacher's representation of all landmarks (DINO-style, no labels).

One step, as data (no Python loop over views):
  faces -> views.make_lafs_views (clean + augmented copies of 2 global + L local views)
  -> frozen landmark CNN on all clean copies (one batched call, no_grad)
  -> ops.multicrop_embed (student tokens of every view, teacher tokens of the global views;
     landmark shuffle/subset on the local views, coordinate perturbation on all)
  -> student ViT: global batch + local batch; teacher ViT: global batch (no_grad)
  -> DINO heads -> lafs_fast.dino.DINOLoss -> backward -> AdamW -> EMA teacher.

    python -m lafs_fast.train pretrain --help
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from .. import config, ops, views
from ..convert import save_model
from ..data import to_model_input
from ..dino import (
    DINOLoss,
    cancel_last_layer_grads,
    check_finite,
    ema_update_,
    lr_schedule,
    momentum_schedule,
    teacher_temp_schedule,
    weight_decay_schedule,
)
from ..models import create_model
from ..models.heads import DINOHead
from ..models.registry import model_config
from ..ops.dropout import use_counter_dropout
from . import common, distributed
from .data_setup import build_train_data
from .run import Run, fit


@dataclass
class PretrainConfig(common.RunConfig):
    """LAFS pretraining (self-supervised, DINO-style, on unlabeled faces). The defaults are sized for the
    bundled ORL faces on a CPU; configs/release/lafs_pretrain_webface4m.yaml is the release's recipe."""
    out_dir: str = config.field("runs/pretrain", "where checkpoints, metrics.jsonl and pictures go")
    model: str = config.field("part_fvit_tiny", "backbone preset")
    landmarks: str = config.field("cnn", "cnn: a frozen landmark CNN from --landmark-init; grid: the "
                                         "fixed grid (DINO-on-fViT baseline)", choices=["cnn", "grid"])
    landmark_init: str = config.field("", "checkpoint holding the supervised landmark CNN (required for cnn)")
    epochs: int = config.field(20, "epochs")
    batch_size: int = config.field(32, "faces per step (each gives 2 global + n_local views)")
    n_local: int = config.field(8, "local views per face")
    local_landmarks: int = config.field(0, "landmarks per local view (0 = 36/196 of N, rounded)")
    shuffle: bool = config.field(True, "local views draw landmarks with replacement in random order")
    perturb_std: float = config.field(5.0, "sigma in pixels of the landmark coordinate perturbation")
    photometric: bool = config.field(True, "colour jitter / grayscale / blur / solarize on augmented copies")
    out_dim: int = config.field(4096, "DINO head output dimension K (100000 in the release)")
    head_hidden: int = config.field(2048, "DINO head hidden width (2048 in the release)")
    head_bottleneck: int = config.field(256, "DINO head bottleneck before the weight-normed layer (256)")
    lr: float = config.field(5e-4, "peak lr for a global batch of 256 (scaled linearly: lr x batch_size x world "
                                   "size / 256)")
    min_lr: float = config.field(1e-6, "final lr")
    warmup_epochs: float = config.field(2.0, "lr warm-up epochs (10 of 41 in the release; 2 suits the CPU-sized "
                                             "ORL default)")
    weight_decay: float = config.field(0.04, "initial weight decay (cosine to --weight-decay-end)")
    weight_decay_end: float = config.field(0.4, "final weight decay")
    momentum_teacher: float = config.field(0.996, "initial EMA momentum (cosine to 1)")
    teacher_temp: float = config.field(0.04, "teacher temperature after warm-up")
    warmup_teacher_temp: float = config.field(0.04, "initial teacher temperature (the release: 0.07; the ORL "
                                                    "default keeps 0.04, its runs being short)")
    warmup_teacher_temp_epochs: int = config.field(0, "teacher temperature warm-up epochs, linear (30 in the "
                                                      "release; more than --epochs is cut, not a crash)")
    student_temp: float = config.field(0.1, "student temperature")
    freeze_last_layer: int = config.field(1, "epochs with the head's last layer frozen (1: epoch 0, the release)")
    clip_grad: float = config.field(3.0, "gradient-norm clip (0 = off)")
    clip_mode: str = config.field("global", "global: one norm over all student tensors (lafs_fast's default); "
                                            "per_tensor: each tensor's gradient clipped to --clip-grad on its own "
                                            "(DINO's clip_gradients: the release)", choices=list(common.CLIP_MODES))
    decay_tokens: bool = config.field(False, "weight decay on cls_token and pos_embedding too (the release: true; "
                                             "default false exempts them, as timm/DeiT)")
    weight_init: str = config.field("timm", "student init: timm (trunc-normal 0.02, lafs_fast's default) or "
                                            "release (cls_token, pos_embedding ~ N(0, 1), PyTorch's default Linear "
                                            "init, DINO head's last layer likewise)", choices=["timm", "release"])
    landmark_source: str = config.field("view", "view: the frozen CNN predicts landmarks on every view's clean "
                                                "copy (the release); image: once per face, mapped into each view "
                                                "through its crop and flip (10x fewer CNN calls)",
                                        choices=["view", "image"])

    def validate(self):
        super().validate()
        config.require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        config.require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        config.require(self.n_local >= 0, f"--n-local must be >= 0, got {self.n_local}")
        config.require(self.perturb_std >= 0, f"--perturb-std must be >= 0, got {self.perturb_std}")
        config.require(self.out_dim >= 2, f"--out-dim must be >= 2, got {self.out_dim}")
        if self.landmarks == "cnn":
            config.require(bool(self.landmark_init), "--landmarks cnn needs --landmark-init (a supervised "
                                                     "Part fViT checkpoint); use --landmarks grid without one")
            config.require(os.path.exists(self.landmark_init),
                           f"--landmark-init: no such file {self.landmark_init}")

    def derived(self) -> list[str]:
        """What the options imply (printed by --print-config as comments)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            n = int(model_config(self.model).get("num_landmarks", 196))
        except ValueError:
            n = 0
        k = self.local_landmarks or max(1, round(n * 36 / 196))
        temps = teacher_temp_schedule(self.warmup_teacher_temp, self.teacher_temp,
                                          self.warmup_teacher_temp_epochs, self.epochs)
        return [f"peak lr = lr x batch_size x world size / 256 = {self.lr:g} x {self.batch_size} x W / 256: "
                f"{self.lr * self.batch_size / 256:.6g} at W=1, {self.lr * self.batch_size * 2 / 256:.6g} at W=2 "
                f"(W here: {world})",
                f"lr: linear warm-up 0 -> peak over {min(self.warmup_epochs, self.epochs / 2):g} epochs, cosine "
                f"to {self.min_lr:g} at epoch {self.epochs}",
                f"teacher temperature per epoch: {temps[0]:g} -> {temps[-1]:g} "
                f"(warm-up {min(self.warmup_teacher_temp_epochs, self.epochs)} of {self.epochs} epochs)",
                f"views per face: 2 global ({n} landmarks) + {self.n_local} local ({k} landmarks each); "
                f"DINO loss pairs: {2 * (2 + self.n_local) - 2}"]


class LafsPretrainer(nn.Module):
    """Student and teacher (backbone + DINO head) and the frozen landmark source."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        # The pretraining backbone has no landmark CNN: landmarks come from a frozen one (or a grid).
        self.student = create_model(cfg.model, landmarks="grid")
        if cfg.fast_dropout:
            use_counter_dropout(self.student)
        self.student_head = DINOHead(self.student.dim, cfg.out_dim, hidden_dim=cfg.head_hidden,
                                     bottleneck_dim=cfg.head_bottleneck)
        if cfg.weight_init == "release":
            self.student.init_weights("release")
            # DINO's head (vision_transformer.py:283-285): trunc-normal MLP as ours, but the last
            # layer is weight_norm(nn.Linear) with PyTorch's default init of v (g = 1 either way).
            nn.init.kaiming_uniform_(self.student_head.last_layer.weight_v, a=math.sqrt(5))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        self.landmark_cnn = None
        if cfg.landmarks == "cnn":
            from ..checkpoint import load_landmark_cnn
            self.set_landmark_cnn(load_landmark_cnn(cfg.landmark_init))
        N = self.student.num_landmarks
        self.local_k = cfg.local_landmarks or max(1, round(N * 36 / 196))

    def set_landmark_cnn(self, cnn: nn.Module) -> None:
        """The frozen landmark source: eval mode, no gradients, BatchNorm folded into the convs,
        float32 under autocast (LandmarkCNN.freeze_)."""
        self.landmark_cnn = cnn.freeze_()

    def landmarks(self, clean: torch.Tensor) -> torch.Tensor:
        if self.landmark_cnn is None:
            return self.student.grid.to(clean.dtype)[None].expand(clean.shape[0], -1, -1)
        # One call on a GPU; on CPU chunks of 32 views keep oneDNN's activations in cache
        # (measured 0.20 s vs 0.34 s for 160 views at 112 px, part_fvit_tiny's CNN).
        chunk = clean.shape[0] if clean.is_cuda else 32
        with torch.no_grad():
            return torch.cat([self.landmark_cnn(c) for c in clean.split(chunk)])

    def forward(self, v: "views.LafsViews", seed: int, generator: torch.Generator,
                index: Optional[torch.Tensor] = None):
        """(student outputs (V*B, K), teacher outputs (G*B, K)) for one batch of views. index
        (L*B, K): the local views' landmark subsets; None draws them from generator."""
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
        drawn_here = index is None  # in range by construction: no per-step host sync to check it
        if index is None:
            index = views.landmark_view_index(v.clean_local.shape[0], self.student.num_landmarks, self.local_k,
                                              cfg.shuffle, generator, v.clean_local.device)
        s_pe, t_pe = self.student.patch_embed, self.teacher.patch_embed
        s_g, s_l, t_g = ops.multicrop_embed(
            v.aug_global, lm_g, v.aug_local, lm_l, s_pe.weight, s_pe.bias, t_pe.weight, t_pe.bias,
            local_index=index, patch_size=self.student.patch_size, perturb_std=cfg.perturb_std, seed=seed,
            backend=cfg.backend, check_index=not drawn_here)
        emb = [self.student.forward_tokens(s_g)]
        if s_l.shape[0]:
            emb.append(self.student.forward_tokens(s_l))
        student_out = self.student_head(torch.cat(emb))
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher.forward_tokens(t_g))
        return student_out, teacher_out

    def student_modules(self):
        return [self.student, self.student_head]

    def student_parameters(self) -> list:
        return [p for m in self.student_modules() for p in m.parameters()]

    def teacher_parameters(self) -> list:
        """In the student's order (the EMA pairs them)."""
        return [p for m in (self.teacher, self.teacher_head) for p in m.parameters()]


def forward_loss(model: nn.Module, dino: "DINOLoss", v: "views.LafsViews", seed: int,
                 generator: torch.Generator, epoch: int, device: torch.device, amp: str,
                 index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One step's DINO loss (the centre is updated inside). model: the LafsPretrainer, or its DDP
    wrapper."""
    with common.autocast(device, amp):
        s_out, t_out = model(v, seed, generator, index)
    return dino(s_out.float(), t_out.float(), epoch)


def update(net: LafsPretrainer, opt: torch.optim.Optimizer, scaler, loss: torch.Tensor, epoch: int,
           momentum: float, before_step=None) -> torch.Tensor:
    """Backward, clipping (--clip-mode), the head's last layer frozen in early epochs, AdamW, EMA
    teacher: the release's order (lafs_train.py:590-613). before_step(): called with the final
    gradients in place (tests). Returns the gradient norm before clipping."""
    cfg = net.cfg
    student_params = net.student_parameters()
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    gnorm = common.clip_gradients_(student_params, cfg.clip_grad, cfg.clip_mode)
    cancel_last_layer_grads(net.student_head, epoch, cfg.freeze_last_layer)
    if before_step is not None:
        before_step()
    scaler.step(opt)
    scaler.update()
    ema_update_(net.teacher_parameters(), student_params, momentum)
    return gnorm


def make_optimizer(net: LafsPretrainer, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the student and its head (lr and weight decay are set every step)."""
    cfg = net.cfg
    groups = common.param_groups(net.student, cfg.weight_decay, extra=net.student_head,
                                 decay_tokens=cfg.decay_tokens)
    return common.make_adamw(groups, cfg.lr, device)


# ----------------------------------------------------------------------------- the run
@dataclass
class PretrainRun(Run):
    """A pretraining run: the shared parts (model: the LafsPretrainer), the DINO loss with its
    centre, the view recipe."""
    dino_loss: Optional[DINOLoss] = None
    view_config: Optional[views.ViewConfig] = None

    def save_state(self, epoch: int) -> None:
        self.write_checkpoint(epoch, net=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                              dino=self.dino_loss.state_dict(), config=dataclasses.asdict(self.cfg),
                              model_config=self.model.student.config, kind="lafs_pretrain")

    def finish(self) -> dict:
        """teacher.pt: the backbone finetuning starts from."""
        final = os.path.join(self.cfg.out_dir, "teacher.pt")
        save_model(self.model.teacher, final, stage="lafs_teacher")
        return {"steps": self.step, "final_loss": self.last.get("loss"),
                "images_per_s": self.last.get("images_per_s", 0.0), "checkpoint": final}

    def done_record(self, result: dict) -> dict:
        return {**self.last, "checkpoint": result["checkpoint"]}


def build_run(cfg: PretrainConfig, stage: str = "pretrain") -> PretrainRun:
    """Data, student / teacher / landmark source, DINO loss, optimiser, the lr / weight-decay /
    momentum schedules, the resumed state, the DDP wrapper."""
    device, amp = common.setup_run(cfg)
    me = distributed.info()
    data = build_train_data(cfg.dataset, cfg.data_path, 0, cfg.seed, cfg.batch_size, cfg.workers,
                            me.rank, me.world_size)
    net = LafsPretrainer(cfg).to(device)
    distributed.seed_rank_rngs(cfg.seed)  # weights are equal on every rank; dropout masks must not be
    vcfg = views.ViewConfig(size=net.student.image_size, n_local=cfg.n_local, photometric=cfg.photometric)
    # The centre is an EMA of the teacher's mean over the global batch (all-reduced in update_center).
    dino_loss = DINOLoss(cfg.out_dim, n_global=vcfg.n_global, n_views=vcfg.n_global + cfg.n_local,
                         student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp,
                         warmup_teacher_temp=cfg.warmup_teacher_temp,
                         warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
                         total_epochs=cfg.epochs).to(device)
    opt = make_optimizer(net, device)
    steps_per_epoch = len(data)
    # The linear lr scaling rule uses the global batch (every rank's images).
    schedules = {"lr": lr_schedule(cfg.epochs, steps_per_epoch, data.global_batch, cfg.lr, cfg.min_lr,
                                   warmup_epochs=min(cfg.warmup_epochs, cfg.epochs / 2)),
                 "weight_decay": weight_decay_schedule(cfg.epochs, steps_per_epoch, cfg.weight_decay,
                                                       cfg.weight_decay_end),
                 "momentum": momentum_schedule(cfg.epochs, steps_per_epoch, cfg.momentum_teacher)}
    # Views, the local landmark subsets and the perturbation seed come from this rank's own stream
    # (rank 0: the single-process one): LafsPretrainer and views draw per local batch, and the op
    # keys its noise by the row within the rank's batch, so the draws cannot follow the global
    # batch without changes there (see docs/training.md, "Distributed training").
    gen = torch.Generator().manual_seed(distributed.rank_seed(cfg.seed + 1, me.rank, stream=2))
    run = PretrainRun(cfg=cfg, stage=stage, device=device, amp=amp, data=data, model=net, optimizer=opt,
                      scaler=common.make_grad_scaler(device, amp), generator=gen, steps_per_epoch=steps_per_epoch,
                      schedules=schedules, dino_loss=dino_loss, view_config=vcfg)
    state = run.resume(per_rank_generator=True)
    if state:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        dino_loss.load_state_dict(state["dino"])
    # Under torchrun: student gradients averaged over ranks; the teacher (no gradients) is the EMA
    # of the unwrapped student, identical on every rank.
    run.ddp_model = distributed.wrap_ddp(net)
    return run


def train_one_epoch(run: PretrainRun, epoch: int) -> Iterator[dict]:
    """The steps of one epoch (views, DINO loss, update); yields each step's metrics."""
    schedule = run.schedules
    for images, _ in run.data.epoch_batches(epoch, max(0, run.step - epoch * run.steps_per_epoch)):
        step = run.step
        x = to_model_input(images.to(run.device, non_blocking=True))
        common.set_schedule(run.optimizer, float(schedule["lr"][step]), float(schedule["weight_decay"][step]))
        with torch.no_grad():
            v = views.make_lafs_views(x, run.view_config, generator=run.generator)
        seed = int(torch.randint(0, 2**62, (1,), generator=run.generator))
        loss = forward_loss(run.ddp_model, run.dino_loss, v, seed, run.generator, epoch, run.device, run.amp)
        shown = distributed.all_reduce_mean(loss.detach())  # the global batch's loss
        check_finite(shown, epoch=epoch, step=step, checkpoint=run.ring.latest())
        gnorm = update(run.model, run.optimizer, run.scaler, loss, epoch, float(schedule["momentum"][step]))
        run.step += 1
        run.seen += x.shape[0] * distributed.info().world_size
        yield {"step": run.step, "epoch": epoch, "loss": shown.item(), "lr": float(schedule["lr"][step]),
               "weight_decay": float(schedule["weight_decay"][step]), "momentum": float(schedule["momentum"][step]),
               "teacher_temp": run.dino_loss.teacher_temp(epoch), "grad_norm": float(gnorm)}


def run(cfg: PretrainConfig, log_prefix: str = "pretrain") -> dict:
    """Pretrain; under torchrun every rank calls this and returns rank 0's result."""
    with distributed.failure_guard(), common.backend_scope(cfg.backend):
        return fit(build_run(cfg, log_prefix), train_one_epoch)


def main(argv: Optional[list[str]] = None) -> dict:
    return run(config.parse(PretrainConfig, argv, prog="python -m lafs_fast.train pretrain"))
