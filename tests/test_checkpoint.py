"""Checkpoints: atomic save / checked load; load_official against an independent model written
with the release's module names (Residual(PreNorm(fn)), einsum attention with dim ** -0.5,
one grid_sample per landmark + mosaic); convert CLI round trip."""
import argparse
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lafs_fast.checkpoint import CheckpointError, load_checkpoint, load_official, save_checkpoint
from lafs_fast.convert import load_model
from lafs_fast.convert import main as convert_main

S, P, N = 112, 8, 16


# ----------------------------------------------------------------------------- release-like model
def div8(x):
    return int(math.ceil(x / 8) * 8)


class RelSE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c, c // 4, bias=False), nn.ReLU(),
                                nn.Linear(c // 4, c, bias=False), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.fc(x.mean((2, 3)))[..., None, None]


class RelBlock(nn.Module):
    def __init__(self, i, o, k, s, e, se, nl):
        super().__init__()
        act = nn.ReLU if nl == "RE" else nn.Hardswish
        self.res = s == 1 and i == o
        self.conv = nn.Sequential(nn.Conv2d(i, e, 1, bias=False), nn.BatchNorm2d(e), act(),
                                  nn.Conv2d(e, e, k, s, k // 2, groups=e, bias=False), nn.BatchNorm2d(e),
                                  RelSE(e) if se else nn.Identity(), act(),
                                  nn.Conv2d(e, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        return x + self.conv(x) if self.res else self.conv(x)


class RelMobileNet(nn.Module):
    SETTING = [(3, 16, 16, 0, "RE", 1), (3, 64, 24, 0, "RE", 2), (3, 72, 24, 0, "RE", 1),
               (5, 72, 40, 1, "RE", 2), (5, 120, 40, 1, "RE", 1), (5, 120, 40, 1, "RE", 1),
               (3, 240, 80, 0, "HS", 2), (3, 200, 80, 0, "HS", 1), (3, 184, 80, 0, "HS", 1),
               (3, 184, 80, 0, "HS", 1), (3, 480, 112, 1, "HS", 1), (3, 672, 112, 1, "HS", 1),
               (5, 672, 160, 1, "HS", 2), (5, 960, 160, 1, "HS", 1), (5, 960, 160, 1, "HS", 1)]

    def __init__(self, w):
        super().__init__()
        c = div8(16 * w)
        layers = [nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.Hardswish())]
        for k, e, o, se, nl, s in self.SETTING:
            layers.append(RelBlock(c, div8(o * w), k, s, div8(e * w), se, nl))
            c = div8(o * w)
        self.features = nn.Sequential(*layers)
        self.out = c

    def forward(self, x):
        return self.features(x)


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class RelAttention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.scale = heads, dim ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(0.1))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        a = (torch.einsum("bhid,bhjd->bhij", q, k) * self.scale).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", a, v).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out)


class RelTransformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([
            Residual(PreNorm(dim, RelAttention(dim, heads, dim_head))),
            Residual(PreNorm(dim, nn.Module()))]) for _ in range(depth))
        for layer in self.layers:
            layer[1].fn.fn.net = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(0.1),
                                               nn.Linear(mlp, dim), nn.Dropout(0.1))
            layer[1].fn.fn.forward = layer[1].fn.fn.net.forward

    def forward(self, x):
        for a, f in self.layers:
            x = f(a(x))
        return x


