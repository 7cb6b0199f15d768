"""python -m lafs_fast.eval ijb on a synthetic IJB-shaped set (tests/ijb_fixture.py), in seconds.

- The aggregation (media mean, template sum, norm and detector-score modes, unreadable faces left
  out) against values worked out by hand.
- The nearest_roc_point TARs of results.json equal the release's evaluation re-stated here from
  its description (IJB_evaluation.py: image2template_feature, verification, and the ROC point
  whose FPR is nearest each target, read off sklearn's roc_curve) on the run's own features.npy
  and faceness.npy; the strict TARs equal tar_at_far on scores.npy.
- features.npy rows equal an independent embedding of each face (whole image decoded, aligned by
  align_faces, 8-bit, flip sum); an interrupted run continues where it stopped and ends with the
  features of an uninterrupted one; a missing or corrupt image is named, counted, left out of
  its template, and shifts no row.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from ijb_fixture import make_ijb_fixture
from PIL import Image

from lafs_fast.checkpoint import _release_name
from lafs_fast.convert import save_model
from lafs_fast.eval import ijb
from lafs_fast.eval.__main__ import main
from lafs_fast.eval.align import align_faces
from lafs_fast.eval.verification import tar_at_far
from lafs_fast.models import create_model

FARS = ("1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1")


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ijb") / "IJBC")
    return make_ijb_fixture(root, "IJBC", subjects=8, templates_per_subject=3, seed=0)


@pytest.fixture(scope="module")
def ijbc_run(ijbc, tiny_model_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "out")
    assert main(["ijb", "--root", ijbc.root, "--target", "IJBC", "--checkpoint", tiny_model_file[0], "--out", out,
                 "--batch-size", "16", "--workers", "2", "--device", "cpu"]) == 0
    return out


def load(out, name):
    return np.load(os.path.join(out, name))


# ----------------------------------------------------------------------------- the release, re-stated
def release_template_features(img_feats, templates, medias):
    """image2template_feature: per template, the mean feature of each media, summed over the
    template's medias; the sums L2-normalised (a zero sum stays zero)."""
    uniq = np.unique(templates)
    out = np.zeros((len(uniq), img_feats.shape[1]))
    for row, t in enumerate(uniq):
        mine = templates == t
        feats, meds = img_feats[mine], medias[mine]
        out[row] = np.sum([feats[meds == m].mean(axis=0) for m in np.unique(meds)], axis=0)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm == 0, 1, norm), uniq


def release_scores(tfeat, uniq, p1, p2):
    """verification: cosine of the two templates' normalised features, via a template-id table."""
    row_of = {t: r for r, t in enumerate(uniq)}
    return np.array([tfeat[row_of[a]] @ tfeat[row_of[b]] for a, b in zip(p1, p2)])


def sklearn_roc(labels, scores):
    """sklearn.metrics.roc_curve(labels, scores) as documented: thresholds = the distinct scores,
    highest first; a point (fp, tp) counts pairs with score >= threshold; points whose both
    counts continue a straight run (second differences zero) are dropped; (0, 0) goes first."""
    pts = []
    for t in sorted(set(scores.tolist()), reverse=True):
        accepted = scores >= t
        pts.append((int((accepted & (labels == 0)).sum()), int((accepted & (labels == 1)).sum())))
    keep = [pts[0]] + [pts[i] for i in range(1, len(pts) - 1)
                       if pts[i + 1][0] - 2 * pts[i][0] + pts[i - 1][0] != 0
                       or pts[i + 1][1] - 2 * pts[i][1] + pts[i - 1][1] != 0] + ([pts[-1]] if len(pts) > 1 else [])
    keep = [(0, 0)] + keep
    fp, tp = np.array(keep, dtype=np.float64).T
    return fp / fp[-1], tp / tp[-1]


