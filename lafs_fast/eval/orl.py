"""The held-out ORL protocol: subjects 31-40 (never trained on), all 450 genuine and 4,500
impostor pairs; the raw-pixel floor; the end-of-training evaluation the loops run."""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .. import data
from . import verification

NAME = "ORL held-out"


def shuffled_orl_pairs():
    """The held-out pairs in a fixed random order: the 10 accuracy folds are contiguous (as
    insightface's), and ORL's natural order would put one subject's genuine pairs in one fold."""
    idx1, idx2, same = data.orl_verification_pairs()
    perm = torch.randperm(len(same), generator=torch.Generator().manual_seed(0))
    return idx1[perm], idx2[perm], same[perm]


def evaluate_orl(model, device, batch_size: int = 64, n_folds: int = 10) -> dict:
    """Held-out ORL verification of a model (flip-summed embeddings, cosine scores; n_folds-fold
    accuracy)."""
    images, _ = data.load_orl()
    idx1, idx2, same = shuffled_orl_pairs()
    model = model.to(device)
    return verification.evaluate_pairs(model, images, idx1.numpy(), idx2.numpy(), same.numpy(),
                                       batch_size=batch_size, n_folds=n_folds)


def raw_pixel_orl() -> dict:
    """The floor to beat: cosine similarity of raw pixels on the held-out ORL pairs."""
    images, _ = data.load_orl()
    idx1, idx2, same = shuffled_orl_pairs()
    flat = torch.nn.functional.normalize(data.to_model_input(images).flatten(1), dim=1)
    return verification.verification_report(verification.pair_scores(flat, idx1.numpy(), idx2.numpy()),
                                            same.numpy())


def evaluate_model(model, device, out_dir: Optional[str] = None, name: str = NAME) -> dict:
    """evaluate_orl, its table printed and, with out_dir, written to out_dir/eval.json."""
    report = evaluate_orl(model, device)
    verification.print_table({name: report})
    if out_dir:
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump({name: report}, f, indent=1, default=float)
    return report


class OrlEvaluation:
    """Training-loop hook: the held-out ORL evaluation of the final model (rank 0, at the end),
    its report in the run's result under "eval"."""

    def __init__(self, out_dir: Optional[str] = None):
        self.out_dir = out_dir

    def at_end(self, run, result: dict) -> None:
        result["eval"] = evaluate_model(run.model, run.device, self.out_dir)
