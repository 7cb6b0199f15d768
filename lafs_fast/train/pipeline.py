"""The main job: the whole LAFS recipe on the bundled ORL faces, on CPU, in minutes.

  1. supervised Part fViT on the training subjects' few-shot subset (learns a landmark CNN
     without landmark labels) -- also the "from scratch" result;
  2. LAFS pretraining on all training-subject images, labels unused, landmarks from stage 1;
  3. few-shot finetuning from the LAFS teacher (landmark CNN from stage 1, drift-regularised);
  4. held-out ORL verification of stages 1 and 3, next to the raw-pixel floor.

    python -m lafs_fast.train            # = python -m lafs_fast.train pipeline
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Optional

from .. import config
from ..cli import UsageError
from ..eval import verification
from ..eval.orl import raw_pixel_orl
from ..ops import BACKENDS
from . import common, finetune, pretrain


@dataclass
class PipelineConfig:
    """Supervised Part fViT -> LAFS pretraining -> few-shot finetuning -> verification."""
    model: str = config.field("part_fvit_tiny", "backbone preset")
    dataset: str = config.field("orl", "data for every stage", choices=["orl", "recordio", "folder", "synthetic"])
    data_path: str = config.field("", "train.rec prefix / image folder (unused for orl)")
    fewshot: int = config.field(2, "images per identity for the supervised stages (0 = all)")
    supervised_epochs: int = config.field(120, "epochs of stage 1 (few-shot supervised Part fViT)")
    pretrain_epochs: int = config.field(20, "epochs of stage 2 (LAFS pretraining)")
    finetune_epochs: int = config.field(120, "epochs of stage 3 (few-shot finetuning)")
    batch_size: int = config.field(20, "images per step in stages 1 and 3")
    lr: float = config.field(1e-3, "peak learning rate of stages 1 and 3")
    scale: float = config.field(8.0, "CosFace scale s of stages 1 and 3 (tiny data wants a small s)")
    margin: float = config.field(0.1, "CosFace margin m of stages 1 and 3")
    weight_decay: float = config.field(0.05, "weight decay of stages 1 and 3")
    mixup_prob: float = config.field(0.0, "mixup probability of stages 1 and 3")
    pretrain_batch_size: int = config.field(30, "faces per step in stage 2")
    n_local: int = config.field(4, "local views per face in stage 2")
    out_dim: int = config.field(1024, "DINO output dimension in stage 2")
    head_hidden: int = config.field(512, "DINO head hidden width in stage 2 (2048 at full size)")
    threads: int = config.field(0, "torch CPU threads (0 = default)")
    device: str = config.field("auto", "cpu, cuda or auto")
    backend: str = config.field("auto", "op backend of every stage", choices=list(BACKENDS))
    out_dir: str = config.field("runs/pipeline", "one folder per stage inside")
    resume: config.BoolOrAuto = config.field(False, "continue an interrupted pipeline in --out-dir: each stage "
                                                    "continues from its newest checkpoint, a stage without one "
                                                    "starts (an error when no stage has one); auto: the same, "
                                                    "or a fresh pipeline when there is nothing to continue")
    overwrite: bool = config.field(False, "replace the pipeline already in --out-dir (each stage's metrics, "
                                          "checkpoints and TensorBoard events are removed first)")
    tensorboard: bool = config.field(False, "TensorBoard event files in each stage's tb/ folder")
    seed: int = config.field(0, "random seed of every stage")
    progress: bool = config.field(True, "progress bars")

    def validate(self):
        for name in ("supervised_epochs", "pretrain_epochs", "finetune_epochs", "batch_size",
                     "pretrain_batch_size"):
            config.require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1")
        config.require(self.fewshot >= 0, "--fewshot must be >= 0")
        config.require(not (self.resume and self.overwrite),
                       "--resume and --overwrite exclude each other (--resume continues the pipeline, "
                       "--overwrite replaces it)")


STAGES = ("1_supervised", "2_pretrain", "3_finetune")


def check_out_dir(cfg: PipelineConfig) -> None:
    """The pipeline's runs never mix (common.prepare_out_dir, for its stage folders as one): a
    used --out-dir needs --resume or --overwrite; --resume needs a checkpoint in some stage."""
    stages = [os.path.join(cfg.out_dir, s) for s in STAGES]
    if cfg.resume is True and not any(os.path.isdir(s) and common.newest_checkpoint(s) for s in stages):
        raise UsageError(f"--resume: nothing to resume in {cfg.out_dir} (no stage folder holds a checkpoint)",
                         "give the --out-dir of the pipeline to continue, or --resume auto to start fresh "
                         "when there is none")
    used = [os.path.basename(s) for s in stages if os.path.isdir(s) and common.holds_run(s)]
    if used and not cfg.resume and not cfg.overwrite:
        raise UsageError(f"--out-dir {cfg.out_dir} holds another pipeline's stages ({', '.join(used)})",
                         "continue it with --resume, replace it with --overwrite, or choose another --out-dir")


def stage_config(cls, cfg: PipelineConfig, **options):
    """A stage's config: the pipeline's shared options, resumed stage by stage under --resume (a
    stage with no checkpoint yet starts), and the pipeline's command line for its messages."""
    shared = dict(model=cfg.model, dataset=cfg.dataset, data_path=cfg.data_path, seed=cfg.seed,
                  threads=cfg.threads, device=cfg.device, progress=cfg.progress, backend=cfg.backend,
                  resume=config.AUTO if cfg.resume else False, overwrite=cfg.overwrite,
                  tensorboard=cfg.tensorboard)
    stage = cls(**shared, **options)
    made = cfg.__dict__.get("command_line")
    if made:
        config.set_command_line(stage, *made)
    return stage