def release_nearest_tar(labels, scores, x_labels):
    """The table rows: curve reversed, then for each target the point of least |fpr - target|,
    ties to the lower index of the reversed curve."""
    fpr, tpr = sklearn_roc(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = []
    for x in x_labels:
        _, k = min(zip(np.abs(fpr - x), range(len(fpr))))
        out.append(tpr[k])
    return out


def release_evaluation(features, faceness, templates, medias, p1, p2, labels, norm_score=True,
                       detector_score=True, fars=tuple(float(f) for f in FARS)):
    f = features.astype(np.float32)
    if not norm_score:
        f = f / np.sqrt(np.sum(f ** 2, -1, keepdims=True))
    if detector_score:
        f = f * faceness.astype(np.float32)[:, None]
    tfeat, uniq = release_template_features(f, templates, medias)
    s = release_scores(tfeat, uniq, p1, p2)
    return s, release_nearest_tar(labels, s, fars)


# ----------------------------------------------------------------------------- aggregation by hand
def hand_meta():
    return ijb.IJBMeta(names=[f"{i}.jpg" for i in range(6)], landmarks=np.zeros((6, 5, 2)),
                       faceness=np.float32([0.5, 1.0, 2.0, 1.0, 1.0, 1.0]),
                       templates=np.array([10, 10, 10, 20, 20, 30]), medias=np.array([1, 1, 2, 3, 3, 4]),
                       p1=np.array([10, 10, 20]), p2=np.array([20, 30, 30]), labels=np.array([1, 0, 0]))


@pytest.mark.parametrize("norm_score,detector_score,t10", [
    # template 10: media 1 = images 0 and 1 (averaged), media 2 = image 2; the two summed
    (True, True, [(0.5 * 2 + 0) / 2 + 2.0 * 1, (0 + 4) / 2 + 2.0 * 1]),           # (2.5, 4)
    (True, False, [(2 + 0) / 2 + 1, (0 + 4) / 2 + 1]),                            # (2, 3)
    (False, True, [(0.5 * 1 + 0) / 2 + 2.0 * 2 ** -0.5, (0 + 1) / 2 + 2.0 * 2 ** -0.5]),
    (False, False, [(1 + 0) / 2 + 2 ** -0.5, (0 + 1) / 2 + 2 ** -0.5]),
])
def test_aggregation_by_hand(norm_score, detector_score, t10):
    """Image 4 (in template 20) and image 5 (all of template 30) are unreadable: left out, so
    template 20 is image 3 alone, (3, 4) -> (0.6, 0.8), and template 30 scores 0."""
    feats = np.float32([[2, 0], [0, 4], [1, 1], [3, 4], [5, 5], [1, 0]])
    valid = np.array([True, True, True, True, False, False])
    r = ijb.score_ijb(feats, hand_meta().faceness, valid, hand_meta(), norm_score, detector_score, fars=(0.5,))
    t10 = np.asarray(t10) / np.linalg.norm(t10)
    np.testing.assert_allclose(r["scores"], [t10 @ [0.6, 0.8], 0.0, 0.0], atol=1e-12)
    assert r["templates_without_faces"] == 1 and r["n_templates"] == 3
    assert (r["n_genuine"], r["n_impostor"]) == (1, 2)


def test_faces_of_one_media_are_averaged_not_summed():
    meta = hand_meta()
    feats = np.float32([[1, 0], [1, 0], [0, 1], [0, 1], [0, 1], [1, 0]])  # template 10: 2 x (1,0) in media 1
    r = ijb.score_ijb(feats, meta.faceness, np.ones(6, bool), meta, True, False, fars=(0.5,))
    # media 1 -> (1, 0), media 2 -> (0, 1): template 10 along (1, 1), template 20 along (0, 1)
    np.testing.assert_allclose(r["scores"][0], 2 ** -0.5, atol=1e-12)


# ----------------------------------------------------------------------------- TAR conventions
def test_nearest_roc_point_equals_release_restatement():
    rng = np.random.default_rng(0)
    x_labels = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8]
    differs = 0
    for trial in range(60):
        n = int(rng.integers(5, 300))
        labels = rng.integers(0, 2, n)
        labels[:2] = (0, 1)
        scores = rng.normal(size=n) + labels * rng.uniform(0, 3)
        if trial % 2:
            scores = np.round(scores, 1)  # ties, and straight runs for drop_intermediate
        got = ijb.tar_at_far_nearest(scores, labels, x_labels)
        assert [got[x]["tar"] for x in x_labels] == release_nearest_tar(labels, scores, x_labels)
        strict = tar_at_far(scores, labels, x_labels)
        differs += sum(got[x]["tar"] != strict[x]["tar"] for x in x_labels)
    assert differs > 0  # the two conventions are different readings of one curve


