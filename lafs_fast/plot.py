"""Loss, learning-rate and validation curves of a training run, drawn from its metrics.jsonl.

    python -m lafs_fast.plot RUN_DIR [--out PNG]

RUN_DIR is a run's --out-dir (it holds metrics.jsonl), a pipeline's (each stage has its own in a
subfolder: 1_supervised, 2_pretrain, 3_finetune), or a metrics.jsonl file. Each stage gets a row:
training loss and learning rate against the optimiser step, and the validation accuracies when
the run had --val-bins. A step logged twice (a resumed run repeats the steps after its
checkpoint) is drawn with its latest value; a line still being written is left out. The PNG goes
to RUN_DIR/curves.png unless --out says otherwise. Needs matplotlib (the plot extra).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from . import cli
from ._extras import require_extra

PROG = "python -m lafs_fast.plot"
METRICS = "metrics.jsonl"
TRAIN_KEYS = ("loss", "lr")


@dataclasses.dataclass
class StageCurves:
    """One stage's series, each a (steps, values) pair of lists sorted by step."""
    name: str
    train: dict
    val: dict

    @property
    def steps(self) -> int:
        return max((s[-1] for s, _ in self.train.values() if s), default=0)


def metrics_files(run_dir: str) -> list[tuple[str, str]]:
    """(stage name, path) of RUN_DIR's metrics.jsonl and of its stage folders', in name order."""
    if os.path.isfile(run_dir):
        return [(os.path.basename(os.path.dirname(os.path.abspath(run_dir))), run_dir)]
    found = []
    if os.path.isfile(os.path.join(run_dir, METRICS)):
        found.append((os.path.basename(os.path.abspath(run_dir)), os.path.join(run_dir, METRICS)))
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name, METRICS)
        if os.path.isfile(path):
            found.append((name, path))
    return found


def read_records(path: str) -> list[dict]:
    """The JSON objects of a metrics.jsonl; an unfinished last line (a run writing it) is skipped."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline yet: being written
                break
            raise cli.UsageError(f"{path}:{n}: not a JSON line ({e.msg})",
                                 "give the metrics.jsonl a lafs_fast training run wrote") from None
        if not isinstance(rec, dict):
            raise cli.UsageError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}",
                                 "give the metrics.jsonl a lafs_fast training run wrote")
        records.append(rec)
    return records


def _add(series: dict, key: str, step, value) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        series.setdefault(key, {})[step] = float(value)  # a later record of a step replaces it


def stage_curves(name: str, records: Sequence[dict]) -> StageCurves:
    """Training steps (records with a step and a loss, not "val" nor a "*_done" summary) and
    validation records ("val": their acc_<set> keys, and acc_mean when there are several sets)."""
    train, val = {}, {}
    for rec in records:
        stage, step = str(rec.get("stage", "")), rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if stage == "val":
            for key, value in rec.items():
                if key.startswith("acc_"):
                    _add(val, key[len("acc_"):], step, value)
        elif not stage.endswith("_done") and "loss" in rec:
            for key in TRAIN_KEYS:
                _add(train, key, step, rec.get(key))
    if len(val) == 2:  # one set: its mean is itself
        val.pop("mean", None)
    as_lists = lambda d: {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in d.items()}  # noqa: E731
    return StageCurves(name, as_lists(train), as_lists(val))


def load_run(run_dir: str) -> list[StageCurves]:
    """The stages of RUN_DIR that have logged training steps."""
    if not os.path.exists(run_dir):
        raise cli.UsageError(f"RUN_DIR {run_dir!r} does not exist", "give a training run's --out-dir")
    files = metrics_files(run_dir)
    if not files:
        raise cli.UsageError(f"no {METRICS} in {run_dir} nor in its stage folders",
                             "give a training run's --out-dir; the run writes it there")
    stages = [stage_curves(name, read_records(path)) for name, path in files]
    stages = [s for s in stages if s.train]
    if not stages:
        raise cli.UsageError(f"no training steps logged yet in {', '.join(p for _, p in files)}",
                             "a run logs every --log-every steps; try again later")
    return stages


def draw(stages: Sequence[StageCurves], out: str) -> None:
    """One row per stage: loss | learning rate | validation accuracy (when any stage has one)."""
    require_extra("matplotlib", "plot", "plotting")
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    cols = 3 if any(s.val for s in stages) else 2
    fig = Figure(figsize=(4.2 * cols, 3.0 * len(stages)), layout="constrained")
    axes = fig.subplots(len(stages), cols, squeeze=False)
    for row, stage in zip(axes, stages):
        for ax, key, title in zip(row, TRAIN_KEYS, ("training loss", "learning rate")):
            if key in stage.train:
                steps, values = stage.train[key]
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2)
            ax.set_title(f"{stage.name}: {title}", fontsize=10)
        row[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if cols == 3:
            ax = row[2]
            for name, (steps, values) in stage.val.items():
                ax.plot(steps, [100 * v for v in values], marker=".", label=name)
            ax.set_title(f"{stage.name}: validation accuracy %", fontsize=10)
            if stage.val:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no validation sets", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
        for ax in row:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.savefig(out, dpi=100, format="png")


def default_out(run_dir: str) -> str:
    folder = os.path.dirname(run_dir) if os.path.isfile(run_dir) else run_dir
    return os.path.join(folder, "curves.png")


def plot_run(run_dir: str, out: Optional[str] = None) -> tuple[str, list[StageCurves]]:
    """Draw RUN_DIR's curves to `out` (default RUN_DIR/curves.png); returns its path and the
    curves drawn."""
    stages = load_run(run_dir)
    out = out or default_out(run_dir)
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(folder):
        what = "is a directory" if os.path.isdir(out) else f"folder {folder!r} does not exist"
        raise cli.UsageError(f"--out {out!r}: {what}", "give a .png path in an existing folder")
    partial = f"{out}.partial-{os.getpid()}"
    try:  # written beside the target and renamed: a failure leaves no partial picture
        draw(stages, partial)
        os.replace(partial, out)
    except OSError as e:
        raise cli.RunError(f"could not write {out}: {e.strerror or e}",
                           "check the free space and permissions of its folder") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return out, stages


def run(a: argparse.Namespace) -> int:
    require_extra("matplotlib", "plot", "plotting")  # before reading anything
    out, stages = plot_run(a.run_dir, a.out)
    print(f"wrote {out}: " + ", ".join(f"{s.name} ({s.steps} steps)" for s in stages))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 2)[2].strip())
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's --out-dir (or its metrics.jsonl)")
    p.add_argument("--out", default=None, help="the PNG to write (default: RUN_DIR/curves.png)")
    return cli.run(PROG, run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
