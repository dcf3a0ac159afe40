"""Shared by the CUDA and Triton test files of every op: the GPU test markers, the error floors of
the "2x PyTorch's own error" rule, and compiling Triton kernels for an H100 (sm_90) on a machine
without a GPU, which catches what the interpreter accepts but the compiler does not."""
import os

import pytest
import torch

# Floor of the allowed error, relative to max |truth|, by dtype.
ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _has_cuda_kernel(op):
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
    except RuntimeError:  # the op itself is not registered: no extension
        return False


def cuda_kernel_marks(op):
    """pytestmark for a file of tests of `op`'s CUDA kernel (e.g. "fastcnn::grid_sample")."""
    return [
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
        pytest.mark.skipif(
            torch.cuda.is_available() and not _has_cuda_kernel(op),
            reason="fastcnn._C was built without its CUDA sources",
        ),
    ]


def needs_ptxas():
    ptxas = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's bundled ptxas is missing")


def compile_sm90(kernel, pointer_types, constexprs, int64_args=()):
    """Compiles a @triton.jit kernel for sm_90: pointer arguments typed by `pointer_types`, the
    names in `int64_args` as i64, other scalars as i32, `constexprs` fixed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "i64" if name in int64_args else "i32")
        for name in names
    }
    try:
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(k),): v for k, v in constexprs.items()})
    except TypeError as exc:  # the ASTSource signature moves between Triton releases
        pytest.skip(f"triton.compiler.ASTSource API differs in this Triton: {exc}")
    return triton.compile(source, target=GPUTarget("cuda", 90, 32))
