"""Partial FC: a class-sharded CosFace / ArcFace head for training with many identities on many
ranks (the idea of insightface's arcface_torch partial_fc_v2, written afresh here).

Under torchrun with W ranks and C classes, rank r holds the rows of classes
[floor(r*C/W), floor((r+1)*C/W)) of the class matrix (sizes differ by at most one when W does not
divide C). Every step:

  1. the embeddings and labels of all ranks are all-gathered (the embedding gather has a backward:
     the per-rank partial gradients are all-reduced and each rank keeps its own rows);
  2. each rank computes the cosines and margin logits of the global batch against its own classes
     (optionally a sample of them: all positives plus random negatives, --sample-rate);
  3. the softmax normaliser comes from the all-reduced row maxima and the all-reduced sums of
     exponentials, the target logits from an all-reduced sum: the loss is the global batch's mean
     cross-entropy, the same value on every rank.

The margin maths is heads.CosFace / heads.ArcFace's (margin_logits), applied to the shard.

Gradients: the shard's weight gradient is exact (do not wrap this module in DDP). The embedding
gradient handed back to rank r is world_size x dL/d(its embeddings): the backbone's DDP averages
gradients over ranks, which turns it back into dL/d(backbone). Without torch.distributed (one
process) everything is a plain, full head and the factor is 1.

Checkpoints: every rank writes its shard (weight, its AdamW moments, class range) beside the main
checkpoint (``<checkpoint>.head-<r>-of-<W>``); the main checkpoint holds the layout. A resume on
any world size reads the rows of its own range from the shard files that overlap it (re-sharding),
and a replicated head (CosFace/ArcFace) resumes from shards and vice versa (load_head).
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import ArcFace, CosFace

SHARD_FORMAT = "lafs_fast.partial_fc_shard/1"
FULL_INIT_MAX = 1 << 26  # class-matrix elements drawn whole at init (256 MB of float32)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Classes [lo, hi) of rank `rank`: floor(r*C/W) .. floor((r+1)*C/W)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if num_classes < world_size:
        raise ValueError(f"Partial FC needs at least one class per rank: {num_classes} classes, "
                         f"{world_size} ranks")
    return rank * num_classes // world_size, (rank + 1) * num_classes // world_size


# ----------------------------------------------------------------------------- collectives
class _GatherRows(torch.autograd.Function):
    """All ranks' (B, D) rows concatenated in rank order. Backward: each rank's gradient of the
    gathered rows is partial (its own classes only), so they are summed over ranks; a rank keeps
    its own rows, times world_size to undo DDP's averaging of the backbone gradient."""

    @staticmethod
    def forward(ctx, t):
        rank, world = _world()
        ctx.rank, ctx.world, ctx.rows = rank, world, t.shape[0]
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows] * ctx.world


