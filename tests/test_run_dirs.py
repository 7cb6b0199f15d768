"""Runs never mix in one --out-dir, and a checkpoint that cannot be written stops the run in one
line: --resume with nothing to resume is an error naming the folder; --resume auto resumes when
there is a checkpoint and starts fresh otherwise, saying which; a folder holding another run is
refused unless --resume or --overwrite (which removes the old run's files first); a full disk
(or an unwritable file) while saving names the checkpoint that survived and the command that
continues from it, and that command finishes the run."""
import errno
import json
import os
import shlex

import pytest
import torch

from lafs_fast.cli import UsageError
from lafs_fast.train import finetune, pipeline, pretrain
from lafs_fast.train.__main__ import main as train_main

# 48 synthetic images, batch 8: 6 steps per epoch, 12 in all (a few seconds on one core).
TINY = ["finetune", "--dataset", "synthetic", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "0.5",
        "--no-eval", "--progress", "false", "--device", "cpu", "--log-every", "1"]


def run(*argv):
    """The command's result, or its exit status (SystemExit)."""
    try:
        return train_main([*TINY, *argv])
    except SystemExit as e:
        return e.code


def files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def steps_logged(folder):
    lines = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return [line["step"] for line in lines if line.get("stage") == "finetune"]


def test_resume_with_nothing_to_resume_names_the_out_dir(tmp_path, capsys):
    out = tmp_path / "run"
    for folder_exists in (False, True):
        if folder_exists:
            out.mkdir()
        assert run("--out-dir", str(out), "--resume") == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and f"--resume: nothing to resume in {out}" in err[0], err
        assert "--resume auto" in err[0]
    assert files(out) == []  # nothing written


def test_resume_auto_starts_fresh_then_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run("--out-dir", out, "--resume", "auto", "--stop-after", "3", "--save-every", "3")["stopped"]
    assert f"--resume auto: no checkpoint in {out}, starting fresh" in capsys.readouterr().out
    res = run("--out-dir", out, "--resume", "auto")
    assert res["steps"] == 12
    assert f"resumed from {out}/step-00000003.pt at step 3" in capsys.readouterr().out
    # the steps after the checkpoint, once each (and the summary line repeating the last)
    assert steps_logged(out) == [*range(1, 13), 12]


def test_a_used_out_dir_is_refused_and_left_as_it_was(tmp_path, capsys):
    out = str(tmp_path / "run")
    run("--out-dir", out, "--stop-after", "2", "--save-every", "2")
    before = {f: open(os.path.join(out, f), "rb").read() for f in files(out)}
    assert run("--out-dir", out) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"--out-dir {out} holds another run (metrics.jsonl, 1 checkpoint, the newest " \
                               "step-00000002.pt)" in err[0], err
    assert "continue it with --resume, replace it with --overwrite" in err[0]
    assert {f: open(os.path.join(out, f), "rb").read() for f in files(out)} == before


def test_overwrite_removes_the_old_runs_metrics_and_checkpoints_first(tmp_path, capsys):
    out = str(tmp_path / "run")
    run("--out-dir", out, "--stop-after", "5", "--save-every", "1", "--keep-checkpoints", "10")
    open(os.path.join(out, ".tmp_step-00000009.pt.x"), "w").close()  # a save killed half-way
    assert [f for f in files(out) if f.startswith("step-")] == [f"step-0000000{i}.pt" for i in range(1, 6)]
    assert run("--out-dir", out, "--overwrite", "--stop-after", "2", "--save-every", "2")["stopped"]
    assert "--overwrite: removed 7 file(s) of the earlier run" in capsys.readouterr().out
    assert files(out) == ["metrics.jsonl", "step-00000002.pt"]
    assert steps_logged(out) == [1, 2]  # the new run's lines only (stopped: no summary line)


def test_resume_auto_clears_a_run_that_saved_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "finetune", "step": 1, "loss": 9.0}\n' * 3)
    assert run("--out-dir", str(out), "--resume", "auto", "--stop-after", "2")["stopped"]
    assert steps_logged(str(out)) == [1, 2]


# ----------------------------------------------------------------------------- a full disk
def enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def raise_enospc(*args, **kwargs):
    raise enospc()


def raise_like_torch(*args, **kwargs):
    """What torch.save raises when the disk fills mid-write: its writer's RuntimeError, with the
    OSError as its context."""
    try:
        raise enospc()
    except OSError:  # the OSError becomes the RuntimeError's __context__
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")


