"""bench/gpu_check.sh in its CPU smoke mode (LAFS_GPU_CHECK_SMOKE=1): the plumbing of the GPU
check (arguments, the files it writes, the report, no aborts, the order of its parts) on every run
of the suite, through one run of the `all` stage (correctness then bench, as on the GPU machine).
Only the GPU itself stays unproven here."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def run_stage(stage, out, **env):
    full = dict(os.environ, LAFS_GPU_CHECK_SMOKE="1", OUT=str(out), PYTHON=sys.executable, **env)
    full.pop("TRITON_INTERPRET", None)  # the script must set it up by itself
    return subprocess.run(["bash", SCRIPT, stage], env=full, capture_output=True, text=True, timeout=600)


def report(out, stage):
    md = open(os.path.join(out, f"gpu_check_{stage}.md")).read()
    data = json.load(open(os.path.join(out, f"gpu_check_{stage}.json")))
    return md, data


FAILING = '''
import time

def test_passes():
    assert 1 + 1 == 2

def test_deliberately_fails():
    assert 1 + 1 == 3, "a deliberately failing test"

def test_hangs():
    time.sleep(120)
'''


@pytest.fixture(scope="module")
def correctness(tmp_path_factory):
    """One smoke run of the all stage, with a failing and a hanging test injected."""
    out = tmp_path_factory.mktemp("gpu_check_all")
    extra = out.parent / "injected"
    extra.mkdir()
    (extra / "test_injected.py").write_text(FAILING)
    res = run_stage("all", out, LAFS_GPU_CHECK_EXTRA_TESTS=str(extra / "test_injected.py"),
                    LAFS_GPU_CHECK_EXTRA_TIMEOUT="3")
    return res, out


def test_correctness_smoke_runs_to_the_end(correctness):
    res, out = correctness
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["gpu_check_all.json", "gpu_check_all.log", "gpu_check_all.md"]
    assert len(files) <= 8  # what one device call may bring back
    md, data = report(out, "all")
    assert "## Parts" in md and "## Test outcomes" in md and "python3 -m lafs_fast.info" in md
    parts = {p["part"].split(":")[0].split(" (")[0]: p for p in data["parts"]}
    assert set(parts) >= {"build", "lafs_fast.info", "tests", "finetune", "pretrain", "bench"}
    for p in data["parts"]:
        assert p["status"] == "ok", p
        assert p["part"] in md and p["seconds"] >= 0
    # the Python.h probe ran (and found the headers of this interpreter)
    assert "Python.h" in parts["build"]["note"] and "found" in parts["build"]["note"]
    # the training runs come before the test groups, the benchmarks after them
    order = [p["part"].split(":")[0].split(" (")[0] for p in data["parts"]]
    assert order.index("finetune") < order.index("pretrain") < order.index("tests") < order.index("bench")
    tests_part = next(p for p in data["parts"] if p["part"].startswith("tests"))
    # the smoke mode's two groups (its op subset and the injected one): side by side on a machine
    # with more than 2 CPUs, each with its share of them
    cpus = os.cpu_count() or 1
    width = 1 if cpus <= 2 else 2
    assert tests_part["note"].startswith(f"{width} side by side, {max(1, cpus // width)} "
                                         "CPU threads each"), tests_part
    assert data["seconds"] < 600
    tests = {t["nodeid"]: t for t in data["tests"]}
    real = {k: t for k, t in tests.items() if "test_injected" not in k}
    assert len(real) >= 15
    for nodeid, t in real.items():
        assert t["outcome"] in ("passed", "skipped"), (nodeid, t)
        assert f"`{nodeid}` | {t['outcome']}" in md  # every outcome is in the report
    # the CUDA cases are collected and reported as skipped, with the reason
    cuda = [t for k, t in real.items() if "cuda" in k and "[train]" not in k]
    assert cuda and all(t["outcome"] == "skipped" and ("no CUDA device" in t["message"] or
                                                      "two CUDA devices" in t["message"]) for t in cuda), cuda
    trained = {k: t for k, t in real.items() if k.startswith("[train]")}
    assert set(trained) == {"[train] finetune", "[train] pretrain (cnn landmarks)"}  # CNN from the finetune
    assert all(t["outcome"] == "passed" and "losses" in t["message"] for t in trained.values())


def test_a_failing_test_does_not_stop_the_stage(correctness):
    """The injected failing and hanging tests are reported; the parts after them still ran."""
    res, out = correctness
    assert res.returncode == 0
    md, data = report(out, "all")
    tests = {t["nodeid"].split("::")[-1]: t for t in data["tests"] if "test_injected" in t["nodeid"]}
    assert tests["test_passes"]["outcome"] == "passed"
    assert tests["test_deliberately_fails"]["outcome"] == "failed"
    assert "a deliberately failing test" in tests["test_deliberately_fails"]["message"]
    assert tests["test_hangs"]["outcome"] == "timeout"
    assert "## Failures" in md and "test_deliberately_fails` (failed)" in md and "test_hangs` (timeout)" in md
    order = [p["part"] for p in data["parts"]]
    tests_at = next(i for i, p in enumerate(order) if p.startswith("tests"))
    assert any(p.startswith("bench") for p in order[tests_at + 1:])  # the stage went on
    assert data["counts"]["failed"] == 1 and data["counts"]["timeout"] == 1


def test_bench_smoke_writes_every_table(correctness):
    res, out = correctness
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    md, data = report(out, "all")
    for p in data["parts"]:
        assert p["status"] == "ok", p
    for title in ("Op benchmark: landmark_patch_embed forward (", "Op benchmark: landmark_patch_embed "
                  "forward+backward (", "Op targets", "Pretraining step:", "Data side: decode + views",
                  "GPU utilisation"):
        assert f"## {title}" in md, title
    ops = data["data"]["ops"]
    for pass_name in ("forward", "forward+backward"):
        impls = ops[pass_name]
        assert {"fused [cpu]", "fused [triton]", "original per-landmark loop",
                "vectorised (one grid_sample + F.linear)"} <= set(impls)
        assert all(v["median_s"] > 0 for v in impls.values())
    assert "bare GEMM on ready patches" in ops["forward"]
    steps = data["data"]["step"]["results"]
    assert {(r["path"], r["with_data"]) for r in steps} == {(p, w) for p in ("fused", "original")
                                                            for w in (True, False)}
    assert data["data"]["loader"]["fused_images_per_s"] > 0


def test_bad_stage_is_a_usage_error(tmp_path):
    res = run_stage("benchmark", tmp_path)
    assert res.returncode == 2 and "usage" in res.stderr


def test_missing_python_headers_fail_the_build_in_one_clear_line(tmp_path, monkeypatch):
    """Outside smoke mode, an interpreter without Python.h: the build part fails at once (no
    compiler run) with the line that says what to install."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check
    monkeypatch.delenv("LAFS_GPU_CHECK_SMOKE", raising=False)
    monkeypatch.delenv("LAFS_GPU_CHECK_SKIP_BUILD", raising=False)
    fake = tmp_path / "python_without_headers"
    # an interpreter whose include folder holds no Python.h, and whose build probe finds no
    # CUDA build (so the build would start)
    fake.write_text("#!/bin/sh\ncase \"$2\" in *Python.h*) echo /nonexistent/include/Python.h; exit 3;; "
                    "*version_info*) echo 3.11;; *) echo '{\"cuda_kernel\": false, \"cap\": [9, 0]}';; esac\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PYTHON", str(fake))
    rec = gpu_check.Recorder("correctness", str(tmp_path))
    t = time.time()
    gpu_check.build(rec)
    took = time.time() - t
    rec.finish()
    part = rec.parts[0]
    assert part["part"] == "build" and part["status"] == "failed"
    assert "Python.h not found (/nonexistent/include/Python.h)" in part["note"]
    assert "apt-get install python3.11-dev" in part["note"] and took < 30
    log = open(tmp_path / "gpu_check_correctness.log").read()
    assert "pip install" not in log and "build_ext" not in log  # no build was attempted


def test_without_a_gpu_the_full_stage_stops_after_saying_so(tmp_path, monkeypatch):
    """Outside smoke mode on a machine without a GPU: a failed 'gpu' part, no build into the
    source tree, the report written, exit status 0."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_check
    monkeypatch.delenv("LAFS_GPU_CHECK_SMOKE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["correctness", "--out", str(tmp_path)]) == 0
    md, data = report(tmp_path, "correctness")
    assert [p["part"] for p in data["parts"]] == ["gpu"]
    assert data["parts"][0]["status"] == "failed" and "no CUDA device" in data["parts"][0]["note"]
    assert "| gpu | failed |" in md