class _SumOverRanks(torch.autograd.Function):
    """Sum over ranks whose result every rank uses in the *same* loss: the loss is one value
    computed W times, so dL/d(own part) = dL/d(sum) and the backward is the identity."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad


def _gather_rows(t: Tensor) -> Tensor:
    return _GatherRows.apply(t) if _world()[1] > 1 else t


def _sum_over_ranks(t: Tensor) -> Tensor:
    return _SumOverRanks.apply(t) if _world()[1] > 1 else t


def _gather_const(t: Tensor) -> Tensor:
    if _world()[1] == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_world()[1])]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _max_over_ranks_(t: Tensor) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


# ----------------------------------------------------------------------------- the head
class PartialFC(nn.Module):
    """Class-sharded CosFace / ArcFace head whose forward returns the loss (the global batch's
    mean cross-entropy): ``loss = head(emb, labels[, label_weights])``.

    labels: (B,) class indices, or (B, K) with label_weights (B, K) for soft targets (mixup: K=2,
    weights lam and 1 - lam; a class listed twice gets the sum). The margin scales with the target
    weight exactly as the replicated heads' soft targets do.

    sample_rate < 1 (training only): each rank keeps max(positives, int(rate * its classes)) of its
    classes per step: every class in the global batch's labels plus uniformly drawn others, from a
    stream seeded by (seed, rank, step counter); ``last_sampled`` holds the global class indices
    used. Unsampled rows get no gradient from the loss (AdamW's momentum and weight decay still
    move them, as in insightface)."""

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "cosface", s: float = 64.0,
                 m: Optional[float] = None, easy_margin: bool = False, sample_rate: float = 1.0,
                 seed: int = 0, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        r, w = _world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
        if loss not in ("cosface", "arcface"):
            raise ValueError(f"loss must be 'cosface' or 'arcface', got {loss!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        self.lo, self.hi = shard_range(num_classes, world_size, rank)
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.rank, self.world_size, self.loss_kind = rank, world_size, loss
        self.sample_rate, self.seed = float(sample_rate), int(seed)
        m = (0.4 if loss == "cosface" else 0.5) if m is None else m
        self.s, self.m = s, m
        # The margin maths lives in heads.py; a 1x1 head instance carries its constants. Kept out
        # of the module tree (not a parameter, not in the state dict).
        with torch.random.fork_rng(devices=[]):  # its 1x1 init must not move the global stream
            margin = (CosFace(1, 1, s=s, m=m) if loss == "cosface" else
                      ArcFace(1, 1, s=s, m=m, easy_margin=easy_margin))
        self.__dict__["_margin"] = margin.requires_grad_(False)
        self.weight = nn.Parameter(torch.empty(self.hi - self.lo, embedding_dim))
        with torch.no_grad():
            if num_classes * embedding_dim <= FULL_INIT_MAX:
                # the replicated head's init, drawn whole from the global stream (equal on every
                # rank) and sliced: Partial FC then starts exactly where CosFace / ArcFace would
                full = torch.empty(num_classes, embedding_dim)
                nn.init.xavier_uniform_(full)
                self.weight.copy_(full[self.lo:self.hi])
            else:  # too big to draw whole on every rank: the same distribution, per shard
                bound = math.sqrt(6.0 / (num_classes + embedding_dim))
                g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, 7]).generate_state(1)[0]))
                self.weight.copy_(torch.rand(self.weight.shape, generator=g) * (2 * bound) - bound)
        self.register_buffer("sample_step", torch.zeros((), dtype=torch.int64))
        self.last_sampled: Optional[Tensor] = None

    def extra_repr(self) -> str:
        return (f"{self.embedding_dim} -> classes [{self.lo}, {self.hi}) of {self.num_classes}, "
                f"rank {self.rank}/{self.world_size}, {self.loss_kind} s={self.s} m={self.m}, "
                f"sample_rate={self.sample_rate}")

    def _check_world(self) -> None:
        r, w = _world()
        if (r, w) != (self.rank, self.world_size):
            raise RuntimeError(f"PartialFC was built for rank {self.rank} of {self.world_size}, "
                               f"the process group is rank {r} of {w}")

    def _sample(self, labels_all: Tensor) -> Tensor:
        """Sorted local class indices to use this step: all positives, then random negatives."""
        n_local = self.hi - self.lo
        local = labels_all.reshape(-1) - self.lo
        pos = torch.unique(local[(local >= 0) & (local < n_local)]).cpu()
        keep = max(1, int(self.sample_rate * n_local), pos.numel())
        if keep >= n_local:
            return torch.arange(n_local, device=labels_all.device)
        seed = np.random.SeedSequence([self.seed, self.rank, int(self.sample_step)]).generate_state(1)[0]
        score = torch.rand(n_local, generator=torch.Generator().manual_seed(int(seed)))
        score[pos] = 2.0  # above every uniform draw: positives always kept
        return torch.topk(score, keep).indices.sort().values.to(labels_all.device)

    def forward(self, emb: Tensor, labels: Tensor, label_weights: Optional[Tensor] = None) -> Tensor:
        self._check_world()
        if emb.dim() != 2 or emb.shape[1] != self.embedding_dim:
            raise ValueError(f"emb must be (B, {self.embedding_dim}), got {tuple(emb.shape)}")
        if labels.dim() == 1:
            labels = labels[:, None]
        if labels.dim() != 2 or labels.shape[0] != emb.shape[0]:
            raise ValueError(f"labels must be (B,) or (B, K) with B = {emb.shape[0]}, got {tuple(labels.shape)}")
        if label_weights is None:
            if labels.shape[1] != 1:
                raise ValueError("(B, K) labels with K > 1 need label_weights (B, K)")
            label_weights = torch.ones(labels.shape, device=emb.device)
        if label_weights.shape != labels.shape:
            raise ValueError(f"label_weights {tuple(label_weights.shape)} must match labels {tuple(labels.shape)}")
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self._loss(emb.float(), labels, label_weights.float())

    def _loss(self, emb: Tensor, labels: Tensor, wts: Tensor) -> Tensor:
        emb_all = _gather_rows(emb)                               # (N, D)
        labels_all, wts_all = _gather_const(labels), _gather_const(wts)
        N, n_local = emb_all.shape[0], self.hi - self.lo
        weight, local = self.weight, labels_all - self.lo
        in_shard = (local >= 0) & (local < n_local)
        if self.training and self.sample_rate < 1.0:
            idx = self._sample(labels_all)
            self.sample_step += 1
            col = torch.full((n_local,), -1, dtype=torch.long, device=emb.device)
            col[idx] = torch.arange(idx.numel(), device=emb.device)
            local = torch.where(in_shard, col[local.clamp(0, n_local - 1)], local)
            weight = weight[idx]
            self.last_sampled = (idx + self.lo).detach()
        else:
            self.last_sampled = None
        cos = F.linear(F.normalize(emb_all, dim=1), F.normalize(weight.float(), dim=1))  # (N, Cs)
        rows = torch.arange(N, device=emb.device)[:, None].expand_as(local)
        t = torch.zeros_like(cos).index_put_((rows[in_shard], local[in_shard]), wts_all[in_shard],
                                             accumulate=True)
        logits = self._margin.margin_logits(cos, t)
        with torch.no_grad():  # the stabiliser: any value works, the global row maximum is safest
            mx = _max_over_ranks_(logits.max(dim=1).values if logits.shape[1] else
                                  torch.full((N,), -math.inf, device=emb.device))
        sum_exp = _sum_over_ranks(torch.exp(logits - mx[:, None]).sum(dim=1))
        target = _sum_over_ranks((t * logits).sum(dim=1))       # sum_k w_k * logit(label_k)
        # -sum_k w_k log softmax(label_k) = (sum_k w_k) * logZ - sum_k w_k * logit(label_k)
        return (wts_all.sum(dim=1) * (mx + torch.log(sum_exp)) - target).mean()

    def no_sync(self):
        """DDP's no_sync, for gradient accumulation: a shard never all-reduces its gradient."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------- replicated view
    @torch.no_grad()
    def full_weight(self) -> Tensor:
        """The whole (C, D) class matrix (collective; for tests and small heads)."""
        return _gather_var(self.weight.detach())


