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


# ============================================================================ every other command
# The training commands (python -m lafs_fast.train [pipeline|finetune|pretrain|eval]), IJB
# evaluation, embed and convert: the same rule, run in-process through their main(argv).
def train_main(argv):
    from lafs_fast.train.__main__ import main
    return main(argv)


def ijb_main(argv):
    from lafs_fast.eval.__main__ import main
    return main(argv)


def embed_main(argv):
    from lafs_fast.embed import main
    return main(argv)


def convert_main(argv):
    from lafs_fast.convert import main
    return main(argv)


COMMAND_MAINS = {"train": train_main, "eval": ijb_main, "embed": embed_main, "convert": convert_main}


@pytest.fixture(scope="module")
def used(files):
    """Folders a run or a pipeline wrote into, a face folder, a training checkpoint in a run folder."""
    from PIL import Image
    (files / "used_run").mkdir()
    (files / "used_run" / "metrics.jsonl").write_text('{"stage": "finetune", "step": 1, "loss": 2.0}\n')
    (files / "used_pipeline" / "1_supervised").mkdir(parents=True)
    (files / "used_pipeline" / "1_supervised" / "metrics.jsonl").write_text('{"stage": "1 supervised"}\n')
    (files / "ckpt_run").mkdir()
    torch.save({"step": 1}, files / "ckpt_run" / "step-00000001.pt")
    (files / "faces" / "ann").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(files / "faces" / "ann" / "1.png")
    return files


def hidden_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the extra were not installed


def yaml_text(text):
    def make(tmp):
        (tmp / "cfg.yaml").write_text(text)
        return str(tmp / "cfg.yaml")
    return make


FT = ("train", "finetune")
PT = ("train", "pretrain", "--landmarks", "grid")
# (command, arguments, exit status, words the line must hold[, a setup(monkeypatch)]). Strings may
# name {model} (a model file) and {inputs} (the inputs folder); callables get the tmp folder.
COMMAND_CASES = [
    (("train",), ["--supervised-epochs", "0"], 2, "--supervised-epochs must be >= 1"),
    (("train",), ["--resume", "--overwrite"], 2, "--resume and --overwrite exclude each other"),
    (("train",), ["--resume"], 2, "--resume: nothing to resume in runs/pipeline"),
    (("train",), ["--out-dir", "{inputs}/used_pipeline"], 2, "holds another pipeline's stages (1_supervised)"),
    (("train",), ["--backend", "gpu"], 2, "argument --backend: invalid choice: 'gpu'"),
    (("train",), ["frobnicate"], 2, "unknown command 'frobnicate' (choose from pipeline, finetune"),
    (FT, ["--dataset", "recordio"], 2, "--data-path is required for --dataset recordio"),
    (FT, ["--config", yaml_text("batch_szie: 8\n")], 2, "unknown option 'batch_szie' in"),
    (FT, ["--config", yaml_text("batch_szie: 8\n")], 2, "did you mean 'batch-size'?"),
    (FT, ["--epochs", "-3"], 2, "--epochs must be >= 1, got -3"),
    (FT, ["--amp", "fp8"], 2, "argument --amp: invalid choice: 'fp8'"),
    (FT, ["--config", "missing.yaml"], 2, "--config: cannot read missing.yaml: No such file or directory"),
    (FT, ["--resume"], 2, "--resume: nothing to resume in runs/finetune (the folder does not exist)"),
    (FT, ["--resume", "maybe"], 2, "expected true, false or auto, got 'maybe'"),
    (FT, ["--no-resume", "true"], 2, "--no-resume takes no value"),
    (FT, ["--out-dir", "{inputs}/used_run"], 2, "holds another run (metrics.jsonl)"),
    (FT, ["--out-dir", "{inputs}/ckpt_run", "--resume", "--overwrite"], 2, "exclude each other"),
    (FT, ["--margin", "wide"], 2, "argument --margin: invalid"),
    (FT, ["--tensorboard"], 1, "--tensorboard needs the tensorboard extra (pip install 'lafs_fast[tensorboard]')",
     hidden_tensorboard),
    (FT, ["--dataset", "folder", "--data-path", "no_such_folder"], 2, "--data-path: 'no_such_folder' does not exist"),
    (FT, ["--out-dir", "{inputs}/ckpt_run", "--overwrite", "--init", "{inputs}/ckpt_run/step-00000001.pt"], 2,
     "is a file of the run --overwrite removes"),
    (FT, ["--backend", "fast"], 2, "argument --backend: invalid choice: 'fast'"),
    (("train", "pretrain"), ["--landmarks", "cnn"], 2, "--landmarks cnn needs --landmark-init"),
    (PT, ["--n-local", "-1"], 2, "--n-local must be >= 0, got -1"),
    (PT, ["--resume", "true"], 2, "--resume: nothing to resume in runs/pretrain"),
    (PT, ["--teacher-temp", "hot"], 2, "argument --teacher-temp: invalid float value: 'hot'"),
    (("train", "eval"), [], 2, "--checkpoint is required"),
    (("train", "eval"), ["--checkpoint", "{model}", "--folds", "1"], 2, "--folds must be >= 2"),
    (("train", "eval"), ["--checkpoint", "missing.pt"], 2, "--checkpoint: no such file missing.pt"),
    (("train", "eval"), ["--checkpoint", "{model}", "--orl", "maybe"], 2, "expected a boolean (true/false)"),
    (("eval",), [], 2, "the following arguments are required: COMMAND"),
    (("eval",), ["ijb"], 2, "the following arguments are required: --root, --target, --checkpoint, --out"),
    (("eval",), ["ijb", "--root", ".", "--target", "IJBX", "--checkpoint", "{model}", "--out", "o"], 2,
     "argument --target: invalid choice: 'IJBX'"),
    (("eval",), ["ijb", "--root", "nope", "--target", "IJBC", "--checkpoint", "{model}", "--out", "o"], 2,
     "--root 'nope' is not a folder"),
    (("eval",), ["ijb", "--root", ".", "--target", "IJBC", "--checkpoint", "{model}", "--out", "o",
                 "--norm-score", "sometimes"], 2, "expected a boolean"),
    (("embed",), ["--images", "{inputs}/faces"], 2, "the following arguments are required: --checkpoint"),
    (("embed",), ["--checkpoint", "{model}"], 2, "give exactly one input: --images, --list, --recordio or --bin"),
    (("embed",), ["--checkpoint", "{model}", "--images", "nope"], 2, "--images: 'nope' is not a folder"),
    (("embed",), ["--checkpoint", "{model}", "--images", "{inputs}/faces", "--batch-size", "0"], 2,
     "--batch-size must be >= 1, got 0"),
    (("embed",), ["--checkpoint", "{model}", "--images", "{inputs}/faces", "--flip", "perhaps"], 2,
     "expected a boolean"),
    (("embed",), ["--checkpoint", "missing.pt", "--images", "{inputs}/faces"], 2, "checkpoint not found: missing.pt"),
    (("convert",), [], 2, "the following arguments are required: input, output"),
    (("convert",), ["missing.pth", "o.pt"], 2, "checkpoint not found: missing.pth"),
    (("convert",), ["{inputs}/notes.txt", "o.pt"], 2, "it is truncated, corrupt or not a torch checkpoint"),
    (("convert",), ["{model}", "o.pt", "--bogus"], 2, "unrecognized arguments: --bogus"),
]


