"""setup.py's CUDA decision: LAFS_FAST_CUDA=1 promises the CUDA kernels, so a build that cannot
make them must stop at once with one line saying why, not fall back to a CPU-only build (CI forces
it to prove the CUDA sources compile). Run on a copy of setup.py in an empty folder: nothing of
the checkout is touched."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_setup(folder, **env):
    shutil.copy(os.path.join(ROOT, "setup.py"), folder / "setup.py")
    (folder / "lafs_fast").mkdir(exist_ok=True)
    e = {k: v for k, v in os.environ.items() if k not in ("LAFS_FAST_CUDA", "CUDA_HOME")}
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=folder, env={**e, **env},
                          capture_output=True, text=True, timeout=300)


def test_lafs_fast_cuda_1_fails_loudly_when_the_cuda_build_is_impossible(tmp_path):
    no_toolkit = tmp_path / "no-toolkit"  # a CUDA_HOME without bin/nvcc
    no_toolkit.mkdir()
    res = run_setup(tmp_path, LAFS_FAST_CUDA="1", CUDA_HOME=str(no_toolkit))
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]  # (torch may log its own CUDA_HOME notice first)
    assert "Traceback" not in res.stderr, res.stderr
    assert last.startswith("LAFS_FAST_CUDA=1 but the CUDA build is impossible") and "no bin/nvcc" in last, last
    assert not (tmp_path / "lafs_fast" / "_build_info.py").exists()  # stopped before writing anything
    # control: the same folder and toolkit with the CUDA kernels not asked for builds CPU-only
    res = run_setup(tmp_path, LAFS_FAST_CUDA="0", CUDA_HOME=str(no_toolkit))
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == "lafs_fast", res.stderr
    assert "'cuda_decision': 'LAFS_FAST_CUDA=0'" in (tmp_path / "lafs_fast" / "_build_info.py").read_text()
