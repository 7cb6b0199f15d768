"""`python -m lafs_fast.train [COMMAND] [OPTIONS]`; COMMAND is one of:

  pipeline   (default) supervised Part fViT -> LAFS pretraining -> few-shot finetuning ->
             held-out verification, on the bundled ORL faces unless told otherwise
  finetune   supervised training / finetuning (CosFace / ArcFace)
  pretrain   LAFS self-supervised pretraining
  eval       verification of a checkpoint (ORL held-out pairs or insightface .bin files)

`python -m lafs_fast.train COMMAND --help` documents every option of a command.
"""
import sys

from .. import cli

PROG = "python -m lafs_fast.train"
COMMANDS = ("pipeline", "finetune", "pretrain", "eval")


def _backend_flag(argv):
    """The value of --backend on the command line, if any (checked before the command parses)."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None


def _runner(command: str):
    if command == "finetune":
        from .finetune import main
    elif command == "pretrain":
        from .pretrain import main
    elif command == "eval":
        from ..eval.bins import main
    else:
        from .pipeline import main
    return main


def main(argv=None):
    """The command's result; bad usage or input ends the process with one line on stderr and exit
    status 2, a failure at run time (a full disk, a diverged loss, a missing extra) with status 1
    (lafs_fast.cli)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    command = "pipeline"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
        if command not in COMMANDS:
            cli.report(PROG, f"unknown command {command!r} (choose from {', '.join(COMMANDS)}; see {PROG} --help)")
            sys.exit(cli.USAGE_EXIT)
    from ..ops import BackendUnavailable, require_compiled
    try:
        if not any(a in ("-h", "--help", "--print-config") for a in argv):
            require_compiled(_backend_flag(argv))
        return _runner(command)(argv)
    except Exception as e:  # noqa: BLE001 -- a bug (not classified) keeps its traceback
        code = cli.USAGE_EXIT if isinstance(e, BackendUnavailable) else cli.exit_status(e)
        if code is None:
            raise
        # Problems with the user's input, data or disk: one clear line, not a traceback.
        cli.report(f"{PROG} {command}", str(e))
        sys.exit(code)


if __name__ == "__main__":
    main()