def test_nearest_roc_point_can_sit_above_the_target():
    """10 impostors, scores interleaved with 3 genuine ones. The curve has two points at FPR 0.1
    (TPR 0.25 and 0.5): the reading takes the larger. FAR 0.16 is nearer FPR 0.2 than 0.1, so the
    nearest point accepts 2 impostors (above the target); the strict reading accepts 1."""
    labels = np.array([1] * 4 + [0] * 10)
    scores = np.array([0.95, 0.85, 0.75, 0.05] + [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    near = ijb.tar_at_far_nearest(scores, labels, (0.14, 0.16))
    assert (near[0.14]["fpr"], near[0.14]["tar"], near[0.14]["threshold"]) == (0.1, 0.5, 0.85)
    assert (near[0.16]["fpr"], near[0.16]["tar"], near[0.16]["threshold"]) == (0.2, 0.75, 0.75)
    strict = tar_at_far(scores, labels, (0.16,))[0.16]
    assert (strict["far_actual"], strict["tar"]) == (0.1, 0.5)


# ----------------------------------------------------------------------------- the command
def test_command_writes_outputs_and_matches_the_release(ijbc, ijbc_run):
    out, n = ijbc_run, len(ijbc.names)
    feats, face, scores = load(out, "features.npy"), load(out, "faceness.npy"), load(out, "scores.npy")
    assert feats.shape == (n, 96) and feats.dtype == np.float32 and np.isfinite(feats).all()
    np.testing.assert_array_equal(face, ijbc.faceness)
    assert scores.shape == (len(ijbc.p1),)
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert (r["n_images"], r["n_unreadable"], r["n_pairs"], r["mode"]) == (n, 0, len(ijbc.p1), "N1D1F2")
    assert r["n_genuine"] == int(ijbc.labels.sum()) and r["n_templates"] == len(np.unique(ijbc.templates))
    assert Image.open(os.path.join(out, "roc.png")).size[0] > 100
    want_scores, want_tars = release_evaluation(feats, face, ijbc.templates, ijbc.medias, ijbc.p1, ijbc.p2,
                                                ijbc.labels)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
    assert [r["tar_at_far"]["nearest_roc_point"][f]["tar"] for f in FARS] == want_tars
    strict = tar_at_far(scores, ijbc.labels, [float(f) for f in FARS])
    assert [r["tar_at_far"]["strict"][f]["tar"] for f in FARS] == [strict[float(f)]["tar"] for f in FARS]
    assert 0.5 < r["auc"] < 1.0  # a random model on look-alike subjects: neither chance nor perfect


@pytest.mark.parametrize("norm_score,detector_score", [(False, True), (True, False), (False, False)])
def test_score_modes_match_the_release(ijbc, ijbc_run, tiny_model_file, norm_score, detector_score, tmp_path):
    """Other modes re-score the cached features (no image is embedded again)."""
    out = str(tmp_path / "out")
    shutil.copytree(ijbc_run, out)
    r = ijb.run_ijb(ijbc.root, "IJBC", tiny_model_file[0], out, workers=0, device="cpu", norm_score=norm_score,
                    detector_score=detector_score, progress=False)
    assert r["seconds"]["faces_embedded_now"] == 0
    assert r["mode"] == f"N{int(norm_score)}D{int(detector_score)}F2"
    _, want = release_evaluation(load(out, "features.npy"), load(out, "faceness.npy"), ijbc.templates,
                                 ijbc.medias, ijbc.p1, ijbc.p2, ijbc.labels, norm_score, detector_score)
    assert [r["tar_at_far"]["nearest_roc_point"][f]["tar"] for f in FARS] == want


def independent_features(model, fx, rows):
    """Each face decoded whole, aligned by align_faces, rounded to 8 bits, embedded with its mirror."""
    out = []
    for i in rows:
        img = np.asarray(Image.open(os.path.join(fx.root, "loose_crop", fx.names[i])).convert("RGB"))
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()
        face = align_faces(x, torch.from_numpy(fx.landmarks[i])[None]).round().clamp(0, 255) / 127.5 - 1
        with torch.no_grad():
            out.append((model(face) + model(torch.flip(face, dims=[3])))[0].numpy())
    return np.stack(out)


def test_features_are_the_aligned_flip_sum(ijbc, ijbc_run, tiny_model_file):
    rows = [0, 7, len(ijbc.names) - 1]
    got = load(ijbc_run, "features.npy")[rows]
    want = independent_features(tiny_model_file[1], ijbc, rows)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_interrupted_run_continues_where_it_stopped(ijbc, ijbc_run, tiny_model_file, tmp_path, monkeypatch):
    real = ijb.embed_aligned
    calls = []

    def stop_after_first_batch(model, crops, mats):
        calls.append(len(crops))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, crops, mats)

    monkeypatch.setattr(ijb, "embed_aligned", stop_after_first_batch)
    out = str(tmp_path / "out")
    args = ["ijb", "--root", ijbc.root, "--target", "IJBC", "--checkpoint", tiny_model_file[0], "--out", out,
            "--batch-size", "16", "--workers", "0", "--no-progress"]
    assert main(args) == 130
    status = load(out, "image_status.npy")
    assert (status == 1).sum() == 16 and (status[:16] == 1).all() and (status[16:] == 0).all()
    assert not os.path.exists(os.path.join(out, "results.json"))
    calls.clear()
    monkeypatch.setattr(ijb, "embed_aligned", lambda m, c, x: calls.append(len(c)) or real(m, c, x))
    assert main(args) == 0
    assert sum(calls) == len(ijbc.names) - 16  # only what the first run had not done
    np.testing.assert_allclose(load(out, "features.npy"), load(ijbc_run, "features.npy"), rtol=0, atol=1e-6)
    with open(os.path.join(out, "results.json")) as f, open(os.path.join(ijbc_run, "results.json")) as g:
        assert json.load(f)["tar_at_far"] == json.load(g)["tar_at_far"]


def test_missing_and_corrupt_images_are_named_and_shift_no_row(ijbc, ijbc_run, tiny_model_file, tmp_path, capsys):
    root = str(tmp_path / "IJBC")
    shutil.copytree(ijbc.root, root)
    os.remove(os.path.join(root, "loose_crop", ijbc.names[3]))
    with open(os.path.join(root, "loose_crop", ijbc.names[10]), "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    out = str(tmp_path / "out")
    assert main(["ijb", "--root", root, "--target", "IJBC", "--checkpoint", tiny_model_file[0], "--out", out,
                 "--workers", "0", "--batch-size", "8", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert ijbc.names[3] in err and ijbc.names[10] in err
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    assert r["n_unreadable"] == 2 and sorted(r["unreadable_first"]) == sorted([ijbc.names[3], ijbc.names[10]])
    assert "No such file" in r["unreadable_first"][ijbc.names[3]]
    feats, clean = load(out, "features.npy"), load(ijbc_run, "features.npy")
    assert (feats[[3, 10]] == 0).all() and (load(out, "image_status.npy")[[3, 10]] == 2).all()
    keep = np.ones(len(feats), bool)
    keep[[3, 10]] = False
    # other batch sizes (8 here, 16 there) round float32 GEMMs differently: ~4e-6
    np.testing.assert_allclose(feats[keep], clean[keep], rtol=0, atol=1e-5 * np.abs(clean).max())
    # the scores are those of the set without the two faces
    want, _ = release_evaluation(feats[keep], ijbc.faceness[keep], ijbc.templates[keep], ijbc.medias[keep],
                                 ijbc.p1, ijbc.p2, ijbc.labels)
    np.testing.assert_allclose(load(out, "scores.npy"), want, atol=1e-6)


def test_ijbb_names_and_a_release_checkpoint(tmp_path):
    """IJB-B's file names (ijbb_*), and a release-layout checkpoint (load_official) giving the
    features of the same model saved in lafs_fast's format."""
    fx = make_ijb_fixture(str(tmp_path / "IJBB"), "IJBB", subjects=3, templates_per_subject=2, seed=1)
    torch.manual_seed(1)
    m = create_model("part_fvit_mini", depth=1).eval()
    torch.save({"module." + _release_name(k): v for k, v in m.state_dict().items()}, tmp_path / "release.pth")
    save_model(m, str(tmp_path / "model.pt"))
    for ckpt in ("release.pth", "model.pt"):
        assert main(["ijb", "--root", fx.root, "--target", "ijbb", "--checkpoint", str(tmp_path / ckpt),
                     "--out", str(tmp_path / ckpt.split(".")[0]), "--workers", "0", "--no-progress"]) == 0
    a, b = load(tmp_path / "release", "features.npy"), load(tmp_path / "model", "features.npy")
    assert a.shape == (len(fx.names), 192)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    with open(tmp_path / "release" / "results.json") as f:
        assert json.load(f)["target"] == "IJBB"


def test_a_release_lafs_checkpoint_with_the_landmark_cnn_of_another(tmp_path):
    """The release's LAFS checkpoint holds the teacher's ViT without a landmark CNN: --landmark-cnn
    names the release checkpoint that has it, and the features equal those of the whole model."""
    fx = make_ijb_fixture(str(tmp_path / "IJBC"), "IJBC", subjects=3, templates_per_subject=2, seed=2)
    torch.manual_seed(2)
    m = create_model("part_fvit_mini", depth=1).eval()
    release = {_release_name(k): v for k, v in m.state_dict().items()}
    torch.save({"module." + k: v for k, v in release.items()}, tmp_path / "stage1.pth")
    vit = {k: v for k, v in release.items() if not k.startswith(("stn.", "output_layer."))}
    assert 0 < len(vit) < len(release)  # the LAFS file really lacks the landmark CNN
    teacher = {"module.backbone." + k: v for k, v in vit.items()}
    teacher.update({"module.head.mlp.0.weight": torch.randn(8, 192), "module.head.last_layer.weight_g":
                    torch.ones(5, 1), "module.head.last_layer.weight_v": torch.randn(5, 8)})
    student = {"module.backbone." + k: torch.zeros_like(v) for k, v in vit.items()}
    torch.save({"teacher": teacher, "student": student, "epoch": 3, "args": argparse.Namespace(lr=1e-3)},
               tmp_path / "lafs.pth")
    save_model(m, str(tmp_path / "model.pt"))
    common = ["--root", fx.root, "--target", "IJBC", "--workers", "0", "--no-progress"]
    assert main(["ijb", *common, "--checkpoint", str(tmp_path / "lafs.pth"), "--landmark-cnn",
                 str(tmp_path / "stage1.pth"), "--out", str(tmp_path / "lafs")]) == 0
    assert main(["ijb", *common, "--checkpoint", str(tmp_path / "model.pt"), "--out", str(tmp_path / "model")]) == 0
    a, b = load(tmp_path / "lafs", "features.npy"), load(tmp_path / "model", "features.npy")
    assert a.shape == (len(fx.names), 192) and np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


# ----------------------------------------------------------------------------- bad input
def run_error(capsys, *args):
    assert main(["ijb", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m lafs_fast.eval ijb: error: ")
    return err


def test_bad_input_is_one_clear_line(ijbc, ijbc_run, tiny_model_file, tmp_path, capsys):
    ck = tiny_model_file[0]
    common = ["--checkpoint", ck, "--out", str(tmp_path / "o"), "--workers", "0"]
    assert "is not a folder" in run_error(capsys, "--root", str(tmp_path / "none"), "--target", "IJBC", *common)
    err = run_error(capsys, "--root", os.path.dirname(ijbc.root), "--target", "IJBC", *common)
    assert "one level down" in err and ijbc.root in err
    err = run_error(capsys, "--root", ijbc.root, "--target", "IJBB", *common)
    assert "meta/ijbb_name_5pts_score.txt" in err
    root = str(tmp_path / "IJBC")
    shutil.copytree(ijbc.root, root, ignore=shutil.ignore_patterns("*.jpg"))
    faces = os.path.join(root, "meta", "ijbc_face_tid_mid.txt")
    lines = open(faces).read().splitlines()
    lines[2] = "wrong.jpg " + lines[2].split(" ", 1)[1]
    open(faces, "w").write("\n".join(lines) + "\n")
    assert "face 3 is '3.jpg'" in run_error(capsys, "--root", root, "--target", "IJBC", *common)
    shutil.copy(os.path.join(ijbc.root, "meta", "ijbc_face_tid_mid.txt"), faces)
    with open(os.path.join(root, "meta", "ijbc_template_pair_label.txt"), "a") as f:
        f.write(f"{ijbc.templates[0]} 77 0\n")
    assert "template 77" in run_error(capsys, "--root", root, "--target", "IJBC", *common)
    # a cache computed with another model is not reused
    other = str(tmp_path / "other.pt")
    torch.manual_seed(5)
    save_model(create_model("part_fvit_tiny", depth=1), other)
    err = run_error(capsys, "--root", ijbc.root, "--target", "IJBC", "--checkpoint", other, "--out", ijbc_run)
    assert "another run (checkpoint_sha256 differ)" in err
    assert "--batch-size must be >= 1" in run_error(capsys, "--root", ijbc.root, "--target", "IJBC", *common,
                                                    "--batch-size", "0")
    with pytest.raises(SystemExit) as e:
        main(["ijb", "--root", ijbc.root, "--target", "IJBX", "--checkpoint", ck, "--out", "o"])
    assert e.value.code == 2


def test_exit_code_and_single_line_from_a_shell(tmp_path):
    p = subprocess.run([sys.executable, "-m", "lafs_fast.eval", "ijb", "--root", str(tmp_path), "--target", "IJBC",
                        "--checkpoint", "x.pt", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"python -m lafs_fast.eval ijb: error: --root {str(tmp_path)!r} lacks meta/ijbc_name_5pts_score.txt, "
        "meta/ijbc_face_tid_mid.txt, meta/ijbc_template_pair_label.txt, loose_crop: it must hold meta/ and "
        "loose_crop/ of IJBC"]
