#!/usr/bin/env bash
# The user path (part of .ci/run, runnable alone): the README's main-job install, typed as written,
# in a fresh virtual env at the root of a copy of the checkout (non-editable), then
# `python -m lafs_fast.info` and the main job at one epoch per stage from the repository root and
# from another folder (the compiled cpu backend in use, the final table printed, the log short),
# and the whole suite run from outside the source tree against that install.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
start=$(date +%s)
stamp() { echo "[ci user path] $* ($(( $(date +%s) - start )) s)"; }
rm -rf .venv-user
# CUDA kernels skipped only to save CI time: .ci/run's first part compiled them already.
python3.11 -m venv .venv-user
. .venv-user/bin/activate
python -m pip install -q --upgrade pip
export LAFS_FAST_CUDA=0
# A copy of the checkout as a fresh clone has it (tracked and untracked-not-ignored files): the
# in-place build of step 1 must not be what makes this pass, nor be deleted from a developer's tree.
USER_REPO=$(mktemp -d)/lafs_fast_repo
mkdir -p "$USER_REPO"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$USER_REPO"
cd "$USER_REPO"
pip install -q torch==2.14.1 torchvision==0.29.1 && pip install -q -r requirements-test.txt && pip install -q --no-build-isolation .
test -z "$(ls lafs_fast/_C.* 2>/dev/null)" || { echo "[ci] the source tree holds a _C: not the user path"; exit 1; }
stamp "non-editable install done"

OTHER=$(mktemp -d)
check_main_job() {  # $1 = folder to run from
    ( cd "$1"
      python -m lafs_fast.info > info.log
      grep -Eq '^  cpu +usable$' info.log || { cat info.log; echo "[ci] cpu backend not usable from $1"; exit 1; }
      grep -Eq '^  cpu tensors +cpu$' info.log || { cat info.log; echo "[ci] auto is not the cpu backend from $1"; exit 1; }
      python -m lafs_fast.train --supervised-epochs 1 --pretrain-epochs 1 --finetune-epochs 1 \
          --out-dir "$OTHER/run-$(basename "$1")" > main_job.log 2>&1 || { tail -40 main_job.log; exit 1; }
      grep -q "LAFS pretrained + finetuned" main_job.log || { tail -40 main_job.log; echo "[ci] no final table"; exit 1; }
      if grep -q "slow reference ops" main_job.log; then echo "[ci] the main job fell back to the reference ops"; exit 1; fi
      lines=$(wc -l < main_job.log)
      [ "$lines" -lt 200 ] || { echo "[ci] main-job log has $lines lines"; exit 1; }
      rm -f info.log main_job.log )
}
check_main_job "$USER_REPO"
stamp "main job from the repository root passed"
check_main_job "$OTHER"
stamp "main job from another folder passed"

# the whole suite from outside the source tree, against the non-editable install
( cd "$OTHER" && python -m pytest -q -p no:cacheprovider --rootdir "$USER_REPO" "$USER_REPO/tests" )
stamp "suite against the non-editable install passed"
cd "$REPO"
rm -rf "$OTHER" "$(dirname "$USER_REPO")"
deactivate
stamp "done"
