"""lafs_fast.views: batched LAFS views (geometry, photometric ops, landmark index, grid)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from lafs_fast.ops.photometric import BRIGHTNESS, CONTRAST, HUE, SATURATION, adjust_hue, color_jitter, gaussian_blur
from lafs_fast.views import (
    ViewConfig,
    crop_resize,
    landmark_view_index,
    make_lafs_views,
    normalize_uint8,
    sample_crop_boxes,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# tiny views: 32x32 faces, 16x16 crops, 2 global + 3 local
SMALL = ViewConfig(size=16, n_global=2, n_local=3)
NO_PHOTO = dataclasses.replace(SMALL, jitter_p=0.0, grayscale_p=0.0, blur_p_global=(0.0,),
                               blur_p_local=0.0, solarize_p_global=(0.0,))


def faces(B=3, H=32, W=32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8).to(device)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("device", DEVICES)
def test_shapes_dtypes_and_range(device):
    x = faces(device=device)
    v = make_lafs_views(x, SMALL, gen())
    B, G, L, S = 3, 2, 3, 16
    assert v.clean_global.shape == v.aug_global.shape == (G * B, 3, S, S)
    assert v.clean_local.shape == v.aug_local.shape == (L * B, 3, S, S)
    assert (v.batch_size, v.n_global, v.n_local) == (B, G, L)
    for t in (v.clean_global, v.aug_global, v.clean_local, v.aug_local):
        assert t.dtype == torch.float32 and t.device.type == device
        assert t.min() >= -1 and t.max() <= 1
    assert v.boxes_global.shape == (G * B, 4) and v.boxes_local.shape == (L * B, 4)
    assert v.flip_global.dtype == torch.bool and v.flip_local.shape == (L * B,)
    assert v.params["jitter_factors"].shape == ((G + L) * B, 4)


def test_float_input_dtypes_and_local_size():
    x = normalize_uint8(faces(), torch.float64)
    v = make_lafs_views(x, dataclasses.replace(SMALL, local_size=8), gen())
    assert v.clean_global.dtype == torch.float64 and v.aug_local.dtype == torch.float64
    assert v.clean_local.shape == (9, 3, 8, 8) and v.clean_global.shape == (6, 3, 16, 16)
    v16 = make_lafs_views(x.float(), SMALL, gen(), out_dtype=torch.bfloat16)
    assert v16.aug_global.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        make_lafs_views(x[:, :1], SMALL)


def test_normalize_uint8():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8)
    assert torch.allclose(normalize_uint8(x), torch.tensor([-1.0, 1.0, -0.6]))


# ----------------------------------------------------------------------------- geometry
def test_crop_resize_full_box_equals_resize():
    x = normalize_uint8(faces(B=2))
    box = torch.tensor([0.0, 0.0, 32.0, 32.0]).expand(1, 2, 4)
    for mode in ("bilinear", "bicubic"):
        out = crop_resize(x, box, None, 20, mode)
        ref = F.interpolate(x, size=(20, 20), mode=mode, align_corners=False)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_crop_resize_known_box_equals_crop_then_resize():
    x = normalize_uint8(faces(B=2))
    # view 0: box (x0=5, y0=3, w=20, h=24); view 1: box (x0=0, y0=8, w=30, h=16), both images
    boxes = torch.tensor([[5.0, 3, 20, 24], [0.0, 8, 30, 16]])[:, None].expand(2, 2, 4)
    out = crop_resize(x, boxes, None, 40, "bilinear").view(2, 2, 3, 40, 40)
    for v, (x0, y0, w, h) in enumerate(boxes[:, 0].long().tolist()):
        ref = F.interpolate(x[:, :, y0:y0 + h, x0:x0 + w], size=(40, 40), mode="bilinear",
                            align_corners=False)
        # borders differ: crop-then-resize clamps to the crop, the direct sampler reads neighbours
        torch.testing.assert_close(out[v, :, :, 2:-2, 2:-2], ref[:, :, 2:-2, 2:-2],
                                   atol=1e-5, rtol=0)
        assert not torch.allclose(out[v], out[1 - v])


def test_crop_resize_flip_mirrors():
    x = normalize_uint8(faces(B=2))
    boxes = torch.tensor([4.0, 2, 22, 26]).expand(2, 2, 4)
    flips = torch.tensor([[False, False], [True, True]])
    out = crop_resize(x, boxes, flips, 16, "bicubic").view(2, 2, 3, 16, 16)
    torch.testing.assert_close(out[1], out[0].flip(-1), atol=1e-5, rtol=0)
    assert not torch.allclose(out[1], out[0], atol=1e-2)


def test_views_match_direct_crop_view_major():
    """Each clean view is the crop of ITS image (row v*B + b <-> image b) with its box/flip."""
    cfg = dataclasses.replace(SMALL, interpolation="bilinear")
    x = faces(B=3)
    v = make_lafs_views(x, cfg, gen(3))
    xf = normalize_uint8(x)
    B = 3
    for clean, boxes, flips in ((v.clean_global, v.boxes_global, v.flip_global),
                                (v.clean_local, v.boxes_local, v.flip_local)):
        for row in range(clean.shape[0]):
            b = row % B
            x0, y0, w, h = boxes[row].long().tolist()
            ref = F.interpolate(xf[b:b + 1, :, y0:y0 + h, x0:x0 + w], size=(16, 16),
                                mode="bilinear", align_corners=False)[0]
            if flips[row]:
                ref = ref.flip(-1)
            torch.testing.assert_close(clean[row, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3],
                                       atol=1e-5, rtol=0)


def test_crop_box_statistics():
    n, H, W = 4000, 112, 112
    boxes = sample_crop_boxes(n, H, W, (0.4, 1.0), (3 / 4, 4 / 3), gen(1))
    x0, y0, w, h = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= W).all() and (y0 + h <= H).all()
    assert torch.equal(boxes, boxes.round())
    frac = w * h / (H * W)
    assert frac.min() > 0.38 and frac.max() <= 1.0
    ar = w / h
    assert ar.min() > 0.73 and ar.max() < 1.37
    assert 0.55 < frac.mean() < 0.75            # not all full-image fallbacks
    assert x0.std() > 3 and y0.std() > 3        # positions vary
    # an impossible scale falls back to the centre crop (whole square image)
    fb = sample_crop_boxes(5, 40, 40, (2.0, 3.0), (3 / 4, 4 / 3), gen(1))
    assert torch.equal(fb, torch.tensor([[0.0, 0, 40, 40]]).expand(5, 4))
    wide = sample_crop_boxes(2, 20, 60, (2.0, 3.0), (3 / 4, 4 / 3), gen(1))
    assert torch.equal(wide[0], torch.tensor([16.0, 0, 27, 20]))   # ratio clamped to 4/3, centred


def test_flip_rate():
    v = make_lafs_views(faces(B=64), dataclasses.replace(SMALL, photometric=False), gen(2))
    flips = torch.cat([v.flip_global, v.flip_local]).float()
    assert 0.4 < flips.mean() < 0.6
    never = make_lafs_views(faces(B=4), dataclasses.replace(SMALL, flip_p=0.0), gen(2))
    assert not never.flip_global.any() and not never.flip_local.any()


# ----------------------------------------------------------------------------- reproducibility
def test_reproducible_with_seed():
    x = faces()
    a, b = make_lafs_views(x, SMALL, gen(7)), make_lafs_views(x, SMALL, gen(7))
    c = make_lafs_views(x, SMALL, gen(8))
    for f in ("clean_global", "aug_global", "clean_local", "aug_local", "boxes_global"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.boxes_local, c.boxes_local)
    assert not torch.equal(a.aug_global, c.aug_global)


# ----------------------------------------------------------------------------- clean vs augmented
def test_photometric_off_gives_identical_copies():
    x = faces()
    v = make_lafs_views(x, dataclasses.replace(SMALL, photometric=False), gen(5))
    assert torch.equal(v.clean_global, v.aug_global) and torch.equal(v.clean_local, v.aug_local)
    # photometric on but every probability 0: the neutral paths are exact identities
    w = make_lafs_views(x, NO_PHOTO, gen(5))
    assert torch.equal(w.clean_global, w.aug_global) and torch.equal(w.clean_local, w.aug_local)


def test_photometric_changes_augmented_copy_only():
    x = faces(B=4)
    off = make_lafs_views(x, dataclasses.replace(SMALL, photometric=False), gen(9))
    on = make_lafs_views(x, SMALL, gen(9))
    # same geometry and same clean copies whether or not photometric ops run
    assert torch.equal(off.boxes_global, on.boxes_global)
    assert torch.equal(off.clean_global, on.clean_global)
    assert torch.equal(off.clean_local, on.clean_local)
    # global view 1 always blurs: every global-1 augmented copy differs from its clean copy
    diff = (on.aug_global - on.clean_global).abs().flatten(1).amax(1)
    assert (diff[:4] > 1e-3).all()
    allv = torch.cat([on.aug_global, on.aug_local]) - torch.cat([on.clean_global, on.clean_local])
    assert (allv.abs().flatten(1).amax(1) > 1e-3).float().mean() > 0.7


def test_grayscale_and_solarize_masks():
    x = faces(B=4)
    gray = make_lafs_views(x, dataclasses.replace(NO_PHOTO, grayscale_p=1.0), gen(1))
    for t in (gray.aug_global, gray.aug_local):
        assert torch.allclose(t[:, 0], t[:, 1]) and torch.allclose(t[:, 1], t[:, 2])
    sol = make_lafs_views(x, dataclasses.replace(NO_PHOTO, solarize_p_global=(0.0, 1.0)), gen(1))
    B = 4
    assert torch.equal(sol.aug_global[:B], sol.clean_global[:B])      # global-1: never
    assert torch.equal(sol.aug_local, sol.clean_local)                # locals: never
    c01 = (sol.clean_global[B:] + 1) / 2
    ref = torch.where(c01 >= 128 / 255, 1 - c01, c01) * 2 - 1
    torch.testing.assert_close(sol.aug_global[B:], ref, atol=1e-6, rtol=0)


def test_blur_probabilities_per_view():
    x = faces(B=200, H=16, W=16)
    cfg = dataclasses.replace(SMALL, size=8, n_local=2)
    v = make_lafs_views(x, cfg, gen(4))
    blur = v.params["blur"].float().view(4, 200).mean(1)     # views: g1, g2, l1, l2
    assert blur[0] == 1.0
    assert 0.03 < blur[1] < 0.2
    assert 0.4 < blur[2] < 0.6 and 0.4 < blur[3] < 0.6
    sol = v.params["solarize"].float().view(4, 200).mean(1)
    assert sol[0] == 0 and 0.12 < sol[1] < 0.28 and sol[2:].sum() == 0
    assert 0.72 < v.params["jitter"].float().mean() < 0.88
    assert 0.15 < v.params["grayscale"].float().mean() < 0.25


# ----------------------------------------------------------------------------- colour ops vs torchvision
def test_color_jitter_matches_torchvision_per_sample():
    g = gen(11)
    N = 12
    x = torch.rand(N, 3, 8, 8, generator=g)
    f = torch.stack([0.6 + 0.8 * torch.rand(N, generator=g), 0.6 + 0.8 * torch.rand(N, generator=g),
                     0.8 + 0.4 * torch.rand(N, generator=g), -0.1 + 0.2 * torch.rand(N, generator=g)], 1)
    order = torch.rand(N, 4, generator=g).argsort(1)
    apply = torch.rand(N, generator=g) < 0.75
    apply[0] = True
    out = color_jitter(x, f, order, apply)
    ops = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast,
           SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}
    for n in range(N):
        ref = x[n]
        if apply[n]:
            for op in order[n].tolist():
                ref = ops[op](ref, f[n, op].item())
        torch.testing.assert_close(out[n], ref, atol=2e-5, rtol=0)
    assert torch.equal(out[~apply], x[~apply])


def test_adjust_hue_matches_torchvision():
    g = gen(12)
    x = torch.rand(5, 3, 6, 6, generator=g)
    x[0, :, 0, 0] = 0.3                         # a gray pixel and a black one
    x[0, :, 0, 1] = 0.0
    h = torch.tensor([0.1, -0.1, 0.05, 0.5, 0.0])
    out = adjust_hue(x, h)
    for n in range(5):
        torch.testing.assert_close(out[n], TF.adjust_hue(x[n], h[n].item()), atol=2e-5, rtol=0)
    assert not torch.allclose(out[0], x[0], atol=1e-3)


def test_gaussian_blur_matches_torchvision():
    g = gen(13)
    x = torch.rand(3, 3, 16, 16, generator=g)
    sigma = torch.tensor([0.5, 1.7, 1.0])
    apply = torch.tensor([True, True, False])
    out = gaussian_blur(x, sigma, apply, sigma_max=2.0)
    for n in range(2):
        ref = TF.gaussian_blur(x[n], kernel_size=13, sigma=sigma[n].item())
        torch.testing.assert_close(out[n], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- landmark index
def test_index_shuffle_with_replacement():
    idx = landmark_view_index(512, 196, 36, shuffle=True, generator=gen(0))
    assert idx.shape == (512, 36) and idx.dtype == torch.int64
    assert idx.min() >= 0 and idx.max() < 196
    has_repeat = torch.tensor([r.unique().numel() < 36 for r in idx])
    assert has_repeat.any()                        # with replacement: repeats occur
    assert 0.85 < has_repeat.float().mean() < 1.0  # P(repeat in a row) ~ 0.96
    counts = torch.bincount(idx.flatten(), minlength=196).float()   # ~94 each
    assert counts.min() > 50 and counts.max() < 150
    assert not (idx.diff(dim=1) >= 0).all(dim=1).all()   # random order, not sorted
    full = landmark_view_index(4, 196, None, shuffle=True, generator=gen(0))
    assert full.shape == (4, 196) and not torch.equal(full[0], torch.arange(196))


def test_index_without_shuffle():
    idx = landmark_view_index(64, 196, 36, shuffle=False, generator=gen(1))
    assert idx.shape == (64, 36) and idx.dtype == torch.int64
    assert (idx.diff(dim=1) > 0).all()            # sorted and distinct: order kept
    assert idx.min() >= 0 and idx.max() < 196
    assert not torch.equal(idx[0], idx[1])
    assert torch.equal(landmark_view_index(3, 196, 196, shuffle=False),
                       torch.arange(196).expand(3, 196))
    with pytest.raises(ValueError):
        landmark_view_index(2, 10, 20, shuffle=False)


def test_index_reproducible():
    a = landmark_view_index(8, 196, 36, True, gen(3))
    b = landmark_view_index(8, 196, 36, True, gen(3))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- grid landmarks


def test_landmarks_to_views_follows_crop_resize():
    """The mapped point is where crop_resize puts the source point, to 1e-4 px.

    The synthetic source image holds its own coordinates: channel 0 = x, channel 1 = y at every
    pixel centre (a linear ramp, which bilinear resampling reproduces exactly away from the
    border). crop_resize's view then holds, at every view pixel, the source coordinate it read;
    bilinear-sampling the view at the mapped point must give back the source landmark. A
    half-pixel (or any) error in the mapping moves the read-back by ~w / S px: far above 1e-4."""
    from lafs_fast.views import crop_resize, landmarks_to_views
    B, H, W, S = 2, 64, 60, 32
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    img = torch.stack([xs, ys])[None].expand(B, 2, H, W).contiguous()
    # boxes (x0, y0, w, h) inside the image by >= 1 px (no border clamping), up- and downscaled,
    # non-square, with and without flips; view-major: row v*B + b
    boxes = torch.tensor([[8.0, 4.0, 40.0, 48.0], [16.0, 2.0, 20.0, 28.0],
                          [1.0, 1.0, 58.0, 62.0], [10.0, 6.0, 45.0, 17.0]], dtype=torch.float64)
    flips = torch.tensor([False, True, True, False])
    g = torch.Generator().manual_seed(0)
    # landmarks well inside every crop (so the read-back uses interior view pixels)
    lo = torch.tensor([16.0, 10.0], dtype=torch.float64)
    lms = lo + torch.rand(B, 6, 2, generator=g, dtype=torch.float64) * torch.tensor([14.0, 6.0], dtype=torch.float64)
    view = crop_resize(img, boxes.view(2, B, 4), flips.view(2, B), S, mode="bilinear")   # (4, 2, S, S)
    mapped = landmarks_to_views(lms, boxes, flips, S)                                    # (4, 6, 2)
    assert mapped.dtype == torch.float64 and mapped.shape == (4, 6, 2)
    inside = ((mapped >= 0) & (mapped <= S - 1)).all()
    assert inside, mapped
    grid = (2 * mapped + 1) / S - 1                                                       # pixel -> [-1, 1]
    back = F.grid_sample(view, grid[:, :, None], mode="bilinear", align_corners=False)[..., 0]  # (4, 2, 6)
    want = lms.repeat(2, 1, 1).transpose(1, 2)                                            # image b of view v
    torch.testing.assert_close(back, want, rtol=0, atol=1e-4)
    # the check has teeth: half a view pixel off reads back a different source point
    off = F.grid_sample(view, ((2 * (mapped + 0.5) + 1) / S - 1)[:, :, None], mode="bilinear",
                        align_corners=False)[..., 0]
    assert (off - want).abs().max() > 0.1
    # the full image resampled to its own width is the identity along x
    ident = landmarks_to_views(lms, torch.tensor([[0.0, 0.0, W, H]] * B, dtype=torch.float64),
                               torch.zeros(B, dtype=torch.bool), W)
    torch.testing.assert_close(ident[..., 0], lms[..., 0], rtol=0, atol=1e-12)


def test_photometric_names_moved_out_still_resolve_with_a_deprecation_warning():
    from lafs_fast import views
    from lafs_fast.ops import photometric
    for name in ("apply_photometric", "apply_photometric_reference", "draw_photometric_params",
                 "photometric_augment", "color_jitter", "adjust_hue", "gaussian_blur", "HUE"):
        with pytest.warns(DeprecationWarning, match=f"lafs_fast.ops.photometric.{name}"):
            assert getattr(views, name) is getattr(photometric, name)
    with pytest.raises(AttributeError):
        views.no_such_name
