"""Face embeddings of a set of aligned face crops, for use outside lafs_fast.

    python -m lafs_fast.embed --checkpoint runs/pipeline/3_finetune/model.pt --images faces/ --out feats

Input (one of): --images FOLDER (every image file below it, sorted by relative path), --list FILE
(one image path per line, relative to the list's folder unless absolute; text after a tab is
ignored, blank lines and lines starting with '#' too), --recordio PREFIX (insightface train.rec /
.idx, every image record in key order) or --bin FILE (an insightface verification .bin, images in
stored order). The checkpoint is a lafs_fast model file (model.pt of finetune / convert) or an
official release checkpoint (through checkpoint.load_official; --landmark-cnn for a backbone
without one).

Output: FEATS.npy, float32 (N, D), one row per input item in input order, L2-normalised
(embedding(x) + embedding(flipped x) first with --flip true, as verification does), and
FEATS.txt, N lines "<name>\\tok" or "<name>\\tbad\\t<reason>". An unreadable image is skipped
(never given to the model), named on stderr and in the list, and its .npy row is all NaN: rows
and lines stay aligned and a bad row cannot pass for a face.

--amp none (default) computes the features in float32, exactly as evaluation does. --amp bf16 /
fp16 run the model under autocast (features returned in float32); auto picks bf16 on a CUDA GPU
that has it (fp16 on older ones) and none on the CPU. Why none on the CPU: bf16 pays only on CPUs
with native bf16 arithmetic (measured 1.7x on a Zen 4 with avx512_bf16, bench/embed_throughput*.md;
emulated elsewhere, and slower), and what it does to a trained model's verification accuracy (the
landmark CNN's convolutions run in bf16 too) is not measured yet; ask for it with --amp bf16.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

AMP_CHOICES = ("none", "bf16", "fp16", "auto")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- inputs
class Items(torch.utils.data.Dataset):
    """(index, uint8 (3, S, S) image or None, error text) per input item; never raises for one
    bad item."""

    def __init__(self, names: list[str], read, image_size: int):
        self.names, self.read, self.image_size = names, read, image_size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        from .data.image_folder import decode_image_bytes
        try:
            return i, decode_image_bytes(self.read(i), self.image_size), ""
        except Exception as e:  # any unreadable item: named, not fatal
            return i, None, f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")


def _collate(batch):
    return batch


def folder_items(root: str) -> tuple[list[str], list[str]]:
    if not os.path.isdir(root):
        raise ValueError(f"--images: {root!r} is not a folder")
    rel = []
    for d, _, files in os.walk(root):
        rel += [os.path.relpath(os.path.join(d, f), root) for f in files if f.lower().endswith(IMAGE_EXTS)]
    rel.sort()
    if not rel:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_EXTS)}) under {root}")
    return rel, [os.path.join(root, r) for r in rel]


def list_items(list_file: str) -> tuple[list[str], list[str]]:
    if not os.path.isfile(list_file):
        raise ValueError(f"--list: no such file {list_file}")
    base = os.path.dirname(os.path.abspath(list_file))
    names = []
    with open(list_file) as f:
        for line in f:
            line = line.rstrip("\n").split("\t")[0].strip()
            if line and not line.startswith("#"):
                names.append(line)
    if not names:
        raise ValueError(f"--list: {list_file} names no images")
    return names, [n if os.path.isabs(n) else os.path.join(base, n) for n in names]


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _RecordReader:
    """Picklable reader of the image bytes of record keys (DataLoader workers)."""

    def __init__(self, prefix: str, keys: list[int]):
        from .data.recordio import RecordIOReader
        self.reader, self.keys = RecordIOReader(prefix if prefix.endswith(".rec") else prefix + ".rec"), keys

    def __call__(self, i: int) -> bytes:
        from .data.recordio import unpack_record
        return unpack_record(self.reader.read(self.keys[i]))[2]


def recordio_items(prefix: str):
    import warnings
    from .data.recordio import RecordIODataset
    with warnings.catch_warnings():  # entries past the end are kept here, and named per item
        warnings.simplefilter("ignore")
        ds = RecordIODataset(prefix)
    keys = sorted(set(ds.image_keys) | set(ds.bad_keys))
    return [f"record:{k}" for k in keys], _RecordReader(prefix, keys)


def bin_items(path: str):
    """A .bin's images (decoded by eval.load_bin, which refuses a .bin with an undecodable image:
    a verification set cannot lose one image of a pair)."""
    from .eval import load_bin
    images, _ = load_bin(path)
    names = [f"bin:{i}" for i in range(len(images))]
    return names, images


# ----------------------------------------------------------------------------- embedding
def resolve_amp(amp: str, device: torch.device) -> str:
    """The precision --amp asks for on `device`: none, bf16 or fp16 (auto: bf16 on a CUDA GPU
    with bf16, fp16 on one without, none on the CPU)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        if device.type != "cuda":
            return "none"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "fp16" and device.type == "cpu":
        raise ValueError("--amp fp16 needs a CUDA device (CPUs have no fast float16 path); "
                         "use --amp bf16 or none on the CPU")
    return amp


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def embed_uint8(model, images: torch.Tensor, flip: bool, amp: str = "none") -> torch.Tensor:
    """L2-normalised float32 features of uint8 (B, 3, S, S) images (flip-sum as in evaluation),
    the model run under `amp` autocast (none, bf16 or fp16; see resolve_amp)."""
    from .data import to_model_input
    x = to_model_input(images)
    with _autocast(x.device, amp):
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[3])).float()
    return F.normalize(e, dim=1).cpu()


