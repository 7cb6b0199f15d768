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


# ----------------------------------------------------------------------------- in the training loop
def jsonl_records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_a_2_epoch_orl_finetune_with_tensorboard_writes_what_metrics_jsonl_holds(tmp_path, capsys):
    """--tensorboard: the run's scalars in OUT/tb, read back by TensorBoard's reader, equal to
    metrics.jsonl's; the epoch lines carry the corrupt-image count; plot draws the run."""
    from lafs_fast import plot
    from lafs_fast.train.__main__ import main as train_main
    out = tmp_path / "run"
    res = train_main(["finetune", "--fewshot", "2", "--batch-size", "20", "--epochs", "2", "--warmup-epochs", "0.5",
                      "--no-eval", "--log-every", "1", "--progress", "false", "--device", "cpu",
                      "--tensorboard", "--out-dir", str(out)])
    assert res["steps"] == 2 * (60 // 20)  # ORL's 30 training subjects x 2 images
    assert any(p.name.startswith("events.out.tfevents.") for p in (out / "tb").iterdir())
    got = read_scalars(out / "tb")
    records = jsonl_records(out)
    steps = {r["step"]: r for r in records if r["stage"] == "finetune" and "step" in r}
    for key in ("loss", "lr", "images_per_s", "grad_norm", "drift"):  # (the summary line repeats the last step)
        assert dict(got[f"finetune/{key}"]) == {s: pytest.approx(steps[s][key], rel=1e-6) for s in steps}, key
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    epochs = [r for r in records if r["stage"] == "finetune_epoch"]
    assert [(r["step"], r["epoch"], r["corrupt_images"]) for r in epochs] == [(3, 0, 0), (6, 1, 0)]
    assert got["finetune_epoch/corrupt_images"] == [(3, 0.0), (6, 0.0)]
    assert plot.main([str(out)]) == 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pretrain_logs_weight_decay_and_teacher_temperature(tmp_path):
    from lafs_fast.dino import teacher_temp_schedule, weight_decay_schedule
    from lafs_fast.train.__main__ import main as train_main
    out = tmp_path / "run"
    train_main(["pretrain", "--landmarks", "grid", "--dataset", "synthetic", "--batch-size", "8", "--epochs", "2",
                "--n-local", "1", "--out-dim", "16", "--head-hidden", "16", "--head-bottleneck", "8",
                "--warmup-teacher-temp", "0.07", "--warmup-teacher-temp-epochs", "2", "--log-every", "1",
                "--progress", "false", "--device", "cpu", "--tensorboard", "--out-dir", str(out)])
    steps = [r for r in jsonl_records(out) if r["stage"] == "pretrain" and "step" in r][:12]
    wd = weight_decay_schedule(2, 6, 0.04, 0.4)
    temps = teacher_temp_schedule(0.07, 0.04, 2, 2)
    assert [r["weight_decay"] for r in steps] == pytest.approx([float(wd[s - 1]) for s in range(1, 13)])
    assert [r["teacher_temp"] for r in steps] == pytest.approx([float(temps[(s - 1) // 6]) for s in range(1, 13)])
    got = read_scalars(out / "tb")
    assert [v for _, v in got["pretrain/teacher_temp"]][:12] == pytest.approx([r["teacher_temp"] for r in steps])


def test_the_corrupt_images_of_each_epoch_are_counted(tmp_path, capsys):
    """A folder with one undecodable image among 12: each epoch's line counts it (the second
    epoch passes it over for free, flagged by the first, and still counts it as missing), in
    metrics.jsonl and in the log."""
    import torch

    from lafs_fast.data.image_folder import encode_image
    from lafs_fast.train.__main__ import main as train_main
    root = tmp_path / "faces"
    g = torch.Generator().manual_seed(0)
    for person in ("ann", "bob", "cid", "dan"):
        (root / person).mkdir(parents=True)
        for k in range(3):
            img = torch.randint(0, 256, (3, 112, 112), dtype=torch.uint8, generator=g)
            (root / person / f"{k}.png").write_bytes(encode_image(img, "png"))
    (root / "bob" / "1.png").write_bytes(b"\x89PNG truncated")
    out = tmp_path / "run"
    with pytest.warns(Warning, match="bob/1.png"):
        train_main(["finetune", "--dataset", "folder", "--data-path", str(root), "--batch-size", "4", "--epochs", "2",
                    "--warmup-epochs", "0.5", "--workers", "0", "--no-eval", "--progress", "false", "--device", "cpu",
                    "--out-dir", str(out)])
    epochs = [r for r in jsonl_records(out) if r["stage"] == "finetune_epoch"]
    assert [(r["epoch"], r["corrupt_images"]) for r in epochs] == [(0, 1), (1, 1)]
    said = [line for line in capsys.readouterr().out.splitlines() if "corrupt" in line]
    assert said == ["finetune epoch 0: 1 corrupt image(s) skipped", "finetune epoch 1: 1 corrupt image(s) skipped"]
