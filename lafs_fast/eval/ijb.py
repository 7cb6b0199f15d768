"""IJB-B / IJB-C 1:1 template verification (the insightface protocol), from the released images
to TAR at FAR.

    python -m lafs_fast.eval ijb --root IJB_release/IJBC --target IJBC --checkpoint model.pt --out runs/ijbc

Data, insightface's layout under --root (<t> = ijbb or ijbc):
  meta/<t>_name_5pts_score.txt     one face per line: image name in loose_crop/, 5 points, detector score
  meta/<t>_face_tid_mid.txt        the same faces in the same order: name, template id, media id
  meta/<t>_template_pair_label.txt template 1, template 2, 1 = same person / 0
  loose_crop/                      the images

Each face is aligned by its 5 points to the 112 x 112 ArcFace template (eval.align) and embedded
with its mirror image: the per-image feature is embedding(x) + embedding(flip(x)) (insightface's F2),
stored unnormalised in features.npy. Scoring then keeps the feature norm (--norm-score, N1; off:
each image feature is L2-normalised first, N0), multiplies by the detector score (--detector-score,
D1; off: D0), averages the images of one media (video), sums a template's medias, L2-normalises
the template and scores template pairs by cosine. TAR at each FAR is read two ways: at the ROC point
whose FPR is nearest the target (the release's and insightface's tables) and strictly (threshold
at the k-th highest impostor score, at most FAR x impostors accepted).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .align import arcface_template, estimate_similarity, read_five_points, source_window, warp_affine
from .verification import _check, roc_auc, tar_at_far

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")
# What features.npy holds; a cache written under another recipe is not reused.
FEATURE_RECIPE = "lafs_fast.ijb_features/1: ArcFace-112 alignment, 8-bit aligned face, [-1, 1], flip sum"


# ----------------------------------------------------------------------------- meta files
def read_face_list(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`<image> <template id> <media id>` lines -> (names, templates, medias)."""
    names, ids = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3:
                raise ValueError(f"{path}:{n}: expected 3 fields (image, template id, media id), got {len(fields)}")
            try:
                ids.append((int(fields[1]), int(fields[2])))
            except ValueError:
                raise ValueError(f"{path}:{n}: template and media ids must be integers: {line.strip()!r}") from None
            names.append(fields[0])
    if not names:
        raise ValueError(f"{path} lists no faces")
    arr = np.asarray(ids, dtype=np.int64)
    return names, arr[:, 0], arr[:, 1]