def raise_permission(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def fail_on_call(n, fail, monkeypatch, target="save"):
    """torch.save (or os.replace) works n - 1 times, then fails as `fail` does."""
    import lafs_fast.checkpoint as ckpt
    real = {"save": torch.save, "replace": os.replace}[target]
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= n:
            fail()
        return real(*args, **kwargs)
    if target == "save":
        monkeypatch.setattr(ckpt.torch, "save", patched)
    else:
        monkeypatch.setattr(ckpt.os, "replace", patched)


@pytest.mark.parametrize("fail, target, reason", [
    (raise_enospc, "save", "No space left on device"),
    (raise_like_torch, "save", "No space left on device"),
    (raise_permission, "replace", "Permission denied"),
])
def test_a_checkpoint_that_cannot_be_written_names_the_survivor_and_the_resume_command(
        fail, target, reason, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    straight = run("--out-dir", str(tmp_path / "straight"), "--save-every", "2")
    with monkeypatch.context() as m:
        fail_on_call(2, fail, m, target)  # step 2 is saved, step 4 is not
        assert run("--out-dir", out, "--save-every", "2") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("python -m lafs_fast.train finetune: error: could not write checkpoint "
                           f"{out}/step-00000004.pt at step 4: {reason} (the last checkpoint, "
                           f"{out}/step-00000002.pt, is intact"), line
    command = line.split("then continue with: ")[1].rstrip(")")
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "lafs_fast.train"] and argv[-1] == "--resume"
    assert [f for f in files(out) if f.startswith(("step-", ".tmp"))] == ["step-00000002.pt"]
    resumed = train_main(argv[3:])  # the command it names continues the run to its end
    assert resumed["steps"] == straight["steps"] == 12
    a = torch.load(straight["checkpoint"], weights_only=False)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise the uninterrupted run


def test_a_final_model_that_cannot_be_written_is_one_line_and_resume_finishes_the_run(
        tmp_path, monkeypatch, capsys):
    """Checkpoints at the two epoch ends are written (calls 1, 2), model.pt is not (call 3)."""
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        fail_on_call(3, raise_like_torch, m)
        assert run("--out-dir", out) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"could not write the run's files in {out}: No space left on device" in err[0], err
    assert f"the last checkpoint, {out}/step-00000012.pt, is intact" in err[0] and err[0].endswith("--resume)")
    assert "model.pt" not in files(out)
    assert run("--out-dir", out, "--resume")["steps"] == 12 and "model.pt" in files(out)


def test_a_first_checkpoint_that_cannot_be_written_says_to_start_again(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    fail_on_call(1, raise_enospc, monkeypatch)
    assert run("--out-dir", out, "--save-every", "2") == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no checkpoint was written" in err[0] and err[0].endswith("--overwrite)"), err


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture
def stages(monkeypatch, tmp_path):
    """The pipeline with its stages replaced by recorders of their configs."""
    seen = []

    def record(kind):
        def stage(cfg, log_prefix=""):
            seen.append((kind, cfg))
            return {"checkpoint": str(tmp_path / "m.pt"), "eval": {}, "steps": 1}
        return stage
    monkeypatch.setattr(finetune, "run", record("finetune"))
    monkeypatch.setattr(pretrain, "run", record("pretrain"))
    monkeypatch.setattr(pipeline, "raw_pixel_orl", lambda: {})
    monkeypatch.setattr(pipeline.verification, "print_table", lambda reports: None)
    return seen


@pytest.mark.parametrize("flags, resume, overwrite", [
    ([], False, False), (["--resume", "auto"], "auto", False), (["--overwrite"], False, True)])
def test_the_pipeline_passes_resume_overwrite_tensorboard_and_backend_to_each_stage(
        flags, resume, overwrite, stages, tmp_path):
    out = tmp_path / "pipe"
    out.mkdir()  # the stages would make it
    pipeline.main(["--out-dir", str(out), "--tensorboard", "--backend", "reference", *flags])
    assert [k for k, _ in stages] == ["finetune", "pretrain", "finetune"]
    for _, cfg in stages:
        assert (cfg.resume, cfg.overwrite, cfg.tensorboard, cfg.backend) == (resume, overwrite, True, "reference")
        assert cfg.command_line[0] == "python -m lafs_fast.train pipeline"  # its messages name the pipeline


def test_the_pipeline_refuses_a_used_out_dir_and_resumes_stage_by_stage(stages, tmp_path):
    out = tmp_path / "pipe"
    (out / "2_pretrain").mkdir(parents=True)
    (out / "2_pretrain" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match=r"pipe holds another pipeline's stages \(2_pretrain\)"):
        pipeline.main(["--out-dir", str(out)])
    with pytest.raises(UsageError, match="nothing to resume in .*pipe .no stage folder holds a checkpoint"):
        pipeline.main(["--out-dir", str(out), "--resume"])
    assert stages == []
    torch.save({"step": 1}, out / "2_pretrain" / "step-00000001.pt")
    pipeline.main(["--out-dir", str(out), "--resume"])
    assert [cfg.resume for _, cfg in stages] == ["auto"] * 3  # a stage without a checkpoint starts


# ----------------------------------------------------------------------------- under torchrun
def refused_worker(rank, world, port, root):
    """One rank of a 2-process gloo run into a used out dir: its outcome in outcome<rank>.txt."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from lafs_fast.cli import UsageError
    from lafs_fast.train import distributed
    try:
        finetune.run(finetune.FinetuneConfig(dataset="synthetic", batch_size=4, epochs=1, eval=False, progress=False,
                                             device="cpu", dist_timeout=60, out_dir=f"{root}/used"))
        outcome = "trained"
    except UsageError as e:
        outcome = f"UsageError: {e}"
    except Exception as e:  # noqa: BLE001 -- reported to the test
        outcome = f"{type(e).__name__}: {e}"
    finally:
        distributed.shutdown()
    with open(f"{root}/outcome{rank}.txt", "w") as f:
        f.write(outcome)


def test_every_rank_gets_rank_0s_verdict_on_the_out_dir(tmp_path):
    """Rank 0 alone looks at the out dir (another rank may arrive while rank 0 still writes);
    a refusal reaches every rank as the same UsageError, none is left waiting."""
    import multiprocessing
    import socket
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("{}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=refused_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert not [p for p in procs if p.is_alive()], "a rank hung"
    outcomes = [(tmp_path / f"outcome{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("UsageError: --out-dir "), outcomes
    assert "holds another run (metrics.jsonl)" in outcomes[0]
