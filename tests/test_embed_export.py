"""python -m lafs_fast.embed (features of a folder / list / RecordIO / .bin, bad images named)
and python -m lafs_fast.export (ONNX through one grid_sample, run in onnxruntime).

Tolerances: embed computes what eval.embed_with_flip computes, batch by batch (batch splits move
float32 GEMMs by ~1e-7): atol 1e-5 on unit vectors. The exported graph samples patches with
grid_sample, whose normalised coordinates (2x + 1) / W - 1 round x by ~1e-5 px: patches move
~1e-5, embeddings ~2e-5 (measured); the bar is 1e-4.
"""

import numpy as np
import pytest
import torch
from conftest import require_optional

from lafs_fast import embed, export, ops
from lafs_fast.checkpoint import _release_name
from lafs_fast.data.image_folder import encode_image
from lafs_fast.data.recordio import write_recordio
from lafs_fast.eval import embed_with_flip
from lafs_fast.eval.bin_reader import write_bin
from lafs_fast.models import create_model

S = 112


def faces(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g) for _ in range(n)]


def expected(model, imgs, flip=True):
    x = torch.stack(imgs)
    if flip:
        return embed_with_flip(model, x, batch_size=len(imgs)).numpy()
    with torch.no_grad():
        return torch.nn.functional.normalize(model((x.float() / 127.5) - 1.0), dim=1).numpy()


def read_list(path):
    return [l.rstrip("\n").split("\t") for l in open(path)]


@pytest.mark.parametrize("flip", [True, False])
def test_embed_folder_names_and_skips_bad_images(tiny_model_file, tmp_path, flip, capsys):
    path, model = tiny_model_file
    imgs = faces(5)
    root = tmp_path / "faces"
    (root / "b").mkdir(parents=True)
    names = ["a1.png", "a2.jpg", "b/b1.png", "b/b2.png", "c.png"]
    for n, im in zip(names, imgs):
        (root / n).write_bytes(encode_image(im, "png"))  # png bytes under .jpg too: decoded by content
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "notes.txt").write_text("not an image")
    rc = embed.main(["--checkpoint", path, "--images", str(root), "--out", str(tmp_path / "f"),
                     "--batch-size", "2", "--workers", "0", "--flip", str(flip).lower()])
    assert rc == 0
    out, err = capsys.readouterr()  # the counts are exact: 5 of the 6 images embedded
    assert err.splitlines()[-1].startswith("embedded 5/6 images, 1 unreadable (")
    assert "6 items -> " in out and "; 5 embedded, 1 unreadable" in out
    feats, lines = np.load(tmp_path / "f.npy"), read_list(tmp_path / "f.txt")
    order = sorted(names + ["b/broken.png"])
    assert [l[0] for l in lines] == order and feats.shape == (6, model.dim)
    bad = order.index("b/broken.png")
    assert lines[bad][1] == "bad" and "decode" in lines[bad][2]
    assert np.isnan(feats[bad]).all()
    good = [i for i in range(6) if i != bad]
    assert all(lines[i][1] == "ok" for i in good)
    ref = expected(model, [imgs[names.index(order[i])] for i in good], flip)
    np.testing.assert_allclose(feats[good], ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(feats[good], axis=1), 1.0, atol=1e-6)


def test_embed_list_recordio_and_bin(tiny_model_file, tmp_path):
    path, model = tiny_model_file
    imgs = faces(4, seed=1)
    for i, im in enumerate(imgs):
        (tmp_path / f"{i}.png").write_bytes(encode_image(im))
    (tmp_path / "list.txt").write_text("# faces\n0.png\t7\n1.png\n\nmissing.png\n" + str(tmp_path / "3.png") + "\n")
    assert embed.main(["--checkpoint", path, "--list", str(tmp_path / "list.txt"), "--out",
                       str(tmp_path / "l"), "--workers", "1", "--progress", "false"]) == 0
    feats, lines = np.load(tmp_path / "l.npy"), read_list(tmp_path / "l.txt")
    assert [l[0] for l in lines] == ["0.png", "1.png", "missing.png", str(tmp_path / "3.png")]
    assert lines[2][1] == "bad" and "FileNotFoundError" in lines[2][2] and np.isnan(feats[2]).all()
    np.testing.assert_allclose(feats[[0, 1, 3]], expected(model, [imgs[0], imgs[1], imgs[3]]), atol=1e-5)

    write_recordio(str(tmp_path / "train"), imgs, [0, 0, 1, 1])
    assert embed.main(["--checkpoint", path, "--recordio", str(tmp_path / "train"), "--out",
                       str(tmp_path / "r"), "--workers", "0", "--batch-size", "3"]) == 0
    assert [l[0] for l in read_list(tmp_path / "r.txt")] == [f"record:{k}" for k in range(1, 5)]
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), expected(model, imgs), atol=1e-5)

    write_bin(str(tmp_path / "v.bin"), imgs, [True, False])
    assert embed.main(["--checkpoint", path, "--bin", str(tmp_path / "v.bin"), "--out", str(tmp_path / "v")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "v.npy"), expected(model, imgs), atol=1e-5)


