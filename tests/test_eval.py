"""Evaluation: metrics on hand-computed cases, flip embeddings, .bin reader, IJB templates."""
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from lafs_fast.eval import (
    best_threshold,
    cosine_scores,
    embed_with_flip,
    evaluate_pairs,
    format_table,
    ijb_evaluation,
    kfold_accuracy,
    load_bin,
    pair_scores,
    roc_auc,
    tar_at_far,
    template_features,
    verification_report,
    write_bin,
)


def test_perfect_separation():
    s = np.r_[np.linspace(0.6, 0.9, 40), np.linspace(-0.2, 0.2, 60)]
    y = np.r_[np.ones(40), np.zeros(60)].astype(bool)
    perm = np.random.default_rng(0).permutation(100)
    r = verification_report(s[perm], y[perm], fars=(1e-1, 1e-3))
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0 and r["auc"] == 1.0
    assert r["tar_at_far"][1e-1]["tar"] == 1.0 and r["tar_at_far"][1e-1]["resolvable"]
    assert not r["tar_at_far"][1e-3]["resolvable"]  # 60 impostors: FAR 1e-3 not resolvable
    assert r["far_resolution"] == pytest.approx(1 / 60)
    assert "TAR@0.1" in format_table({"toy": r})


def test_hand_made_six_pairs():
    s = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]
    y = [1, 1, 0, 1, 0, 0]
    # genuine > impostor in 8 of 9 (genuine, impostor) combinations
    assert roc_auc(s, y) == pytest.approx(8 / 9)
    t, acc = best_threshold(s, y)
    assert acc == pytest.approx(5 / 6) and 0.2 < t < 0.3  # lowest of the best cuts
    assert roc_auc([0.5] * 4, [1, 0, 1, 0]) == 0.5  # ties count one half
    assert roc_auc([0.5, 0.5, 0.9], [1, 0, 1]) == pytest.approx(0.75)


def test_kfold_uses_other_folds():
    # two folds: fold 0 is separable at 0.5, fold 1 at 0.0; each is tested with the other's cut
    s = np.array([0.6, 0.4, 0.55, 0.45, 0.1, -0.1, 0.45, -0.45])
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0], dtype=bool)
    r = kfold_accuracy(s, y, n_folds=2)
    assert r["thresholds"][0] == pytest.approx(0.0) and r["thresholds"][1] == pytest.approx(0.5)
    assert r["folds"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="n_folds"):
        kfold_accuracy(s, y, n_folds=1)


def test_tar_at_far_threshold_from_impostors():
    imp = np.arange(1000) / 1000.0  # 0.000 .. 0.999
    gen = np.array([0.9985, 0.9975, 0.5, 0.99])
    s, y = np.r_[gen, imp], np.r_[np.ones(4), np.zeros(1000)].astype(bool)
    r = tar_at_far(s, y, fars=(1e-3, 1e-2))
    assert r[1e-3]["threshold"] == pytest.approx(0.998)  # one impostor (0.999) may pass
    assert r[1e-3]["tar"] == pytest.approx(0.25) and r[1e-3]["far_actual"] == pytest.approx(1e-3)
    assert r[1e-2]["threshold"] == pytest.approx(0.989) and r[1e-2]["tar"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        tar_at_far(s, y, fars=(0.0,))


class Linear1(nn.Module):
    """embedding = (sum of the left half, sum of the right half) of channel 0."""

    def forward(self, x):
        w = x.shape[-1] // 2
        return torch.stack((x[:, 0, :, :w].sum((1, 2)), x[:, 0, :, w:].sum((1, 2))), 1)


def test_embed_with_flip():
    m = Linear1().train()
    img = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    img[0, :, :, :2] = 255  # left half white
    img[1, :, :, :] = 255
    e = embed_with_flip(m, img, batch_size=1)
    assert m.training  # mode restored
    # image 0: (8, -8) + flipped (-8, 8) = 0 -> normalize gives 0; image 1: (16, 16) -> (1, 1)/sqrt2
    torch.testing.assert_close(e[1], torch.tensor([2 ** -0.5, 2 ** -0.5]))
    assert e[0].abs().max() < 1e-6
    torch.testing.assert_close(torch.tensor(cosine_scores(e[1:], e[1:])), torch.tensor([1.0], dtype=torch.float64))


def test_bin_round_trip_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(4)]
    path = str(tmp_path / "toy.bin")
    write_bin(path, imgs, [True, False])
    x, same = load_bin(path, image_size=8)
    assert x.shape == (4, 3, 8, 8) and same.tolist() == [True, False]
    assert all(torch.equal(x[i], imgs[i]) for i in range(4))
    assert load_bin(path, image_size=16)[0].shape == (4, 3, 16, 16)
    (tmp_path / "junk.bin").write_bytes(b"definitely not a pickle")
    with pytest.raises(ValueError, match="not an insightface verification .bin"):
        load_bin(str(tmp_path / "junk.bin"))
    with open(tmp_path / "odd.bin", "wb") as f:
        pickle.dump(([b"x"] * 3, [True]), f)
    with pytest.raises(ValueError, match="need 2 per pair"):
        load_bin(str(tmp_path / "odd.bin"))
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump((torch.nn.Linear, [True]), f)
    with pytest.raises(ValueError, match="not allowed"):
        load_bin(str(tmp_path / "evil.bin"))