def _gather_var(t: Tensor) -> Tensor:
    """Concatenate per-rank tensors whose first dimension may differ by rank."""
    if _world()[1] == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.empty_like(n) for _ in range(_world()[1])]
    dist.all_gather(sizes, n)
    big = int(max(s.item() for s in sizes))
    pad = torch.zeros((big,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[:t.shape[0]] = t
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


# ----------------------------------------------------------------------------- training helpers
def clip_grad_norm_(replicated: Sequence[Tensor], head: PartialFC, max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ over the replicated parameters (already averaged by DDP)
    plus every rank's head shard: the shards' squared norms are summed over ranks, so every rank
    scales by the same factor, the one a single process with the whole head would use."""
    grads = [p.grad for p in replicated if p.grad is not None]
    dev = head.weight.device
    rep = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((), device=dev)
    grad = head.weight.grad
    shard = grad.detach().float().pow(2).sum() if grad is not None else torch.zeros((), device=dev)
    shard = shard.to(rep.device).clone()
    if _world()[1] > 1:
        dist.all_reduce(shard)
    total = (rep + shard).sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads + ([head.weight.grad] if head.weight.grad is not None else []):
            g.detach().mul_(coef.to(g.device))
    return total


def optimizer_index(opt: torch.optim.Optimizer, param: Tensor) -> int:
    """The integer key of `param` in opt.state_dict()['state'] (params numbered in group order)."""
    i = 0
    for g in opt.param_groups:
        for p in g["params"]:
            if p is param:
                return i
            i += 1
    raise ValueError("the head's weight is not in the optimizer")


def shard_path(checkpoint: str, rank: int, world_size: int) -> str:
    return f"{checkpoint}.head-{rank}-of-{world_size}"


def checkpoint_parts(head: nn.Module, opt: torch.optim.Optimizer, checkpoint: str) -> tuple[dict, dict]:
    """(head entry, optimizer entry) of a training checkpoint about to be written at `checkpoint`.
    A replicated head: its state dict and the whole optimizer state. A PartialFC (collective):
    every rank writes its shard file first; the head entry is the layout, the optimizer entry
    leaves the head's moments out (they are in the shard files)."""
    sd = opt.state_dict()
    if not isinstance(head, PartialFC):
        return head.state_dict(), sd
    from ..checkpoint import save_checkpoint
    i = optimizer_index(opt, head.weight)
    moments = sd["state"].pop(i, {})
    save_checkpoint(shard_path(checkpoint, head.rank, head.world_size), {
        "format": SHARD_FORMAT, "rank": head.rank, "world_size": head.world_size, "lo": head.lo,
        "hi": head.hi, "num_classes": head.num_classes, "weight": head.weight.detach().cpu(),
        "optimizer": {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in moments.items()},
        "sample_step": int(head.sample_step)})
    if _world()[1] > 1:
        dist.barrier()  # every shard is on disk before rank 0 writes the checkpoint naming them
    layout = {"partial_fc": True, "num_classes": head.num_classes, "embedding_dim": head.embedding_dim,
              "world_size": head.world_size, "loss": head.loss_kind,
              "ranges": [list(shard_range(head.num_classes, head.world_size, r)) for r in range(head.world_size)]}
    return layout, sd


def prune_shards(folder: str) -> None:
    """Remove shard files whose checkpoint is gone (rotated out of the ring, or never written)."""
    for f in glob.glob(os.path.join(folder, "step-*.pt.head-*-of-*")):
        if not os.path.exists(f.split(".head-")[0]):
            try:
                os.remove(f)
            except OSError:
                pass


def _rows_from_checkpoint(state: dict, checkpoint: str, lo: int, hi: int, opt_index: int):
    """Rows [lo, hi) of the class matrix and of its AdamW moments, from a replicated head entry
    or from the shard files of a Partial FC checkpoint (any world size)."""
    head_sd = state["head"]
    if not head_sd.get("partial_fc"):
        w = head_sd["weight"]
        m = state["optimizer"]["state"].get(opt_index, {})
        return w[lo:hi], {k: (v[lo:hi] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in m.items()}, 0
    from ..checkpoint import CheckpointError, load_checkpoint
    if head_sd["num_classes"] < hi:
        raise CheckpointError(f"{checkpoint}: its Partial FC head has {head_sd['num_classes']} classes, "
                              f"this run needs {hi}")
    ws, ms, step = [], [], 0
    for r, (a, b) in enumerate(head_sd["ranges"]):
        if b <= lo or a >= hi:
            continue
        path = shard_path(checkpoint, r, head_sd["world_size"])
        if not os.path.exists(path):
            raise CheckpointError(f"{checkpoint}: its head shard {path} is missing (every rank's "
                                  "shard file must sit beside the checkpoint)")
        sh = load_checkpoint(path)
        if sh.get("format") != SHARD_FORMAT or (sh["lo"], sh["hi"]) != (a, b):
            raise CheckpointError(f"{path} is not the shard [{a}, {b}) that {checkpoint} names")
        s0, s1 = max(lo, a) - a, min(hi, b) - a
        ws.append(sh["weight"][s0:s1])
        ms.append(sh["optimizer"])
        step = sh["sample_step"]
        for k, v in sh["optimizer"].items():
            if torch.is_tensor(v) and v.dim() == 2:
                sh["optimizer"][k] = v[s0:s1]
    moments = {}
    if ms and all(ms):
        for k, v in ms[0].items():
            moments[k] = torch.cat([m[k] for m in ms]) if torch.is_tensor(v) and v.dim() == 2 else v
    return torch.cat(ws), moments, step


@torch.no_grad()
def load_head(state: dict, checkpoint: str, head: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Restore the head and the optimizer from a training checkpoint written with either head
    (replicated or Partial FC, any world size): this rank reads the rows of its own classes."""
    from ..checkpoint import CheckpointError
    i = optimizer_index(opt, head.weight)
    lo, hi = (head.lo, head.hi) if isinstance(head, PartialFC) else (0, head.weight.shape[0])
    n_ckpt = state["head"]["num_classes"] if state["head"].get("partial_fc") else state["head"]["weight"].shape[0]
    n_here = head.num_classes
    if n_ckpt != n_here:
        raise CheckpointError(f"{checkpoint}: its head has {n_ckpt} classes, this run has {n_here}")
    w, moments, step = _rows_from_checkpoint(state, checkpoint, lo, hi, i)
    if w.shape != head.weight.shape:
        raise CheckpointError(f"{checkpoint}: head rows [{lo}, {hi}) have shape {tuple(w.shape)}, "
                              f"the head needs {tuple(head.weight.shape)}")
    head.weight.copy_(w)
    if isinstance(head, PartialFC):
        head.sample_step.fill_(step)
    sd = {"state": dict(state["optimizer"]["state"]), "param_groups": state["optimizer"]["param_groups"]}
    if moments:
        sd["state"][i] = moments
    else:
        sd["state"].pop(i, None)
    opt.load_state_dict(sd)
