"""The training skeleton finetune and pretrain share (DINO's main_dino.py split): a trainer builds
a `Run` (`build_run(cfg)`) and writes `train_one_epoch(run, epoch)`, which does the optimiser
steps of one epoch and yields each step's metrics; `fit` drives it and owns everything around the
steps: the progress bar, the metrics lines, checkpoints, the --stop-after check, the hooks
(validation, evaluation) and the result every rank returns."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..cli import RunError
from . import common, distributed
from .data_setup import TrainData
from .progress import progress


@dataclasses.dataclass
class Run:
    """What a training run holds between steps. A trainer subclasses it with its own parts and
    says what a checkpoint holds (save_state) and what the run leaves behind (finish)."""
    cfg: common.RunConfig
    stage: str                          # the name of its metrics lines and progress bar
    device: torch.device
    amp: str                            # mixed precision: none, bf16 or fp16
    data: TrainData
    model: nn.Module                    # what is trained, unwrapped: checkpoints and hooks see it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator          # the run's random stream (augmentation, views), checkpointed
    steps_per_epoch: int
    schedules: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-step values
    ddp_model: Optional[nn.Module] = None   # the model's DDP wrapper under torchrun, else the model
    step: int = 0                       # optimiser steps done (a resumed run starts at its checkpoint's)
    start_epoch: int = 0
    seen: int = 0                       # images trained on by every rank since this process started
    last: dict = dataclasses.field(default_factory=dict)  # the latest step's metrics
    ring: common.CheckpointRing = dataclasses.field(init=False)
    logger: common.JsonlLogger = dataclasses.field(init=False)  # or a TensorBoardLogger wrapping one

    def __post_init__(self):
        os.makedirs(self.cfg.out_dir, exist_ok=True)  # checked by common.setup_run; made once the run starts
        self.ring = common.CheckpointRing(self.cfg.out_dir, self.cfg.keep_checkpoints)
        self.logger = make_logger(self.cfg)

    @property
    def is_main(self) -> bool:
        return distributed.info().is_main

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run."""
        return self.cfg.epochs * self.steps_per_epoch

    def micro_batches(self, epoch: int) -> int:
        """Batches of epoch `epoch` that are trained on."""
        return self.steps_per_epoch * getattr(self.cfg, "accum_steps", 1)

    def resume(self, per_rank_generator: bool) -> Optional[dict]:
        """--resume: the newest checkpoint in out_dir (None without --resume or a checkpoint),
        with the step, the epoch, every random stream and the AMP scaler restored; the trainer
        loads its modules from it."""
        if not self.cfg.resume:
            return None
        state = common.load_training_state(self.ring, self.data.global_batch, self.generator, self.scaler,
                                           per_rank_gen=per_rank_generator, seed=self.cfg.seed)
        if state:
            self.step, self.start_epoch = state["step"], state["epoch"]
        elif self.is_main:  # --resume auto (--resume true without a checkpoint stopped in setup_run)
            print(f"--resume auto: no checkpoint in {self.cfg.out_dir}, starting fresh", flush=True)
        return state

    def write_checkpoint(self, epoch: int, **payload) -> None:
        """A resumable checkpoint of the trainer's payload (collective: every rank calls it)."""
        common.save_training_state(self.ring, self.step, epoch, self.steps_per_epoch, self.data.global_batch,
                                   self.generator, self.scaler, **payload)

    def save_state(self, epoch: int) -> None:
        """The trainer's checkpoint: `epoch` is the epoch a resume continues."""
        raise NotImplementedError

    def finish(self) -> dict:
        """Rank 0, after the last epoch: the final files and the run's result."""
        raise NotImplementedError

    def done_record(self, result: dict) -> dict:
        """The run's last metrics line (stage "<stage>_done")."""
        return {k: v for k, v in result.items() if k != "eval"}


def make_logger(cfg: common.RunConfig):
    """The run's metrics logger: OUT/metrics.jsonl, and with --tensorboard the same records as
    TensorBoard scalars in OUT/tb."""
    logger = common.JsonlLogger(os.path.join(cfg.out_dir, "metrics.jsonl"))
    if getattr(cfg, "tensorboard", False):
        from .tensorboard import TensorBoardLogger
        logger = TensorBoardLogger(os.path.join(cfg.out_dir, "tb"), also=logger)
    return logger


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind e (torch's writer reports a failed write as a RuntimeError whose
    context is the OSError), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


