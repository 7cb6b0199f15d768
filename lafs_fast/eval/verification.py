"""Face verification metrics: flip-sum embeddings, 10-fold accuracy (insightface protocol),
ROC AUC, TAR at FAR, and a report / table.

Scores are similarities (higher = same person); a pair is predicted "same" when score > t.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..data import to_model_input

DEFAULT_FARS = (1e-3, 1e-4)


# ----------------------------------------------------------------------------- embeddings
@torch.no_grad()
def embed_with_flip(model: nn.Module, images: Tensor, batch_size: int = 64,
                    device: Optional[torch.device] = None) -> Tensor:
    """L2-normalised embedding(x) + embedding(hflip(x)) for uint8 (or [-1, 1] float) images
    (M, 3, H, W), in eval mode (the model's mode is restored), float32 on the CPU."""
    if images.dim() != 4:
        raise ValueError(f"images must be (M, C, H, W), got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = to_model_input(images[i:i + batch_size].to(device))
            e = model(x).float() + model(torch.flip(x, dims=[3])).float()
            out.append(torch.nn.functional.normalize(e, dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def cosine_scores(emb1: Tensor, emb2: Tensor) -> np.ndarray:
    """Row-wise cosine similarity of two (n, D) embedding sets."""
    if emb1.shape != emb2.shape:
        raise ValueError(f"emb1 {tuple(emb1.shape)} and emb2 {tuple(emb2.shape)} differ")
    a = torch.nn.functional.normalize(torch.as_tensor(emb1).double(), dim=1)
    b = torch.nn.functional.normalize(torch.as_tensor(emb2).double(), dim=1)
    return (a * b).sum(1).numpy()


def pair_scores(embeddings: Tensor, idx1: Sequence[int], idx2: Sequence[int]) -> np.ndarray:
    """Cosine scores of pairs (idx1[k], idx2[k]) of one embedding table (cosine_scores' numbers).

    The rows the pairs use are normalised once (float64), then the pairs are scored in chunks of
    ~256 k values (cache-sized; 9x faster than 16 M here): gathering both rows of every pair at
    once took 6.8 GB and ~30 s for the raw-pixel floor (4,950 ORL pairs x 37,632 pixels). Row-wise
    dots, not a Gram matrix: equal rows give exactly equal scores (a BLAS product rounds by
    position, which would break the ties of, say, a collapsed model's embeddings)."""
    i1, i2 = torch.as_tensor(np.asarray(idx1)), torch.as_tensor(np.asarray(idx2))
    if i1.shape != i2.shape or i1.dim() != 1:
        raise ValueError(f"idx1 {tuple(i1.shape)} and idx2 {tuple(i2.shape)} must be equal 1-D")
    emb = torch.as_tensor(embeddings)
    used, inv = torch.unique(torch.cat([i1, i2]), return_inverse=True)
    e = torch.nn.functional.normalize(emb[used].double(), dim=1)
    chunk = max(1, 2**18 // max(1, e.shape[1]))
    a, b = inv[:len(i1)].split(chunk), inv[len(i1):].split(chunk)
    return torch.cat([(e[x] * e[y]).sum(1) for x, y in zip(a, b)] + [e.new_zeros(0)]).numpy()


# ----------------------------------------------------------------------------- metrics
def _check(scores, is_same) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(is_same).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and is_same ({y.size}) differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    return s, y


def best_threshold(scores, is_same) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `score > threshold`, exactly (every cut
    between distinct scores is tried; the lowest best one wins)."""
    s, y = _check(scores, is_same)
    if s.size == 0:
        raise ValueError("no pairs")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # k = number of pairs predicted "different" (the k lowest); only cuts between distinct values
    neg_below = np.concatenate(([0], np.cumsum(~y)))
    pos_above = y.sum() - np.concatenate(([0], np.cumsum(y)))
    correct = neg_below + pos_above
    valid = np.ones(s.size + 1, dtype=bool)
    valid[1:-1] = s[1:] > s[:-1]
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        t = s[0] - 1.0
    elif k == s.size:
        t = s[-1] + 1.0
    else:
        t = 0.5 * (s[k - 1] + s[k])
    return float(t), float(correct[k]) / s.size


def kfold_accuracy(scores, is_same, n_folds: int = 10) -> dict:
    """insightface protocol: contiguous folds (the .bin files order pairs by fold); for each,
    the best threshold on the other folds is applied to it. Returns mean, std, per-fold
    accuracies and thresholds."""
    s, y = _check(scores, is_same)
    if n_folds < 2:
        raise ValueError(f"n_folds (--folds) must be >= 2 (one fold to test, the rest to pick the "
                         f"threshold), got {n_folds}")
    if s.size < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 pairs, this set has {s.size}")
    if n_folds > s.size:
        raise ValueError(f"{n_folds}-fold accuracy needs at least {n_folds} pairs, this set has {s.size} "
                         f"(use fewer folds: --folds / n_folds between 2 and {s.size})")
    folds = np.array_split(np.arange(s.size), n_folds)
    accs, ths = [], []
    for f in folds:
        train = np.ones(s.size, dtype=bool)
        train[f] = False
        t, _ = best_threshold(s[train], y[train])
        accs.append(float(np.mean((s[f] > t) == y[f])))
        ths.append(t)
    return dict(mean=float(np.mean(accs)), std=float(np.std(accs)), folds=accs, thresholds=ths)


def roc_auc(scores, is_same) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic; ties count one half."""
    s, y = _check(scores, is_same)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both genuine and impostor pairs")
    order = np.argsort(s, kind="stable")
    ss = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average 1-based rank over each group of tied scores
    starts = np.flatnonzero(np.concatenate(([True], ss[1:] != ss[:-1])))
    ends = np.concatenate((starts[1:], [s.size]))
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tar_at_far(scores, is_same, fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """TAR at each FAR: threshold t = the (floor(FAR * n_imp) + 1)-th highest impostor score,
    accept when score > t, so at most FAR * n_imp impostors pass. With n_imp impostor pairs a
    FAR below 1 / n_imp cannot be resolved (t = the highest impostor score, actual FAR 0):
    such entries carry resolvable=False."""
    s, y = _check(scores, is_same)
    gen, imp = s[y], np.sort(s[~y])[::-1]
    if gen.size == 0 or imp.size == 0:
        raise ValueError("tar_at_far needs both genuine and impostor pairs")
    out = {}
    for far in fars:
        if not 0 < far <= 1:
            raise ValueError(f"fars must lie in (0, 1], got {far}")
        k = int(np.floor(far * imp.size + 1e-9))  # allowed false accepts
        t = float(imp[k]) if k < imp.size else float(imp[-1]) - 1.0
        out[far] = dict(tar=float(np.mean(gen > t)), threshold=t,
                        far_actual=float(np.mean(imp > t)), resolvable=far * imp.size >= 1)
    return out


def verification_report(scores, is_same, fars: Sequence[float] = DEFAULT_FARS,
                        n_folds: int = 10) -> dict:
    """Accuracy (k-fold mean / std), best overall threshold, AUC and TAR@FAR in one dict."""
    s, y = _check(scores, is_same)
    acc = kfold_accuracy(s, y, n_folds)
    t, best = best_threshold(s, y)
    return dict(n_genuine=int(y.sum()), n_impostor=int((~y).sum()),
                accuracy=acc["mean"], accuracy_std=acc["std"], fold_thresholds=acc["thresholds"],
                best_threshold=t, best_accuracy=best, auc=roc_auc(s, y),
                far_resolution=1.0 / max(int((~y).sum()), 1), tar_at_far=tar_at_far(s, y, fars))


def format_table(reports: Mapping[str, dict]) -> str:
    """A plain-text table, one row per named report."""
    fars = sorted({f for r in reports.values() for f in r["tar_at_far"]}, reverse=True)
    head = ["set", "pairs", "acc % (+- std)", "AUC"] + [f"TAR@{f:g}" for f in fars]
    rows = []
    for name, r in reports.items():
        row = [name, f"{r['n_genuine']}+{r['n_impostor']}",
               f"{100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f}", f"{r['auc']:.4f}"]
        for f in fars:
            e = r["tar_at_far"].get(f)
            row.append("-" if e is None else f"{100 * e['tar']:.2f}" + ("" if e["resolvable"] else "*"))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    text = "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])
    if any(not e["resolvable"] for r in reports.values() for e in r["tar_at_far"].values()):
        text += "\n* FAR below 1 / (impostor pairs): not resolvable with this many pairs"
    return text


def print_table(reports: Mapping[str, dict]) -> None:
    print(format_table(reports))


def evaluate_pairs(model: nn.Module, images: Tensor, idx1, idx2, is_same,
                   fars: Sequence[float] = DEFAULT_FARS, batch_size: int = 64,
                   n_folds: int = 10) -> dict:
    """Embed every image the pairs use once (flip-sum), score the pairs, report. (The held-out
    ORL pairs use 100 of the 400 images passed: embedding all of them cost 4x.)"""
    i1, i2 = np.asarray(idx1).reshape(-1), np.asarray(idx2).reshape(-1)
    used, inv = np.unique(np.concatenate([i1, i2]), return_inverse=True)
    emb = embed_with_flip(model, images[torch.as_tensor(used)], batch_size)
    return verification_report(pair_scores(emb, inv[:len(i1)], inv[len(i1):]), is_same, fars, n_folds)
