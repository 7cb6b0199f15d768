"""Exact resume after SIGKILL: a run killed mid-save, then resumed with --resume, ends with the
losses and the bitwise weights of a run that was never interrupted (CPU, finetune and pretrain).

The child process is `python -m lafs_fast.train` whose torch.save writes half of checkpoint 6
and then SIGKILLs the process: the last good checkpoint (step 4, mid-epoch) must survive the
torn write, and resuming from it must redo steps 5-6 exactly (data position, dropout and
augmentation streams, optimiser, schedules, DINO centre).
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from lafs_fast.train import finetune, pretrain

KILL_AT = 6  # 2 epochs x 3 steps (48 synthetic faces, batch 16); checkpoints at 2, 3, 4, 6
COMMON = ["--dataset", "synthetic", "--batch-size", "16", "--epochs", "2", "--save-every", "2",
          "--log-every", "1", "--threads", "1", "--progress", "false", "--device", "cpu"]
ARGS = {
    # dropout, drop-path, mixup, erasing: every random stream matters
    "finetune": ["--warmup-epochs", "0.5", "--mixup-prob", "0.5", "--erase-prob", "0.5", "--eval", "false"],
    "pretrain": ["--landmarks", "grid", "--n-local", "2", "--out-dim", "64", "--head-hidden", "64",
                 "--head-bottleneck", "32", "--warmup-epochs", "0"],
}
KILLED_CHILD = f"""
import io, os, signal, sys, torch
real_save = torch.save
def save(obj, f, *a, **kw):
    if isinstance(obj, dict) and obj.get("step") == {KILL_AT}:
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **kw)
torch.save = save
from lafs_fast.train.__main__ import main
main(sys.argv[1:])
"""


def step_losses(out_dir, stage):
    """Loss per step; a resumed run logs the steps it redoes again, and the later line wins."""
    by_step = {}
    for line in open(os.path.join(out_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if rec.get("stage") == stage:
            by_step[rec["step"]] = rec["loss"]
    return [by_step[k] for k in sorted(by_step)]


def latest(out_dir):
    name = sorted(f for f in os.listdir(out_dir) if f.startswith("step-"))[-1]
    return torch.load(os.path.join(out_dir, name), weights_only=False)


def flat(state, keys):
    out = {}
    for key in keys:
        sd = state[key]
        if key == "optimizer":
            sd = {f"{i}.{n}": t for i, st in sd["state"].items() for n, t in st.items()}
        out.update({f"{key}.{k}": v for k, v in sd.items()})
    return out


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_sigkill_mid_save_then_resume_is_exact(kind, tmp_path):
    main = {"finetune": finetune.main, "pretrain": pretrain.main}[kind]
    args = [kind, *COMMON, *ARGS[kind]]
    straight = main([*args[1:], "--out-dir", str(tmp_path / "straight")])

    out = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", KILLED_CHILD, *args, "--out-dir", str(out)],
                           capture_output=True, text=True, timeout=300,
                           cwd=os.path.dirname(os.path.dirname(__file__)))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert [f for f in files if f.startswith("step-")] == ["step-00000002.pt", "step-00000003.pt",
                                                            "step-00000004.pt"]
    assert any(f.startswith(f".tmp_step-{KILL_AT:08d}") for f in files)  # the torn write
    assert latest(out)["step_in_epoch"] == 1  # resumes mid-epoch

    resumed = main([*args[1:], "--out-dir", str(out), "--resume", "true"])
    assert resumed["steps"] == straight["steps"] == KILL_AT
    assert not any(f.startswith(".tmp_") for f in os.listdir(out))  # cleaned on resume
    assert step_losses(out, kind) == step_losses(tmp_path / "straight", kind)  # exact floats
    keys = ("model", "head", "optimizer") if kind == "finetune" else ("net", "dino", "optimizer")
    a, b = flat(latest(tmp_path / "straight"), keys), flat(latest(out), keys)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise
    final = "model.pt" if kind == "finetune" else "teacher.pt"
    fa = torch.load(tmp_path / "straight" / final, weights_only=False)["model"]
    fb = torch.load(out / final, weights_only=False)["model"]
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.mark.slow  # 3 short runs (~7 s)
def test_resume_refuses_another_global_batch_and_warns_on_another_world_size(tmp_path, capsys):
    """docs/training.md, "Exact resume": a different global batch is refused (the data order would not continue); a
    different world size continues the data order but restarts the per-rank streams, with a warning."""
    from lafs_fast.train.__main__ import main as cli_main
    args = ["finetune", *COMMON, *ARGS["finetune"], "--out-dir", str(tmp_path)]
    assert cli_main([*args, "--stop-after", "1", "--save-every", "1"])["stopped"]
    ckpt = tmp_path / "step-00000001.pt"
    assert torch.load(ckpt, weights_only=False)["global_batch"] == 16
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:   # one line naming the problem, no traceback
        cli_main([*args, "--resume", "true", "--batch-size", "8"])
    msg = capsys.readouterr().err
    assert e.value.code == 2 and len(msg.splitlines()) == 1, msg
    assert "global batch of 16" in msg and "this run has 8" in msg, msg
    assert [f for f in os.listdir(tmp_path) if f.startswith("step-")] == ["step-00000001.pt"]  # nothing ran

    # the same checkpoint as if 2 ranks x batch 8 had written it
    state = torch.load(ckpt, weights_only=False)
    state["rng"] = [state["rng"][0], state["rng"][0]]
    state["world_size"] = 2
    torch.save(state, ckpt)
    with pytest.warns(UserWarning, match="written by 2 ranks, this run has 1.*per-rank random streams restart"):
        res = cli_main([*args, "--resume", "true", "--stop-after", "2"])
    assert res["stopped"] and latest(tmp_path)["step"] == 2   # continued from step 1


@pytest.mark.parametrize("kind", ["finetune", "pretrain"])
def test_resume_refuses_a_checkpoint_that_would_run_code(kind, tmp_path, capsys):
    """A step-*.pt planted in the out-dir whose pickle calls a function (here: creates a file) is
    refused by --resume with one line naming it, and nothing of it runs."""
    from hostile import plant

    from lafs_fast.train.__main__ import main as cli_main
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    out.mkdir()
    planted = out / "step-00000009.pt"
    plant(planted, marker, step=9, global_batch=16)
    with pytest.raises(SystemExit) as e:
        cli_main([kind, *COMMON, *ARGS[kind], "--out-dir", str(out), "--resume", "true"])
    msg = capsys.readouterr().err
    assert e.value.code == 2 and len(msg.splitlines()) == 1, (e.value.code, msg)
    assert str(planted) in msg and "refused, loading it would call" in msg, msg
    assert not marker.exists()  # the planted code did not run
    assert sorted(os.listdir(out)) == ["step-00000009.pt"]  # nor did the run


def test_random_states_are_plain_data_and_older_array_states_still_resume(tmp_path):
    """rng_state() holds numpy's key as a list (the checkpoint loads weights-only without numpy
    types); an older checkpoint's array key restores the same streams."""
    import random

    import numpy as np

    from lafs_fast.checkpoint import load_checkpoint, save_checkpoint
    from lafs_fast.train import common
    gen = torch.Generator().manual_seed(3)
    common.seed_everything(5)
    state = common.rng_state(gen)
    assert isinstance(state["numpy"][1], list)
    want = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    older = {**state, "numpy": (state["numpy"][0], np.asarray(state["numpy"][1], dtype=np.uint32),
                                *state["numpy"][2:])}
    for name, st in (("new", state), ("older", older)):
        save_checkpoint(str(tmp_path / f"{name}.pt"), {"rng": st})
        common.seed_everything(0)
        if name == "new":  # plain data: torch's own weights-only rules suffice, no numpy types allowed
            torch.load(tmp_path / "new.pt", weights_only=True)
        common.set_rng_state(load_checkpoint(str(tmp_path / f"{name}.pt"))["rng"], gen)
        got = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
        assert got == want, name
