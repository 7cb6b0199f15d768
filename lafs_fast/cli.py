"""How lafs_fast's commands fail: one line on stderr, `prog: error: <what> (<how to fix>)`, exit
status 2 for a bad command line or input, 1 for a failure at run time; the usage is printed only
under --help.

    parser = cli.ArgumentParser(prog="python -m lafs_fast.export", description=...)
    args = parser.parse_args(argv)            # a bad option: one line, exit 2
    return cli.run(parser.prog, work, args)   # its status; UsageError -> 2, RunError / MissingExtra -> 1
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn, Optional

from ._extras import MissingExtra

USAGE_EXIT = 2
FAILURE_EXIT = 1


class CommandError(Exception):
    """A problem reported in one line: what went wrong and how to fix it."""
    exit_code = USAGE_EXIT

    def __init__(self, what: str, fix: str = ""):
        super().__init__(what + (f" ({fix})" if fix else ""))


class UsageError(CommandError):
    """Bad options or input (a missing file, a value out of range): exit 2."""
    exit_code = USAGE_EXIT


class RunError(CommandError):
    """The input was fine but the work failed (a full disk, an exporter error): exit 1."""
    exit_code = FAILURE_EXIT


def error_line(prog: str, message: str) -> str:
    return f"{prog}: error: {message}"


def report(prog: str, message: str) -> None:
    """The error line on stderr (a message spanning lines is joined into one)."""
    print(error_line(prog, " ".join(str(message).split())), file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (argparse prints the usage before them)."""

    def error(self, message: str) -> NoReturn:
        report(self.prog, f"{message} (see {self.prog} --help)")
        sys.exit(USAGE_EXIT)


# A path given wrong (an input that is not there, an output under a file): the command line's fault.
_BAD_PATH = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def exit_status(e: BaseException, plain: bool = True) -> Optional[int]:
    """The exit status of an error a command reports in one line, None for one it does not (a
    bug: its traceback is the report). CommandError: its own; MissingExtra: 1; with plain, also
    ValueError (a bad value, file or checkpoint) and a path given wrong: 2; another OSError (a
    full disk, a permission) and FloatingPointError (a diverged run): 1."""
    if isinstance(e, CommandError):
        return e.exit_code
    if isinstance(e, MissingExtra):
        return FAILURE_EXIT
    if not plain:
        return None
    if isinstance(e, (ValueError, *_BAD_PATH)):
        return USAGE_EXIT
    if isinstance(e, (OSError, FloatingPointError)):
        return FAILURE_EXIT
    return None


def run(prog: str, work: Callable, *args, plain: bool = False) -> int:
    """work(*args)'s exit status (0 when it returns None), or its error reported in one line with
    the status exit_status gives it (CommandError, MissingExtra; with plain, ValueError and
    OSError too); any other exception propagates."""
    try:
        status = work(*args)
    except Exception as e:  # noqa: BLE001 -- classified below, re-raised when not ours
        code = exit_status(e, plain)
        if code is None:
            raise
        report(prog, str(e))
        return code
    return 0 if status is None else status
