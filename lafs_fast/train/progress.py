"""Progress of a training loop: a tqdm bar on a terminal, plain lines in a log.

Redirected to a file, a tqdm bar writes one carriage-return redraw per update: thousands per
run, unreadable. Off a terminal the same figures go out as one line every `interval` seconds
and one at the end."""
from __future__ import annotations

import sys
import time


class LineProgress:
    """The part of tqdm's interface the loops use (update, set_postfix, close), as lines."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", interval: float = 30.0, file=None):
        self.total, self.n, self.desc, self.interval = total, initial, desc, interval
        self.file = file if file is not None else sys.stderr
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()
        self.start_n = initial
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._emit()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._emit()

    def _emit(self) -> None:
        elapsed = time.monotonic() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        pct = f" ({100.0 * self.n / self.total:.0f} %)" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {self.n}/{self.total}{pct} {elapsed:.0f} s {rate:.2f} steps/s{extra}",
              file=self.file, flush=True)


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True, interval: float = 30.0):
    """A tqdm bar when stderr is a terminal, LineProgress otherwise, nothing when disabled."""
    if not enabled:
        return _Off()
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
    return LineProgress(total, initial, desc, interval)
