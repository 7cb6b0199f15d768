"""`python -m lafs_fast.train [COMMAND] [OPTIONS]`; COMMAND is one of:

  pipeline   (default) supervised Part fViT -> LAFS pretraining -> few-shot finetuning ->
             held-out verification, on the bundled ORL faces unless told otherwise
  finetune   supervised training / finetuning (CosFace / ArcFace)
  pretrain   LAFS self-supervised pretraining
  eval       verification of a checkpoint (ORL held-out pairs or insightface .bin files)

`python -m lafs_fast.train COMMAND --help` documents every option of a command.
"""
import sys

COMMANDS = ("pipeline", "finetune", "pretrain", "eval")


def _backend_flag(argv):
    """The value of --backend on the command line, if any (checked before the command parses)."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    command = "pipeline"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
        if command not in COMMANDS:
            sys.exit(f"python -m lafs_fast.train: unknown command {command!r}; choose from {', '.join(COMMANDS)}")
    if command == "finetune":
        from .finetune import main as run
    elif command == "pretrain":
        from .pretrain import main as run
    elif command == "eval":
        from ..eval.bins import main as run
    else:
        from .pipeline import main as run
    from ..checkpoint import CheckpointError
    from ..ops import BackendUnavailable, require_compiled
    try:
        if not any(a in ("-h", "--help", "--print-config") for a in argv):
            require_compiled(_backend_flag(argv))
        return run(argv)
    except (ValueError, CheckpointError, OSError, FloatingPointError, BackendUnavailable) as e:
        # Problems with the user's input, data or disk (a missing or unwritable file, a full
        # disk): one clear line, not a traceback.
        sys.exit(f"python -m lafs_fast.train {command}: error: {e}")


if __name__ == "__main__":
    main()