def release_patches(imgs, lm, p):
    """One grid_sample per landmark over offsets arange(-p/2, p/2) normalised by S/2 - 1
    (x along the first patch axis), a sqrt(N) x sqrt(N) mosaic, then
    'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'."""
    b, c, s, _ = imgs.shape
    off = torch.arange(-p // 2, p // 2, dtype=imgs.dtype)
    grid = torch.stack(torch.meshgrid(off, off, indexing="ij"), dim=-1)  # [a][b] = (a, b) offsets
    pats = []
    for n in range(lm.shape[1]):
        g = (grid[None] + lm[:, n, None, None, :]) / (s * 0.5) - 1
        pats.append(F.grid_sample(imgs, g, align_corners=False))  # (B, C, p, p)
    st = torch.stack(pats, dim=2)  # (B, C, N, p, p)
    r = int(math.isqrt(lm.shape[1]))
    mosaic = st.reshape(b, c, r, r, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, r * p, r * p)
    return mosaic.reshape(b, c, r, p, r, p).permute(0, 2, 4, 3, 5, 1).reshape(b, r * r, p * p * c)


class ReleaseLikePartFViT(nn.Module):
    def __init__(self, dim=32, depth=2, heads=2, mlp=48, n=N, width=0.25, with_land=True):
        super().__init__()
        if with_land:
            self.stn = RelMobileNet(width)
            self.output_layer = nn.Sequential(nn.Dropout(0.5), nn.Linear(self.stn.out, 2 * n))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.patch_to_embedding = nn.Linear(P * P * 3, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = RelTransformer(dim, depth, heads, 64, mlp)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim))
        self.loss = nn.Module()
        self.loss.weight = nn.Parameter(torch.randn(7, dim))  # the CosFace classifier

    def landmarks(self, x):
        t = self.output_layer(self.stn(x).mean(dim=(-2, -1)))
        lo, hi = t.min(1, keepdim=True)[0], t.max(1, keepdim=True)[0]
        return ((t - lo) / (hi - lo) * 111).view(x.shape[0], -1, 2)

    def forward(self, x, lm=None):
        lm = self.landmarks(x) if lm is None else lm
        tok = self.patch_to_embedding(release_patches(x, lm, P))
        h = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tok), 1)
        h = h + self.pos_embedding[:, :tok.shape[1] + 1]
        return self.mlp_head(self.transformer(h)[:, 0])


def randomize_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 0.5 + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    torch.manual_seed(3)
    ref = ReleaseLikePartFViT()
    with torch.no_grad():
        randomize_bn(ref)
        ref.output_layer[1].weight.mul_(100)  # spread the landmarks over the image
    ref.eval()
    d = tmp_path_factory.mktemp("release")
    sup = str(d / "partfvit.pth")
    torch.save({"module." + k: v for k, v in ref.state_dict().items()}, sup)
    x = torch.rand(2, 3, S, S) * 2 - 1
    with torch.no_grad():
        emb, lm = ref(x), ref.landmarks(x)
    return dict(model=ref, path=sup, dir=d, x=x, emb=emb, lm=lm)


# ----------------------------------------------------------------------------- tests
def test_release_patch_layout_matches_ops():
    from lafs_fast import ops
    x = torch.rand(2, 3, 24, 24)
    lm = torch.rand(2, 9, 2) * 23
    torch.testing.assert_close(ops.landmark_patches(x, lm, patch_size=4), release_patches(x, lm, 4),
                               atol=1e-5, rtol=1e-5)


def test_load_official_supervised_matches_release(release):
    m = load_official(release["path"])
    assert not m.training
    assert m.config["dim"] == 32 and m.config["depth"] == 2 and m.config["heads"] == 2
    assert m.config["dim_head"] == 64 and m.config["mlp_dim"] == 48 and m.config["num_landmarks"] == N
    with torch.no_grad():
        emb, lm = m(release["x"], return_landmarks=True)
    torch.testing.assert_close(lm, release["lm"], atol=1e-4, rtol=1e-5)
    assert release["lm"].std() > 5  # landmarks spread: the comparison is not vacuous
    torch.testing.assert_close(emb, release["emb"], atol=1e-4, rtol=1e-4)


def test_load_official_dino_with_landmark_cnn(release):
    ref = release["model"]
    vit = {k: v for k, v in ref.state_dict().items() if not k.startswith(("stn.", "output_layer."))}
    head = {"head.mlp.0.weight": torch.randn(8, 32), "head.last_layer.weight_g": torch.ones(5, 1),
            "head.last_layer.weight_v": torch.randn(5, 8)}
    teacher = {"module.backbone." + k: v for k, v in vit.items()}
    teacher.update({"module." + k: v for k, v in head.items()})
    student = {"module.backbone." + k: torch.zeros_like(v) for k, v in vit.items()}
    path = str(release["dir"] / "lafs.pth")
    torch.save({"teacher": teacher, "student": student, "epoch": 3,
                "args": argparse.Namespace(lr=1e-3)}, path)
    m = load_official(path, landmark_cnn_path=release["path"])
    with torch.no_grad():
        torch.testing.assert_close(m(release["x"]), release["emb"], atol=1e-4, rtol=1e-4)
    with pytest.warns(UserWarning, match="RANDOMLY"):
        m2 = load_official(path)
    # the ViT came from the teacher: with the release landmarks the embedding matches
    with torch.no_grad():
        torch.testing.assert_close(m2(release["x"], landmarks=release["lm"]), release["emb"],
                                   atol=1e-4, rtol=1e-4)