def test_ijb_templates_and_scores():
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    templates = np.array([10, 10, 10, 20, 30])
    medias = np.array([1, 1, 2, 5, 6])
    tf, uniq = template_features(feats, templates, medias)
    assert uniq.tolist() == [10, 20, 30]
    # template 10: media 1 mean (0.5, 0.5) + media 2 (1, 1) = (1.5, 1.5) -> normalised
    np.testing.assert_allclose(tf[0], [2 ** -0.5, 2 ** -0.5])
    np.testing.assert_allclose(tf[1], [1, 0])
    w = template_features(feats, templates, medias, faceness=np.array([1, 1, 0, 1, 1]))[0]
    np.testing.assert_allclose(w[0], [2 ** -0.5, 2 ** -0.5])  # (0.5, 0.5) alone
    w = template_features(feats, templates, medias, faceness=np.array([1, 0, 0, 1, 1]))[0]
    np.testing.assert_allclose(w[0], [1, 0])  # only image 0 counts (half of media 1's mean)
    r = ijb_evaluation(feats, templates, medias, p1=[10, 10, 20], p2=[20, 30, 30],
                       labels=[1, 1, 0], fars=(0.5,), flipped_feats=feats)
    np.testing.assert_allclose(r["scores"], [2 ** -0.5, 2 ** -0.5, 0.0])
    assert r["auc"] == 1.0 and r["tar_at_far"][0.5]["tar"] == 1.0
    with pytest.raises(ValueError, match="no images"):
        ijb_evaluation(feats, templates, medias, p1=[10], p2=[99], labels=[1])


# ----------------------------------------------------------------------------- evaluate_pairs, raw pixels, eval
def test_evaluate_pairs_on_constructed_embeddings():
    """Genuine pairs are the same picture (score 1), impostors different random pictures, and
    one extra pair is a picture and its negative (score -1): AUC and accuracy are known."""
    g = torch.Generator().manual_seed(0)
    people = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8, generator=g)
    images = torch.cat([people.repeat_interleave(2, 0), 255 - people[:1]])   # 2k, 2k+1: person k; 10: -person 0
    genuine = [(2 * k, 2 * k + 1) for k in range(5)]
    impostor = [(2 * j, 2 * k) for j in range(5) for k in range(j + 1, 5)]
    # interleaved, so that each of the 2 contiguous accuracy folds holds both kinds
    pairs = [p for k in range(5) for p in (genuine[k], impostor[k])] + impostor[5:] + [(0, 10)]
    i1, i2 = [p[0] for p in pairs], [p[1] for p in pairs]
    model = nn.Flatten()   # embedding = the pixels (+ their mirror image: flip-sum)
    right = np.array([True, False] * 5 + [False] * 6)
    r = evaluate_pairs(model, images, i1, i2, right, n_folds=2)
    assert (r["n_genuine"], r["n_impostor"]) == (5, 11)
    assert r["auc"] == 1.0 and r["accuracy"] == 1.0 and r["best_accuracy"] == 1.0
    assert r["tar_at_far"][1e-3]["tar"] == 1.0
    # the negative pair labelled genuine: it scores lowest of all (-1), below all 10 impostors
    wrong = right.copy()
    wrong[-1] = True
    r = evaluate_pairs(model, images, i1, i2, wrong, n_folds=2)
    assert r["auc"] == pytest.approx(5 * 10 / (6 * 10))
    assert r["best_accuracy"] == pytest.approx(15 / 16)


@pytest.mark.parametrize("n_rows", [6, 300])   # few rows, many pairs (one Gram matrix) / row-wise
def test_pair_scores_equal_cosine_of_the_pairs(n_rows):
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(n_rows, 40, generator=g)
    i1, i2 = torch.randint(0, n_rows, (2, 200), generator=g)
    want = cosine_scores(emb[i1], emb[i2])
    np.testing.assert_allclose(pair_scores(emb, i1.numpy(), i2.numpy()), want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="must be equal"):
        pair_scores(emb, [0, 1], [1])


