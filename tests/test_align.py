"""5-point alignment (lafs_fast.eval.align) against independent computations.

- The similarity estimate equals Umeyama's SVD solution (re-stated here in NumPy) to 1e-9, with
  reflections excluded, and recovers a known similarity transform to 1e-4 px.
- The warp equals a direct per-pixel bilinear read (pixel k's centre at k, zero outside) to 1e-4
  of a grey level (float32 weights: 3e-5 measured), and a window of the image (source_window)
  warps to the same face as the whole image.
- A synthetic face drawn at a known pose and warped back has its landmarks on the template:
  blob centres found in the aligned image lie within 0.05 px of the template points (measured
  0.005 px; landmarks 1 px off in the loose crop move them 0.45 px).
"""
import math

import numpy as np
import pytest
import torch
from ijb_fixture import draw_face, random_look, render, similarity

from lafs_fast.eval.align import (
    ARCFACE_TEMPLATE,
    align_faces,
    apply_affine,
    arcface_template,
    estimate_similarity,
    read_five_points,
    source_window,
    warp_affine,
)


def umeyama_svd(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama (1991), eq. 40-42: R = U S V^T with S = diag(1, det(U) det(V)) (no reflection),
    c = tr(D S) / var(src), t = mean(dst) - c R mean(src)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    cov = (dst - mu_d).T @ (src - mu_s) / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.diag([1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt))])
    R = U @ S @ Vt
    c = np.trace(np.diag(D) @ S) / ((src - mu_s) ** 2).sum(1).mean()
    return np.hstack([c * R, (mu_d - c * R @ mu_s)[:, None]])


def test_arcface_template_is_insightface_112():
    # insightface's arcface_dst (the 96 x 112 template moved 8 px right)
    np.testing.assert_allclose(ARCFACE_TEMPLATE, [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                                  [41.5493, 92.3655], [70.7299, 92.2041]], atol=1e-9)


def test_estimate_equals_umeyama_svd():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 300, (20, 5, 2))
    dst = np.stack([np.asarray(ARCFACE_TEMPLATE) + rng.normal(0, 4, (5, 2)) for _ in range(20)])
    # mirrored inputs: the best fit would be a reflection, which a similarity must not use
    src[:5, :, 0] *= -1
    got = estimate_similarity(torch.from_numpy(src), torch.from_numpy(dst)).numpy()
    for k in range(20):
        np.testing.assert_allclose(got[k], umeyama_svd(src[k], dst[k]), atol=1e-9)
        assert np.linalg.det(got[k][:, :2]) > 0


@pytest.mark.parametrize("scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (1.7, 23.0, 40.0, -12.5),
                                               (0.45, -140.0, 300.25, 91.0), (3.2, 179.0, -50.0, 500.0)])
def test_known_similarity_is_recovered(scale, angle, tx, ty):
    """Points placed by a known similarity T are aligned by T^-1 (every pixel of a 1000 x 1000
    image maps to the same place within 1e-4 px)."""
    T = similarity(scale, angle, tx, ty)
    template = np.asarray(ARCFACE_TEMPLATE)
    placed = template @ T[:, :2].T + T[:, 2]
    est = estimate_similarity(torch.from_numpy(placed), arcface_template())
    grid = torch.cartesian_prod(torch.linspace(0, 1000, 21), torch.linspace(0, 1000, 21)).double()[None]
    T_inv = np.linalg.inv(np.vstack([T, [0, 0, 1]]))[:2]
    expected = grid[0].numpy() @ T_inv[:, :2].T + T_inv[:, 2]
    np.testing.assert_allclose(apply_affine(est, grid)[0].numpy(), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(apply_affine(est, torch.from_numpy(placed)[None])[0].numpy(), template, atol=1e-9)


def direct_bilinear(img: np.ndarray, M: np.ndarray, h: int, w: int) -> np.ndarray:
    """out[y, x] = bilinear read of img at M^-1 (x, y), zero outside: cv2.warpAffine's definition."""
    C, H, W = img.shape
    inv = np.linalg.inv(np.vstack([M, [0, 0, 1]]))[:2]
    out = np.zeros((C, h, w))
    for y in range(h):
        for x in range(w):
            sx, sy = inv @ [x, y, 1]
            x0, y0 = math.floor(sx), math.floor(sy)
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < H and 0 <= xx < W:
                        out[:, y, x] += wy * wx * img[:, yy, xx]
    return out


def test_warp_equals_direct_bilinear():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8, generator=g)
    M = torch.from_numpy(np.stack([similarity(0.8, 17.0, 5.0, -3.0), similarity(1.6, -95.0, 40.0, 60.0)]))
    got = warp_affine(imgs, M, (24, 20))
    assert got.dtype == torch.float32 and got.shape == (2, 3, 24, 20)
    for k in range(2):
        want = direct_bilinear(imgs[k].double().numpy(), M[k].numpy(), 24, 20)
        np.testing.assert_allclose(got[k].numpy(), want, atol=1e-4, rtol=0)
    assert (got == 0).any() and (got > 0).any()  # the poses reach past the border: zeros there