@contextlib.contextmanager
def failed_writes(run: Run, what: Optional[str] = None):
    """A write that fails inside (a full disk, a file that cannot be written) as one line: what
    could not be written, the checkpoint that survived and the command that continues from it."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        if cause is None:
            raise
        target = what or (f"{cause.filename}" if cause.filename else f"the run's files in {run.cfg.out_dir}")
        survived = run.ring.latest()
        if survived:
            fix = (f"the last checkpoint, {survived}, is intact; free space (or fix the folder's permissions), "
                   f"then continue with: {common.resume_hint(run.cfg)}")
        else:
            fix = (f"no checkpoint was written; free space (or fix the folder's permissions), then start "
                   f"again with: {common.resume_hint(run.cfg, '--overwrite')}")
        raise RunError(f"could not write {target}: {cause.strerror or cause}", fix) from None


def save_or_fail(run: Run, epoch: int) -> None:
    """run.save_state; a checkpoint that cannot be written stops the run in one line."""
    with failed_writes(run, f"checkpoint {run.ring.path(run.step)} at step {run.step}"):
        run.save_state(epoch)


def epoch_corrupt_images(run: Run, epoch: int) -> int:
    """How many images of epoch `epoch` were unreadable (skipped), summed over ranks: the
    dataset's count_corrupt over this rank's rows of the epoch's order (0 for in-memory data)."""
    data = run.data
    count = getattr(data.dataset, "count_corrupt", None)
    n = 0
    if count is not None:
        used = run.micro_batches(epoch)
        r0 = data.rank * data.batch_size
        rows = data.order(epoch).view(data.steps, data.global_batch)[:used, r0:r0 + data.batch_size]
        n = count(data.indices[rows.flatten().numpy()])
    total = torch.tensor([float(n)], device=run.device)
    return int(distributed.all_reduce_sum_(total).item())


def _call(hooks: Sequence, name: str, *args) -> None:
    """hook.<name>(*args) of every hook that defines it."""
    for hook in hooks:
        method = getattr(hook, name, None)
        if method is not None:
            method(*args)


def fit(run: Run, train_one_epoch: Callable[[Run, int], Iterator[dict]], hooks: Sequence = ()) -> dict:
    """Train from run.start_epoch to --epochs. After each optimiser step (each metrics record
    train_one_epoch yields): the hooks, a metrics line every --log-every steps, a checkpoint every
    --save-every steps, the --stop-after check; after each epoch: the hooks, an "<stage>_epoch"
    metrics line (corrupt_images: the epoch's unreadable, skipped images, every rank's) and a
    checkpoint (unless that step was just saved); a checkpoint or final file that cannot be
    written (a full disk) stops the run with a RunError naming the checkpoint that survived and
    the command that continues from it; at the end, on rank 0:
    Run.finish, the hooks, the last metrics line. Returns rank 0's result on every rank, once rank
    0's final files exist (a pipeline's next stage reads them), or {"steps", "stopped"} after
    --stop-after.

    A hook (arcface_torch's callbacks; lafs_fast.eval's Validator and OrlEvaluation) defines any
    of after_step(run, epoch), after_epoch(run, epoch) -- called before that step's or epoch's
    metrics line and checkpoint -- and at_end(run, result), which may add to the result."""
    cfg = run.cfg
    bar = progress(run.total_steps, run.step, run.stage, enabled=cfg.progress and run.is_main)
    t_start, last_saved = time.time(), run.step
    for epoch in range(run.start_epoch, cfg.epochs):
        for record in train_one_epoch(run, epoch):
            bar.update(1)
            ips = run.seen / max(1e-9, time.time() - t_start)
            bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{ips:.1f}")
            run.last = record = {**record, "images_per_s": ips}
            with failed_writes(run):  # a validator's best.pt
                _call(hooks, "after_step", run, epoch)
            if run.step % cfg.log_every == 0:
                run.logger.log(stage=run.stage, **record)
            if cfg.save_every and run.step % cfg.save_every == 0:
                save_or_fail(run, epoch)
                last_saved = run.step
            if cfg.stop_after and run.step >= cfg.stop_after:
                bar.close()
                return {"steps": run.step, "stopped": True}
        with failed_writes(run):  # a validator's best.pt
            _call(hooks, "after_epoch", run, epoch)
        corrupt = epoch_corrupt_images(run, epoch)
        run.logger.log(stage=run.stage + "_epoch", step=run.step, epoch=epoch, corrupt_images=corrupt)
        if corrupt and run.is_main:  # the warnings name each file once; the count is per epoch
            print(f"{run.stage} epoch {epoch}: {corrupt} corrupt image(s) skipped", flush=True)
        if last_saved != run.step:
            save_or_fail(run, epoch + 1)
            last_saved = run.step
    bar.close()
    result = None
    if run.is_main:
        with failed_writes(run):  # model.pt / teacher.pt, pictures, evaluation reports
            result = run.finish()
            _call(hooks, "at_end", run, result)
        run.logger.log(stage=run.stage + "_done", **run.done_record(result))
    return distributed.broadcast_object(result)
