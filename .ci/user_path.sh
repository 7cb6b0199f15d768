#!/usr/bin/env bash
# The user path (part of .ci/run; runnable alone in an active virtual env): the README's main-job
# install line, typed as written (non-editable), at the root of a copy of the checkout as a fresh
# clone has it, then `python -m lafs_fast.info` and the main job at one epoch per stage from that
# repository root and from another folder (the compiled cpu backend in use, no fallback, the final
# table printed, the log short), the onnx extra with an export of the main job's model checked in
# onnxruntime, and the whole suite run from outside the source tree against the non-editable
# install. Leaves lafs_fast uninstalled from the env at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
stamp() { echo "[ci user path] $* ($(( $(date +%s) - start )) s)"; }
# A copy (tracked + untracked-not-ignored files): an in-place build in this tree must not be what
# makes the check pass, and nothing of a developer's tree is touched.
USER_REPO=$(mktemp -d)/lafs_fast_repo
OTHER=$(mktemp -d)
trap 'rm -rf "$(dirname "$USER_REPO")" "$OTHER"' EXIT
mkdir -p "$USER_REPO"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$USER_REPO"
cd "$USER_REPO"
pip install -q torch==2.14.1 torchvision==0.29.1 && pip install -q -r requirements-test.txt && pip install -q --no-build-isolation .
test -z "$(ls lafs_fast/_C.* 2>/dev/null)" || { echo "[ci] the source tree holds a _C: not the user path"; exit 1; }
stamp "non-editable install done"

check_main_job() {  # $1 = folder to run from
    ( cd "$1"
      python -m lafs_fast.info > "$OTHER/info.log"
      grep -Eq '^  cpu +usable$' "$OTHER/info.log" || { cat "$OTHER/info.log"; echo "[ci] cpu backend not usable from $1"; exit 1; }
      grep -Eq '^  cpu tensors +cpu$' "$OTHER/info.log" || { cat "$OTHER/info.log"; echo "[ci] auto is not the cpu backend from $1"; exit 1; }
      log="$OTHER/main_job.log"
      python -m lafs_fast.train --supervised-epochs 1 --pretrain-epochs 1 --finetune-epochs 1 \
          --out-dir "$OTHER/run-$(basename "$1")" > "$log" 2>&1 || { tail -40 "$log"; exit 1; }
      grep -q "LAFS pretrained + finetuned" "$log" || { tail -40 "$log"; echo "[ci] no final table"; exit 1; }
      if grep -q "slow reference ops" "$log"; then echo "[ci] the main job fell back to the reference ops"; exit 1; fi
      lines=$(wc -l < "$log")
      [ "$lines" -lt 200 ] || { echo "[ci] main-job log has $lines lines"; exit 1; } )
}
check_main_job "$USER_REPO"
stamp "main job from the repository root passed"
check_main_job "$OTHER"
stamp "main job from another folder passed"

# The onnx extra as a user adds it (pip reuses the build folder of the install above: nothing is
# recompiled), then the main job's model exported and checked against PyTorch in onnxruntime.
pip install -q --no-build-isolation '.[onnx]'
python -m lafs_fast.export --checkpoint "$OTHER/run-$(basename "$USER_REPO")/3_finetune/model.pt" \
    --out "$OTHER/model.onnx" --check
stamp "pip install '.[onnx]' and export --check passed"

# the whole suite from outside the source tree, against the non-editable install
( cd "$OTHER" && python -m pytest -q -p no:cacheprovider --rootdir "$USER_REPO" "$USER_REPO/tests" )
stamp "suite against the non-editable install passed"
pip uninstall -q -y lafs_fast