def run(checkpoint: str, out: str, images: str = "", list_file: str = "", recordio: str = "",
        bin_file: str = "", flip: bool = True, batch_size: int = 64, device: str = "auto",
        workers: int = 2, landmark_cnn: Optional[str] = None, progress: bool = True,
        amp: str = "none") -> dict:
    given = [bool(images), bool(list_file), bool(recordio), bool(bin_file)]
    if sum(given) != 1:
        raise ValueError("give exactly one input: --images, --list, --recordio or --bin")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible")
    amp = resolve_amp(amp, dev)
    from .convert import load_any_model
    model = load_any_model(checkpoint, landmark_cnn).to(dev).eval()
    S = model.image_size
    if bin_file:
        names, decoded = bin_items(bin_file)
        batches = ([(i, decoded[i], "") for i in range(j, min(j + batch_size, len(names)))]
                   for j in range(0, len(names), batch_size))
    else:
        if images:
            names, paths = folder_items(images)
            read = _Paths(paths)
        elif list_file:
            names, paths = list_items(list_file)
            read = _Paths(paths)
        else:
            names, read = recordio_items(recordio)
        loader = torch.utils.data.DataLoader(Items(names, read, S), batch_size=batch_size, shuffle=False,
                                             num_workers=workers, collate_fn=_collate)
        batches = iter(loader)
    N = len(names)
    feats = np.full((N, model.dim), np.nan, dtype=np.float32)
    bad: dict[int, str] = {}
    done, t0 = 0, time.time()
    tty = sys.stderr.isatty()
    for batch in batches:
        good = [(i, img) for i, img, err in batch if img is not None]
        for i, img, err in batch:
            if img is None:
                bad[i] = err
                print(f"{chr(10) if tty else ''}unreadable, skipped: {names[i]}: {err}", file=sys.stderr)
        if good:
            x = torch.stack([img for _, img in good]).to(dev, non_blocking=True)
            feats[[i for i, _ in good]] = embed_uint8(model, x, flip, amp).numpy()
        before, done = done, done + len(batch)
        # a rewritten line on a terminal; otherwise (logs) a line per tenth of the input
        if progress and (tty or done == N or done * 10 // N != before * 10 // N):
            rate = done / max(1e-9, time.time() - t0)
            print(f"{chr(13) if tty else ''}embedded {done}/{N} images ({rate:.1f} img/s, {len(bad)} unreadable)",
                  end="" if tty else chr(10), file=sys.stderr, flush=True)
    if progress and tty:
        print(file=sys.stderr)
    out = out[:-4] if out.endswith(".npy") else out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out + ".npy", feats)
    with open(out + ".txt", "w") as f:
        for i, n in enumerate(names):
            f.write(f"{n}\tok\n" if i not in bad else f"{n}\tbad\t{bad[i]}\n")
    return {"features": out + ".npy", "list": out + ".txt", "count": N, "unreadable": len(bad),
            "dim": model.dim, "seconds": time.time() - t0, "amp": amp}


class _Paths:
    def __init__(self, paths):
        self.paths = paths

    def __call__(self, i: int) -> bytes:
        return _read_file(self.paths[i])


def _bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lafs_fast.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="lafs_fast model file or official release checkpoint")
    src = p.add_argument_group("input (exactly one)")
    src.add_argument("--images", default="", help="folder of face crops (searched recursively)")
    src.add_argument("--list", default="", dest="list_file", help="text file of image paths, one per line")
    src.add_argument("--recordio", default="", help="insightface train.rec prefix (or .rec path)")
    src.add_argument("--bin", default="", dest="bin_file", help="insightface verification .bin")
    p.add_argument("--out", default="features", help="output prefix: OUT.npy (features) and OUT.txt (names)")
    p.add_argument("--flip", type=_bool, default=True, help="add the horizontally flipped image's embedding first")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0 = in the main one)")
    p.add_argument("--landmark-cnn", default=None, help="release checkpoint whose landmark CNN completes "
                                                        "a LAFS / DINO backbone")
    p.add_argument("--progress", type=_bool, default=True)
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="none: float32 (as evaluation); bf16 / fp16: autocast; auto: bf16 on a CUDA GPU "
                        "(fp16 without bf16), none on the CPU")
    a = p.parse_args(argv)
    try:
        r = run(a.checkpoint, a.out, a.images, a.list_file, a.recordio, a.bin_file, a.flip, a.batch_size,
                a.device, a.workers, a.landmark_cnn, a.progress, a.amp)
    except (ValueError, OSError) as e:
        print(f"python -m lafs_fast.embed: error: {e}", file=sys.stderr)
        return 2
    print(f"{r['count']} items -> {r['features']} ({r['count']} x {r['dim']}), names in {r['list']}; "
          f"{r['unreadable']} unreadable (NaN rows, marked 'bad' in the list)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
