"""Test-wide setup. Triton kernels run on CPU only through the interpreter, which must be chosen
before triton is imported: without a GPU, the suite interprets them."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
