"""TensorBoardLogger: the records the training loops log, read back from the event files with
TensorBoard's own reader."""
import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lafs_fast.train.common import JsonlLogger
from lafs_fast.train.tensorboard import TensorBoardLogger


def finetune_records():
    """Records shaped as finetune's loop logs them (steps, validation, the end-of-run line)."""
    out = []
    for step in (10, 20, 30):
        out.append({"stage": "finetune", "step": step, "epoch": step // 20, "loss": 5.0 - step / 10,
                    "drift": 0.01 * step, "drift_lambda": 1000.0, "lr": 1e-3 * step / 30,
                    "grad_norm": 2.5, "images_per_s": 100.0 + step, "loader_images_per_s": None})
    out.append({"stage": "val", "step": 20, "epoch": 1, "acc_lfw": 0.75, "acc_mean": 0.75,
                "best_mean": 0.75, "saved_best": True})
    out.append({"stage": "finetune_done", "steps": 30, "final_loss": 2.0, "checkpoint": "model.pt"})
    return out


def pretrain_records():
    return [{"stage": "2 pretrain", "step": s, "epoch": 0, "loss": 7.0 - s / 100, "lr": 1e-4 * s,
             "weight_decay": 0.04 + s / 1000, "teacher_temp": 0.04 + s / 10000, "momentum": 0.996,
             "images_per_s": 50.0} for s in (5, 10)]


def read_scalars(log_dir):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_every_numeric_key_is_a_scalar_at_its_step(tmp_path):
    records = finetune_records() + pretrain_records()
    with TensorBoardLogger(str(tmp_path / "tb")) as tb:
        for r in records:
            tb.log(**r)
    got = read_scalars(tmp_path / "tb")
    assert got["finetune/loss"] == [(s, pytest.approx(5.0 - s / 10)) for s in (10, 20, 30)]
    assert got["finetune/lr"] == [(s, pytest.approx(1e-3 * s / 30)) for s in (10, 20, 30)]
    assert [v for _, v in got["finetune/images_per_s"]] == [110.0, 120.0, 130.0]
    assert got["val/acc_lfw"] == [(20, 0.75)]
    # a record without a step (the end-of-run summary) lands at the highest step seen
    assert got["finetune_done/final_loss"] == [(30, 2.0)]
    assert got["2_pretrain/weight_decay"] == [(5, pytest.approx(0.045)), (10, pytest.approx(0.05))]
    assert got["2_pretrain/teacher_temp"] == [(5, pytest.approx(0.0405)), (10, pytest.approx(0.041))]
    # not curves: the step itself, wall time, None, bools, strings
    assert not {t for t in got if t.split("/")[1] in ("step", "time", "loader_images_per_s",
                                                      "saved_best", "checkpoint")}
    assert len(got) == 9 + 3 + 2 + 6  # finetune keys + val + done + pretrain


def test_it_also_writes_metrics_jsonl(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    tb = TensorBoardLogger(str(tmp_path / "tb"), also=JsonlLogger(str(jsonl)))
    for r in finetune_records():
        tb.log(**r)
    # on disk record by record: a loop that never closes it (or a crash) loses nothing
    assert read_scalars(tmp_path / "tb")["val/acc_lfw"] == [(20, 0.75)]
    tb.close()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["finetune"] * 3 + ["val", "finetune_done"]
    assert lines[1]["loss"] == 3.0 and "time" in lines[1]
    assert read_scalars(tmp_path / "tb")["finetune/loss"][1] == (20, 3.0)


def test_a_resumed_run_hides_the_steps_it_repeats(tmp_path):
    """A run stopped after step 40 and resumed from its step-20 checkpoint: TensorBoard shows
    steps 10 and 20 of the first run and 30 onward of the second, each step once."""
    with TensorBoardLogger(str(tmp_path / "tb")) as tb:
        for s in (10, 20, 30, 40):
            tb.log(stage="finetune", step=s, loss=1.0)
    with TensorBoardLogger(str(tmp_path / "tb")) as tb:
        for s in (30, 40, 50):
            tb.log(stage="finetune", step=s, loss=2.0)
    assert read_scalars(tmp_path / "tb")["finetune/loss"] == [(10, 1.0), (20, 1.0), (30, 2.0), (40, 2.0),
                                                               (50, 2.0)]


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path):
    """CI installs the extra: hide the module in a child process."""
    code = ("import sys; sys.modules['tensorboard'] = None\n"
            "from lafs_fast.train.tensorboard import TensorBoardLogger\n"
            "from lafs_fast._extras import MissingExtra\n"
            "try:\n"
            f"    TensorBoardLogger({str(tmp_path / 'tb')!r})\n"
            "except MissingExtra as e:\n"
            "    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("TensorBoard logging needs the tensorboard extra "
                                  "(pip install 'lafs_fast[tensorboard]')")
    assert not (tmp_path / "tb").exists()
