"""Bad input to info, export and plot: one line on stderr, `prog: error: <what> (...)`, no usage
and no traceback, exit 2 for a bad command line or input (1 when the work itself fails), and
nothing written."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lafs_fast import cli, export, info, plot
from lafs_fast.convert import save_model
from lafs_fast.models import create_model

PROGS = {"info": info, "export": export, "plot": plot}
# Checkpoint errors say how to fix them in their own words, not in parentheses.
FIX_IN_PROSE = {"is a training checkpoint", "--landmark-cnn applies to official release checkpoints"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model file, a training checkpoint, a text file and a finished run's folder."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    save_model(create_model("part_fvit_tiny", depth=1).eval(), str(root / "model.pt"))
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, root / "step-00000010.pt")
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text(
        json.dumps({"stage": "finetune", "step": 10, "loss": 3.0, "lr": 1e-3}) + "\n")
    return root


def metrics(text):
    """A RUN_DIR holding a metrics.jsonl with this text."""
    def make(tmp):
        (tmp / "bad_run").mkdir()
        (tmp / "bad_run" / "metrics.jsonl").write_text(text)
        return str(tmp / "bad_run")
    return make


# (command, arguments: strings, or callables of (tmp folder, inputs folder), exit status, words the
# line must hold). Every path a case writes lies in the tmp folder, which must stay as it was.
CASES = [
    ("info", ["--json"], 2, "unrecognized arguments: --json"),
    ("info", ["extra"], 2, "unrecognized arguments: extra"),
    ("export", [], 2, "the following arguments are required: --checkpoint, --out"),
    ("export", ["--out", "m.onnx"], 2, "required: --checkpoint"),
    ("export", ["--checkpoint", "missing.pt", "--out", "m.onnx"], 2, "--checkpoint: no such file 'missing.pt'"),
    ("export", ["--checkpoint", "{model}", "--out", "m.onnx", "--opset", "15"], 2, "--opset must be >= 16"),
    ("export", ["--checkpoint", "{model}", "--out", "m.onnx", "--opset", "x"], 2, "invalid int value: 'x'"),
    ("export", ["--checkpoint", "{model}", "--out", "no/such/dir/m.onnx"], 2, "does not exist"),
    ("export", ["--checkpoint", "{model}", "--out", "."], 2, "is a directory"),
    ("export", ["--checkpoint", "{inputs}/notes.txt", "--out", "m.onnx"], 2, "not a torch checkpoint"),
    ("export", ["--checkpoint", "{inputs}/step-00000010.pt", "--out", "m.onnx"], 2, "is a training checkpoint"),
    ("export", ["--checkpoint", "{model}", "--out", "m.onnx", "--landmark-cnn", "nope.pth"], 2,
     "--landmark-cnn: no such file"),
    ("export", ["--checkpoint", "{model}", "--out", "m.onnx", "--landmark-cnn", "{model}"], 2,
     "--landmark-cnn applies to official release checkpoints"),
    ("export", ["--checkpoint", "{model}", "--out", "m.onnx", "--bogus"], 2, "unrecognized arguments: --bogus"),
    ("plot", [], 2, "the following arguments are required: RUN_DIR"),
    ("plot", ["no_such_run"], 2, "RUN_DIR 'no_such_run' does not exist"),
    ("plot", ["."], 2, "no metrics.jsonl in ."),
    ("plot", [metrics(json.dumps({"stage": "finetune_done", "steps": 0}) + "\n")], 2, "no training steps logged"),
    ("plot", [metrics('{"stage": "finetune", "step": 1\n{"stage": "finetune", "step": 2}\n')], 2,
     "metrics.jsonl:1: not a JSON line"),
    ("plot", [metrics("[1, 2]\n")], 2, "metrics.jsonl:1: expected a JSON object, got list"),
    ("plot", ["{inputs}/run", "--out", "no/such/dir/c.png"], 2, "does not exist"),
    ("plot", ["{inputs}/run", "--out", "."], 2, "is a directory"),
    ("plot", ["{inputs}/run", "--dpi", "300"], 2, "unrecognized arguments: --dpi"),
]


def resolve(args, tmp, inputs):
    out = []
    for a in args:
        out.append(a(tmp) if callable(a) else a.format(model=inputs / "model.pt", inputs=inputs))
    return out


def tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def call(command, argv, capsys):
    """main(argv)'s exit status (argparse's errors exit through SystemExit) and stderr lines."""
    try:
        status = PROGS[command].main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("command, args, status, words", CASES,
                         ids=[f"{c}-{i}" for i, (c, *_) in enumerate(CASES)])
def test_bad_input_is_one_line(command, args, status, words, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = resolve(args, tmp_path, files)
    before_tmp, before_inputs = tree(tmp_path), tree(files)
    got, err = call(command, argv, capsys)
    prog = f"python -m lafs_fast.{command}"
    assert got == status, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert words in err[0] and "usage:" not in err[0] and "Traceback" not in err[0]
    assert err[0].endswith(")") or words in FIX_IN_PROSE  # how to fix
    assert tree(tmp_path) == before_tmp and tree(files) == before_inputs  # nothing written


def full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command, args", [
    ("export", ["--checkpoint", "{model}", "--out", "m.onnx"]),
    ("plot", ["{inputs}/run", "--out", "c.png"]),
])
def test_a_full_disk_is_a_failure_at_run_time(command, args, files, tmp_path, monkeypatch, capsys):
    """The file is written beside its target and renamed: a failing write leaves nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "replace", full_disk)
    status, err = call(command, resolve(args, tmp_path, files), capsys)
    assert status == cli.FAILURE_EXIT and len(err) == 1, err
    assert "No space left on device" in err[0] and "check the free space" in err[0]
    assert tree(tmp_path) == []


def test_help_prints_usage_and_exits_0(capsys):
    for command, module in PROGS.items():
        with pytest.raises(SystemExit) as e:
            module.main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: python -m lafs_fast.{command}"), out


@pytest.mark.parametrize("command, args, words", [
    ("info", ["--json"], "unrecognized arguments: --json"),
    ("export", ["--checkpoint", "missing.pt", "--out", "m.onnx"], "no such file"),
    ("plot", ["no_such_run"], "does not exist"),
])
def test_the_modules_run_as_commands(command, args, words, tmp_path):
    """The same through `python -m` (each module's __main__ path)."""
    res = subprocess.run([sys.executable, "-m", f"lafs_fast.{command}", *args], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1 and words in res.stderr, res.stderr
    assert res.stdout == "" and list(tmp_path.iterdir()) == []
