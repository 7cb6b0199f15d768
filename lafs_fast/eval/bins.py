"""Verification of a checkpoint on insightface .bin files and the held-out ORL pairs: the
`python -m lafs_fast.train eval` command. The table is printed and written as JSON next to the
checkpoint."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from .. import config
from . import verification
from .orl import NAME as ORL_NAME
from .orl import evaluate_orl


def evaluate_bin(model, path: str, batch_size: int = 64, n_folds: int = 10) -> dict:
    """The verification report of one .bin file (its pairs are consecutive images)."""
    from .bin_reader import load_bin
    images, same = load_bin(path)
    n = len(same)
    return verification.evaluate_pairs(model, images, list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2)),
                                       same.numpy(), batch_size=batch_size, n_folds=n_folds)


@dataclass
class EvalConfig:
    """Verification of a trained model."""
    checkpoint: str = config.field("", "a lafs_fast model checkpoint (model.pt) or an official release file")
    landmark_cnn: str = config.field("", "for an official LAFS checkpoint without landmark CNN: its source")
    bins: list[str] = config.field([], "comma-separated insightface .bin files (lfw.bin, cfp_fp.bin, ...)")
    orl: bool = config.field(True, "also evaluate the held-out ORL pairs")
    folds: int = config.field(10, "folds of the k-fold accuracy (a threshold picked on k-1 folds, tested on the "
                                  "k-th); at most the number of pairs of the smallest set")
    batch_size: int = config.field(64, "images per forward pass")
    device: str = config.field("auto", "cpu, cuda or auto")

    def validate(self):
        config.require(bool(self.checkpoint), "--checkpoint is required")
        config.require(os.path.exists(self.checkpoint), f"--checkpoint: no such file {self.checkpoint}")
        for b in self.bins:
            config.require(os.path.exists(b), f"--bins: no such file {b}")
        config.require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        config.require(self.folds >= 2, f"--folds must be >= 2 (one fold to test, the rest to pick the "
                                        f"threshold), got {self.folds}")


def run(cfg: EvalConfig) -> dict:
    from ..convert import load_any_model
    from ..train.common import resolve_device
    device = resolve_device(cfg.device)
    model = load_any_model(cfg.checkpoint, cfg.landmark_cnn or None).to(device).eval()
    reports = {}
    if cfg.orl:
        reports[ORL_NAME] = evaluate_orl(model, device, cfg.batch_size, cfg.folds)
    for path in cfg.bins:
        reports[os.path.basename(path)] = evaluate_bin(model, path, cfg.batch_size, cfg.folds)
    verification.print_table(reports)
    out = os.path.splitext(cfg.checkpoint)[0] + ".eval.json"
    with open(out, "w") as f:
        json.dump(reports, f, indent=1, default=float)
    print(f"wrote {out}")
    return reports


def main(argv: Optional[list[str]] = None) -> dict:
    return run(config.parse(EvalConfig, argv, prog="python -m lafs_fast.train eval"))
