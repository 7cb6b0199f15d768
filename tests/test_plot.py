"""python -m lafs_fast.plot: the curves it reads from metrics.jsonl (a run's and a pipeline's stage
folders, resumed steps, a line being written) and the PNG it draws."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lafs_fast import plot


def write_jsonl(path, records, tail=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)


def train_lines(stage, steps, loss=lambda s: 5.0 - s / 100, lr=lambda s: 1e-3 * s / 100):
    """Step records as finetune / pretrain log them."""
    return [{"time": 0.1 * s, "stage": stage, "step": s, "epoch": s // 10, "loss": loss(s), "lr": lr(s),
             "grad_norm": 1.0, "images_per_s": 80.0} for s in steps]


def val_line(step, **acc):
    return {"time": 1.0, "stage": "val", "step": step, "epoch": 0, **{f"acc_{k}": v for k, v in acc.items()},
            "acc_mean": float(np.mean(list(acc.values()))), "best_mean": 0.9, "saved_best": True}


@pytest.fixture
def pipeline_dir(tmp_path):
    """A pipeline's run: three stage folders, one validated on two sets, and a top-level file
    that is not a metrics log."""
    run = tmp_path / "pipe"
    write_jsonl(str(run / "1_supervised" / "metrics.jsonl"),
                train_lines("1 supervised", range(10, 60, 10))
                + [{"stage": "1 supervised_done", "steps": 50, "final_loss": 4.5}])
    write_jsonl(str(run / "2_pretrain" / "metrics.jsonl"), train_lines("2 pretrain", range(5, 35, 5)))
    write_jsonl(str(run / "3_finetune" / "metrics.jsonl"),
                train_lines("3 finetune", range(10, 110, 10))
                + [val_line(50, lfw=0.8, cfp_fp=0.7), val_line(100, lfw=0.9, cfp_fp=0.75)])
    (run / "results.json").write_text("{}")
    return run


def test_pipeline_stages_each_get_their_curves(pipeline_dir):
    stages = plot.load_run(str(pipeline_dir))
    assert [s.name for s in stages] == ["1_supervised", "2_pretrain", "3_finetune"]
    sup, pre, fin = stages
    assert sup.train["loss"] == ([10, 20, 30, 40, 50], [4.9, 4.8, 4.7, 4.6, 4.5])
    assert pre.train["lr"][0] == [5, 10, 15, 20, 25, 30] and pre.steps == 30
    assert not sup.val and not pre.val
    assert fin.val == {"lfw": ([50, 100], [0.8, 0.9]), "cfp_fp": ([50, 100], [0.7, 0.75]),
                       "mean": ([50, 100], [0.75, 0.825])}


def test_resumed_steps_keep_their_latest_value_and_a_partial_line_is_skipped(tmp_path):
    """A run stopped at step 40, resumed from its step-20 checkpoint, and still writing."""
    lines = train_lines("finetune", [10, 20, 30, 40]) + train_lines("finetune", [30, 40, 50], loss=lambda s: 1.0)
    write_jsonl(str(tmp_path / "run" / "metrics.jsonl"), lines, tail='{"time": 9.0, "stage": "fine')
    (stage,) = plot.load_run(str(tmp_path / "run"))
    assert stage.train["loss"] == ([10, 20, 30, 40, 50], [4.9, 4.8, 1.0, 1.0, 1.0])
    # a single validation set: no separate mean curve
    write_jsonl(str(tmp_path / "one" / "metrics.jsonl"), lines + [val_line(50, lfw=0.5)])
    assert plot.load_run(str(tmp_path / "one"))[0].val == {"lfw": ([50], [0.5])}


def test_the_command_draws_a_png(pipeline_dir, tmp_path):
    out = tmp_path / "curves.png"
    res = subprocess.run([sys.executable, "-m", "lafs_fast.plot", str(pipeline_dir), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"wrote {out}: 1_supervised (50 steps), 2_pretrain (30 steps), "
                                  "3_finetune (100 steps)")
    with Image.open(out) as im:
        assert im.format == "PNG"
        w, h = im.size
        pixels = np.asarray(im.convert("L"))
    assert (w, h) == (1260, 900)  # three panels per stage, three stages
    assert pixels.std() > 10  # lines and text on the background, not an empty picture
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "pipe"]  # no temporary file left
    # the default place: RUN_DIR/curves.png; a single run has two panels (no validation)
    run = tmp_path / "ft"
    write_jsonl(str(run / "metrics.jsonl"), train_lines("finetune", range(1, 50)))
    assert plot.main([str(run)]) == 0
    with Image.open(run / "curves.png") as im:
        assert im.size == (840, 300)
