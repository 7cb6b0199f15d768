"""Convert a release checkpoint to lafs_fast's own format, and read that format back.

    python -m lafs_fast.convert IN OUT [--landmark-cnn PATH]

The output is {'model': state_dict, 'config': PartFViT kwargs, 'format': 'lafs_fast.part_fvit/1'}.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from . import cli
from .checkpoint import CheckpointError, load_checkpoint, load_official, save_checkpoint
from .models.part_fvit import PartFViT

FORMAT = "lafs_fast.part_fvit/1"


def save_model(model: PartFViT, path: str, **extra) -> None:
    """Atomically save a PartFViT with the config needed to rebuild it."""
    save_checkpoint(path, {"format": FORMAT, "config": dict(model.config),
                           "model": model.state_dict(), **extra})


def load_model(path: str, map_location="cpu") -> PartFViT:
    """A PartFViT (eval mode) from a file written by save_model / this converter."""
    return _model_from(load_checkpoint(path, map_location), path)


def _model_from(obj: dict, path: str) -> PartFViT:
    if "model" not in obj or "config" not in obj:
        raise CheckpointError(f"{path} is not in lafs_fast format (needs 'model' and 'config'; "
                              "for a release checkpoint use lafs_fast.checkpoint.load_official)")
    if not isinstance(obj["config"], dict) or not isinstance(obj["model"], dict):
        raise CheckpointError(f"{path}: 'config' and 'model' must be dicts, got "
                              f"{type(obj['config']).__name__} and {type(obj['model']).__name__}")
    try:
        model = PartFViT(**obj["config"])
    except (TypeError, ValueError) as e:  # a config of another version, or edited by hand
        raise CheckpointError(f"{path}: its config does not build a PartFViT ({e}): {obj['config']}") from e
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: state dict does not fit its config: {e}") from e
    return model.eval()


def load_any_model(path: str, landmark_cnn: Optional[str] = None):
    """A PartFViT in eval mode from a lafs_fast model file or an official release checkpoint."""
    obj = load_checkpoint(path)  # clear errors for missing / corrupt files
    if "rng" in obj or "optimizer" in obj or (os.path.basename(path).startswith("step-") and "kind" in obj):
        # A training-state checkpoint (optimiser, random streams; pretraining's holds student and
        # teacher together): the run's model file is the model to use.
        raise CheckpointError(f"{path} is a training checkpoint (optimiser and random-generator "
                              "states, not a model file): use the model.pt the run wrote beside it")
    if isinstance(obj.get("model"), dict) and "config" in obj:
        if landmark_cnn:
            raise ValueError("--landmark-cnn applies to official release checkpoints; "
                             f"{path} is a lafs_fast model file with its own landmark CNN")
        return _model_from(obj, path)
    try:
        return load_official(path, landmark_cnn)
    except CheckpointError as e:
        raise CheckpointError(f"{path} is neither a lafs_fast model file (model.pt of finetune / "
                              f"convert) nor a release checkpoint: {e}") from e


PROG = "python -m lafs_fast.convert"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0, or one line on stderr: exit 2 for an input that is not a release checkpoint (or is not
    there), 1 when the output cannot be written (the existing output is left as it was)."""
    ap = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("input", help="release checkpoint (supervised Part fViT or LAFS/DINO)")
    ap.add_argument("output", help="lafs_fast checkpoint to write")
    ap.add_argument("--landmark-cnn", default=None,
                    help="supervised Part fViT checkpoint to take the landmark CNN from")
    return cli.run(PROG, convert, ap.parse_args(argv))


def convert(args) -> None:
    try:
        model = load_official(args.input, args.landmark_cnn)
    except FileNotFoundError as e:
        raise cli.UsageError(str(e), "give the path of a release checkpoint") from None
    except CheckpointError as e:
        raise cli.UsageError(str(e), "give a release checkpoint (.pth); a lafs_fast model file needs no "
                                     "conversion") from None
    try:
        save_model(model, args.output, source=args.input)
    except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:  # a path under a file, or a folder
        raise cli.UsageError(f"cannot write {args.output}: {e.strerror or e}",
                             "give a file path whose parents are folders") from None
    except OSError as e:  # atomic: an existing output file is left as it was
        raise cli.RunError(f"cannot write {args.output}: {e.strerror or e}",
                           "check the free space and permissions of its folder") from None
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.output}: {n / 1e6:.2f} M parameters, config {model.config}")


if __name__ == "__main__":
    sys.exit(main())
