"""Training commands end to end on tiny data, and the CLI's handling of bad options."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lafs_fast import config as C
from lafs_fast.train import finetune, pretrain
from lafs_fast.train.__main__ import main as cli_main
from lafs_fast.train.data_setup import TrainData, build_train_data

TINY = dict(dataset="synthetic", batch_size=8, threads=0, progress=False, device="cpu")


def tiny_finetune(out_dir, **kw):
    cfg = finetune.FinetuneConfig(**{**TINY, "epochs": 2, "warmup_epochs": 0.5, "eval": False,
                                     "out_dir": str(out_dir), "log_every": 1, **kw})
    cfg.validate()
    return finetune.run(cfg)


def test_finetune_from_scratch_moves_landmarks_and_logs(tmp_path):
    res = tiny_finetune(tmp_path, lr=5e-3, save_every=4, keep_checkpoints=3)
    assert res["steps"] == 2 * (48 // 8)
    assert res["landmark_shift_px"] > 0  # the landmark CNN learned through the op's gradient
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    steps = [l for l in lines if l.get("stage") == "finetune"]
    assert len(steps) >= res["steps"] and all(torch.isfinite(torch.tensor(l["loss"])) for l in steps)
    png = open(tmp_path / "landmarks.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from lafs_fast.convert import load_model
    model = load_model(res["checkpoint"])
    assert model(torch.zeros(1, 3, 112, 112)).shape == (1, model.dim)
    # checkpoints rotate: 4 were written (every 4 steps: 4, 8, 12; epoch ends: 6, 12 once),
    # exactly the newest 3 remain
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("step-")) == [
        "step-00000006.pt", "step-00000008.pt", "step-00000012.pt"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp_")]


def test_checkpoint_ring_removes_the_oldest(tmp_path):
    from lafs_fast.train.common import CheckpointRing
    ring = CheckpointRing(str(tmp_path), keep=2)
    for step in (3, 7, 12, 100, 101):
        ring.save(step, {"step": step})
    assert sorted(os.listdir(tmp_path)) == ["step-00000100.pt", "step-00000101.pt"]
    assert ring.latest() == str(tmp_path / "step-00000101.pt")
    assert torch.load(ring.latest())["step"] == 101


def test_finetune_resume_continues_the_same_run(tmp_path):
    kw = dict(epochs=2, mixup_prob=0.5, save_every=2)
    straight = tiny_finetune(tmp_path / "a", **kw)
    assert tiny_finetune(tmp_path / "b", stop_after=7, **kw)["stopped"]  # mid-epoch, after a save at 6
    resumed = tiny_finetune(tmp_path / "b", resume=True, **kw)
    assert resumed["steps"] == straight["steps"]
    a = torch.load(straight["checkpoint"], weights_only=False)["model"]
    b = torch.load(resumed["checkpoint"], weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_pretrain_grid_and_cnn_landmarks(tmp_path):
    sup = tiny_finetune(tmp_path / "sup", epochs=1)
    for landmarks, extra in (("grid", {}), ("cnn", {"landmark_init": sup["checkpoint"]})):
        cfg = pretrain.PretrainConfig(**TINY, landmarks=landmarks, epochs=1, n_local=2, out_dim=64,
                                      out_dir=str(tmp_path / landmarks), warmup_epochs=0, **extra)
        cfg.validate()
        res = pretrain.run(cfg)
        assert res["steps"] == 48 // 8 and torch.isfinite(torch.tensor(res["final_loss"]))
        # finetuning starts from the teacher it wrote
        ft = tiny_finetune(tmp_path / f"ft_{landmarks}", epochs=1, init=res["checkpoint"],
                           landmark_init=sup["checkpoint"])
        assert ft["steps"] == 48 // 8


def test_data_order_is_seeded_and_fewshot_is_random():
    data = build_train_data("synthetic", "", 0, seed=3, batch_size=8, workers=0)
    again = build_train_data("synthetic", "", 0, seed=3, batch_size=8, workers=0)
    assert torch.equal(data.order(0), again.order(0))
    assert not torch.equal(data.order(0), data.order(1))
    few = build_train_data("synthetic", "", 2, seed=3, batch_size=4, workers=0)
    assert len(few.indices) == 2 * 8 and few.num_classes == 8
    with pytest.raises(ValueError, match="batch-size"):
        TrainData(few.dataset, 1000, 0)


def test_drift_lambda_schedule():
    cfg = finetune.FinetuneConfig()
    got = [finetune.drift_weight(cfg, e) for e in (0, 7, 8, 13, 14, 20, 21, 27, 28, 40)]
    assert got == [1000, 1000, 100, 100, 1, 1, 0.11, 0.11, 0, 0]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lafs_fast.train", *args], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_cli_process_reports_errors_in_one_line():
    res = run_cli("finetune", "--no-such-flag", "1")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-flag" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args,words", [
    (["finetune", "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["finetune", "--batch-size", "-4"], "--batch-size must be >= 2"),
    (["finetune", "--batch-size", "four"], "--batch-size"),
    (["finetune", "--dataset", "folder", "--data-path", "/no/such/dir"], "does not exist"),
    (["finetune", "--init", "/no/such/file.pt"], "--init: no such file"),
    (["pretrain", "--landmarks", "cnn"], "--landmark-init"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_cli_rejects_bad_options(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code != 0
    err = capsys.readouterr().err + str(e.value.code)
    assert words in err, err[-2000:]


def test_cli_rejects_unwritable_output_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "--dataset", "synthetic", "--epochs", "1", "--out-dir", str(ro / "sub")])
    assert e.value.code == 2 and "not writable" in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["finetune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in C.dataclasses.fields(finetune.FinetuneConfig):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_config_yaml_and_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\nlr: 0.01\nbatch-size: 16\n")
    cfg = C.parse(finetune.FinetuneConfig, ["--config", str(y), "--lr", "0.02"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (3, 0.02, 16)
    y.write_text("epochs: 3\nbogus: 1\n")
    with pytest.raises(SystemExit):
        C.parse(finetune.FinetuneConfig, ["--config", str(y)])


@pytest.fixture
def deterministic_off():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow  # 4 short runs (~10 s)
def test_deterministic_runs_repeat_bitwise(tmp_path, deterministic_off):
    """--deterministic: every op of a finetune (landmark CNN, mixup) and a pretrain step has a
    deterministic CPU kernel (none raises), and two runs give bitwise the same weights."""
    states = []
    for i in range(2):
        tiny_finetune(tmp_path / f"ft{i}", epochs=1, batch_size=4, deterministic=True, mixup_prob=0.5,
                      save_every=2, stop_after=2)
        assert torch.are_deterministic_algorithms_enabled()
        states.append(torch.load(tmp_path / f"ft{i}" / "step-00000002.pt", weights_only=False)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # pretraining with every random path on (views, photometric ops, landmark subsets, coordinate
    # noise, dropout) and the landmark CNN: two runs, bitwise the same state after 2 steps
    from lafs_fast.convert import save_model
    from lafs_fast.models import create_model
    torch.manual_seed(0)
    sup = tmp_path / "sup.pt"
    save_model(create_model("part_fvit_tiny"), str(sup))   # a landmark CNN to freeze
    for i in range(2):
        cfg = pretrain.PretrainConfig(**{**TINY, "batch_size": 4}, landmarks="cnn", landmark_init=str(sup),
                                      epochs=1, n_local=1, out_dim=64, head_hidden=64, head_bottleneck=32,
                                      deterministic=True, save_every=2, stop_after=2, out_dir=str(tmp_path / f"pt{i}"))
        assert pretrain.run(cfg)["steps"] == 2
        assert torch.are_deterministic_algorithms_enabled()
    a, b = (torch.load(tmp_path / f"pt{i}" / "step-00000002.pt", weights_only=False) for i in range(2))
    for key in ("net", "dino"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k}"
    moments = lambda s: [t for st in s["optimizer"]["state"].values() for t in st.values()]  # noqa: E731
    assert len(moments(a)) > 0 and all(torch.equal(x, y) for x, y in zip(moments(a), moments(b)))
    # the runs did train (equal because repeatable, not because nothing moved)
    assert not torch.equal(a["net"]["student.patch_embed.weight"], a["net"]["teacher.patch_embed.weight"])


def test_deterministic_mode_routes_cuda_image_gradients_to_reference(deterministic_off, monkeypatch):
    from lafs_fast import ops
    monkeypatch.delenv("LAFS_FAST_BACKEND", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fused, on_cpu = ops.resolve_backend("auto", cuda), ops.resolve_backend("auto", cpu)
    assert fused != "reference" or not ops.HAS_EXTENSION
    torch.use_deterministic_algorithms(True)
    assert ops.resolve_backend("auto", cuda) == "reference"  # a backward may need image grads
    assert ops.resolve_backend("auto", cuda, needs_image_grad=True) == "reference"
    assert ops.resolve_backend("auto", cuda, needs_image_grad=False) == fused  # training: images need none
    with torch.no_grad():
        assert ops.resolve_backend("auto", cuda) == fused
    assert ops.resolve_backend("auto", cpu) == on_cpu  # the C++ kernels are deterministic
    assert ops.resolve_backend("triton", cuda) == "triton"  # an explicit choice is honoured
