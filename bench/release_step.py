"""The authors' release's OWN LAFS pretraining step, run beside lafs_fast for measurement.

NEEDS A CHECKOUT OF THE RELEASE (github szlbiubiubiu/LAFS_CVPR2024), given with --release PATH or
the LAFS_RELEASE environment variable, and the `einops` package the release imports. This repo
holds none of the release's code: its modules (lafs_train.py, vision_transformer.py, utils.py,
face_pre_pro/ViT_face.py, face_pre_pro/mobilenet.py) are imported from that path, and the step
that runs is the release's `train_one_epoch`, called on a one-batch loader, so that every line of
its loop body runs (landmark CNN on the 2 global views and on all local views, per-landmark
`grid_sample`, MultiCropWrapper student/teacher, its DINOLoss, per-tensor `clip_gradients` with
one `.item()` per tensor, AdamW, the Python-loop EMA, its MetricLogger).

Without the checkout (or without einops) the script prints what is missing and exits with
status 0, and `load_release` raises `ReleaseUnavailable`; bench/step_throughput.py then skips the
release's column.

Shims, applied at run time only (nothing in the release is edited):
  * `torch.Tensor.cuda` -> identity and `torch.cuda.synchronize` -> no-op while the release's step
    runs on a CPU (the release moves its noise and index tensors with `.cuda()` and syncs once
    per step);
  * lafs_train's `dist` -> world size 1 without a process group (its DINOLoss all-reduces the
    centre; with one process that is the identity);
  * `IPython` -> a stub module (ViT_face.py imports `embed` and never calls it in this path);
  * the student is wrapped in a module with `.module` (the release's loop reads
    `student.module.parameters()` from DDP);
  * the models are built at the benchmark's size (the release hard-codes dim 768, depth 12,
    heads 11, mlp 2048, DINO out 100000 in `train_lafs`): its own classes, other sizes.

    python bench/release_step.py --release ../LAFS_CVPR2024        # images/s of its step alone
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
import time
import types

import torch
from torch import nn


class ReleaseUnavailable(RuntimeError):
    """The release checkout (or a package it imports) is not there."""


_MODULES = ("lafs_train", "utils", "vision_transformer", "face_pre_pro.ViT_face", "face_pre_pro.mobilenet")


def load_release(path: str | None):
    """Import the release's modules from a checkout; returns a namespace with lafs_train, utils,
    ViT_face. Raises ReleaseUnavailable naming what is missing."""
    path = path or os.environ.get("LAFS_RELEASE", "")
    if not path:
        raise ReleaseUnavailable("no release checkout given (--release PATH or LAFS_RELEASE)")
    need = ["lafs_train.py", "utils.py", "vision_transformer.py", "face_pre_pro/ViT_face.py",
            "face_pre_pro/mobilenet.py"]
    missing = [f for f in need if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ReleaseUnavailable(f"{path} is not a checkout of the LAFS release: missing {', '.join(missing)}")
    try:
        import einops  # noqa: F401  (the release's ViT_face.py and lafs_train.py import it)
    except ImportError as e:
        raise ReleaseUnavailable("the release imports einops: pip install einops") from e
    if "IPython" not in sys.modules:
        try:
            import IPython  # noqa: F401
        except ImportError:  # only `from IPython import embed` at import time; never called here
            stub = types.ModuleType("IPython")
            stub.embed = lambda *a, **k: None
            sys.modules["IPython"] = stub
    # The release imports its modules by bare names (utils, vision_transformer): they must come
    # from the checkout, not from anything else called utils.
    for name in _MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, os.path.abspath(path))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            lafs_train = importlib.import_module("lafs_train")
            vit_face = importlib.import_module("face_pre_pro.ViT_face")
    except ImportError as e:
        raise ReleaseUnavailable(f"importing the release from {path} failed: {e}") from e
    finally:
        sys.path.remove(os.path.abspath(path))
    # One process, no process group: all_reduce of the centre is the identity.
    lafs_train.dist = types.SimpleNamespace(all_reduce=lambda t, *a, **k: None, get_world_size=lambda: 1,
                                            is_available=lambda: True, is_initialized=lambda: False)
    return types.SimpleNamespace(lafs_train=lafs_train, utils=lafs_train.utils, vit_face=vit_face, path=path)


class _DDPLike(nn.Module):
    """What the release's loop needs from DDP: `.module` and a forward that calls it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


@contextlib.contextmanager
def cpu_shims(device: str):
    """While the release's step runs on a CPU: .cuda() is the identity, synchronize a no-op."""
    if device != "cpu":
        yield
        return
    cuda, sync = torch.Tensor.cuda, torch.cuda.synchronize
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.cuda.synchronize = cuda, sync


