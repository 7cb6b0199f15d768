"""insightface / MXNet RecordIO reader and a small writer, without mxnet.

File layout (dmlc recordio): each record is uint32 magic 0xced7230a, uint32 lrecord (upper 3
bits cflag, lower 29 bits length), the payload, zero padding to 4 bytes. cflag 0 is a whole
record; 1 / 2 / 3 are first / middle / last parts of a record that was split where its data
contained the magic word (the reader re-inserts the magic between parts). The .idx file has
"key\\toffset" lines. Payload: IRHeader '<IfQQ' (flag, label, id, id2); when flag > 0, `flag`
float32 labels follow (and the header label is unused); then the encoded image.
insightface convention: record 0 has flag > 0 and label[0] = first key after the images, so the
images are keys 1 .. label[0] - 1 (keys from label[0] to label[1] - 1 describe identities).
"""
from __future__ import annotations

import os
import struct
import warnings
from typing import Optional, Sequence, Union

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from .image_folder import SkipCorrupt, decode_image_bytes, encode_image

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(IR_FORMAT)


class RecordIOError(ValueError):
    """A record that cannot be read or parsed."""


def read_index(idx_path: str) -> dict[int, int]:
    """key -> byte offset from a .idx file."""
    index: dict[int, int] = {}
    with open(idx_path) as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t")
            try:
                key, offset = (int(p) for p in parts) if len(parts) == 2 else (None, None)
            except ValueError:
                key = offset = None
            if key is None or offset < 0:
                raise ValueError(f"{idx_path}:{n + 1}: expected 'key<TAB>offset' (integers, offset >= 0), "
                                 f"got {line!r}")
            index[key] = offset
    return index


def unpack_record(payload: bytes) -> tuple[np.ndarray, int, bytes]:
    """IRHeader payload -> (labels float32 array, id, image bytes)."""
    if len(payload) < IR_SIZE:
        raise RecordIOError(f"record of {len(payload)} bytes is shorter than its header")
    flag, label, ident, _ = struct.unpack_from(IR_FORMAT, payload)
    pos = IR_SIZE
    if flag > 0:
        if len(payload) < pos + 4 * flag:
            raise RecordIOError(f"record header announces {flag} labels past its end")
        labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=pos).copy()
        pos += 4 * flag
    else:
        labels = np.array([label], dtype=np.float32)
    return labels, ident, payload[pos:]


def pack_record(label: Union[float, Sequence[float]], image: bytes = b"", ident: int = 0) -> bytes:
    """The inverse of unpack_record: a scalar label uses flag 0, a sequence flag = len."""
    if isinstance(label, (int, float, np.floating, np.integer)):
        return struct.pack(IR_FORMAT, 0, float(label), ident, 0) + image
    lab = np.asarray(label, dtype="<f4")
    return struct.pack(IR_FORMAT, len(lab), 0.0, ident, 0) + lab.tobytes() + image


class RecordIOReader:
    """Random access to records by key through the .idx file; fork-safe (os.pread on a
    descriptor reopened in each process)."""

    def __init__(self, rec_path: str, idx_path: Optional[str] = None):
        if idx_path is None:
            idx_path = os.path.splitext(rec_path)[0] + ".idx"
        for p in (rec_path, idx_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"RecordIO file not found: {p}")
        self.rec_path, self.idx_path = rec_path, idx_path
        self.index = read_index(idx_path)
        self.keys = sorted(self.index)
        self.size = os.path.getsize(rec_path)
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = state["_pid"] = None
        return state

    def __del__(self):
        # getattr: __init__ may have failed (a missing file) before the descriptor existed
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def _read_part(self, offset: int) -> tuple[int, bytes, int]:
        head = os.pread(self._file(), 8, offset)
        if len(head) < 8:
            raise RecordIOError(f"{self.rec_path}: truncated record header at offset {offset} "
                                f"(file size {self.size}: a truncated .rec or an .idx of another file)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{self.rec_path}: bad magic 0x{magic:08x} at offset {offset}")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        data = os.pread(self._file(), length, offset + 8)
        if len(data) < length:
            raise RecordIOError(f"{self.rec_path}: truncated record at offset {offset} ({length} bytes "
                                f"announced, {len(data)} left in the file)")
        return cflag, data, offset + 8 + ((length + 3) & ~3)

    def read(self, key: int) -> bytes:
        """The raw payload of record `key` (multi-part records joined)."""
        if key not in self.index:
            raise KeyError(f"key {key} not in {self.idx_path}")
        cflag, data, nxt = self._read_part(self.index[key])
        if cflag == 0:
            return data
        if cflag != 1:
            raise RecordIOError(f"record {key} starts with continuation flag {cflag}")
        parts = [data]
        while True:
            cflag, data, nxt = self._read_part(nxt)
            parts.append(data)
            if cflag == 3:
                return _MAGIC_BYTES.join(parts)
            if cflag != 2:
                raise RecordIOError(f"record {key}: unexpected flag {cflag} inside a split record")


