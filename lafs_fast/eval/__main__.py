"""Evaluation commands.

    python -m lafs_fast.eval ijb --root IJB_release/IJBC --target IJBC --checkpoint model.pt --out runs/ijbc

ijb: IJB-B / IJB-C 1:1 verification from the released loose crops (see lafs_fast.eval.ijb).
An interrupted run continues from the features already in --out when started again the same way.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import cli, config

PROG = "python -m lafs_fast.eval"


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ijb = sub.add_parser("ijb", help="IJB-B / IJB-C 1:1 template verification (TAR at FAR)",
                         description="IJB-B / IJB-C 1:1 verification: align the loose crops by their 5 points, "
                                     "embed (flip sum), aggregate templates, TAR at FAR 1e-6 ... 1e-1.",
                         formatter_class=config.SwitchHelpFormatter)
    ijb.add_argument("--root", required=True, help="folder holding meta/ and loose_crop/ of the target "
                                                   "(insightface's IJB_release/IJBC or IJBB)")
    ijb.add_argument("--target", required=True, type=str.upper, choices=("IJBB", "IJBC"))
    ijb.add_argument("--checkpoint", required=True, help="lafs_fast model file (model.pt) or release checkpoint")
    ijb.add_argument("--landmark-cnn", default=None, help="release checkpoint whose landmark CNN completes a "
                                                          "LAFS / DINO backbone")
    ijb.add_argument("--out", required=True, help="output folder (features.npy, faceness.npy, scores.npy, "
                                                  "roc.png, results.json); holds the resumable feature cache")
    ijb.add_argument("--batch-size", type=int, default=128, help="faces per forward pass (each with its mirror)")
    ijb.add_argument("--workers", type=int, default=4, help="image-decoding processes (0 = in the main one)")
    ijb.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    config.add_bool_argument(ijb, "norm_score", True, "keep each image feature's norm (N1, the release's default); "
                                                      "false: L2-normalise first (N0)")
    config.add_bool_argument(ijb, "detector_score", True, "multiply each image feature by its detector score (D1, "
                                                          "the release's default)")
    config.add_bool_argument(ijb, "progress", True, "a progress line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .ijb import format_results, run_ijb
    try:
        r = run_ijb(args.root, args.target, args.checkpoint, args.out, args.landmark_cnn, args.batch_size,
                    args.workers, args.device, args.norm_score, args.detector_score, args.progress)
    except (ValueError, OSError) as e:  # a bad input (CheckpointError too): 2; a failed write: 1
        cli.report(f"{PROG} ijb", str(e))
        return cli.exit_status(e)
    except KeyboardInterrupt:
        print(f"\n{PROG} ijb: interrupted; the same command continues from the features in {args.out}",
              file=sys.stderr)
        return 130
    print(format_results(r))
    print(f"results in {args.out}: results.json, roc.png, scores.npy, features.npy, faceness.npy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
