"""`python -m lafs_fast.info`: versions, build facts and which op backends are usable here."""
import importlib.util
import os
import platform
import sys

import torch

from . import cli


def backend_status() -> dict:
    from . import ops
    status = {"reference": "usable (plain PyTorch)"}
    if not ops.HAS_EXTENSION:
        status["cpu"] = status["cuda"] = f"unavailable: {ops.EXTENSION_STATUS}"
    else:
        status["cpu"] = "usable" if ops.has_kernel("landmark_patch_embed", "CPU") else "not built"
        if not ops.has_kernel("landmark_patch_embed", "CUDA"):
            status["cuda"] = "not built (rebuild with LAFS_FAST_CUDA=1)"
        else:
            status["cuda"] = "usable" if torch.cuda.is_available() else "built, but no GPU visible"
    if importlib.util.find_spec("triton") is None:
        status["triton"] = "unavailable: triton is not installed"
    elif torch.cuda.is_available():
        status["triton"] = "usable"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        status["triton"] = "usable on CPU through the interpreter (slow; for tests)"
    else:
        status["triton"] = "needs a GPU (or TRITON_INTERPRET=1 for the slow CPU interpreter)"
    return status


def cpu_isa() -> str:
    """The instruction-set path of the CPU kernels (LAFS_FAST_CPU_ISA forces a lower one)."""
    from . import ops
    if not ops.HAS_EXTENSION:
        return "unavailable (no lafs_fast._C)"
    if not hasattr(torch.ops.lafs_fast, "cpu_isa"):
        return "unknown (lafs_fast._C predates the CPU path switch: rebuild it)"
    return (f"{torch.ops.lafs_fast.cpu_isa()} (supported: "
            f"{', '.join(torch.ops.lafs_fast.cpu_isa_supported())}; force with LAFS_FAST_CPU_ISA)")


def info() -> dict:
    from . import COMPILED_FROM, __version__, ops
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        BUILD_INFO = None
    return {
        "lafs_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": cpu_isa(),
        "extension": ops.EXTENSION_STATUS,
        "package": os.path.dirname(os.path.abspath(__file__)),
        "compiled_from": COMPILED_FROM or "the package folder",
        "build": BUILD_INFO,
        "backends": backend_status(),
        "default_backend": {"cpu tensors": ops.resolve_backend("auto", torch.device("cpu")),
                            "cuda tensors": ops.resolve_backend("auto", torch.device("cuda"))},
    }


def promised_but_unusable(facts: dict) -> list:
    """Backends the build promised that cannot run here: a reason for a non-zero exit."""
    build, backends = facts["build"], facts["backends"]
    problems = []
    if build is not None and not backends["cpu"].startswith("usable"):
        problems.append(f"cpu: {backends['cpu']}")
    if build and build.get("with_cuda") and facts["cuda_available"] and not backends["cuda"].startswith("usable"):
        problems.append(f"cuda: {backends['cuda']}")
    return problems


PROG = "python -m lafs_fast.info"


def print_report(facts: dict) -> None:
    for key, value in facts.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<16} {v}")
        else:
            print(f"{key:<18} {value}")


def run(_args) -> int:
    facts = info()
    print_report(facts)
    problems = promised_but_unusable(facts)
    if problems:
        raise cli.RunError("the build promised backends that are unusable here: " + "; ".join(problems),
                           "rebuild in this environment: pip install --no-build-isolation .")
    return 0


def main(argv=None) -> int:
    parser = cli.ArgumentParser(prog=PROG, description="Print versions, build facts and which op backends "
                                                       "are usable here.",
                                epilog="Exit status 1 when the build promised a backend that cannot run here.")
    return cli.run(PROG, run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
