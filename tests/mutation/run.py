"""Mutation testing of the core with mutmut: one module at a time, each mutant run against the
fast tests that cover that module. Not part of CI (minutes to an hour per module on two cores).

    python tests/mutation/run.py dino checkpoint ...      # modules by key (see MODULES)
    python tests/mutation/run.py --sample 200 --seed 0 partial_fc

Each module is mutated in its own scratch copy of the package under .mutation/<key>/ (git-ignored),
so the source tree is never touched and mutmut's `mutants/` folder and cache stay out of it. The
compiled extension and the Triton kernels are copied in (the kernels folder dereferenced), and
the un-mutated tests must pass there before any mutant runs (mutmut checks this itself).
Per-module counts are written to .mutation/<key>/summary.json; docs/mutation.md holds the table.
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = ROOT / ".mutation"

# key -> (file to mutate, tests that cover it, functions to restrict to (glob on mutmut's
# mangled names; None = the whole file))
MODULES = {
    "dino": ("lafs_fast/dino.py", ["tests/test_dino.py"], None),
    "checkpoint": ("lafs_fast/checkpoint.py", ["tests/test_checkpoint.py", "tests/test_bad_input.py"],
                   None),
    "verification": ("lafs_fast/eval/verification.py",
                     ["tests/test_eval.py", "-k", "not orl and not eval_command"], None),
    "heads": ("lafs_fast/models/heads.py",
              ["tests/test_models.py", "tests/test_precision.py", "tests/test_partial_fc.py", "-m", "not slow"],
              None),
    "partial_fc": ("lafs_fast/models/partial_fc.py",
                   ["tests/test_partial_fc.py", "tests/test_step_equivalence_finetune.py", "-m", "not slow"], None),
    # the tests that run ranks or a killed run in subprocesses are left out: mutmut sees none of
    # the code they run, and they take 130 of the list's 300 s
    "common": ("lafs_fast/train/common.py",
               ["tests/test_release_recipe.py", "tests/test_release_recipe_finetune.py",
                "tests/test_resume.py", "tests/test_run_dirs.py", "tests/test_bad_input.py", "-k",
                "not two_ranks and not sigkill and not every_rank and not subprocess"], None),
    # the schedule and optimiser wiring of the two trainers
    "pretrain": ("lafs_fast/train/pretrain.py",
                 ["tests/test_release_recipe.py", "tests/test_step_equivalence_pretrain.py",
                  "tests/test_pretrain_options.py", "tests/test_precision.py"],
                 ["*x_build_run__*", "*x_make_optimizer__*", "*x_train_one_epoch__*", "*x_update__*",
                  "*x_forward_loss__*"]),
    "finetune": ("lafs_fast/train/finetune.py",
                 ["tests/test_release_recipe_finetune.py", "tests/test_step_equivalence_finetune.py",
                  "tests/test_fewshot_protocol.py", "tests/test_train.py", "-m", "not slow"],
                 ["*x_build_run__*", "*x_make_param_groups__*", "*x_peak_lr__*", "*x_release_sqrt_lr__*",
                  "*x_optimizer_step__*", "*x_train_one_epoch__*", "*x_forward_backward__*",
                  "*x_clip_gradients__*", "*x_drift_weight__*"]),
}


def prepare(key: str) -> Path:
    work = SCRATCH / key
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # symlinks=False dereferences lafs_fast/kernels (a link to kernels/ in a checkout)
    shutil.copytree(ROOT / "lafs_fast", work / "lafs_fast", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    if (ROOT / "configs").exists():
        shutil.copytree(ROOT / "configs", work / "configs")
    write_config(key, work)
    return work


def write_config(key: str, work: Path) -> None:
    """mutmut's setup.cfg: the module to mutate and the tests to run on its mutants."""
    target, tests, _ = MODULES[key]
    lines = ["[mutmut]", "source_paths=lafs_fast", f"only_mutate={target}",
             "also_copy=\n    configs/", "pytest_add_cli_args_test_selection="]
    extra = f"tests/test_{key}_mutants.py"      # the tests written to kill this module's survivors
    if (ROOT / extra).exists():
        tests = [extra] + tests
    lines += [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args=\n    -p\n    no:cacheprovider\n    -x", "timeout_multiplier=5.0"]
    (work / "setup.cfg").write_text("\n".join(lines) + "\n")


def mutant_names(work: Path, functions) -> list:
    """Every mutant mutmut generated for the module, optionally restricted to some functions."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, check=True).stdout
    names = re.findall(r"^\s*([\w.]+__mutmut_\d+)", out, re.M)
    if functions:
        import fnmatch
        names = [n for n in names if any(fnmatch.fnmatch(n, f) for f in functions)]
    return sorted(set(names))


def statuses(work: Path, env) -> dict:
    """mutant name -> mutmut's verdict ("killed", "survived", "not checked", ...)."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"^\s*([\w.]+__mutmut_\d+): (\w[\w ]*)$", out, re.M))


def run_module(key: str, sample: int, seed: int, resume: bool = False, retest: tuple = (),
               jobs: int = 1) -> dict:
    work = SCRATCH / key
    if not (resume and (work / "mutants").is_dir()):
        work = prepare(key)
    else:  # a resumed run keeps mutmut's results; tests written since then join (mutmut finds them)
        shutil.copytree(ROOT / "tests", work / "tests", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        write_config(key, work)
    env = dict(os.environ, OMP_NUM_THREADS="1", LAFS_FAST_CUDA="0")
    # First pass generates the mutants and checks the clean tests; run no mutant yet by naming
    # one that is guaranteed not to exist is not possible, so generate via a dry results call.
    names_all = None
    functions = MODULES[key][2]
    run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)]
    selected = []
    if functions or sample:
        # generate mutants (cheap) then select
        subprocess.run(run + ["__no_such_mutant__*"], cwd=work, env=env)
        names_all = mutant_names(work, functions)
        selected = names_all
        if sample and len(selected) > sample:
            selected = sorted(random.Random(seed).sample(selected, sample))
    if resume:  # mutmut re-tests every mutant it is given by name: name only what is left
        now = statuses(work, env)
        redo = [n for n in (selected or now) if now.get(n) in ("not checked", *retest)]
        if redo:
            subprocess.run(run + redo, cwd=work, env=env)
    else:
        subprocess.run(run + selected, cwd=work, env=env)
    status = statuses(work, env)
    if selected:
        status = {n: s for n, s in status.items() if n in set(selected)}
    counts = {}
    for s in status.values():
        counts[s] = counts.get(s, 0) + 1
    summary = {"module": MODULES[key][0], "generated": len(names_all) if names_all else len(status),
               "run": len(status), "sample_seed": seed if sample else None, "counts": counts,
               "survived": sorted(n for n, s in status.items() if s == "survived"),
               "timeout": sorted(n for n, s in status.items() if s == "timeout")}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("survived",)}, indent=1))
    return summary


