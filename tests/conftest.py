"""Test-wide setup. Triton kernels run on CPU only through the interpreter, which must be chosen
before triton is imported: without a GPU, the suite interprets them."""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_optional(module: str):
    """The optional test dependency `module` (listed in requirements-test.txt), imported: without
    it the test is skipped, except under CI=true, where it fails -- CI installs every test
    dependency, and a skip there would hide what the test guards (a broken export, a Triton path)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        reason = f"{module} is not installed (requirements-test.txt has it): {e}"
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail(f"CI=true: a missing test dependency fails instead of skipping: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """The training commands set torch's CPU thread count (--threads): every test leaves it as it
    found it, so that a test's speed or a thread-count check never depends on the one before."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    """(path, model): a saved one-block part_fvit_tiny whose landmark CNN outputs spread (a fresh
    one is nearly constant), for the commands that read a model file."""
    from lafs_fast.convert import save_model
    from lafs_fast.models import create_model
    torch.manual_seed(0)
    m = create_model("part_fvit_tiny", depth=1).eval()
    with torch.no_grad():
        m.landmark_cnn.output_layer[1].weight.normal_(0, 0.5)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    save_model(m, path)
    return path, m
