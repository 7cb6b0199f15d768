"""Inputs the library refuses with a message saying what it expects: images of another size than
the model's, and more accuracy folds than pairs."""
import numpy as np
import pytest
import torch

from lafs_fast.eval.verification import kfold_accuracy, verification_report
from lafs_fast.models import create_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("part_fvit_tiny", depth=1).eval()


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (2, 3, 112, 96), (1, 3, 56, 56)])
def test_an_image_of_another_size_is_refused(model, shape):
    with pytest.raises(ValueError, match=rf"this model embeds 112 x 112 faces, got {shape[2]} x {shape[3]} "
                                         r"images .*resize \(or align and crop\) them to 112 x 112 first"):
        model(torch.zeros(shape))


def test_the_right_size_and_explicit_landmarks_are_accepted(model):
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 112, 112)).shape == (2, model.dim)
        # given landmarks, the patches are cut from any image size (the landmarks' own pixels)
        lm = torch.rand(1, model.num_landmarks, 2) * 200
        assert model(torch.zeros(1, 3, 224, 224), landmarks=lm).shape == (1, model.dim)


def test_fewer_pairs_than_folds_says_how_many_folds_fit():
    rng = np.random.default_rng(0)
    scores, same = rng.normal(size=7), np.arange(7) % 2 == 0
    with pytest.raises(ValueError, match=r"^10-fold accuracy needs at least 10 pairs, this set has 7 "
                                         r"\(use fewer folds: --folds / n_folds between 2 and 7\)$"):
        verification_report(scores, same)
    assert len(verification_report(scores, same, n_folds=7)["fold_thresholds"]) == 7
    with pytest.raises(ValueError, match="needs at least 2 pairs, this set has 1"):
        kfold_accuracy(scores[:1], same[:1], n_folds=2)