def test_embed_official_release_checkpoint(tmp_path):
    """A release-layout state dict (module.-prefixed release names) goes through load_official."""
    from lafs_fast.checkpoint import load_official
    torch.manual_seed(1)
    m = create_model("part_fvit_mini", depth=1)
    torch.save({"module." + _release_name(k): v for k, v in m.state_dict().items()}, tmp_path / "release.pth")
    imgs = faces(3, seed=2)
    (tmp_path / "in").mkdir()
    for i, im in enumerate(imgs):
        (tmp_path / "in" / f"{i}.png").write_bytes(encode_image(im))
    assert embed.main(["--checkpoint", str(tmp_path / "release.pth"), "--images", str(tmp_path / "in"),
                       "--out", str(tmp_path / "o"), "--workers", "0"]) == 0
    ref = expected(load_official(str(tmp_path / "release.pth")), imgs)
    np.testing.assert_allclose(np.load(tmp_path / "o.npy"), ref, atol=1e-5)


def test_embed_amp(tiny_model_file, tmp_path, capsys):
    """--amp auto is float32 on the CPU (the same features as none, bit for bit); bf16 runs
    under autocast (features float32, within bf16 rounding of the float32 ones, not equal to
    them); fp16 on the CPU is refused in one line."""
    path, model = tiny_model_file
    imgs = faces(4, seed=3)
    (tmp_path / "in").mkdir()
    for i, im in enumerate(imgs):
        (tmp_path / "in" / f"{i}.png").write_bytes(encode_image(im))
    feats = {}
    for amp in ("none", "auto", "bf16"):
        out = str(tmp_path / amp)
        assert embed.main(["--checkpoint", path, "--images", str(tmp_path / "in"), "--out", out,
                           "--workers", "0", "--device", "cpu", "--amp", amp]) == 0
        feats[amp] = np.load(out + ".npy")
    assert feats["none"].dtype == feats["bf16"].dtype == np.float32
    np.testing.assert_array_equal(feats["auto"], feats["none"])
    np.testing.assert_allclose(feats["none"], expected(model, imgs), atol=1e-5)
    assert not np.array_equal(feats["bf16"], feats["none"])  # autocast did run
    # unit vectors; bf16 keeps 8 bits (2^-8 = 4e-3 relative per rounding, a few roundings deep)
    np.testing.assert_allclose(feats["bf16"], feats["none"], atol=5e-2)
    assert (feats["bf16"] * feats["none"]).sum(1).min() > 0.99
    capsys.readouterr()
    assert embed.main(["--checkpoint", path, "--images", str(tmp_path / "in"), "--out", str(tmp_path / "h"),
                       "--workers", "0", "--device", "cpu", "--amp", "fp16"]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err


def test_embed_refuses_bad_arguments(tiny_model_file, tmp_path, capsys):
    path, _ = tiny_model_file
    assert embed.main(["--checkpoint", path, "--out", str(tmp_path / "x")]) == 2
    assert "exactly one input" in capsys.readouterr().err
    assert embed.main(["--checkpoint", path, "--images", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert embed.main(["--checkpoint", str(tmp_path / "junk.pt"), "--images", str(tmp_path)]) == 2
    assert "junk.pt" in capsys.readouterr().err
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, tmp_path / "step-00000001.pt")
    assert embed.main(["--checkpoint", str(tmp_path / "step-00000001.pt"), "--images", str(tmp_path)]) == 2
    assert "training checkpoint" in capsys.readouterr().err


def test_grid_sample_patches_is_the_patch_op():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, S, S, generator=g) * 2 - 1
    lm = torch.rand(2, 30, 2, generator=g) * (S + 16) - 8  # inside, on and past the borders
    got = export.grid_sample_patches(x, lm, 8)
    ref = ops.landmark_patches(x, lm, patch_size=8, backend="reference")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    assert (ref.abs() > 0.5).any() and (ref == 0).any()  # real values and out-of-image zeros


def test_onnx_export_matches_pytorch(tiny_model_file, tmp_path):
    require_optional("onnx")
    ort = require_optional("onnxruntime")
    path, model = tiny_model_file
    out = str(tmp_path / "model.onnx")
    assert export.main(["--checkpoint", path, "--out", out, "--landmarks-output"]) == 0
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    for batch in (1, 5):  # exported with 2: the batch axis is dynamic
        x = torch.rand(batch, 3, S, S, generator=torch.Generator().manual_seed(batch)) * 2 - 1
        emb, lm = sess.run(["embedding", "landmarks"], {"image": x.numpy()})
        with torch.no_grad():
            ref_emb, ref_lm = model(x, return_landmarks=True)  # the model's own patch op backend
        assert emb.shape == (batch, model.dim)
        np.testing.assert_allclose(emb, ref_emb.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(lm, ref_lm.numpy(), atol=1e-3, rtol=0)
    assert float(ref_lm.std()) > 5  # landmarks spread over the face: patches differ per token
    import onnx
    m = onnx.load(out)
    assert m.opset_import[0].version >= 16
    assert sum(n.op_type == "GridSample" for n in m.graph.node) == 1
    assert export.main(["--checkpoint", path, "--out", out, "--opset", "15"]) == 2


def test_a_missing_optional_dependency_skips_but_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_test_dependency is not installed"):
        require_optional("no_such_test_dependency")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: a missing test dependency fails"):
        require_optional("no_such_test_dependency")
    assert require_optional("numpy") is np
