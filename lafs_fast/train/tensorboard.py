"""TensorBoard event files of the training metrics, beside metrics.jsonl (the tensorboard extra).

TensorBoardLogger takes the records JsonlLogger.log takes and writes every numeric value as a
scalar at the record's step, tagged "<stage>/<key>": "finetune/loss", "finetune/lr",
"pretrain/weight_decay", "val/acc_lfw", "finetune/images_per_s" and so on (spaces in a stage name
become underscores). Given `also`, a JsonlLogger, it writes that one too, so it can stand in for
the loop's logger. Off on every rank but 0, as JsonlLogger.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Optional

from .._extras import require_extra
from . import distributed

# Not curves: the x axis and the wall time (every event carries its own).
NOT_SCALARS = frozenset({"step", "time"})


def scalar_items(record: dict):
    """(key, float) for each numeric value of a record; bools, strings, None and lists are
    left out."""
    for key, value in record.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        yield key, float(value)


def tag_prefix(stage: str) -> str:
    return re.sub(r"[^\w.\-/]", "_", stage.strip()) or "train"


class TensorBoardLogger:
    """Scalars of metric records as event files in `log_dir` (OUT/tb for a run in OUT).

    A record without a step (a run's summary) is written at the highest step seen. When `log_dir` already holds event
    files (a resumed run), the first record's step is TensorBoard's purge step: what the earlier
    run logged from that step on is hidden, so the resumed steps are not drawn twice. `purge_step`
    sets it instead."""

    def __init__(self, log_dir: str, also=None, enabled: bool = True, purge_step: Optional[int] = None,
                 flush_secs: int = 30):
        self.log_dir, self.also, self.flush_secs = log_dir, also, flush_secs
        self.enabled = enabled and distributed.info().is_main
        self.purge_step = purge_step
        self.last_step = 0
        self._writer = None
        if self.enabled:
            require_extra("tensorboard", "tensorboard", "TensorBoard logging")

    def _open(self, first_step: int):
        from torch.utils.tensorboard import SummaryWriter
        purge = self.purge_step
        if purge is None and glob.glob(os.path.join(self.log_dir, "events.out.tfevents.*")):
            purge = first_step
        self._writer = SummaryWriter(self.log_dir, purge_step=purge, flush_secs=self.flush_secs)
        return self._writer

    def log(self, **record) -> None:
        if self.also is not None:
            self.also.log(**record)
        if not self.enabled:
            return
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            step = self.last_step
        self.last_step = max(self.last_step, step)
        writer = self._writer or self._open(step)
        prefix = tag_prefix(str(record.get("stage", "train")))
        for key, value in scalar_items(record):
            writer.add_scalar(f"{prefix}/{key}", value, global_step=step)
        writer.flush()  # on disk at every record (every --log-every steps): nothing to close

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
