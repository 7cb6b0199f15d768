"""Face embeddings of a set of aligned face crops, for use outside lafs_fast.

    python -m lafs_fast.embed --checkpoint runs/pipeline/3_finetune/model.pt --images faces/ --out feats

Input (one of): --images FOLDER (every image file below it, sorted by relative path), --list FILE
(one image path per line, relative to the list's folder unless absolute; text after a tab is
ignored, blank lines and lines starting with '#' too), --recordio PREFIX (insightface train.rec /
.idx, every image record in key order) or --bin FILE (an insightface verification .bin, images in
stored order). The checkpoint is a lafs_fast model file (model.pt of finetune / convert) or an
official release checkpoint (through checkpoint.load_official; --landmark-cnn for a backbone
without one). With --five-points FILE (lines `<name> x1 y1 ... x5 y5 [score]`, names as the
--images / --list input names them) each image is first aligned by its 5 points to the 112 x 112
ArcFace template (lafs_fast.eval.align), as the IJB evaluation aligns its loose crops.

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

--compile compiles the transformer blocks with torch.compile (lafs_fast.models.compile): fused
elementwise kernels between the GEMMs, a faster forward (docs/performance.md) after tens of
seconds of compilation (once per process), so it pays on large inputs. Every batch then has the
same shape (a short last batch is padded with blank images, whose rows are dropped), so there is
one compilation; the features equal the eager ones up to float rounding.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import cli, config

PROG = "python -m lafs_fast.embed"
AMP_CHOICES = ("none", "bf16", "fp16", "auto")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- inputs
class Items(torch.utils.data.Dataset):
    """(index, uint8 (3, S, S) image or None, error text) per input item; never raises for one
    bad item."""

    def __init__(self, names: list[str], read, image_size: int, matrices: Optional[np.ndarray] = None):
        self.names, self.read, self.image_size, self.matrices = names, read, image_size, matrices

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        from .data.image_folder import decode_image_bytes
        try:
            if self.matrices is None:
                return i, decode_image_bytes(self.read(i), self.image_size), ""
            return i, _aligned(decode_image_bytes(self.read(i)), self.matrices[i]), ""
        except Exception as e:  # any unreadable item: named, not fatal
            return i, None, f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")


def _aligned(image: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """The 112 x 112 face warped out of `image` by `matrix`, as an 8-bit image."""
    from .eval.align import warp_affine
    return warp_affine(image[None], torch.from_numpy(matrix)[None]).round_().clamp_(0, 255).to(torch.uint8)[0]


def five_point_matrices(path: str, names: list[str]) -> np.ndarray:
    """(N, 2, 3) alignment matrices of the input names from a 5-point file."""
    from .eval.align import arcface_template, estimate_similarity, read_five_points
    file_names, points, _ = read_five_points(path)
    row = {n: k for k, n in enumerate(file_names)}
    missing = [n for n in names if n not in row]
    if missing:
        raise ValueError(f"--five-points: {path} has no points for {missing[0]!r} ({len(missing)} of "
                         f"{len(names)} inputs lack them; names must match the input's names)")
    pts = points[[row[n] for n in names]]
    matrices = estimate_similarity(torch.from_numpy(pts), arcface_template()).numpy()
    bad = [n for n, m in zip(names, matrices) if not np.isfinite(m).all()]
    if bad:
        raise ValueError(f"--five-points: the 5 points of {bad[0]!r} coincide ({len(bad)} such inputs)")
    return matrices


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
        five_points: str = "", amp: str = "none", compile_model: bool = False) -> dict:
    given = [bool(images), bool(list_file), bool(recordio), bool(bin_file)]
    if sum(given) != 1:
        raise ValueError(f"give exactly one input: --images, --list, --recordio or --bin (got {sum(given)})")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if five_points and not (images or list_file):
        raise ValueError("--five-points aligns --images or --list inputs (RecordIO and .bin faces are aligned already)")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible")
    amp = resolve_amp(amp, dev)
    from .convert import load_any_model
    model = load_any_model(checkpoint, landmark_cnn).to(dev).eval()
    if compile_model:
        from .models.compile import compile_blocks
        compile_blocks(model)
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
        matrices = None
        if five_points:
            if S != 112:
                raise ValueError(f"--five-points aligns to 112 x 112 faces; the model takes {S} x {S}")
            matrices = five_point_matrices(five_points, names)
        loader = torch.utils.data.DataLoader(Items(names, read, S, matrices), batch_size=batch_size, shuffle=False,
                                             num_workers=workers, collate_fn=_collate)
        batches = iter(loader)
    N = len(names)
    rows = min(batch_size, N) if compile_model else 0  # one input shape for the compiled blocks
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
            feats[[i for i, _ in good]] = embed_uint8(model, _pad_rows(x, rows), flip, amp)[:len(good)].numpy()
        before, done = done, done + len(batch)
        # a rewritten line on a terminal; otherwise (logs) a line per tenth of the input
        if progress and (tty or done == N or done * 10 // N != before * 10 // N):
            rate = done / max(1e-9, time.time() - t0)
            print(f"{chr(13) if tty else ''}embedded {done - len(bad)}/{N} images, {len(bad)} unreadable "
                  f"({rate:.1f} img/s)", end="" if tty else chr(10), file=sys.stderr, flush=True)
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


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x with blank (zero) images appended up to `rows` rows (each row is embedded on its own)."""
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


