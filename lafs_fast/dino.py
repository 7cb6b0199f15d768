"""The LAFS self-supervised objective (DINO-style): loss with centring, schedules, EMA teacher,
optimiser parameter groups and the small guards of a pretraining step (docs/method.md section 3).

View order everywhere is view-major (lafs_fast.views): row v * B + b is view v of image b; the
student's views are [global 0..G-1, local 0..L-1], the teacher's [global 0..G-1].
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DINOLoss", "cosine_schedule", "teacher_temp_schedule", "momentum_schedule",
    "weight_decay_schedule", "lr_schedule", "ema_update_",
    "cancel_last_layer_grads", "NonFiniteLossError", "check_finite",
]


# ----------------------------------------------------------------------------- schedules
def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup: float = 0.0) -> np.ndarray:
    """One value per step (DINO's cosine_scheduler): linear warm-up start_warmup -> base over
    warmup_epochs, then base -> final along a half cosine. As DINO, the cosine divides by the
    number of cosine steps, so the last value approaches but does not reach `final`."""
    warm = int(warmup_epochs * steps_per_epoch)
    total = int(epochs * steps_per_epoch)
    if warm > total:
        raise ValueError(f"warm-up ({warm} steps) is longer than the schedule ({total} steps)")
    warmup = np.linspace(start_warmup, base, warm) if warm > 0 else np.array([])
    n = total - warm
    it = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * it / max(n, 1)))
    return np.concatenate((warmup, cos))


def teacher_temp_schedule(warmup_teacher_temp: float = 0.07, teacher_temp: float = 0.04,
                          warmup_epochs: int = 30, total_epochs: int = 41) -> np.ndarray:
    """Per-epoch teacher temperature: linspace(warmup, final, warmup_epochs), then constant."""
    warm = np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs)
    rest = np.full(max(total_epochs - warmup_epochs, 0), teacher_temp)
    return np.concatenate((warm, rest))[:max(total_epochs, 1)]


def momentum_schedule(epochs: int, steps_per_epoch: int, base: float = 0.996,
                      final: float = 1.0) -> np.ndarray:
    """Per-step EMA momentum of the teacher: cosine base -> final."""
    return cosine_schedule(base, final, epochs, steps_per_epoch)


def weight_decay_schedule(epochs: int, steps_per_epoch: int, base: float = 0.04,
                          final: float = 0.4) -> np.ndarray:
    """Per-step weight decay: cosine base -> final."""
    return cosine_schedule(base, final, epochs, steps_per_epoch)


def lr_schedule(epochs: int, steps_per_epoch: int, batch_size: int, base_lr: float = 5e-4,
                min_lr: float = 1e-6, warmup_epochs: int = 10) -> np.ndarray:
    """Per-step learning rate: base_lr * batch_size / 256 (linear scaling rule, DINO), linear
    warm-up from 0, cosine to min_lr."""
    return cosine_schedule(base_lr * batch_size / 256.0, min_lr, epochs, steps_per_epoch,
                           warmup_epochs=warmup_epochs)


# ----------------------------------------------------------------------------- loss
class DINOLoss(nn.Module):
    """DINO cross-entropy between sharpened, centred teacher outputs and student outputs.

    forward(student_out (V*B, K), teacher_out (G*B, K), epoch) -> scalar. Every (teacher view g,
    student view v) pair with v != g contributes mean_b sum_k -p_t log p_s; the loss is the mean
    over those pairs (G*V - G = 18 for 2 + 8 views). Computed in float32 with autocast off; the
    centre is an EMA of the teacher's batch mean, all-reduced when torch.distributed is up.
    """

    def __init__(self, out_dim: int, n_global: int = 2, n_views: int = 10,
                 student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.07, warmup_teacher_temp_epochs: int = 30,
                 total_epochs: int = 41, center_momentum: float = 0.9):
        super().__init__()
        if not 1 <= n_global <= n_views:
            raise ValueError(f"need 1 <= n_global <= n_views, got {n_global}, {n_views}")
        self.out_dim, self.n_global, self.n_views = out_dim, n_global, n_views
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temps = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                   warmup_teacher_temp_epochs, total_epochs)
        mask = torch.ones(n_global, n_views, dtype=torch.bool)
        mask[torch.arange(n_global), torch.arange(n_global)] = False   # same view: no term
        self.register_buffer("pair_mask", mask, persistent=False)

    @property
    def n_pairs(self) -> int:
        return int(self.pair_mask.sum())

    def teacher_temp(self, epoch: int) -> float:
        """Temperature of an epoch; past the schedule, its last value."""
        return float(self.teacher_temps[min(int(epoch), len(self.teacher_temps) - 1)])

    def forward(self, student_out: Tensor, teacher_out: Tensor, epoch: int) -> Tensor:
        G, V = self.n_global, self.n_views
        if teacher_out.shape[0] % G or student_out.shape[0] != V * (teacher_out.shape[0] // G):
            raise ValueError(f"expected student (V*B, K) = ({V}*B, K) and teacher (G*B, K) = "
                             f"({G}*B, K), got {tuple(student_out.shape)}, "
                             f"{tuple(teacher_out.shape)}")
        B = teacher_out.shape[0] // G
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            s = F.log_softmax(student_out.float() / self.student_temp, dim=-1).view(V, B, -1)
            t_raw = teacher_out.detach().float()
            t = F.softmax((t_raw - self.center) / self.teacher_temp(epoch), dim=-1).view(G, B, -1)
            ce = -torch.einsum("gbk,vbk->gv", t, s) / B        # (G, V): mean_b CE of each pair
            loss = ce.masked_select(self.pair_mask).mean()
            self.update_center(t_raw)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """center <- m * center + (1 - m) * mean of teacher_out over the global batch."""
        batch_center = teacher_out.float().sum(dim=0, keepdim=True)
        n = teacher_out.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            n = n * dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center / n,
                                                    alpha=1 - self.center_momentum)


# ----------------------------------------------------------------------------- teacher EMA
@torch.no_grad()
def ema_update_(teacher_params: Iterable[Tensor], student_params: Iterable[Tensor],
                momentum) -> None:
    """teacher <- m * teacher + (1 - m) * student for all tensors in one multi-tensor op."""
    t, s = list(teacher_params), list(student_params)
    if len(t) != len(s):
        raise ValueError(f"teacher has {len(t)} tensors, student {len(s)}")
    if not t:
        return
    torch._foreach_lerp_(t, s, 1.0 - float(momentum))


# ----------------------------------------------------------------------------- optimiser
def cancel_last_layer_grads(head: nn.Module, epoch: int, freeze_last_layer: int = 1,
                            name: str = "last_layer") -> int:
    """Drop the gradients of parameters named *last_layer* while epoch < freeze_last_layer
    (DINO freezes the head's output layer during the first epoch). Returns how many were dropped."""
    if epoch >= freeze_last_layer:
        return 0
    n = 0
    for pname, p in head.named_parameters():
        if name in pname and p.grad is not None:
            p.grad = None
            n += 1
    return n


# ----------------------------------------------------------------------------- guards
class NonFiniteLossError(RuntimeError):
    """The loss is NaN or infinite: training must stop (the original aborts too)."""


def check_finite(loss: Tensor, step: Optional[int] = None, epoch: Optional[int] = None,
                 checkpoint: Optional[str] = None) -> None:
    """Raise NonFiniteLossError if loss is not finite (syncs with the device); checkpoint (the
    last good one, if any) is named in the message so the run can be resumed from it."""
    value = loss.detach().float()
    if not bool(torch.isfinite(value).all()):
        where = "".join([f" at epoch {epoch}" if epoch is not None else "",
                         f" step {step}" if step is not None else ""])
        shown = value.item() if value.numel() == 1 else value.flatten()[:8].tolist()
        resume = f" Last checkpoint: {checkpoint}." if checkpoint else ""
        raise NonFiniteLossError(
            f"non-finite loss {shown}{where}: stopping. Usual causes: lr too high, fp16 overflow "
            f"(check the grad scaler), a bad batch, or a collapsed teacher temperature.{resume}")
