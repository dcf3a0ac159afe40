"""Builds the one extension, fastcnn._C: C++ sources always, CUDA sources when they can be built.

FASTCNN_CUDA=1 forces the CUDA sources (and fails if they cannot build), FASTCNN_CUDA=0 leaves
them out. Otherwise CUDA is built when torch was built with CUDA and a toolkit is found.
Build with `pip install --no-build-isolation -e .` so the extension links against the torch
that is installed, not one pip fetched into an isolated build environment.
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "fastcnn", "fastcnn.ops", "fastcnn.reference", "fastcnn.nn", "fastcnn.models", "fastcnn.bench_cases",
    "fastcnn.kernels",
]


def _want_cuda():
    flag = os.environ.get("FASTCNN_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False, "disabled by FASTCNN_CUDA=0"
    forced = flag in ("1", "true", "yes", "on")
    if torch.version.cuda is None:
        if forced:
            sys.exit("FASTCNN_CUDA=1 but this torch has no CUDA support (torch.version.cuda is None)")
        return False, "torch was built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        if forced:
            sys.exit("FASTCNN_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the toolkit root")
        return False, "no CUDA toolkit found (set CUDA_HOME to the toolkit root)"
    return True, "forced by FASTCNN_CUDA=1" if forced else f"toolkit at {cpp_extension.CUDA_HOME}"


def _extension():
    with_cuda, why = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "autograd", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    define_macros = [("FASTCNN_BUILD_CUDA", "1" if with_cuda else "0")]
    extra = {"cxx": cxx_flags}
    kind = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
        kind = cpp_extension.CUDAExtension
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(
        "fastcnn build configuration:\n"
        f"  torch {torch.__version__} (CUDA {torch.version.cuda})\n"
        f"  CUDA sources: {'yes' if with_cuda else 'no'} ({why})\n"
        f"  TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '')}\n"
        f"  MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}\n"
        f"  sources: {len(sources)}",
        flush=True,
    )
    return kind(
        "fastcnn._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        # -lstdc++ here, ahead of the libraries the compiler driver appends: a g++ set up to link
        # -static-libstdc++ (the lent GPU machines' /opt/gcc/bin/g++ is) would otherwise put a
        # private libstdc++ into _C beside the shared one torch uses; their locale data mix, and
        # formatting a number into an error message (TORCH_CHECK) crashed the process there.
        extra_link_args=["-fopenmp", "-lstdc++"],
    )


setup(
    packages=PACKAGES,
    package_dir={"fastcnn": "fastcnn", "fastcnn.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