@pytest.mark.parametrize("pose", [(1.3, 10.0, 60.0, 40.0), (0.9, -35.0, -40.0, 20.0), (1.0, 0.0, -500.0, 0.0)])
def test_source_window_warps_to_the_same_face(pose):
    """Warping the window that source_window cuts out gives the full image's warp: inside the
    image, partly outside it (zeros), and entirely outside it."""
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (3, 230, 310), dtype=torch.uint8, generator=g)
    M = similarity(*pose)
    (x0, y0, x1, y1), Mw = source_window(M, 230, 310)
    assert 0 <= x0 < x1 <= 310 and 0 <= y0 < y1 <= 230
    full = warp_affine(img[None], torch.tensor(M)[None])
    window = img[:, y0:y1, x0:x1]
    padded = torch.zeros(3, y1 - y0 + 7, x1 - x0 + 5, dtype=torch.uint8)  # a batch pads with zeros
    padded[:, :y1 - y0, :x1 - x0] = window
    part = warp_affine(padded[None], torch.tensor(Mw)[None])
    torch.testing.assert_close(part, full, atol=1e-4, rtol=0)
    if pose[2] > 0:
        assert (x1 - x0) * (y1 - y0) < 230 * 310  # the window is smaller than the image


def blob_centre(img: np.ndarray, cx: float, cy: float, r: int = 7) -> np.ndarray:
    """Intensity-weighted centre of the dark blob near (cx, cy), against the local skin level."""
    ys, xs = np.mgrid[int(cy) - r:int(cy) + r + 1, int(cx) - r:int(cx) + r + 1]
    d = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    weight = np.clip(img[ys, xs].max() - img[ys, xs], 0, None) * d
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_synthetic_face_lands_on_the_template():
    """A face drawn at a known pose, aligned by its 5 points: the eye blobs (drawn at the
    template's eye points) lie at the template eye points of the aligned face, as they do in a
    face drawn directly at the template."""
    rng = np.random.default_rng(3)
    look = dict(random_look(rng), head_w=45.0, head_h=60.0, eye=2.5)
    look["skin"] = np.array([200.0, 200.0, 200.0])
    look["iris"] = np.array([0.0, 0.0, 0.0])
    T = similarity(1.9, 27.0, 80.0, 15.0)
    loose = torch.from_numpy(render(look, T, 320, 300)).permute(2, 0, 1)[None].float()
    pts = np.asarray(ARCFACE_TEMPLATE) @ T[:, :2].T + T[:, 2]
    aligned = align_faces(loose, torch.from_numpy(pts)[None])[0].mean(0).numpy()
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    reference = draw_face(xs, ys, look).mean(-1)
    for (cx, cy) in ARCFACE_TEMPLATE[:2]:
        want = blob_centre(reference, cx, cy)
        got = blob_centre(aligned, cx, cy)
        assert np.abs(got - want).max() < 0.05, (got, want)
        assert np.abs(got - [cx, cy]).max() < 0.05, (got, cx, cy)


def test_coinciding_points_do_not_align():
    pts = torch.full((1, 5, 2), 7.0, dtype=torch.float64)
    assert torch.isnan(estimate_similarity(pts, arcface_template())).all()
    with pytest.raises(ValueError, match="coincide"):
        align_faces(torch.zeros(1, 3, 20, 20), pts)
    with pytest.raises(ValueError, match=r"\(B, K, 2\)"):
        estimate_similarity(torch.zeros(2, 5, 3), arcface_template())


