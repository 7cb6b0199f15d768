"""Verification during training (--val-bins): a hook the training loop calls."""
from __future__ import annotations

import math
import os

import numpy as np

from ..convert import save_model


class Validator:
    """--val-bins: flip-sum 10-fold accuracy of each .bin (insightface's protocol, images in the
    training range [-1, 1]), a metrics line per evaluation, and best.pt (highest mean accuracy
    over the sets) kept beside the last model. Rank 0 only. A resumed run continues from the
    best.pt already in out_dir (its mean accuracy), so a worse later model never replaces it.

    As a training-loop hook (arcface_torch's CallBackVerification): every `every` optimiser steps,
    or at each epoch end when every is 0, and on the final weights unless they were just
    evaluated."""

    def __init__(self, paths: list[str], image_size: int, out_dir: str, logger, batch_size: int = 64,
                 resume: bool = False, every: int = 0):
        from .bin_reader import load_bin
        self.sets = {}
        for p in paths:
            name = os.path.splitext(os.path.basename(p))[0]
            if name in self.sets:
                raise ValueError(f"--val-bins: two files named {name}.bin")
            self.sets[name] = load_bin(p, image_size)
        self.out_dir, self.logger, self.batch_size, self.every = out_dir, logger, batch_size, every
        self.best = -math.inf
        self.best_path = os.path.join(out_dir, "best.pt")
        if resume and self.sets and os.path.exists(self.best_path):
            from ..checkpoint import load_checkpoint
            self.best = float(load_checkpoint(self.best_path).get("val_mean", -math.inf))

    def __bool__(self) -> bool:
        return bool(self.sets)

    def __call__(self, model, step: int, epoch: int) -> dict:
        from .verification import cosine_scores, embed_with_flip, kfold_accuracy
        acc = {}
        for name, (images, same) in self.sets.items():
            emb = embed_with_flip(model, images, self.batch_size)
            scores = cosine_scores(emb[0::2], emb[1::2])
            acc[name] = kfold_accuracy(scores, same.numpy(), n_folds=min(10, len(scores)))["mean"]
        mean = float(np.mean(list(acc.values())))
        improved = mean > self.best
        if improved:
            self.best = mean
            save_model(model, self.best_path, stage="finetune", step=step, val_accuracy=acc, val_mean=mean)
        self.logger.log(stage="val", step=step, epoch=epoch, **{f"acc_{k}": v for k, v in acc.items()},
                        acc_mean=mean, best_mean=self.best, saved_best=improved)
        return {"mean": mean, **acc}

    # ------------------------------------------------------------------ training-loop hook
    def after_step(self, run, epoch: int) -> None:
        if self.every and run.step % self.every == 0:
            self(run.model, run.step, epoch)

    def after_epoch(self, run, epoch: int) -> None:
        if not self.every:
            self(run.model, run.step, epoch)

    def at_end(self, run, result: dict) -> None:
        if self.every and run.step % self.every:  # the final weights, unless just evaluated
            self(run.model, run.step, run.cfg.epochs - 1)
        result["val_best_mean"], result["best_checkpoint"] = self.best, self.best_path