class _Paths:
    def __init__(self, paths):
        self.paths = paths

    def __call__(self, i: int) -> bytes:
        return _read_file(self.paths[i])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=config.SwitchHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="lafs_fast model file or official release checkpoint")
    src = p.add_argument_group("input (exactly one)")
    src.add_argument("--images", default="", help="folder of face crops (searched recursively)")
    src.add_argument("--list", default="", dest="list_file", help="text file of image paths, one per line")
    src.add_argument("--recordio", default="", help="insightface train.rec prefix (or .rec path)")
    src.add_argument("--bin", default="", dest="bin_file", help="insightface verification .bin")
    p.add_argument("--out", default="features", help="output prefix: OUT.npy (features) and OUT.txt (names)")
    config.add_bool_argument(p, "flip", True, "add the horizontally flipped image's embedding first")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--workers", type=int, default=2, help="image-decoding processes (0 = in the main one)")
    p.add_argument("--landmark-cnn", default=None, help="release checkpoint whose landmark CNN completes "
                                                        "a LAFS / DINO backbone")
    p.add_argument("--five-points", default="", help="file of `<name> x1 y1 ... x5 y5 [score]` lines: align each "
                                                      "--images / --list input to the ArcFace template first")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES,
                   help="none: float32 (as evaluation); bf16 / fp16: autocast; auto: bf16 on a CUDA GPU "
                        "(fp16 without bf16), none on the CPU")
    config.add_bool_argument(p, "compile", False, "compile the transformer blocks (torch.compile): faster after "
                                                   "tens of seconds of compilation; features equal up to rounding")
    config.add_bool_argument(p, "progress", True, "a progress line (rewritten on a terminal, every tenth in a log)")
    a = p.parse_args(argv)
    return cli.run(PROG, _main, a, plain=True)  # a bad input: one line, exit 2; a failed write: exit 1


def _main(a) -> None:
    r = run(a.checkpoint, a.out, a.images, a.list_file, a.recordio, a.bin_file, a.flip, a.batch_size,
            a.device, a.workers, a.landmark_cnn, a.progress, a.five_points, a.amp, a.compile)
    print(f"{r['count']} items -> {r['features']} ({r['count']} x {r['dim']}), names in {r['list']}; "
          f"{r['count'] - r['unreadable']} embedded, {r['unreadable']} unreadable (NaN rows, marked 'bad' in the list)")


if __name__ == "__main__":
    sys.exit(main())
