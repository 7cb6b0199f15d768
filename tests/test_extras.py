"""Optional parts without their extra: one line naming the extra and its pip command, exit 1,
nothing written. The suite's environment installs every extra, so each test hides the module in
a child process (sys.modules[name] = None makes its import fail as if it were not installed)."""
import subprocess
import sys

import pytest
import torch

from lafs_fast._extras import MissingExtra, require_extra
from lafs_fast.convert import save_model
from lafs_fast.models import create_model


def run_without(hidden, module, *args, cwd):
    """`python -m module args` with the modules in `hidden` made unimportable."""
    code = ("import runpy, sys\n"
            f"for name in {list(hidden)!r}:\n"
            "    sys.modules[name] = None\n"
            f"sys.argv = [{module!r}] + sys.argv[1:]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(create_model("part_fvit_tiny", depth=1).eval(), str(path))
    return str(path)


def pipeline_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"stage": "finetune", "step": 1, "loss": 2.0, "lr": 0.001}\n')
    return run


@pytest.mark.parametrize("hidden, extra_args, line", [
    (["onnx"], [], "python -m lafs_fast.export: error: ONNX export needs the onnx extra "
                   "(pip install 'lafs_fast[onnx]')"),
    (["onnxruntime"], ["--check"], "python -m lafs_fast.export: error: --check needs the onnx extra "
                                   "(pip install 'lafs_fast[onnx]')"),
])
def test_export_without_onnx(model_file, tmp_path, hidden, extra_args, line):
    res = run_without(hidden, "lafs_fast.export", "--checkpoint", model_file, "--out", "m.onnx", *extra_args,
                      cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.splitlines() == [line], res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_plot_without_matplotlib(tmp_path):
    run = pipeline_metrics(tmp_path)
    res = run_without(["matplotlib"], "lafs_fast.plot", str(run), cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    assert res.stderr.splitlines() == ["python -m lafs_fast.plot: error: plotting needs the plot extra "
                                       "(pip install 'lafs_fast[plot]')"]
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_the_same_commands_work_with_the_extras(model_file, tmp_path):
    """The hiding wrapper itself runs the commands (hiding an unrelated module)."""
    res = run_without(["no_such_module"], "lafs_fast.export", "--checkpoint", model_file, "--out", "m.onnx",
                      cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "m.onnx").stat().st_size > 1000, res.stderr
    run = pipeline_metrics(tmp_path)
    assert run_without([], "lafs_fast.plot", str(run), cwd=tmp_path).returncode == 0
    assert (run / "curves.png").exists()


def test_require_extra_messages(tmp_path, monkeypatch):
    with pytest.raises(MissingExtra) as missing:
        require_extra("lafs_fast_no_such_module", "onnx", "ONNX export")
    assert str(missing.value) == "ONNX export needs the onnx extra (pip install 'lafs_fast[onnx]')"
    assert isinstance(missing.value, ImportError)
    # installed but broken (a dependency of its own is missing): said so, not "install it"
    pkg = tmp_path / "lafs_fast_broken_extra"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import lafs_fast_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtra, match=r"^plotting needs lafs_fast_broken_extra, which is installed but "
                                           r"fails to import: No module named 'lafs_fast_missing_dependency' "
                                           r"\(reinstall it: .*\[plot\]'\)$"):
        require_extra("lafs_fast_broken_extra", "plot", "plotting")
    assert require_extra("json", "plot") is sys.modules["json"]
