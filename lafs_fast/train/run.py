"""The training skeleton finetune and pretrain share (DINO's main_dino.py split): a trainer builds
a `Run` (`build_run(cfg)`) and writes `train_one_epoch(run, epoch)`, which does the optimiser
steps of one epoch and yields each step's metrics; `fit` drives it and owns everything around the
steps: the progress bar, the metrics lines, checkpoints, the --stop-after check, the hooks
(validation, evaluation) and the result every rank returns."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

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
    logger: common.JsonlLogger = dataclasses.field(init=False)

    def __post_init__(self):
        self.ring = common.CheckpointRing(self.cfg.out_dir, self.cfg.keep_checkpoints)
        self.logger = common.JsonlLogger(os.path.join(self.cfg.out_dir, "metrics.jsonl"))

    @property
    def is_main(self) -> bool:
        return distributed.info().is_main

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


def _call(hooks: Sequence, name: str, *args) -> None:
    """hook.<name>(*args) of every hook that defines it."""
    for hook in hooks:
        method = getattr(hook, name, None)
        if method is not None:
            method(*args)


def fit(run: Run, train_one_epoch: Callable[[Run, int], Iterator[dict]], hooks: Sequence = ()) -> dict:
    """Train from run.start_epoch to --epochs. After each optimiser step (each metrics record
    train_one_epoch yields): the hooks, a metrics line every --log-every steps, a checkpoint every
    --save-every steps, the --stop-after check; after each epoch: the hooks and a checkpoint
    (unless that step was just saved); at the end, on rank 0: Run.finish, the hooks, the last
    metrics line. Returns rank 0's result on every rank, once rank 0's final files exist (a
    pipeline's next stage reads them), or {"steps", "stopped"} after --stop-after.

    A hook (arcface_torch's callbacks; lafs_fast.eval's Validator and OrlEvaluation) defines any
    of after_step(run, epoch), after_epoch(run, epoch) -- called before that step's or epoch's
    metrics line and checkpoint -- and at_end(run, result), which may add to the result."""
    cfg = run.cfg
    bar = progress(cfg.epochs * run.steps_per_epoch, run.step, run.stage, enabled=cfg.progress and run.is_main)
    t_start, last_saved = time.time(), run.step
    for epoch in range(run.start_epoch, cfg.epochs):
        for record in train_one_epoch(run, epoch):
            bar.update(1)
            ips = run.seen / max(1e-9, time.time() - t_start)
            bar.set_postfix(loss=f"{record['loss']:.3f}", ips=f"{ips:.1f}")
            run.last = record = {**record, "images_per_s": ips}
            _call(hooks, "after_step", run, epoch)
            if run.step % cfg.log_every == 0:
                run.logger.log(stage=run.stage, **record)
            if cfg.save_every and run.step % cfg.save_every == 0:
                run.save_state(epoch)
                last_saved = run.step
            if cfg.stop_after and run.step >= cfg.stop_after:
                bar.close()
                return {"steps": run.step, "stopped": True}
        _call(hooks, "after_epoch", run, epoch)
        if last_saved != run.step:
            run.save_state(epoch + 1)
            last_saved = run.step
    bar.close()
    result = None
    if run.is_main:
        result = run.finish()
        _call(hooks, "at_end", run, result)
        run.logger.log(stage=run.stage + "_done", **run.done_record(result))
    return distributed.broadcast_object(result)