def run(cfg: PipelineConfig) -> dict:
    t0 = time.time()
    out = lambda name: os.path.join(cfg.out_dir, name)  # noqa: E731
    check_out_dir(cfg)
    supervised = dict(fewshot=cfg.fewshot, batch_size=cfg.batch_size, lr=cfg.lr, scale=cfg.scale,
                      margin=cfg.margin, weight_decay=cfg.weight_decay, mixup_prob=cfg.mixup_prob, eval=True)
    print(f"[1/4] supervised Part fViT ({cfg.fewshot}-shot) -> {out('1_supervised')}")
    sup = finetune.run(stage_config(finetune.FinetuneConfig, cfg, **supervised, epochs=cfg.supervised_epochs,
                                    out_dir=out("1_supervised")), log_prefix="1 supervised")
    print(f"[2/4] LAFS pretraining (no labels) -> {out('2_pretrain')}")
    pre = pretrain.run(stage_config(
        pretrain.PretrainConfig, cfg, landmarks="cnn", landmark_init=sup["checkpoint"], epochs=cfg.pretrain_epochs,
        batch_size=cfg.pretrain_batch_size, n_local=cfg.n_local, out_dim=cfg.out_dim,
        head_hidden=cfg.head_hidden, head_bottleneck=min(256, cfg.head_hidden // 2),
        out_dir=out("2_pretrain")), log_prefix="2 pretrain")
    print(f"[3/4] few-shot finetuning from the LAFS teacher -> {out('3_finetune')}")
    fin = finetune.run(stage_config(finetune.FinetuneConfig, cfg, **supervised, epochs=cfg.finetune_epochs,
                                    init=pre["checkpoint"], landmark_init=sup["checkpoint"],
                                    out_dir=out("3_finetune")), log_prefix="3 finetune")
    print("[4/4] held-out verification (ORL subjects 31-40: 450 genuine, 4500 impostor pairs)")
    reports = {"raw pixels (floor)": raw_pixel_orl(),
               f"Part fViT from scratch ({cfg.fewshot}-shot)": sup["eval"],
               f"LAFS pretrained + finetuned ({cfg.fewshot}-shot)": fin["eval"]}
    verification.print_table(reports)
    minutes = (time.time() - t0) / 60
    print(f"pipeline finished in {minutes:.1f} min; results in {out('results.json')}")
    with open(out("results.json"), "w") as f:
        json.dump({"reports": reports, "minutes": minutes, "pretrain": pre}, f, indent=1, default=float)
    return {"reports": reports, "minutes": minutes}


def main(argv: Optional[list[str]] = None) -> dict:
    return run(config.parse(PipelineConfig, argv, prog="python -m lafs_fast.train pipeline"))
