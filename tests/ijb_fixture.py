"""A synthetic IJB-shaped data set in insightface's layout, small enough for CI.

    root/meta/<t>_name_5pts_score.txt   <image> x1 y1 ... x5 y5 <detector score>
    root/meta/<t>_face_tid_mid.txt      <image> <template id> <media id>
    root/meta/<t>_template_pair_label.txt  <template 1> <template 2> <1 same person / 0>
    root/loose_crop/<k>.jpg

Each image shows a drawn face (skin ellipse, eyes, nose, mouth; colours and sizes per subject)
rendered directly at a random similarity pose -- scale, rotation, position in a loose crop of
random size -- by evaluating the face at every pixel's template-space position, so the 5 points
written beside it are the exact images of the ArcFace template points (plus optional noise).
Templates hold 1-3 medias of 1-3 frames; every template pair is listed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lafs_fast.eval.align import ARCFACE_TEMPLATE


def draw_face(x: np.ndarray, y: np.ndarray, look: dict) -> np.ndarray:
    """RGB float image (…, 3) in [0, 255] of a face at template coordinates (x, y) (pixels of the
    aligned 112 x 112 face, any shape), dark outside the head."""
    t = np.asarray(ARCFACE_TEMPLATE)
    img = np.zeros(x.shape + (3,)) + np.asarray(look["background"])
    head = ((x - 56) / look["head_w"]) ** 2 + ((y - 62) / look["head_h"]) ** 2 < 1
    img[head] = look["skin"]
    blob = lambda cx, cy, r: np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]  # noqa: E731
    for (cx, cy) in t[:2]:
        img = img * (1 - blob(cx, cy, look["eye"])) + blob(cx, cy, look["eye"]) * np.asarray(look["iris"])
    img = img * (1 - 0.6 * blob(*t[2], 2.5))
    for (cx, cy) in t[3:]:
        img = img * (1 - 0.8 * blob(cx, cy, 2.0)) + 0.8 * blob(cx, cy, 2.0) * np.asarray(look["lips"])
    hair = (y < 30 + 4 * np.sin(x / look["wave"])) & head
    img[hair] = look["hair"]
    return np.clip(img, 0, 255)


def random_look(rng: np.random.Generator) -> dict:
    return dict(background=rng.uniform(20, 90, 3), skin=rng.uniform(120, 230, 3), iris=rng.uniform(0, 80, 3),
                lips=rng.uniform(100, 200, 3) * [1.0, 0.5, 0.5], hair=rng.uniform(0, 120, 3),
                head_w=rng.uniform(32, 42), head_h=rng.uniform(44, 54), eye=rng.uniform(2.0, 3.5),
                wave=rng.uniform(3, 9))


def blend_looks(a: dict, b: dict, t: float) -> dict:
    """(1 - t) a + t b, entry by entry: subjects that differ by t of a random look."""
    return {k: (1 - t) * np.asarray(a[k]) + t * np.asarray(b[k]) for k in a}


def image_look(look: dict, rng: np.random.Generator) -> dict:
    """One picture of a subject: its own background and lighting."""
    light = rng.uniform(0.6, 1.3)
    out = {k: np.asarray(v) * light if k in ("skin", "iris", "lips", "hair") else v for k, v in look.items()}
    out["background"] = rng.uniform(0, 120, 3)
    return out


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    """(2, 3) matrix: template coordinates -> loose-crop pixels."""
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]])


def render(look: dict, matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (height, width, 3) loose crop showing the face placed by `matrix` (template -> crop)."""
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    return np.round(draw_face(x, y, look)).astype(np.uint8)


def random_pose(rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """A similarity pose in a loose crop of random size; the face's middle stays inside."""
    h, w = int(rng.integers(120, 260)), int(rng.integers(120, 260))
    scale, angle = rng.uniform(0.7, 1.8), rng.uniform(-30, 30)
    m = similarity(scale, angle, 0.0, 0.0)
    centre = m[:, :2] @ np.array([56.0, 62.0])
    m[:, 2] = np.array([rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h]) - centre
    return m, h, w


@dataclass
class Fixture:
    root: str
    target: str
    names: list = field(default_factory=list)
    landmarks: np.ndarray = None  # (N, 5, 2) as written
    faceness: np.ndarray = None
    templates: np.ndarray = None
    medias: np.ndarray = None
    subjects: np.ndarray = None   # subject of each face
    p1: np.ndarray = None
    p2: np.ndarray = None
    labels: np.ndarray = None


def make_ijb_fixture(root: str, target: str = "IJBC", subjects: int = 6, templates_per_subject: int = 2,
                     seed: int = 0, point_noise: float = 0.0, subject_spread: float = 0.25) -> Fixture:
    """Write the data set under root; returns what was written. Subjects differ from one common
    look by subject_spread of a random one (small: a random model confuses them)."""
    rng = np.random.default_rng(seed)
    t = target.lower()
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    os.makedirs(os.path.join(root, "loose_crop"), exist_ok=True)
    common = random_look(rng)
    looks = [blend_looks(common, random_look(rng), subject_spread) for _ in range(subjects)]
    fx = Fixture(root, target)
    rows, media_id, template_id = [], 100, 1000
    template_subject = {}
    for s in range(subjects):
        for _ in range(templates_per_subject):
            template_id += int(rng.integers(1, 5))  # ids with gaps, not 0..T-1
            template_subject[template_id] = s
            for _ in range(int(rng.integers(1, 4))):
                media_id += 1
                for _ in range(int(rng.integers(1, 4))):
                    rows.append((s, template_id, media_id))
    points, scores = [], []
    for k, (s, tid, mid) in enumerate(rows):
        m, h, w = random_pose(rng)
        name = f"{k + 1}.jpg"
        picture = render(image_look(looks[s], rng), m, h, w)
        Image.fromarray(picture).save(os.path.join(root, "loose_crop", name), quality=95)
        pts = np.asarray(ARCFACE_TEMPLATE) @ m[:, :2].T + m[:, 2] + rng.normal(0, point_noise, (5, 2))
        points.append(pts)
        scores.append(round(float(rng.uniform(0.3, 1.0)), 6))
        fx.names.append(name)
    fx.landmarks, fx.faceness = np.asarray(points), np.asarray(scores, dtype=np.float32)
    fx.subjects = np.array([r[0] for r in rows])
    fx.templates, fx.medias = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    with open(os.path.join(root, "meta", f"{t}_name_5pts_score.txt"), "w") as f:
        for name, pts, sc in zip(fx.names, fx.landmarks, fx.faceness):
            f.write(" ".join([name] + [f"{v:.4f}" for v in pts.reshape(-1)] + [f"{sc:.6f}"]) + "\n")
    fx.landmarks = np.round(fx.landmarks, 4)
    with open(os.path.join(root, "meta", f"{t}_face_tid_mid.txt"), "w") as f:
        for name, tid, mid in zip(fx.names, fx.templates, fx.medias):
            f.write(f"{name} {tid} {mid}\n")
    tids = sorted(template_subject)
    pairs = [(a, b, int(template_subject[a] == template_subject[b]))
             for i, a in enumerate(tids) for b in tids[i + 1:]]
    fx.p1, fx.p2, fx.labels = (np.array(c) for c in zip(*pairs))
    with open(os.path.join(root, "meta", f"{t}_template_pair_label.txt"), "w") as f:
        f.writelines(f"{a} {b} {lab}\n" for a, b, lab in pairs)
    return fx
