"""Corrupt training images through DataLoader workers, as training reads them: each is named once
for the whole run (not once per worker and epoch) in one line, by its path or record key and
without the repr of an in-memory file, and the main process can count them per epoch."""
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from lafs_fast.data.image_folder import ImageFolderDataset, decode_image_bytes, encode_image
from lafs_fast.data.recordio import RecordIODataset, write_recordio

SCRIPT = textwrap.dedent("""
    import sys, torch
    from lafs_fast.data.image_folder import ImageFolderDataset
    from lafs_fast.data.recordio import RecordIODataset

    def main():
        kind, path, context, epochs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        ds = ImageFolderDataset(path, 16) if kind == "folder" else RecordIODataset(path, 16)
        for epoch in range(epochs):  # new worker processes every epoch, as in training
            order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch))
            loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=order.tolist(), num_workers=2,
                                                 multiprocessing_context=context)
            served = sum(len(y) for _, y in loader)
            print(f"epoch {epoch}: {served} served, {ds.count_corrupt(order)} corrupt, "
                  f"{ds.num_corrupt} in all, bad {sorted(map(str, ds.bad_keys))}")

    if __name__ == "__main__":
        main()
""")


def images(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(n)]


def corrupt_folder(tmp_path):
    imgs = images(6)
    root = tmp_path / "faces"
    for i, img in enumerate(imgs):
        (root / f"id{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"id{i % 2}" / f"{i}.png").write_bytes(encode_image(img))
    (root / "id1" / "3.png").write_bytes(b"\x89PNG not really")  # unrecognised format
    return str(root), str(root / "id1" / "3.png")


def corrupt_recordio(tmp_path):
    prefix = str(tmp_path / "train")
    write_recordio(prefix, images(6), [0, 1, 0, 1, 0, 1])
    offsets = [int(line.split("\t")[1]) for line in open(prefix + ".idx") if line.strip()]
    with open(prefix + ".rec", "r+b") as f:  # record 4's PNG bytes overwritten
        f.seek(offsets[4] + 8 + 24 + 20)
        f.write(bytes(40))
    return prefix, "record 4"


def resource_tracker_noise(line):
    """CPython's resource tracker may report a DataLoader queue's semaphore as leaked when spawned
    workers shut down (a two-line UserWarning from multiprocessing itself, not from this package)."""
    return "resource_tracker" in line or line.lstrip().startswith("warnings.warn('resource_tracker")


@pytest.mark.parametrize("kind, context, epochs", [("folder", "fork", 3), ("recordio", "fork", 3),
                                                   ("folder", "spawn", 2)])
def test_each_corrupt_item_is_named_once_and_counted(tmp_path, kind, context, epochs):
    path, name = corrupt_folder(tmp_path) if kind == "folder" else corrupt_recordio(tmp_path)
    script = tmp_path / "epochs.py"
    script.write_text(SCRIPT)
    res = subprocess.run([sys.executable, str(script), kind, path, context, str(epochs)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stderr.splitlines() if line.strip() and not resource_tracker_noise(line)]
    assert len(warned) == 1, res.stderr  # one line, once for the whole run
    assert f"skipping corrupt {'image ' + name if kind == 'folder' else 'record 4'}: " in warned[0]
    assert "BytesIO" not in warned[0] and "could not decode image" in warned[0]
    assert warned[0].endswith("1 corrupt so far")
    key = name if kind == "folder" else "4"
    assert res.stdout.splitlines() == [f"epoch {e}: 6 served, 1 corrupt, 1 in all, bad [{key!r}]"
                                       for e in range(epochs)]


def test_count_corrupt_counts_the_given_items(tmp_path):
    root, bad = corrupt_folder(tmp_path)
    ds = ImageFolderDataset(root, 16)
    i = ds.paths.index(bad)
    assert ds.num_corrupt == 0 and ds.count_corrupt(range(len(ds))) == 0
    with pytest.warns(UserWarning, match="skipping corrupt image"):
        ds[i]
    others = [j for j in range(len(ds)) if j != i]
    assert ds.num_corrupt == 1 and ds.count_corrupt([i, i]) == 2 and ds.count_corrupt(others) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[i][1] == ds[(i + 1) % len(ds)][1]  # known bad: passed over, no second warning


def test_undecodable_bytes_are_described_without_a_file_object_repr():
    with pytest.raises(ValueError) as e:
        decode_image_bytes(b"definitely not an image")
    assert str(e.value) == "could not decode image (23 bytes): unrecognised image format"
    png = encode_image(images(1)[0])
    with pytest.raises(ValueError, match=r"could not decode image \(\d+ bytes\): ") as e:
        decode_image_bytes(png[:60])  # cut short: PIL's own reason
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)


def test_recordio_bad_keys_cover_entries_past_the_end_and_read_failures(tmp_path):
    prefix, _ = corrupt_recordio(tmp_path)
    ds = RecordIODataset(prefix, 16)
    with pytest.warns(UserWarning, match=r"skipping corrupt record 4: .*train\.rec: could not decode image"):
        ds[3]
    assert ds.bad_keys == {4} and ds.num_corrupt == 1
