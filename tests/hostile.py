"""A checkpoint that would run code when unpickled in full (torch.load(weights_only=False)): the
kind of file a loader must refuse. Its "code" is harmless and visible: it creates a marker file."""
import os

import torch


class RunsCode:
    """Unpickles as open(marker, "w"): a call of a function, which only a full unpickler makes."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker, **entries) -> None:
    """Write a torch checkpoint at `path` holding `entries` and a RunsCode(marker); check that the
    file really would run its code, and remove the marker that check made."""
    torch.save({**entries, "payload": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker), "the planted checkpoint does not run code: the test would prove nothing"
    os.remove(marker)