def which_tests(key: str, names: list) -> dict:
    """mutant -> the tests of tests/test_KEY_mutants.py that fail on it (each mutant switched on
    by name in the mutated copy of an existing run), for the docs' table of which test kills what."""
    work = SCRATCH / key / "mutants"
    extra = f"tests/test_{key}_mutants.py"
    if not (work / extra).exists():
        raise SystemExit(f"{work / extra} not found: run the module first")
    out = {}
    for name in names:
        env = dict(os.environ, OMP_NUM_THREADS="1", LAFS_FAST_CUDA="0", MUTANT_UNDER_TEST=name)
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", extra],
                             cwd=work, env=env, capture_output=True, text=True)
        out[name] = sorted(set(re.findall(r"^FAILED \S+::(\w+)", res.stdout, re.M)))
        print(f"{name}: {' '.join(out[name]) or '-'}", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="+", choices=sorted(MODULES))
    p.add_argument("--which-tests", nargs="+", metavar="MUTANT",
                   help="with one module: list the tests of tests/test_MODULE_mutants.py each named mutant fails")
    p.add_argument("--sample", type=int, default=0, help="run a seeded random sample of this many mutants")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="mutants tested at once (one core each)")
    p.add_argument("--resume", action="store_true",
                   help="continue an unfinished run in .mutation/<module>/ instead of starting afresh")
    p.add_argument("--retest", action="append", default=[], metavar="STATUS",
                   help="with --resume: test again the mutants of this verdict too, e.g. timeout "
                        "(a timeout on a loaded machine may be noise, not a detection)")
    a = p.parse_args()
    if a.which_tests:
        if len(a.modules) != 1:
            p.error("--which-tests takes exactly one module")
        which_tests(a.modules[0], a.which_tests)
        return
    if a.retest and not a.resume:
        p.error("--retest needs --resume (it re-tests mutants of an existing run)")
    for key in a.modules:
        run_module(key, a.sample, a.seed, a.resume, tuple(a.retest), a.jobs)


if __name__ == "__main__":
    main()