def fake_orl(held_out_noise):
    """400 'ORL' images: subject s's 10 pictures are one random face plus per-picture noise."""
    g = torch.Generator().manual_seed(1)
    faces = torch.rand(40, 1, 3, 8, 8, generator=g) * 200 + 20
    noise = torch.randn(40, 10, 3, 8, 8, generator=g) * held_out_noise
    images = (faces + noise).clamp(0, 255).round().to(torch.uint8).reshape(400, 3, 8, 8)
    return images, torch.arange(40).repeat_interleave(10)


def test_raw_pixel_orl_on_constructed_faces(monkeypatch):
    from lafs_fast import data as D
    from lafs_fast.eval.orl import raw_pixel_orl
    monkeypatch.setattr(D, "load_orl", lambda: fake_orl(3.0))   # subjects far apart, pictures close
    r = raw_pixel_orl()
    assert (r["n_genuine"], r["n_impostor"]) == (450, 4500)
    assert r["auc"] == 1.0 and r["accuracy"] == 1.0
    # every picture the same: no information; AUC 0.5 (ties), accuracy = the impostor share
    monkeypatch.setattr(D, "load_orl", lambda: (torch.full((400, 3, 8, 8), 77, dtype=torch.uint8),
                                                torch.arange(40).repeat_interleave(10)))
    r = raw_pixel_orl()
    assert r["auc"] == 0.5 and r["tar_at_far"][1e-3]["tar"] == 0.0
    assert r["accuracy"] == pytest.approx(4500 / 4950)


def test_raw_pixel_orl_is_the_readme_floor():
    """The README's raw-pixel row (its Results table) (held-out ORL): 95.52 +- 0.67 %, AUC 0.9269, TAR@1e-3 52.0 %."""
    from lafs_fast.eval.orl import raw_pixel_orl
    r = raw_pixel_orl()
    assert (r["n_genuine"], r["n_impostor"]) == (450, 4500)
    assert round(100 * r["accuracy"], 2) == 95.52 and round(100 * r["accuracy_std"], 2) == 0.67
    assert round(r["auc"], 4) == 0.9269 and round(100 * r["tar_at_far"][1e-3]["tar"], 1) == 52.0


@pytest.mark.slow  # ORL held-out embeddings with a Part fViT (~5-10 s)
def test_eval_command_prints_and_writes_the_table(tmp_path, capsys):
    """`python -m lafs_fast.train eval --checkpoint model.pt --bins toy.bin`: the ORL held-out
    pairs and a .bin whose genuine pairs are the same picture twice (AUC 1 for any model)."""
    import json

    from lafs_fast.convert import save_model
    from lafs_fast.models import create_model
    from lafs_fast.train.__main__ import main as cli_main
    torch.manual_seed(0)
    ckpt = tmp_path / "model.pt"
    save_model(create_model("part_fvit_tiny"), str(ckpt))
    g = torch.Generator().manual_seed(2)
    pics = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(30)]
    images, same = [], []
    for k in range(10):   # genuine: one picture twice; impostor: two different pictures
        images += [pics[k], pics[k], pics[10 + k], pics[20 + k]]
        same += [True, False]
    write_bin(str(tmp_path / "toy.bin"), images, same)
    reports = cli_main(["eval", "--checkpoint", str(ckpt), "--bins", str(tmp_path / "toy.bin"),
                        "--device", "cpu", "--batch-size", "50"])
    out = capsys.readouterr().out
    assert "ORL held-out" in out and "toy.bin" in out and "AUC" in out and "model.eval.json" in out
    written = json.loads((tmp_path / "model.eval.json").read_text())
    assert set(written) == {"ORL held-out", "toy.bin"} == set(reports)
    assert (written["ORL held-out"]["n_genuine"], written["ORL held-out"]["n_impostor"]) == (450, 4500)
    assert 0.0 <= written["ORL held-out"]["auc"] <= 1.0
    assert written["toy.bin"]["n_genuine"] == 10 and written["toy.bin"]["auc"] == 1.0
    assert f"{written['toy.bin']['auc']:.4f}" in out


def test_evaluate_pairs_embeds_only_the_images_the_pairs_use():
    seen = []

    class Count(nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x.flatten(1)

    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8, generator=g)
    i1, i2, same = [9, 2, 9, 5], [2, 7, 5, 7], np.array([True, False, True, False])
    r = evaluate_pairs(Count(), images, i1, i2, same, n_folds=2, batch_size=64)
    assert sum(seen) == 2 * 4   # images 2, 5, 7, 9, each plain and mirrored
    emb = embed_with_flip(nn.Flatten(), images)
    want = verification_report(pair_scores(emb, i1, i2), same, n_folds=2)
    assert r["auc"] == want["auc"] and r["accuracy"] == want["accuracy"]
