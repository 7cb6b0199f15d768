"""The release's finetuning recipe as switches and config files: the configs resolve to the
release's values, the release augmentation, channel order and partition behave, gradient
accumulation equals one step on the concatenated batch, and --val-bins logs accuracies and keeps
the best checkpoint."""
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from tiny_models import dropout_free_model
from tolerances import AdamWDrift, assert_weights_within

from lafs_fast import config as C
from lafs_fast.data import SyntheticFaces, synthetic_faces, write_recordio
from lafs_fast.data.recordio import RecordIODataset
from lafs_fast.data.release_augment import FACE_RAND_INCREASING, ReleaseAugment, face_rand_augment
from lafs_fast.eval import write_bin
from lafs_fast.eval.validator import Validator
from lafs_fast.train import common, finetune
from lafs_fast.train.data_setup import TrainData, build_train_data, open_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["part_fvit_webface4m", "lafs_finetune_1shot", "lafs_finetune_2shot", "lafs_finetune_full"]

# The release's values (train_largescale.py, supervised_config.py, image_iter.py), stated here
# independently of the YAML files.
RELEASE = dict(model="part_fvit_b", landmarks="cnn", epochs=34, batch_size=200, accum_steps=3, lr=1e-3,
               lr_rule="sqrt", min_lr=1e-6, warmup_epochs=5.0, weight_decay=0.1, cnn_weight_decay=0.05,
               cnn_head_weight_decay=0.1, decay_tokens=True, layer_decay=1.0, clip_grad=0.0, loss="cosface",
               scale=64.0, margin=0.4, drift_lambdas=[0.0] * 5, mixup_alpha=0.2, mixup_prob=0.1,
               augment="release", randaugment="rand-m1-mstd0.5-inc1", crop_scale=0.9, color_jitter=0.1,
               erase_prob=0.5, channel_order="bgr", dataset="recordio", weight_init="release", amp="fp16",
               sample_rate=1.0, accum_across_epochs=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_release_configs_resolve_to_the_release_values(name):
    path = os.path.join(ROOT, "configs", "release", name + ".yaml")
    text = open(path).read()
    assert "train_largescale.py" in text and "320c57d" in text  # names the release file it follows
    cfg = C.parse(finetune.FinetuneConfig, ["--config", path])
    for key, want in RELEASE.items():
        assert getattr(cfg, key) == want, (name, key, getattr(cfg, key), want)
    assert cfg.fewshot == 0 and cfg.partition == 1.0
    if name == "part_fvit_webface4m":
        assert cfg.init == "" and cfg.landmark_init == ""  # from scratch
    # The lr the release reaches on 2 GPUs x 200 (train_largescale.py:472), computed by hand.
    assert math.isclose(finetune.peak_lr(cfg, 400), 3 / 480 * 1e-3 * math.sqrt(400 / 336) * 336, rel_tol=1e-12)
    assert math.isclose(finetune.peak_lr(cfg, 400), 2.2913e-3, rel_tol=1e-4)


def test_print_config_prints_the_release_values():
    path = os.path.join(ROOT, "configs", "release", "lafs_finetune_full.yaml")
    out = subprocess.run([sys.executable, "-m", "lafs_fast.train", "finetune", "--config", path, "--print-config"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    for key in ("scale", "margin", "accum_steps", "augment", "randaugment", "erase_prob", "drift_lambdas",
                "clip_grad"):
        assert printed[key] == RELEASE[key], key


def test_defaults_stay_lafs_fast_and_cpu_sized():
    cfg = finetune.FinetuneConfig()
    assert (cfg.dataset, cfg.augment, cfg.accum_steps, cfg.lr_rule, cfg.channel_order) == \
        ("orl", "light", 1, "none", "rgb")
    assert cfg.val_bins == [] and finetune.peak_lr(cfg, 4096) == cfg.lr
    assert (cfg.epochs, cfg.batch_size, cfg.model) == (40, 32, "part_fvit_tiny")


# ----------------------------------------------------------------------------- augmentation
def test_face_rand_augment_is_timms_without_solarize():
    ra = face_rand_augment("rand-m1-mstd0.5-inc1")
    names = [op.name for op in ra.ops]
    assert names == list(FACE_RAND_INCREASING) and not any("Solarize" in n for n in names)
    assert all(op.prob == 0.5 and op.magnitude == 1 and op.hparams["magnitude_std"] == 0.5 for op in ra.ops)
    assert ra.num_layers == 2 and face_rand_augment("rand-m2-mstd0.5-inc1").ops[0].magnitude == 2


def test_release_augment_is_seeded_and_leaves_the_callers_streams_alone():
    img = synthetic_faces(1, 1)[0][0]
    aug = ReleaseAugment()
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    a, b, c = aug(img, 7), aug(img, 7), aug(img, 8)
    assert a.dtype == torch.uint8 and a.shape == img.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    outs = torch.stack([aug(img, s) for s in range(40)])
    assert (outs != img).flatten(1).any(1).float().mean() > 0.9  # nearly every image changes


def test_release_erasing_covers_two_to_ten_percent_in_black():
    # A flat grey image: the crop and (zero) jitter keep it grey, so zeros are the erased box.
    img = torch.full((3, 112, 112), 200, dtype=torch.uint8)
    aug = ReleaseAugment(randaugment="", jitter=0.0, erase_prob=1.0, flip=False)
    fractions = [(aug(img, s) == 0).all(0).float().mean().item() for s in range(30)]
    assert all(0.019 <= f <= 0.101 for f in fractions), fractions
    half = ReleaseAugment(randaugment="", jitter=0.0, erase_prob=0.5, flip=False)
    erased = np.mean([(half(img, s) == 0).any().item() for s in range(200)])
    assert 0.38 < erased < 0.62  # p 0.5


class _NotInMemory(torch.utils.data.Dataset):
    """The same items without the in-memory fast path (DataLoader workers' route)."""

    def __init__(self, ds):
        self.ds, self.labels = ds, ds.labels

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_release_augment_is_split_invariant_and_the_same_in_a_dataloader():
    ds = SyntheticFaces(num_identities=4, images_per_identity=4)
    aug = ReleaseAugment()
    one = TrainData(ds, 8, seed=3, workers=0, transform=aug)
    two = [TrainData(ds, 4, seed=3, workers=0, rank=r, world_size=2, transform=aug) for r in range(2)]
    loader = TrainData(_NotInMemory(ds), 8, seed=3, workers=2, transform=aug)  # pickled into workers
    assert not loader.in_memory
    for epoch in (0, 1):
        ref = list(one.epoch_batches(epoch))
        split = [list(t.epoch_batches(epoch)) for t in two]
        via_loader = list(loader.epoch_batches(epoch))
        for n, (images, labels) in enumerate(ref):
            assert torch.equal(images, torch.cat([split[0][n][0], split[1][n][0]]))
            assert torch.equal(images, via_loader[n][0]) and torch.equal(labels, via_loader[n][1])
        resumed = list(one.epoch_batches(epoch, skip=1))  # resume: the same augmentation
        assert torch.equal(resumed[0][0], ref[1][0])
    plain = next(iter(TrainData(ds, 8, seed=3, workers=0).epoch_batches(0)))[0]
    assert not torch.equal(plain, next(iter(one.epoch_batches(0)))[0])


def test_channel_order_bgr_swaps_recordio_channels(tmp_path):
    imgs, labels = synthetic_faces(2, 2)
    write_recordio(str(tmp_path / "train"), list(imgs), labels.tolist())
    rgb = RecordIODataset(str(tmp_path / "train"))
    bgr = RecordIODataset(str(tmp_path / "train"), channel_order="bgr")
    for i in range(len(rgb)):
        assert torch.equal(bgr[i][0], rgb[i][0].flip(0)) and bgr[i][1] == rgb[i][1]
    assert torch.equal(rgb[0][0], imgs[0])
    with pytest.raises(ValueError, match="recordio only"):
        open_dataset("synthetic", channel_order="bgr")
    with pytest.raises(SystemExit):
        C.parse(finetune.FinetuneConfig, ["--dataset", "synthetic", "--channel-order", "bgr"])


def test_partition_keeps_the_first_fraction():
    data = build_train_data("synthetic", "", 0, 0, 2, 0, partition=0.25)
    assert data.indices.tolist() == list(range(12))
    few = build_train_data("synthetic", "", 1, 0, 2, 0, partition=0.5)  # then 1 image per identity
    assert len(few.indices) == 4 and few.indices.max() < 24


# ----------------------------------------------------------------------------- accumulation
def _model_and_head(seed=0):
    torch.manual_seed(seed)
    model = finetune.create_model("part_fvit_tiny")
    head = finetune.CosFace(model.dim, 6, s=64.0, m=0.4)
    return model.eval(), head  # eval: no dropout, batch-norm on running statistics (batch-size free)


def test_accumulating_three_micro_batches_equals_one_step_on_their_concatenation():
    cfg = finetune.FinetuneConfig(accum_steps=3, clip_grad=0.0, decay_tokens=True, cnn_head_weight_decay=0.1)
    torch.manual_seed(1)
    x = torch.rand(12, 3, 112, 112) * 2 - 1
    target = torch.nn.functional.one_hot(torch.randint(0, 6, (12,)), 6).float()
    runs = []
    for chunks in (3, 1):
        model, head = _model_and_head()
        opt = common.make_adamw(finetune.make_param_groups(cfg, model, head), 1e-3, torch.device("cpu"))
        common.set_schedule(opt, 1e-3)
        scaler = common.make_grad_scaler(torch.device("cpu"), "none")
        params = list(model.parameters()) + list(head.parameters())
        total = 0.0
        for xs, ts in zip(x.chunk(chunks), target.chunk(chunks)):
            loss, _, t = finetune.micro_batch_loss(cfg, model, head, xs, ts, torch.device("cpu"), "none")
            (t / chunks).backward()
            total += loss.item() / chunks
        grads = [p.grad.clone() for p in params]
        finetune.optimizer_step(cfg, opt, scaler, params)
        runs.append((total, grads, [p.detach().clone() for p in params], opt, params))
    names = [n for n, _ in list(model.named_parameters()) + list(head.named_parameters(prefix="head"))]
    (l3, g3, w3, _, _), (l1, g1, w1, opt1, params1) = runs
    assert math.isclose(l3, l1, rel_tol=1e-6)
    # float32: three partial means vs one mean over 12, and convolutions run at other batch sizes
    # (other blockings): rounding only, judged against each tensor's own scale (the landmark CNN's
    # stem gradient passes the min-max scaling and the sampling: ~1e-6 of its largest value).
    for a, b in zip(g3, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    start = list(_model_and_head()[0].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(w1, start))  # every tensor of the model moved
    # The weights: as far apart as AdamW makes the gradients' rounding differences, and no further
    # (tolerances.AdamWDrift: a near-zero gradient's rounding can move its entry by up to 2 lr).
    drift = AdamWDrift()
    drift.step(opt1, {i: (p, b, a, 1e-4 * b.abs() + 1e-5 * b.abs().max()) for i, (p, a, b) in
                      enumerate(zip(params1, g3, g1))})
    for i, (a, b) in enumerate(zip(w3, w1)):
        assert_weights_within(a, b, drift.tolerance(i), names[i])


@pytest.mark.parametrize("cnn_lr_scale", [1.0, 3.0])
def test_layer_wise_lr_decay_scales_each_layers_first_step(cnn_lr_scale):
    """--layer-decay 0.5 (BEiT's rule, which the release computes but never applies): block i of a
    depth-D ViT trains at lr x 0.5^(D - i), the token embedding, the tokens and the landmark CNN at
    lr x 0.5^(D + 1), the final norm and the head at lr. Seen in the
    weights: without weight decay, AdamW's first step moves every entry by lr_group x g / (|g| +
    1e-8), i.e. by lr_group to 1e-5 where |g| >= 0.5. --cnn-lr-scale multiplies the landmark CNN's
    rate only, not the tokens and patch embedding that share its layer."""
    depth, lr = 4, 1e-3
    cfg = finetune.FinetuneConfig(layer_decay=0.5, weight_decay=0.0, cnn_weight_decay=0.0,
                                  cnn_head_weight_decay=0.0, decay_tokens=True, clip_grad=0.0,
                                  cnn_lr_scale=cnn_lr_scale)
    model, head = _model_and_head()
    assert len(model.transformer.blocks) == depth
    named = list(model.named_parameters()) + list(head.named_parameters(prefix="head"))
    start = {n: p.detach().clone() for n, p in named}
    opt = common.make_adamw(finetune.make_param_groups(cfg, model, head), lr, torch.device("cpu"))
    common.set_schedule(opt, lr)
    g = torch.Generator().manual_seed(0)
    for _, p in named:  # gradients well away from AdamW's eps, of either sign
        p.grad = (torch.rand(p.shape, generator=g) + 0.5) * (torch.randint(0, 2, p.shape, generator=g) * 2 - 1)
    opt.step()

    def expected(name):
        if name.startswith("landmark_cnn."):
            return 0.5 ** (depth + 1) * cnn_lr_scale
        if name.startswith(("patch_embed.", "cls_token", "pos_embedding")):
            return 0.5 ** (depth + 1)
        if name.startswith("transformer.blocks."):
            return 0.5 ** (depth - int(name.split(".")[2]))
        return 1.0  # norm, head

    assert {expected(n) for n, _ in named} == {cnn_lr_scale / 32, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0}
    for name, p in named:  # to 1e-5, + the float32 rounding of the weights (2 ulp of |w|)
        err = ((p.detach() - start[name]).abs() - lr * expected(name)).abs()
        allowed = 1e-5 * lr * expected(name) + 2.0 ** -22 * start[name].abs()
        assert (err <= allowed).all(), (name, err.max().item(), lr * expected(name))


def test_accumulation_counts_optimiser_steps_and_resumes_exactly(tmp_path):
    kw = dict(dataset="synthetic", partition=0.25, batch_size=2, accum_steps=3, epochs=2, warmup_epochs=0.5,
              eval=False, progress=False, device="cpu", log_every=1, fast_dropout=False, mixup_prob=0.5)
    straight = finetune.run(finetune.FinetuneConfig(out_dir=str(tmp_path / "a"), **kw))
    assert straight["steps"] == 2 * (12 // 2 // 3)  # 6 micro-batches per epoch -> 2 steps
    lines = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [l["step"] for l in lines if l["stage"] == "finetune"][:4] == [1, 2, 3, 4]
    stopped = finetune.run(finetune.FinetuneConfig(out_dir=str(tmp_path / "b"), stop_after=3, save_every=1, **kw))
    assert stopped["stopped"]
    resumed = finetune.run(finetune.FinetuneConfig(out_dir=str(tmp_path / "b"), resume=True, **kw))
    assert resumed["steps"] == straight["steps"]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- validation
def _write_bins(tmp_path):
    imgs, labels = synthetic_faces(4, 3)
    pairs, same = [], []
    for k in range(12):
        i, j = k % 12, (k * 5 + 1) % 12
        pairs += [imgs[i], imgs[j]]
        same.append(bool(labels[i] == labels[j]))
    write_bin(str(tmp_path / "setA.bin"), pairs, same)
    write_bin(str(tmp_path / "setB.bin"), pairs[:12], same[:6])
    return [str(tmp_path / "setA.bin"), str(tmp_path / "setB.bin")]


def test_val_bins_log_accuracy_per_set_and_keep_the_best(tmp_path):
    bins = _write_bins(tmp_path)
    out = tmp_path / "run"
    cfg = finetune.FinetuneConfig(dataset="synthetic", partition=0.25, batch_size=2, epochs=1, warmup_epochs=0.5,
                                  lr=5e-3, eval=False, progress=False, device="cpu", out_dir=str(out),
                                  val_bins=bins, val_every=2)
    cfg.validate()
    res = finetune.run(cfg)
    vals = [json.loads(l) for l in open(out / "metrics.jsonl") if '"val"' in l]
    assert [v["step"] for v in vals] == [2, 4, 6]
    for v in vals:
        assert 0 <= v["acc_setA"] <= 1 and 0 <= v["acc_setB"] <= 1
        assert math.isclose(v["acc_mean"], (v["acc_setA"] + v["acc_setB"]) / 2)
    best = max(vals, key=lambda v: v["acc_mean"])  # the first of the highest
    assert res["val_best_mean"] == best["acc_mean"] and os.path.exists(out / "model.pt")
    saved = torch.load(out / "best.pt", weights_only=False)
    assert saved["step"] == best["step"] and [v["saved_best"] for v in vals].count(True) >= 1
    # best.pt holds the weights of that evaluation: re-evaluating it gives the logged accuracies.
    from lafs_fast.convert import load_model
    os.makedirs(tmp_path / "re")
    again = Validator(bins, 112, str(tmp_path / "re"), common.JsonlLogger(None))
    acc = again(load_model(str(out / "best.pt")), best["step"], 0)
    assert math.isclose(acc["setA"], best["acc_setA"]) and math.isclose(acc["setB"], best["acc_setB"])


def test_a_resumed_validator_keeps_the_best_so_far(tmp_path):
    bins = _write_bins(tmp_path)
    torch.manual_seed(0)
    model = finetune.create_model("part_fvit_tiny")
    first = Validator(bins, 112, str(tmp_path), common.JsonlLogger(None))
    acc = first(model, 10, 0)
    assert os.path.exists(tmp_path / "best.pt") and first.best == acc["mean"]
    again = Validator(bins, 112, str(tmp_path), common.JsonlLogger(None), resume=True)
    assert again.best == acc["mean"]  # a later, not better model will not replace best.pt
    fresh = Validator(bins, 112, str(tmp_path), common.JsonlLogger(None))
    assert fresh.best == -math.inf  # a new run starts its own best


def test_val_bins_must_exist():
    with pytest.raises(SystemExit):
        C.parse(finetune.FinetuneConfig, ["--dataset", "synthetic", "--val-bins", "/no/such/lfw.bin"])


# ----------------------------------------------------------------------------- 2 ranks (gloo)
def _dist_config(out_dir, batch):
    # grid landmarks: a trained landmark CNN makes trajectories chaotic in rounding (see test_distributed)
    return finetune.FinetuneConfig(dataset="synthetic", landmarks="grid", batch_size=batch, epochs=1,
                                   warmup_epochs=0.5, lr=5e-3, eval=False, mixup_prob=1.0, augment="release",
                                   accum_steps=3, out_dir=str(out_dir), log_every=1, threads=1, progress=False,
                                   device="cpu", fast_dropout=False)


def _dist_worker(rank, port, root):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    finetune.create_model = dropout_free_model
    from lafs_fast.train import distributed
    try:
        finetune.run(_dist_config(f"{root}/w2", 4))
    finally:
        distributed.shutdown()


def test_two_ranks_accumulating_with_the_release_augmentation_train_like_one(tmp_path, monkeypatch):
    """World 2 x 4 images x 3 micro-batches (DDP no_sync on the first two, release augmentation
    in each rank's loader, mixup partners across ranks) = world 1 x 8 x 3, to float32 rounding
    (tolerances as tests/test_distributed.py: losses and weights rtol 1e-4, atol 1e-5)."""
    import multiprocessing
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    monkeypatch.setattr(finetune, "create_model", dropout_free_model)
    threads = torch.get_num_threads()
    try:
        ref = finetune.run(_dist_config(tmp_path / "w1", 8))
    finally:
        torch.set_num_threads(threads)
    assert ref["steps"] == 48 // 8 // 3

    def losses(d):
        return torch.tensor([json.loads(l)["loss"] for l in open(d / "metrics.jsonl")
                             if json.loads(l).get("stage") == "finetune"][:ref["steps"]])

    torch.testing.assert_close(losses(tmp_path / "w2"), losses(tmp_path / "w1"), rtol=1e-4, atol=1e-5)
    a = torch.load(tmp_path / "w1" / "model.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "w2" / "model.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.manual_seed(0)  # the runs' start (setup_run seeds with --seed 0, then builds the model)
    start = dropout_free_model("part_fvit_tiny", landmarks="grid").state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a if a[k].is_floating_point()) > 1e-3  # it trained