def test_read_five_points(tmp_path):
    p = tmp_path / "pts.txt"
    p.write_text("# name x1 y1 ... score\na.jpg 1 2 3 4 5 6 7 8 9 10 0.5\n\n"
                 "b/c.png 11 12 13 14 15 16 17 18 19 20 0.25\n")
    names, pts, sc = read_five_points(str(p), require_score=True)
    assert names == ["a.jpg", "b/c.png"]
    np.testing.assert_array_equal(pts[1], [[11, 12], [13, 14], [15, 16], [17, 18], [19, 20]])
    np.testing.assert_array_equal(sc, np.float32([0.5, 0.25]))
    p.write_text("a.jpg 1 2 3 4 5 6 7 8 9 10\n")
    assert read_five_points(str(p))[2] is None
    with pytest.raises(ValueError, match=r"pts.txt:1: expected 12"):
        read_five_points(str(p), require_score=True)
    p.write_text("a.jpg 1 2 3 4 5 6 7 8 9 x 1\n")
    with pytest.raises(ValueError, match=r"pts.txt:1: could not convert"):
        read_five_points(str(p))
    p.write_text("a.jpg 1 2 3 4 5 6 7 8 9 nan 1\n")
    with pytest.raises(ValueError, match="finite"):
        read_five_points(str(p))


def test_embed_five_points_aligns_like_the_ijb_command(tmp_path, capsys):
    """embed --five-points on the loose crops of an IJB-shaped set gives the IJB command's
    features, L2-normalised (one aligns the whole image in its workers, the other a window of it,
    batched)."""
    from ijb_fixture import make_ijb_fixture

    from lafs_fast import embed
    from lafs_fast.convert import save_model
    from lafs_fast.eval.ijb import run_ijb
    from lafs_fast.models import create_model
    fx = make_ijb_fixture(str(tmp_path / "IJBC"), "IJBC", subjects=2, templates_per_subject=2, seed=4)
    torch.manual_seed(0)
    m = create_model("part_fvit_tiny", depth=1).eval()
    with torch.no_grad():
        m.landmark_cnn.output_layer[1].weight.normal_(0, 0.5)
    save_model(m, str(tmp_path / "model.pt"))
    pts = str(tmp_path / "IJBC" / "meta" / "ijbc_name_5pts_score.txt")
    assert embed.main(["--checkpoint", str(tmp_path / "model.pt"), "--images", str(tmp_path / "IJBC" / "loose_crop"),
                       "--five-points", pts, "--out", str(tmp_path / "e"), "--workers", "0"]) == 0
    got = np.load(tmp_path / "e.npy")
    order = sorted(range(len(fx.names)), key=lambda i: fx.names[i])  # embed sorts the folder by name
    run_ijb(fx.root, "IJBC", str(tmp_path / "model.pt"), str(tmp_path / "ijb"), workers=0, device="cpu",
            progress=False)
    want = np.load(tmp_path / "ijb" / "features.npy")[order]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # without alignment the loose crops give other features
    assert embed.main(["--checkpoint", str(tmp_path / "model.pt"), "--images", str(tmp_path / "IJBC" / "loose_crop"),
                       "--out", str(tmp_path / "raw"), "--workers", "0"]) == 0
    assert np.abs(np.load(tmp_path / "raw.npy") - want).max() > 0.05
    # every input needs its points; RecordIO / .bin inputs are not aligned
    with open(pts) as f:
        lines = f.readlines()
    (tmp_path / "part.txt").write_text("".join(lines[1:]))
    capsys.readouterr()
    assert embed.main(["--checkpoint", str(tmp_path / "model.pt"), "--images", str(tmp_path / "IJBC" / "loose_crop"),
                       "--five-points", str(tmp_path / "part.txt"), "--out", str(tmp_path / "x")]) == 2
    assert f"has no points for '{fx.names[0]}'" in capsys.readouterr().err
    assert embed.main(["--checkpoint", str(tmp_path / "model.pt"), "--bin", "v.bin", "--five-points", pts,
                       "--out", str(tmp_path / "x")]) == 2
    assert "--five-points aligns --images or --list" in capsys.readouterr().err