class ReleaseStep:
    """The release's pretraining step at a given model size. images: the release's batch, a list
    of 2 * (2 + L) tensors (B, 3, S, S) in [-1, 1]: [global 1 clean, global 1 augmented, global 2
    clean, global 2 augmented, local 1 clean, local 1 augmented, ...] (DataAugmentation_LAFS's
    order)."""

    def __init__(self, rel, dim=192, depth=4, heads=3, dim_head=64, mlp_dim=768, num_landmarks=196,
                 out_dim=4096, batch=16, n_local=8, epochs=41, device="cpu", amp="none", seed=0):
        lt, vf = rel.lafs_train, rel.vit_face
        self.rel, self.device, self.n_local, self.batch = rel, device, n_local, batch
        torch.manual_seed(seed)
        with contextlib.redirect_stdout(io.StringIO()):
            # train_lafs's landmark CNN (its dim 512 is the unused global token's width)
            cnn = vf.face_landmark_4simmin_glo_loc(
                loss_type="CosFace", GPU_ID=None, num_class=300, num_patches=num_landmarks, image_size=112,
                patch_size=8, dim=512, depth=12, heads=11, mlp_dim=2560, dropout=0.1, emb_dropout=0.1)
            cnn.requires_grad_(False)
            self.landmarkcnn = cnn.to(device).eval()

            def vit():
                return vf.ViT_face_landmark_patch8(
                    loss_type="CosFace", GPU_ID=None, num_class=30000, image_size=112, patch_size=8, dim=dim,
                    depth=depth, heads=heads, dim_head=dim_head, num_patches=num_landmarks, mlp_dim=mlp_dim,
                    dropout=0.1, emb_dropout=0.1, with_land=False, use_standcoord=False, Random_prob=False,
                    shuffle=False)
            DINOHead = lt.DINOHead
            student = lt.utils.MultiCropWrapper(vit(), DINOHead(dim, out_dim, use_bn=False, norm_last_layer=True))
            teacher = lt.utils.MultiCropWrapper(vit(), DINOHead(dim, out_dim, False))
        student, teacher = student.to(device), teacher.to(device)
        self.student = _DDPLike(student)
        self.teacher = teacher
        teacher.load_state_dict(student.state_dict())
        for p in teacher.parameters():
            p.requires_grad = False
        self.dino_loss = lt.DINOLoss(out_dim, n_local + 2, 0.07, 0.04, 30, epochs).to(device)
        self.optimizer = torch.optim.AdamW(lt.utils.get_params_groups(self.student))
        self.scaler = torch.amp.GradScaler("cuda") if (device == "cuda" and amp != "none") else None
        # One "epoch" per step: the schedules need (epochs) entries; epoch 1 (past the frozen last
        # layer, as most of training is) for every timed step.
        sched = lt.utils.cosine_scheduler
        self.lr_schedule = sched(5e-4 * batch / 256.0, 1e-6, epochs, 1, warmup_epochs=10)
        self.wd_schedule = sched(0.04, 0.4, epochs, 1)
        self.momentum_schedule = sched(0.996, 1, epochs, 1)
        self.args = types.SimpleNamespace(epochs=epochs, clip_grad=3.0, freeze_last_layer=1)
        self.epoch = 1

    def __call__(self, images):
        """One step of the release's train_one_epoch on this batch; returns its stats."""
        lt = self.rel.lafs_train
        loader = [(images, None)]
        with cpu_shims(self.device), contextlib.redirect_stdout(io.StringIO()):
            return lt.train_one_epoch(self.student, self.teacher, self.teacher, self.landmarkcnn, self.dino_loss,
                                      loader, self.optimizer, self.lr_schedule, self.wd_schedule,
                                      self.momentum_schedule, self.epoch, self.scaler, self.args)


def batch_from_views(v) -> list:
    """lafs_fast's LafsViews (view-major) -> the release's batch list (clean, augmented per view)."""
    B = v.batch_size
    out = []
    for clean, aug in ((v.clean_global, v.aug_global), (v.clean_local, v.aug_local)):
        for c, a in zip(clean.split(B), aug.split(B)):
            out += [c.contiguous(), a.contiguous()]
    return out


class ReleaseData:
    """The release's data path on in-memory JPEG bytes: PIL decode, its DataAugmentation_LAFS per
    image (20 PIL crops), default_collate. (The release decodes .rec records with mxnet; PIL is
    used here.)"""

    def __init__(self, rel, payloads, n_local=8, seed=0):
        import random
        self.payloads = payloads
        random.seed(seed)
        torch.manual_seed(seed)
        self.transform = rel.lafs_train.DataAugmentation_LAFS((0.4, 1.0), (0.05, 0.4), n_local)

    def __call__(self):
        from PIL import Image
        from torch.utils.data import default_collate
        items = []
        for p in self.payloads:
            with Image.open(io.BytesIO(p)) as im:
                items.append((self.transform(im.convert("RGB")), 0))
        images, _ = default_collate(items)
        return images


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", default=os.environ.get("LAFS_RELEASE", ""),
                    help="path of a checkout of the LAFS release (or set LAFS_RELEASE)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out-dim", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--with-data", action="store_true", help="decode + the release's transforms in every step")
    args = ap.parse_args(argv)
    try:
        rel = load_release(args.release)
    except ReleaseUnavailable as e:
        print(f"release_step: skipped: {e}")
        return None
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import statistics

    import step_paths as SP
    payloads = SP.face_bytes(args.batch)
    data = ReleaseData(rel, payloads)
    step = ReleaseStep(rel, batch=args.batch, out_dim=args.out_dim)
    cached = data()
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        stats = step(data() if args.with_data else cached)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"release step ({'with data' if args.with_data else 'model only'}): {med * 1e3:.0f} ms, "
          f"{args.batch / med:.2f} images/s, loss {stats['loss']:.4f}")
    return med


if __name__ == "__main__":
    main()
