"""IJB-B / IJB-C 1:1 template verification (the insightface protocol).

Per-image features are the flip sum (embedding(x) + embedding(hflip(x))), optionally scaled
by the detector (faceness) score; within a template the images of one media (video) are
averaged, the media features are summed, and the template feature is L2-normalised. Template
pairs are scored by cosine similarity; the headline is TAR at FAR = 1e-4.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .verification import roc_auc, tar_at_far

IJB_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def read_template_media_list(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`<image> <template id> <media id>` lines -> (templates, medias)."""
    meta = np.loadtxt(path, dtype=str, ndmin=2)
    return meta[:, 1].astype(np.int64), meta[:, 2].astype(np.int64)


def read_template_pair_list(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`<template 1> <template 2> <label>` lines -> (p1, p2, label)."""
    pairs = np.loadtxt(path, dtype=str, ndmin=2)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), pairs[:, 2].astype(np.int64)


def template_features(img_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      faceness: Optional[np.ndarray] = None,
                      normalize_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """-> (L2-normalised template features (T, D), sorted unique template ids (T,)).
    normalize_images L2-normalises image features first (insightface keeps the norm: N0)."""
    f = np.asarray(img_feats, dtype=np.float64)
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
    # one group per (template, media): mean inside it, then sum the groups of a template
    tm = np.stack([t_inv, medias], axis=1)
    uniq_tm, tm_inv = np.unique(tm, axis=0, return_inverse=True)
    tm_inv = tm_inv.reshape(-1)
    media_sum = np.zeros((len(uniq_tm), f.shape[1]))
    np.add.at(media_sum, tm_inv, f)
    media_feat = media_sum / np.bincount(tm_inv, minlength=len(uniq_tm))[:, None]
    tfeat = np.zeros((len(uniq_t), f.shape[1]))
    np.add.at(tfeat, uniq_tm[:, 0], media_feat)
    tfeat /= np.maximum(np.linalg.norm(tfeat, axis=1, keepdims=True), 1e-12)
    return tfeat, uniq_t


def template_pair_scores(tfeat: np.ndarray, unique_templates: np.ndarray, p1, p2) -> np.ndarray:
    """Cosine scores of template pairs (ids p1[k], p2[k])."""
    pos = np.searchsorted(unique_templates, p1), np.searchsorted(unique_templates, p2)
    for ids, idx in zip((p1, p2), pos):
        ids = np.asarray(ids)
        bad = (idx >= len(unique_templates)) | (unique_templates[np.minimum(idx, len(unique_templates) - 1)] != ids)
        if bad.any():
            raise ValueError(f"template id {ids[bad][0]} of the pair list has no images")
    return np.sum(tfeat[pos[0]] * tfeat[pos[1]], axis=1)


def ijb_evaluation(img_feats: np.ndarray, templates, medias, p1, p2, labels,
                   faceness: Optional[np.ndarray] = None, fars: Sequence[float] = IJB_FARS,
                   normalize_images: bool = False,
                   flipped_feats: Optional[np.ndarray] = None) -> dict:
    """Full 1:1 protocol from per-image features (add ``flipped_feats`` to flip-sum here).
    Returns scores, AUC and TAR at each FAR."""
    f = np.asarray(img_feats, dtype=np.float64)
    if flipped_feats is not None:
        f = f + np.asarray(flipped_feats, dtype=np.float64)
    tfeat, uniq = template_features(f, templates, medias, faceness, normalize_images)
    scores = template_pair_scores(tfeat, uniq, np.asarray(p1), np.asarray(p2))
    labels = np.asarray(labels).astype(bool)
    return dict(scores=scores, auc=roc_auc(scores, labels), tar_at_far=tar_at_far(scores, labels, fars),
                n_genuine=int(labels.sum()), n_impostor=int((~labels).sum()))
