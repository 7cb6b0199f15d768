"""`python -m lafs_fast.train eval`: verification of a checkpoint on the ORL held-out pairs and
on insightface .bin files; the table is printed and written as JSON next to the checkpoint."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from .. import config as C
from ..eval import verification as V
from . import common
from .data_setup import evaluate_orl


@dataclass
class EvalConfig:
    """Verification of a trained model."""
    checkpoint: str = C.field("", "a lafs_fast model checkpoint (model.pt) or an official release file")
    landmark_cnn: str = C.field("", "for an official LAFS checkpoint without landmark CNN: its source")
    bins: list[str] = C.field([], "comma-separated insightface .bin files (lfw.bin, cfp_fp.bin, ...)")
    orl: bool = C.field(True, "also evaluate the held-out ORL pairs")
    batch_size: int = C.field(64, "images per forward pass")
    device: str = C.field("auto", "cpu, cuda or auto")

    def validate(self):
        C.require(bool(self.checkpoint), "--checkpoint is required")
        C.require(os.path.exists(self.checkpoint), f"--checkpoint: no such file {self.checkpoint}")
        for b in self.bins:
            C.require(os.path.exists(b), f"--bins: no such file {b}")
        C.require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")


def run(cfg: EvalConfig) -> dict:
    from ..convert import load_any_model
    from ..eval.bin_reader import load_bin
    device = common.resolve_device(cfg.device)
    model = load_any_model(cfg.checkpoint, cfg.landmark_cnn or None).to(device).eval()
    reports = {}
    if cfg.orl:
        reports["ORL held-out"] = evaluate_orl(model, device, cfg.batch_size)
    for path in cfg.bins:
        images, same = load_bin(path)
        n = len(same)
        reports[os.path.basename(path)] = V.evaluate_pairs(model, images, list(range(0, 2 * n, 2)),
                                                           list(range(1, 2 * n, 2)), same.numpy(),
                                                           batch_size=cfg.batch_size)
    V.print_table(reports)
    out = os.path.splitext(cfg.checkpoint)[0] + ".eval.json"
    with open(out, "w") as f:
        json.dump(reports, f, indent=1, default=float)
    print(f"wrote {out}")
    return reports


def main(argv: Optional[list[str]] = None) -> dict:
    return run(C.parse(EvalConfig, argv, prog="python -m lafs_fast.train eval"))
