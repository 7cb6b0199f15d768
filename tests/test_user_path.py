"""The way a user runs the package: `python -m ...` from a source tree that has no compiled parts,
no silent fallback to the reference ops in training, and logs a person can read."""
import io
import os
import shutil
import subprocess
import sys
import time

import pytest

import lafs_fast
from lafs_fast import ops
from lafs_fast.train.progress import LineProgress, progress

PACKAGE_DIR = os.path.dirname(os.path.abspath(lafs_fast.__file__))
COMPILED_DIR = lafs_fast.COMPILED_FROM or PACKAGE_DIR

needs_c = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="lafs_fast._C is not built here")


STALE_BUILD = "a stale build of the source tree"


def source_tree_copy(root, with_broken_c=False):
    """A copy of the package's Python files: what the repository root holds after a non-editable
    install (no _C, and the _build_info.py that setup.py wrote there, here one that describes
    another build). `with_broken_c` adds a _C that cannot be loaded."""
    src = root / "src"
    shutil.copytree(PACKAGE_DIR, src / "lafs_fast",
                    ignore=shutil.ignore_patterns("_C.*", "__pycache__", "_build_info.py"))
    (src / "lafs_fast" / "_build_info.py").write_text(
        f"BUILD_INFO = {{'torch_version': '0.0', 'with_cuda': True, 'cuda_decision': {STALE_BUILD!r}}}\n")
    if with_broken_c:
        (src / "lafs_fast" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not an ELF file")
        shutil.copy(os.path.join(COMPILED_DIR, "_build_info.py"), src / "lafs_fast" / "_build_info.py")
    return src


def run_module(cwd, *args, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LAFS_FAST_BACKEND")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_c
def test_source_tree_without_c_adopts_the_installed_build(tmp_path):
    # cwd = a source tree without _C (it shadows the installed copy, as at the repository root);
    # the installed copy with _C is elsewhere on sys.path.
    src = source_tree_copy(tmp_path)
    installed = tmp_path / "site"
    installed.mkdir()
    os.symlink(COMPILED_DIR, installed / "lafs_fast")
    res = run_module(src, "lafs_fast.info", env_extra={"PYTHONPATH": str(installed)})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(line.split() == ["cpu", "usable"] for line in lines), res.stdout
    assert f"package            {src / 'lafs_fast'}" in res.stdout  # the source tree's Python ...
    assert f"compiled_from      {installed / 'lafs_fast'}" in res.stdout  # ... the installed _C
    # ... described by the installed _build_info, not by the source tree's own
    from lafs_fast._build_info import BUILD_INFO
    assert STALE_BUILD not in res.stdout, res.stdout
    assert any(line.split() == ["cuda_decision", *BUILD_INFO["cuda_decision"].split()] for line in lines), res.stdout
    assert any(line.split()[:2] == ["cpu", "tensors"] and line.split()[-1] == "cpu" for line in lines)


@needs_c
def test_training_stops_at_once_without_the_compiled_kernels(tmp_path):
    src = source_tree_copy(tmp_path, with_broken_c=True)
    t0 = time.time()
    res = run_module(src, "lafs_fast.train", "--supervised-epochs", "1", "--out-dir", str(tmp_path / "run"))
    assert time.time() - t0 < 60
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "compiled kernels are unavailable" in err[0] and "LAFS_FAST_BACKEND=reference" in err[0]
    assert not (tmp_path / "run").exists()  # stopped before any work
    # info says so with a non-zero exit: the build promised a cpu backend
    info = run_module(src, "lafs_fast.info")
    assert info.returncode != 0 and "promised backends that are unusable" in info.stderr


@needs_c
@pytest.mark.parametrize("how", ["env", "flag"])
def test_reference_ops_run_when_asked_for_by_name(tmp_path, how):
    src = source_tree_copy(tmp_path, with_broken_c=True)
    args = ["lafs_fast.train", "pretrain", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "8",
            "--landmarks", "grid", "--n-local", "1", "--out-dim", "64", "--head-hidden", "64",
            "--head-bottleneck", "32", "--stop-after", "2", "--log-every", "1", "--out-dir", str(tmp_path / "run"),
            "--progress", "false"]
    env = {"LAFS_FAST_BACKEND": "reference"} if how == "env" else {}
    if how == "flag":
        args += ["--backend", "reference"]
    res = run_module(src, *args, env_extra=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_require_compiled_rules(monkeypatch):
    monkeypatch.setattr(ops._common, "HAS_EXTENSION", False)
    monkeypatch.delenv("LAFS_FAST_BACKEND", raising=False)
    with pytest.raises(ops.BackendUnavailable, match="compiled kernels are unavailable"):
        ops.require_compiled()
    with pytest.raises(ops.BackendUnavailable):
        ops.require_compiled("auto")
    ops.require_compiled("reference")
    monkeypatch.setenv("LAFS_FAST_BACKEND", "reference")
    ops.require_compiled()
    monkeypatch.setattr(ops._common, "HAS_EXTENSION", True)
    monkeypatch.delenv("LAFS_FAST_BACKEND")
    ops.require_compiled()


def test_line_progress_writes_a_line_per_interval_not_per_step(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="stage", interval=30.0, file=out)
    for _ in range(1000):
        clock[0] += 0.1  # 100 s in all: lines at 30, 60, 90 s, then one at close
        bar.update(1)
        bar.set_postfix(loss="1.000")
    bar.close()
    bar.close()  # a second close writes nothing
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[-1].startswith("stage: step 1000/1000 (100 %) 100 s 10.00 steps/s loss=1.000")
    assert lines[0].startswith("stage: step 300/1000 (30 %) 30 s")


def test_progress_is_a_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert isinstance(progress(10, desc="x"), LineProgress)
    off = progress(10, enabled=False)
    off.update(3)
    off.set_postfix(a=1)
    off.close()
    assert not isinstance(off, LineProgress)