def case_prog(command, args=()):
    """The program name the error line starts with: a subcommand's, the pipeline's when
    `python -m lafs_fast.train` is given none."""
    name, argv = command[0], [*command[1:], *args]
    if name == "train":
        if argv[:1] == ["frobnicate"]:
            return "python -m lafs_fast.train"
        sub = argv[0] if argv and not argv[0].startswith("-") else "pipeline"
        return f"python -m lafs_fast.train {sub}"
    if name == "eval" and argv[:1] == ["ijb"]:
        return "python -m lafs_fast.eval ijb"
    return f"python -m lafs_fast.{name}"


def training_started(*args, **kwargs):
    raise AssertionError("training started: the bad input was not rejected")


@pytest.mark.parametrize("case", COMMAND_CASES, ids=[f"{case_prog(c[0], c[1]).split()[-1]}-{i}"
                                                    for i, c in enumerate(COMMAND_CASES)])
def test_every_command_reports_bad_input_in_one_line(case, used, tmp_path, monkeypatch, capsys):
    command, args, status, words, *setup = case
    monkeypatch.chdir(tmp_path)
    from lafs_fast.train import data_setup
    monkeypatch.setattr(data_setup.TrainData, "epoch_batches", training_started)
    for prepare in setup:
        prepare(monkeypatch)
    argv = [*command[1:], *resolve(args, tmp_path, used)]
    before_tmp, before_inputs = tree(tmp_path), tree(used)
    try:
        got = COMMAND_MAINS[command[0]](argv)
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err.splitlines()
    prog = case_prog(command, args)
    assert got == status, err
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert words in err[0] and "usage:" not in err[0] and "Traceback" not in err[0], err[0]
    assert tree(tmp_path) == before_tmp and tree(used) == before_inputs  # nothing written


def test_the_table_covers_every_command_with_thirty_inputs():
    progs = {case_prog(c[0], c[1]) for c in COMMAND_CASES}
    assert len(COMMAND_CASES) >= 30
    assert {f"python -m lafs_fast.train {c}" for c in ("pipeline", "finetune", "pretrain", "eval")} <= progs
    assert {"python -m lafs_fast.train", "python -m lafs_fast.eval", "python -m lafs_fast.eval ijb",
            "python -m lafs_fast.embed", "python -m lafs_fast.convert"} <= progs


@pytest.mark.parametrize("argv, status, words", [
    (["-m", "lafs_fast.train", "finetune", "--config", "{cfg}"], 2, "unknown option 'batch_szie'"),
    (["-m", "lafs_fast.train", "pretrain", "--epochs", "-3"], 2, "--epochs must be >= 1, got -3"),
    (["-m", "lafs_fast.train", "--resume"], 2, "nothing to resume in runs/pipeline"),
    (["-m", "lafs_fast.eval", "ijb", "--root", "nope", "--target", "IJBC", "--checkpoint", "m.pt", "--out", "o"], 2,
     "is not a folder"),
    (["-m", "lafs_fast.embed", "--checkpoint", "m.pt"], 2, "give exactly one input"),
    (["-m", "lafs_fast.convert", "missing.pth", "o.pt"], 2, "checkpoint not found"),
])
def test_the_commands_fail_in_one_line_as_processes(argv, status, words, tmp_path):
    """The real processes: the exit status, one stderr line, nothing on stdout, nothing written."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("batch_szie: 8\n")
    argv = [a.format(cfg=cfg) for a in argv]
    before = tree(tmp_path)
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == status and len(lines) == 1 and words in lines[0], res.stderr
    assert ": error: " in lines[0] and res.stdout == "" and tree(tmp_path) == before
