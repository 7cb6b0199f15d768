"""Verification reports and their printed table (found by mutation testing, docs/mutation.md):
the defaults a user gets, the resolution of TAR@FAR, and the table the eval command prints."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from lafs_fast.eval.verification import cosine_scores, evaluate_pairs, format_table, verification_report


def _scores(n=20):
    y = np.array([True, False] * (n // 2))
    s = np.where(y, 0.9, 0.1) + np.linspace(0, 0.01, n)
    return s, y


def test_ten_folds_by_default():
    s, y = _scores()
    assert len(verification_report(s, y)["fold_thresholds"]) == 10
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).repeat(1, 3, 2, 2)
    pairs1, pairs2 = list(range(0, 20, 2)) * 2, list(range(1, 20, 2)) * 2
    r = evaluate_pairs(nn.Flatten(), images, pairs1, pairs2, y)
    assert len(r["fold_thresholds"]) == 10


def test_far_resolution_with_one_impostor_is_one():
    r = verification_report([0.9, 0.8, 0.1], [True, True, False], n_folds=3)
    assert r["far_resolution"] == 1.0 and r["n_impostor"] == 1


def test_cosine_scores_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"emb1 \(2, 3\) and emb2 \(3, 3\) differ"):
        cosine_scores(torch.ones(2, 3), torch.ones(3, 3))


def test_table_columns_values_and_footnote():
    s, y = _scores()
    a = verification_report(s, y, fars=(1e-1, 1e-2))       # 1e-2 < 1/10 impostors: not resolvable
    b = verification_report(s, y, fars=(1e-1,))
    lines = format_table({"lfw": a, "cfp_fp": b}).splitlines()
    head = lines[0].split()
    assert head[:2] == ["set", "pairs"] and head[-3:] == ["AUC", "TAR@0.1", "TAR@0.01"]  # FARs descending
    assert set(lines[1]) == {"-", " "}
    lfw, cfp = lines[2].split(), lines[3].split()
    assert lfw[:5] == ["lfw", "10+10", "100.00", "+-", "0.00"] and lfw[5] == "1.0000"
    assert lfw[6] == "100.00" and lfw[7] == "100.00*"
    assert cfp[0] == "cfp_fp" and cfp[-1] == "-"            # a FAR this set was not scored at
    # columns aligned: each value starts where its header does
    for col in ("pairs", "AUC", "TAR@0.1", "TAR@0.01"):
        start = lines[0].index(col)
        assert lines[2][start - 1] == " " and lines[2][start] != " "
    assert lines[4] == "* FAR below 1 / (impostor pairs): not resolvable with this many pairs"
    assert len(lines) == 5


def test_best_threshold_cuts_only_between_distinct_scores():
    from lafs_fast.eval.verification import best_threshold
    assert best_threshold([0.1, 0.9], [False, True]) == (0.5, 1.0)
    # anti-correlated: the lowest best cut is below every score (accept all: half right)
    t, acc = best_threshold([0.1, 0.9], [True, False])
    assert t < 0.1 and acc == 0.5
    # a cut inside the tie at 0.5 would split equal scores: not allowed
    assert best_threshold([0.1, 0.5, 0.5], [False, False, True]) == (pytest.approx(0.3), pytest.approx(2 / 3))


def test_tar_at_far_bounds_and_resolution():
    from lafs_fast.eval.verification import tar_at_far
    s = [0.9, 0.8] + [0.1 * i for i in range(10)]
    y = [True, True] + [False] * 10
    r = tar_at_far(s, y, fars=(1.0, 0.1))
    assert r[1.0]["far_actual"] == 1.0 and r[1.0]["threshold"] < 0.0     # FAR 1: every impostor passes
    assert r[0.1]["resolvable"] and r[0.1]["far_actual"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"fars must lie in \(0, 1\], got 1.5"):
        tar_at_far(s, y, fars=(1.5,))
    with pytest.raises(ValueError, match="tar_at_far needs both genuine and impostor pairs"):
        tar_at_far([0.9, 0.8], [True, True])


def test_errors_say_what_is_wrong():
    from lafs_fast.eval.verification import best_threshold, kfold_accuracy, roc_auc
    with pytest.raises(ValueError, match=r"^scores contain NaN or inf$"):
        verification_report([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match=r"^no pairs$"):
        best_threshold([], [])
    with pytest.raises(ValueError, match=r"^k-fold accuracy needs at least 2 pairs, this set has 1$"):
        kfold_accuracy([0.5], [True])
    with pytest.raises(ValueError, match=r"^roc_auc needs both genuine and impostor pairs$"):
        roc_auc([0.5, 0.6], [True, True])


def test_scores_as_a_column_are_read_as_a_list():
    s, y = _scores()
    flat = verification_report(s, y)
    col = verification_report(s.reshape(-1, 1), y.reshape(-1, 1))
    assert col["accuracy"] == flat["accuracy"] and col["best_threshold"] == flat["best_threshold"]
