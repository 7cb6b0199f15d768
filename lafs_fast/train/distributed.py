"""torch.distributed for the training commands: one process per device, launched by torchrun
(env:// rendezvous: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

Without torchrun (WORLD_SIZE unset or 1) nothing here initialises torch.distributed and every
helper is the identity: a single process runs exactly as it always did.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), env_local_rank())


def init(device: torch.device, timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun job (once per process; later calls reuse the group). nccl on CUDA,
    gloo on CPU. timeout_s bounds the rendezvous and every collective, so a rank that dies
    without closing its sockets cannot leave the others waiting for ever."""
    if env_world_size() <= 1 or is_initialized():
        return info()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(shutdown)
    return info()


def shutdown() -> None:
    """Leave the process group (idempotent). On a failing rank this closes its connections, so
    its peers' pending collectives fail at once instead of waiting for the timeout."""
    if is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


@contextlib.contextmanager
def failure_guard():
    """Around a training run: if this rank raises, say so, shut the process group down and
    re-raise (the process exits non-zero; torchrun then stops the other ranks)."""
    try:
        yield
    except BaseException as e:
        if is_initialized():
            print(f"[rank {dist.get_rank()}] {type(e).__name__}: {e}; shutting down the process group",
                  file=sys.stderr, flush=True)
            shutdown()
        raise


def resolve_cuda_device(device: torch.device) -> torch.device:
    """Under torchrun, 'cuda' (or auto) means this process's GPU, cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", env_local_rank())
    return device


# ----------------------------------------------------------------------------- collectives
def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a new tensor; the input itself without torch.distributed)."""
    if not is_initialized():
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor (same shape on each) concatenated along dim 0, in rank order."""
    if not is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_object(obj: Any) -> list:
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------- per-rank streams
def rank_seed(seed: int, rank: int, stream: int = 0) -> int:
    """A seed for rank `rank`'s own random stream; rank 0 keeps `seed`, so a single process
    draws exactly what it always did."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank, stream]).generate_state(2, np.uint64)[0] % 2**62)


def seed_rank_rngs(seed: int) -> None:
    """After the model is built (identically on every rank): give every rank its own global
    torch / numpy / python streams, so dropout masks differ between ranks."""
    r = info().rank
    if r:
        import random
        s = rank_seed(seed, r, stream=1)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)


# ----------------------------------------------------------------------------- modules
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: every rank's output depends on every rank's input, so the
    backward sums the output gradients over ranks too."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks): the
    CPU/gloo stand-in for nn.SyncBatchNorm, which runs on GPUs only. Mean first, then the centred
    second moment (two all-reduces): as accurate as the single-process variance. Gradients flow
    through the all-reduces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_initialized()):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        C = x.shape[1]
        count = torch.tensor([x.numel() // C], dtype=x.dtype, device=x.device)
        all_reduce_sum_(count)
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / count
        xc = x - mean.view(1, C, 1, 1)
        var = all_reduce((xc * xc).sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), m)
        y = xc * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)
        return y


def sync_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch statistics over the global batch: nn.SyncBatchNorm on CUDA, GlobalBatchNorm2d on
    CPU (same parameters and buffers, so state dicts are unchanged). Identity without
    torch.distributed."""
    if not is_initialized():
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlobalBatchNorm2d):
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batch_norm(child, device)
    return module


def wrap_ddp(module: nn.Module) -> nn.Module:
    """DistributedDataParallel around the trainable module (gradients averaged over ranks in
    the backward); the module itself without torch.distributed. Buffers are broadcast from rank
    0 once, not every step: batch-norm statistics are synchronised (sync_batch_norm), the rest fixed.
    device_ids=None: inputs are already on the device (and include a generator and views)."""
    if not is_initialized():
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=None, forward_sync_buffers=False)