def read_template_media_list(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`<image> <template id> <media id>` lines -> (templates, medias)."""
    _, templates, medias = read_face_list(path)
    return templates, medias


def read_template_pair_list(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`<template 1> <template 2> <label>` lines -> (p1, p2, label)."""
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{path}: expected lines of 3 integers (template 1, template 2, label): {e}") from None
    if pairs.shape[1] != 3 or len(pairs) == 0:
        raise ValueError(f"{path}: expected lines of 3 integers (template 1, template 2, label), "
                         f"got {pairs.shape[1]} columns" if len(pairs) else f"{path} lists no pairs")
    return pairs[:, 0], pairs[:, 1], pairs[:, 2]


def meta_paths(root: str, target: str) -> dict[str, str]:
    t = target.lower()
    return dict(points=os.path.join(root, "meta", f"{t}_name_5pts_score.txt"),
                faces=os.path.join(root, "meta", f"{t}_face_tid_mid.txt"),
                pairs=os.path.join(root, "meta", f"{t}_template_pair_label.txt"),
                images=os.path.join(root, "loose_crop"))


@dataclass
class IJBMeta:
    names: list[str]        # image file names under loose_crop/, one per face
    landmarks: np.ndarray   # (N, 5, 2) float64 pixels
    faceness: np.ndarray    # (N,) float32 detector scores
    templates: np.ndarray   # (N,) template id of each face
    medias: np.ndarray      # (N,) media id of each face
    p1: np.ndarray          # (P,) template pairs and their labels (1 = same person)
    p2: np.ndarray
    labels: np.ndarray


def _check_layout(root: str, target: str) -> dict[str, str]:
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    paths = meta_paths(root, target)
    if not os.path.isdir(root):
        raise ValueError(f"--root {root!r} is not a folder (give the folder that holds meta/ and loose_crop/)")
    missing = [p for k, p in paths.items() if not (os.path.isdir(p) if k == "images" else os.path.isfile(p))]
    if missing:
        hint = ""
        if os.path.isdir(os.path.join(root, target, "meta")):
            hint = f" (the data seem to be one level down: --root {os.path.join(root, target)})"
        raise ValueError(f"--root {root!r} lacks {', '.join(os.path.relpath(p, root) for p in missing)}: it must "
                         f"hold meta/ and loose_crop/ of {target}{hint}")
    return paths


def read_ijb_meta(root: str, target: str) -> IJBMeta:
    """The three meta files of one IJB set, checked against each other."""
    paths = _check_layout(root, target)
    names, points, faceness = read_five_points(paths["points"], require_score=True)
    face_names, templates, medias = read_face_list(paths["faces"])
    if len(face_names) != len(names):
        raise ValueError(f"{paths['faces']} lists {len(face_names)} faces but {paths['points']} {len(names)}: "
                         "they must list the same faces in the same order")
    differ = [i for i, (a, b) in enumerate(zip(names, face_names)) if a != b]
    if differ:
        i = differ[0]
        raise ValueError(f"face {i + 1} is {names[i]!r} in {paths['points']} but {face_names[i]!r} in "
                         f"{paths['faces']} ({len(differ)} rows differ): the lists must be in the same order")
    p1, p2, labels = read_template_pair_list(paths["pairs"])
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{paths['pairs']}: labels must be 0 or 1, got {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    known = np.unique(templates)
    for side in (p1, p2):
        unknown = ~np.isin(side, known)
        if unknown.any():
            raise ValueError(f"{paths['pairs']}: template {side[unknown][0]} ({int(unknown.sum())} pair entries) "
                             f"has no face in {paths['faces']}")
    return IJBMeta(names, points, faceness, templates, medias, p1, p2, labels.astype(np.int64))


# ----------------------------------------------------------------------------- aggregation
def template_features(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      faceness: Optional[np.ndarray] = None,
                      normalize_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (L2-normalised template features (T, D), sorted unique template ids (T,)).
    normalize_images L2-normalises image features first (insightface keeps the norm: N1)."""
    f = np.array(img_feats, dtype=np.float64)  # a writable copy (torch.from_numpy below)
    templates, medias = np.asarray(templates), np.asarray(medias)
    if not (len(f) == len(templates) == len(medias)):
        raise ValueError(f"img_feats ({len(f)}), templates ({len(templates)}) and medias "
                         f"({len(medias)}) must have one entry per image")
    if normalize_images:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    if faceness is not None:
        faceness = np.asarray(faceness, dtype=np.float64)
        if faceness.shape != (len(f),):
            raise ValueError(f"faceness must be ({len(f)},), got {faceness.shape}")
        f = f * faceness[:, None]
    uniq_t, t_inv = np.unique(templates, return_inverse=True)
    # one group per (template, media): the mean inside it, then the sum of a template's groups
    # (index_add_: ~40x faster than np.add.reduceat / np.add.at over 469 k x 768 features)
    groups, g_inv = np.unique(np.stack([t_inv.reshape(-1), medias], 1), axis=0, return_inverse=True)
    g_inv = torch.from_numpy(g_inv.reshape(-1))
    media_sum = torch.zeros(len(groups), f.shape[1], dtype=torch.float64).index_add_(0, g_inv, torch.from_numpy(f))
    media_feat = media_sum / torch.bincount(g_inv, minlength=len(groups))[:, None]
    tfeat = torch.zeros(len(uniq_t), f.shape[1], dtype=torch.float64)
    tfeat = tfeat.index_add_(0, torch.from_numpy(groups[:, 0]), media_feat).numpy()
    tfeat /= np.maximum(np.linalg.norm(tfeat, axis=1, keepdims=True), 1e-12)
    return tfeat, uniq_t


def template_pair_scores(tfeat: np.ndarray, unique_templates: np.ndarray, p1, p2) -> np.ndarray:
    """Cosine scores of template pairs (ids p1[k], p2[k]), in chunks (IJB-C has 15.7 M pairs)."""
    p1, p2 = np.asarray(p1), np.asarray(p2)
    pos = np.searchsorted(unique_templates, p1), np.searchsorted(unique_templates, p2)
    for ids, idx in zip((p1, p2), pos):
        bad = (idx >= len(unique_templates)) | (unique_templates[np.minimum(idx, len(unique_templates) - 1)] != ids)
        if bad.any():
            raise ValueError(f"template id {ids[bad][0]} of the pair list has no images")
    chunk = max(1, 2**22 // max(1, tfeat.shape[1]))
    return np.concatenate([np.einsum("ij,ij->i", tfeat[a], tfeat[b])
                           for a, b in zip(np.array_split(pos[0], range(chunk, len(p1), chunk)),
                                           np.array_split(pos[1], range(chunk, len(p1), chunk)))])


def ijb_evaluation(img_feats: np.ndarray, templates, medias, p1, p2, labels,
                   faceness: Optional[np.ndarray] = None, fars: Sequence[float] = IJB_FARS,
                   normalize_images: bool = False,
                   flipped_feats: Optional[np.ndarray] = None) -> dict:
    """Full 1:1 protocol from per-image features (add ``flipped_feats`` to flip-sum here).
    Returns scores, AUC and TAR at each FAR (strict convention)."""
    f = np.asarray(img_feats, dtype=np.float64)
    if flipped_feats is not None:
        f = f + np.asarray(flipped_feats, dtype=np.float64)
    tfeat, uniq = template_features(f, templates, medias, faceness, normalize_images)
    scores = template_pair_scores(tfeat, uniq, np.asarray(p1), np.asarray(p2))
    labels = np.asarray(labels).astype(bool)
    return dict(scores=scores, auc=roc_auc(scores, labels), tar_at_far=tar_at_far(scores, labels, fars),
                n_genuine=int(labels.sum()), n_impostor=int((~labels).sum()))


# ----------------------------------------------------------------------------- ROC conventions
def roc_curve(scores, labels, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as sklearn.metrics.roc_curve defines them, the curve the release and
    insightface read: one point per distinct score t (accept score >= t), highest t first; with
    drop_intermediate the points inside straight runs (equal steps in both counts) are left out;
    then (0, 0) at threshold +inf is put in front."""
    s, y = _check(scores, labels)
    if y.all() or not y.any():
        raise ValueError("roc_curve needs both genuine and impostor pairs")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    tps = np.cumsum(y)[last_of_value].astype(np.float64)
    fps = (last_of_value + 1) - tps
    thresholds = s[last_of_value]
    if drop_intermediate and fps.size > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps, thresholds = np.r_[0.0, fps], np.r_[0.0, tps], np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far_nearest(scores, labels, fars: Sequence[float] = IJB_FARS) -> dict:
    """TAR at the ROC point (roc_curve) whose FPR is nearest each target FAR; of equally near
    points the one of lowest threshold (the largest TPR at a repeated FPR), as the release picks
    it. The point's FPR may lie above the target."""
    fpr, tpr, thr = roc_curve(scores, labels)
    fpr, tpr, thr = fpr[::-1], tpr[::-1], thr[::-1]
    out = {}
    for far in fars:
        k = int(np.argmin(np.abs(fpr - far)))  # the first of equal distances, as min() over (distance, index)
        out[far] = dict(tar=float(tpr[k]), fpr=float(fpr[k]),
                        threshold=None if not np.isfinite(thr[k]) else float(thr[k]))
    return out


# ----------------------------------------------------------------------------- images -> features
class FaceCrops(torch.utils.data.Dataset):
    """(index, uint8 (3, h, w) window of the loose crop that the alignment reads, (2, 3) float64
    matrix window -> aligned face, error text) for the faces `indices`; never raises for one face."""

    def __init__(self, image_dir: str, names: Sequence[str], matrices: np.ndarray, indices: np.ndarray):
        self.image_dir, self.names, self.matrices, self.indices = image_dir, names, matrices, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        from ..data.image_folder import decode_image_bytes
        i = int(self.indices[k])
        if not np.isfinite(self.matrices[i]).all():
            return i, None, None, "its 5 points coincide: no alignment"
        try:
            with open(os.path.join(self.image_dir, self.names[i]), "rb") as f:
                image = decode_image_bytes(f.read())
        except (OSError, ValueError) as e:
            return i, None, None, f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
        (x0, y0, x1, y1), matrix = source_window(self.matrices[i], image.shape[1], image.shape[2])
        return i, image[:, y0:y1, x0:x1].contiguous(), torch.from_numpy(matrix), ""


def collate_crops(batch):
    """-> (indices of the readable faces, their windows zero-padded to one (B, 3, h, w) uint8
    tensor (the padding lies outside what each warp reads), (B, 2, 3) matrices, [(index, error)])."""
    good = [(i, c, m) for i, c, m, _ in batch if c is not None]
    bad = [(i, e) for i, c, _, e in batch if c is None]
    if not good:
        return [], None, None, bad
    h, w = max(c.shape[1] for _, c, _ in good), max(c.shape[2] for _, c, _ in good)
    crops = torch.zeros(len(good), 3, h, w, dtype=torch.uint8)
    for k, (_, c, _) in enumerate(good):
        crops[k, :, :c.shape[1], :c.shape[2]] = c
    return [i for i, _, _ in good], crops, torch.stack([m for _, _, m in good]), bad


@torch.no_grad()
def embed_aligned(model, crops: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Flip-sum features (B, D) float32 on the CPU of faces warped from `crops` by `matrices`. The
    aligned face is rounded to 8 bits (the release aligns into a uint8 image), then fed in [-1, 1]."""
    faces = warp_affine(crops, matrices).round_().clamp_(0, 255)
    x = faces / 127.5 - 1.0
    e = model(torch.cat([x, torch.flip(x, dims=[3])])).float()
    return (e[:len(x)] + e[len(x):]).cpu()


class FeatureCache:
    """features.npy (N, D) float32 and image_status.npy (N,) int8 (PENDING / EMBEDDED /
    UNREADABLE), memory-mapped in `out` and written batch by batch, with cache.json naming what
    they were computed from; unreadable.txt holds `<name>\\t<reason>` lines. A run that stops
    leaves a consistent cache: status rows are written after their features."""
    PENDING, EMBEDDED, UNREADABLE = 0, 1, 2

    def __init__(self, out: str, key: dict):
        from numpy.lib.format import open_memmap
        self.out, self.key = out, key
        n, dim = key["n_images"], key["dim"]
        paths = self.paths = {k: os.path.join(out, k) for k in
                              ("cache.json", "features.npy", "image_status.npy", "unreadable.txt")}
        resume = os.path.isfile(paths["cache.json"])
        if resume:
            with open(paths["cache.json"]) as f:
                held = json.load(f)
            if held != key:
                changed = sorted(k for k in set(held) | set(key) if held.get(k) != key.get(k))
                raise ValueError(f"{out} holds IJB features of another run ({', '.join(changed)} differ): "
                                 "choose another --out, or delete its features.npy and cache.json to start over")
        mode = "r+" if resume else "w+"
        self.features = open_memmap(paths["features.npy"], mode=mode, dtype=np.float32, shape=(n, dim))
        self.status = open_memmap(paths["image_status.npy"], mode=mode, dtype=np.int8, shape=(n,))
        if self.features.shape != (n, dim) or self.status.shape != (n,):
            raise ValueError(f"{out}: features.npy / image_status.npy do not fit cache.json; delete them to start over")
        if not resume:
            open(paths["unreadable.txt"], "w").close()
            tmp = paths["cache.json"] + ".tmp"
            with open(tmp, "w") as f:
                json.dump(key, f, indent=1)
            os.replace(tmp, paths["cache.json"])

    def pending(self) -> np.ndarray:
        return np.flatnonzero(self.status == self.PENDING)

    def write(self, indices: list[int], feats: Optional[torch.Tensor], bad: list[tuple[int, str, str]]) -> None:
        if indices:
            self.features[indices] = feats.numpy()
        for i, _, _ in bad:
            self.features[i] = 0.0
        self.features.flush()
        if bad:
            with open(self.paths["unreadable.txt"], "a") as f:
                f.writelines(f"{name}\t{reason}\n" for _, name, reason in bad)
        self.status[indices] = self.EMBEDDED
        self.status[[i for i, _, _ in bad]] = self.UNREADABLE
        self.status.flush()

    def unreadable(self) -> dict[str, str]:
        """name -> reason of the faces flagged unreadable (the last reason written for each)."""
        reasons = {}
        with open(self.paths["unreadable.txt"]) as f:
            for line in f:
                name, _, reason = line.rstrip("\n").partition("\t")
                reasons[name] = reason
        return reasons


class ImageProgress:
    """A tqdm bar on a terminal; off a terminal a line every `interval` seconds and at the end."""

    def __init__(self, total: int, done: int, enabled: bool, interval: float = 30.0):
        self.total, self.done, self.start_done, self.enabled = total, done, done, enabled
        self.bad, self.t0, self.last, self.interval = 0, time.monotonic(), time.monotonic(), interval
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc="IJB faces", unit="img", dynamic_ncols=True)

    def update(self, n: int, bad: int) -> None:
        self.done, self.bad = self.done + n, self.bad + bad
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(unreadable=self.bad)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            self.line()

    def line(self) -> None:
        dt = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / dt if dt > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"IJB faces: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.1f} %), "
              f"{rate:.1f} img/s, eta {eta:.0f} s, {self.bad} unreadable", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self.line()


def extract_features(model, meta: IJBMeta, image_dir: str, cache: FeatureCache, batch_size: int = 128,
                     workers: int = 4, device: Optional[torch.device] = None, progress: bool = True) -> int:
    """Embed every face the cache still lacks (an interrupted run continues where it stopped).
    Returns the number of faces embedded or flagged by this call."""
    device = device or torch.device("cpu")
    matrices = estimate_similarity(torch.from_numpy(meta.landmarks), arcface_template()).numpy()
    todo = cache.pending()
    if len(todo) == 0:
        return 0
    loader = torch.utils.data.DataLoader(FaceCrops(image_dir, meta.names, matrices, todo), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, collate_fn=collate_crops,
                                         pin_memory=device.type == "cuda")
    bar = ImageProgress(len(meta.names), len(meta.names) - len(todo), progress)
    try:
        for indices, crops, mats, bad in loader:
            feats = embed_aligned(model, crops.to(device, non_blocking=True), mats) if indices else None
            named = [(i, meta.names[i], err) for i, err in bad]
            cache.write(indices, feats, named)
            for _, name, err in named:
                print(f"{chr(10) if bar.bar is not None else ''}unreadable face (zero features, left out of its "
                      f"template): {name}: {err}", file=sys.stderr, flush=True)
            bar.update(len(indices) + len(bad), len(bad))
    finally:
        bar.close()
    return len(todo)


# ----------------------------------------------------------------------------- scores and report
def score_ijb(features: np.ndarray, faceness: np.ndarray, valid: np.ndarray, meta: IJBMeta,
              norm_score: bool = True, detector_score: bool = True, fars: Sequence[float] = IJB_FARS) -> dict:
    """Template-pair scores and both TAR conventions from per-image flip-sum features. Faces not
    `valid` (unreadable) are left out of their media and template; a template with no valid face
    gets a zero feature (score 0 with anything)."""
    valid = np.asarray(valid, dtype=bool)
    tfeat, uniq = template_features(np.asarray(features)[valid], meta.templates[valid], meta.medias[valid],
                                    np.asarray(faceness)[valid] if detector_score else None,
                                    normalize_images=not norm_score)
    all_templates = np.unique(meta.templates)
    full = np.zeros((len(all_templates), tfeat.shape[1]))
    full[np.searchsorted(all_templates, uniq)] = tfeat
    scores = template_pair_scores(full, all_templates, meta.p1, meta.p2)
    labels = meta.labels.astype(bool)
    return dict(scores=scores, auc=roc_auc(scores, labels),
                nearest_roc_point=tar_at_far_nearest(scores, labels, fars),
                strict=tar_at_far(scores, labels, fars),
                n_genuine=int(labels.sum()), n_impostor=int((~labels).sum()),
                n_templates=len(all_templates), templates_without_faces=len(all_templates) - len(uniq))


def mode_name(norm_score: bool, detector_score: bool) -> str:
    """insightface's test-mode label: N1 keeps the norm, D1 weighs by detector score, F2 flip sum."""
    return f"N{int(norm_score)}D{int(detector_score)}F2"


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def format_results(r: dict) -> str:
    fars = list(r["tar_at_far"]["nearest_roc_point"])
    head = ["convention"] + [f"TAR@{f}" for f in fars]
    rows = [[conv] + [f"{100 * r['tar_at_far'][conv][f]['tar']:.2f}" for f in fars]
            for conv in ("nearest_roc_point", "strict")]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in [head] + rows]
    return (f"{r['target']} {r['mode']}: {r['n_images']} faces ({r['n_unreadable']} unreadable), "
            f"{r['n_templates']} templates, {r['n_genuine']} + {r['n_impostor']} pairs, AUC {100 * r['auc']:.4f} %\n"
            + "\n".join(lines))


def save_roc_png(path: str, fpr: np.ndarray, tpr: np.ndarray, title: str, fars: Sequence[float] = IJB_FARS) -> None:
    """The ROC on a log FPR axis (1e-6 ... 1) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw
    width, height, left, right, top, bottom = 720, 540, 70, 30, 60, 60
    lo_exp = int(np.floor(np.log10(min(fars))))
    at_lo = tpr[fpr >= 10.0**lo_exp]
    y_lo = min(0.9, np.floor(10 * (at_lo.min() if at_lo.size else 0.0)) / 10)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    pw, ph = width - left - right, height - top - bottom

    def xy(f, t):
        lx = (np.log10(np.maximum(f, 10.0**lo_exp)) - lo_exp) / -lo_exp
        return left + lx * pw, top + (1 - (t - y_lo) / (1 - y_lo)) * ph

    for e in range(lo_exp, 1):
        x, _ = xy(10.0**e, 1)
        d.line([(x, top), (x, top + ph)], fill=(210, 210, 210))
        d.text((x - 12, top + ph + 8), f"1e{e}", fill="black")
    for t in np.arange(y_lo, 1.0001, 0.1):
        _, y = xy(1, t)
        d.line([(left, y), (left + pw, y)], fill=(210, 210, 210))
        d.text((left - 34, y - 6), f"{t:.1f}", fill="black")
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    keep = tpr >= y_lo
    pts = [xy(f, t) for f, t in zip(fpr[keep], tpr[keep])]
    if len(pts) > 1:
        d.line(pts, fill=(31, 119, 180), width=2)
    d.text((left, 14), title, fill="black")
    d.text((left + pw // 2 - 60, height - 25), "false accept rate (log)", fill="black")
    d.text((left - 40, top - 18), "true accept rate", fill="black")
    img.save(path)


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device: {device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible")
    return dev


def _report(target: str, root: str, checkpoint: str, meta: IJBMeta, cache: FeatureCache, r: dict,
            norm_score: bool, detector_score: bool) -> dict:
    status = np.asarray(cache.status)
    bad = set(np.asarray(meta.names)[status == FeatureCache.UNREADABLE].tolist())
    reasons = {k: v for k, v in cache.unreadable().items() if k in bad}
    conv = {c: {f"{far:g}": v for far, v in r[c].items()} for c in ("nearest_roc_point", "strict")}
    return dict(target=target, mode=mode_name(norm_score, detector_score), norm_score=norm_score,
                detector_score=detector_score, flip="sum", root=os.path.abspath(root),
                checkpoint=os.path.abspath(checkpoint), n_images=len(meta.names), n_unreadable=len(bad),
                unreadable_first=dict(sorted(reasons.items())[:20]), n_templates=r["n_templates"],
                templates_without_faces=r["templates_without_faces"], n_pairs=len(meta.p1),
                n_genuine=r["n_genuine"], n_impostor=r["n_impostor"], auc=r["auc"], tar_at_far=conv)


def run_ijb(root: str, target: str, checkpoint: str, out: str, landmark_cnn: Optional[str] = None,
            batch_size: int = 128, workers: int = 4, device: str = "auto", norm_score: bool = True,
            detector_score: bool = True, progress: bool = True, fars: Sequence[float] = IJB_FARS) -> dict:
    """The whole evaluation; writes features.npy, faceness.npy, scores.npy, roc.png and
    results.json (plus the cache files) to `out` and returns the results."""
    target = target.upper()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    dev = _resolve_device(device)
    meta = read_ijb_meta(root, target)
    from ..convert import load_any_model
    model = load_any_model(checkpoint, landmark_cnn).to(dev).eval()
    if model.image_size != 112:
        raise ValueError(f"{checkpoint}: the model takes {model.image_size} x {model.image_size} faces; "
                         "IJB faces are aligned to the 112 x 112 ArcFace template")
    os.makedirs(out, exist_ok=True)
    paths = meta_paths(root, target)
    key = dict(recipe=FEATURE_RECIPE, target=target, n_images=len(meta.names), dim=model.dim,
               face_list_sha256=file_sha256(paths["points"]), checkpoint_sha256=file_sha256(checkpoint),
               landmark_cnn_sha256=file_sha256(landmark_cnn) if landmark_cnn else None)
    cache = FeatureCache(out, key)
    t0 = time.time()
    n_new = extract_features(model, meta, paths["images"], cache, batch_size, workers, dev, progress)
    t1 = time.time()
    np.save(os.path.join(out, "faceness.npy"), meta.faceness)
    valid = np.asarray(cache.status) == FeatureCache.EMBEDDED
    r = score_ijb(cache.features, meta.faceness, valid, meta, norm_score, detector_score, fars)
    np.save(os.path.join(out, "scores.npy"), r["scores"])
    results = _report(target, root, checkpoint, meta, cache, r, norm_score, detector_score)
    results["seconds"] = dict(embedding=round(t1 - t0, 3), faces_embedded_now=n_new,
                              scoring=round(time.time() - t1, 3))
    results["device"] = str(dev)
    fpr, tpr, _ = roc_curve(r["scores"], meta.labels)
    save_roc_png(os.path.join(out, "roc.png"), fpr, tpr,
                 f"ROC {target} {results['mode']}, AUC {100 * r['auc']:.4f} %", fars)
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
    return results