class RecordIODataset(SkipCorrupt, Dataset):
    """insightface train.rec / train.idx as (uint8 (3, S, S), int label) items.

    A corrupt record (bad magic, truncation, undecodable image) is skipped: the next good record
    is returned instead, the record is named in one warning and its key joins ``bad_keys``
    (shared with DataLoader workers, see ``SkipCorrupt``). Only when ``max_skip`` records in a
    row are bad does it raise. .idx entries that point past the end of the .rec (a truncated file) are
    known bad at once: left out of the items, counted in ``bad_keys``, with one warning.
    """

    item_kind = "record"

    def __init__(self, path_prefix: str, image_size: int = 112, max_skip: int = 64,
                 channel_order: str = "rgb"):
        # channel_order 'bgr': the records hold channels reversed (the release's img2rec.py packs
        # RGB arrays with an encoder that expects BGR, so WebFace4M decodes as BGR); they are
        # swapped back at load, as the release's loader does for every non-MS1M path
        # (image_iter.py:320-321).
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.swap_channels = channel_order == "bgr"
        rec = path_prefix if path_prefix.endswith(".rec") else path_prefix + ".rec"
        self.reader = RecordIOReader(rec)
        self.image_size, self.max_skip, self.source = image_size, max_skip, rec
        self._labels: Optional[np.ndarray] = None
        self.image_keys = list(self.reader.keys)  # no insightface header: every record an image
        if 0 in self.reader.index:
            try:
                payload0 = self.reader.read(0)
                flag = struct.unpack_from("<I", payload0)[0] if len(payload0) >= 4 else 0
                if flag >= 2:  # insightface header record: images are keys 1 .. label[0] - 1
                    end = int(unpack_record(payload0)[0][0])
                    self.image_keys = [k for k in range(1, end) if k in self.reader.index]
            except RecordIOError as e:
                warnings.warn(f"RecordIODataset: unreadable header record 0 ({e}); using all keys")
        if not self.image_keys:
            raise ValueError(f"{rec} holds no image records")
        # Entries past the end: the .rec was cut short (or the .idx belongs to another file).
        past = [k for k in self.image_keys if self.reader.index[k] + 8 > self.reader.size]
        if len(past) == len(self.image_keys):
            raise ValueError(f"every image entry of {self.reader.idx_path} points past the end of {rec} "
                             f"({self.reader.size} bytes): the .rec is truncated or the .idx is not its index")
        if past:
            warnings.warn(f"RecordIODataset: {len(past)} of {len(self.image_keys)} entries of "
                          f"{self.reader.idx_path} point past the end of {rec} ({self.reader.size} bytes; "
                          f"truncated?), e.g. key {past[0]}: they are left out")
            lost = set(past)
            self.image_keys = [k for k in self.image_keys if k not in lost]
        self.track_corrupt(len(self.image_keys), known_bad=past)

    def __len__(self) -> int:
        return len(self.image_keys)

    def item_key(self, i: int) -> int:
        return self.image_keys[i]

    def load(self, i: int) -> tuple[Tensor, int]:
        """Record i or an exception (RecordIOError / ValueError) -- no skipping."""
        key = self.image_keys[i]
        payload = self.reader.read(key)  # its errors name the .rec file and the offset
        try:
            labels, _, img = unpack_record(payload)
            image = decode_image_bytes(img, self.image_size)
            return (image.flip(0) if self.swap_channels else image), int(labels[0])
        except ValueError as e:
            raise RecordIOError(f"{self.source}: record {key}: {e}") from e

    def corrupt_reason(self, key, error: Exception) -> str:
        return str(error).replace(f"{self.source}: record {key}: ", f"{self.source}: ", 1)

    @property
    def labels(self) -> np.ndarray:
        """All labels (int64, one per item; read once, on first use, from every record header),
        -1 for a record that cannot be read (its key is then counted in ``bad_keys``)."""
        if self._labels is None:
            out = np.full(len(self.image_keys), -1, dtype=np.int64)
            for i, k in enumerate(self.image_keys):
                if self._bad[i]:
                    continue
                try:
                    out[i] = int(unpack_record(self.reader.read(k))[0][0])
                except (RecordIOError, KeyError, OSError):
                    self.mark_corrupt(i)
            self._labels = out
        return self._labels


def _write_record(f, payload: bytes) -> None:
    """Write one logical record, split at 4-byte-aligned magic words as dmlc does."""
    chunks, start = [], 0
    for pos in range(0, len(payload) - 3, 4):
        if payload[pos:pos + 4] == _MAGIC_BYTES:
            chunks.append(payload[start:pos])
            start = pos + 4
    chunks.append(payload[start:])
    for n, chunk in enumerate(chunks):
        cflag = 0 if len(chunks) == 1 else (1 if n == 0 else (3 if n == len(chunks) - 1 else 2))
        f.write(struct.pack("<II", MAGIC, (cflag << 29) | len(chunk)))
        f.write(chunk)
        f.write(b"\x00" * ((-len(chunk)) % 4))


def write_recordio(path_prefix: str, images_uint8: Union[Tensor, Sequence[Tensor]],
                   labels: Sequence[int], encoding: str = "png", quality: int = 95) -> None:
    """Write <prefix>.rec / <prefix>.idx in the insightface layout (header record 0, images at
    keys 1..n). images: uint8 (3, H, W) each; encoding 'png' (lossless, for tests) or 'jpeg'."""
    if encoding not in ("png", "jpeg"):
        raise ValueError(f"encoding must be 'png' or 'jpeg', got {encoding!r}")
    if len(images_uint8) != len(labels):
        raise ValueError(f"{len(images_uint8)} images but {len(labels)} labels")
    n = len(labels)
    with open(path_prefix + ".rec", "wb") as rec, open(path_prefix + ".idx", "w") as idx:
        idx.write(f"0\t{rec.tell()}\n")
        _write_record(rec, pack_record([n + 1, n + 1]))
        for k, (img, lab) in enumerate(zip(images_uint8, labels), start=1):
            enc = encode_image(img, encoding, quality)
            idx.write(f"{k}\t{rec.tell()}\n")
            _write_record(rec, pack_record(float(lab), enc, ident=k))