def test_load_official_clear_errors(release, tmp_path):
    sd = torch.load(release["path"])
    broken = {k: v for k, v in sd.items() if "mlp_head" not in k}
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="mlp_head.0"):
        load_official(str(tmp_path / "missing.pth"))
    bad = dict(sd)
    bad["module.transformer.layers.1.1.fn.fn.net.3.weight"] = torch.zeros(32, 40)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.1\.fn\.fn\.net\.3\.weight.*\(32, 40\)"):
        load_official(str(tmp_path / "shape.pth"))
    odd = dict(sd)
    odd["module.something_else"] = torch.zeros(1)
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="something_else"):
        load_official(str(tmp_path / "odd.pth"))


def test_save_load_atomic_and_corrupt(tmp_path):
    path = str(tmp_path / "ck.pth")
    save_checkpoint(path, {"a": torch.arange(3), "epoch": 2})
    save_checkpoint(path, {"a": torch.arange(4), "epoch": 3})  # overwrite in place
    out = load_checkpoint(path)
    assert out["epoch"] == 3 and out["a"].tolist() == [0, 1, 2, 3]
    assert os.listdir(tmp_path) == ["ck.pth"]  # no temporary left behind
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="state"):
        save_checkpoint(path, [1, 2])


def test_convert_cli_round_trip(release, tmp_path, capsys):
    out = str(tmp_path / "converted.pth")
    assert convert_main([release["path"], out]) == 0
    m = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(m(release["x"]), release["emb"], atol=1e-4, rtol=1e-4)
    assert convert_main([str(tmp_path / "missing.pth"), out]) == 2  # a missing input is bad usage
    assert "not found" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="lafs_fast format"):
        load_model(release["path"])


def test_partial_loading_for_training(release, tmp_path):
    from lafs_fast.checkpoint import load_backbone_into, load_landmark_cnn
    from lafs_fast.convert import save_model
    from lafs_fast.models import PartFViT
    cfg = load_official(release["path"]).config
    cnn = load_landmark_cnn(release["path"])
    with torch.no_grad():
        torch.testing.assert_close(cnn(release["x"]), release["lm"], atol=1e-4, rtol=1e-5)
    # ViT from one file (our format, grid model as the pretraining teacher), CNN from another
    grid = PartFViT(**{**cfg, "landmarks": "grid"})
    load_backbone_into(grid, release["path"], part="vit")
    ours = str(tmp_path / "teacher.pth")
    save_model(grid, ours)
    fresh = PartFViT(**cfg).eval()
    load_backbone_into(fresh, ours, part="vit")
    load_backbone_into(fresh, release["path"], part="landmark_cnn")
    with torch.no_grad():
        torch.testing.assert_close(fresh(release["x"]), release["emb"], atol=1e-4, rtol=1e-4)
    with pytest.raises(CheckpointError, match="no landmark CNN"):
        load_backbone_into(fresh, ours, part="landmark_cnn")
    small = PartFViT(**{**cfg, "dim": 16})
    with pytest.raises(CheckpointError, match="patch_to_embedding"):
        load_backbone_into(small, release["path"], part="vit")


def test_training_state_checkpoint_loads_weights_only(tmp_path):
    """A step-*.pt (with the run's numpy random state) serves as --landmark-init / --init."""
    import numpy as np

    from lafs_fast.checkpoint import load_backbone_into, load_checkpoint
    from lafs_fast.models import create_model
    src, dst = create_model("part_fvit_tiny"), create_model("part_fvit_tiny")
    path = tmp_path / "step-00000001.pt"
    torch.save({"model": src.state_dict(), "config": {}, "model_config": src.config, "kind": "finetune",
                "rng": {"numpy": np.random.get_state()}, "step": 1}, path)
    obj = load_checkpoint(str(path))
    assert obj["rng"]["numpy"][1].dtype == np.uint32
    load_backbone_into(dst, str(path), part="landmark_cnn")
    for (k, a), b in zip(src.landmark_cnn.state_dict().items(), dst.landmark_cnn.state_dict().values()):
        assert torch.equal(a, b), k
    # still weights-only: an arbitrary object is refused with the clear error
    torch.save({"model": src.state_dict(), "bad": object()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "evil.pt"))
