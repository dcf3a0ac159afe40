"""CUDA kernels run on the CPU, thread by thread (tests/cuda_emulation/).

A CUDA kernel whose thread body is plain C++ (no shared memory, barrier or warp operation) is
tested here without a GPU: a small extension built from the kernel's own header calls that body
for every (block, thread) of the launch the CUDA launcher makes, and the result is compared with
PyTorch. The output starts as NaN, so a pixel that no thread writes fails the comparison.

Kernels covered: dw_fwd_cl_rows (depthwise channels_last forward and stride-1 grad_input,
csrc/ops/cuda/depthwise_conv2d_cl_rows.h).
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

from kernel_test_support import ERROR_FLOOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H200_SMS = 132


@functools.lru_cache(maxsize=None)
def _extension():
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name="fastcnn_cuda_emulation",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation", "depthwise_cl_rows.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2"],
        # A compiler that links libstdc++ statically by default (the GPU machines' image) would
        # give the module a private copy beside torch's (see setup.py).
        extra_ldflags=["-lstdc++"],
        verbose=False,
    )


@pytest.fixture(scope="module")
def emulation():
    return _extension()


def _close(actual, expected, dtype):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    tol = 2 * ERROR_FLOOR[dtype] * max(scale, 1.0)
    assert not torch.isnan(actual).any(), "a pixel was never written"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=tol)


# (N, C, H, W, K, stride, padding)
FORWARD_CASES = [
    (2, 32, 17, 19, 3, 1, 1),
    (1, 12, 8, 13, 3, 2, 1),
    (3, 4, 9, 7, 3, 1, 0),
    (2, 8, 5, 6, 3, 1, 2),  # padding past k // 2
    (1, 132, 7, 7, 3, 1, 1),  # more channel vectors than one block's 32
    (2, 20, 15, 15, 3, 2, 0),
    (1, 16, 3, 3, 3, 1, 1),  # the whole image is border
    (2, 8, 11, 23, 5, 1, 2),
    (1, 24, 12, 9, 5, 2, 2),
    (1, 4, 6, 6, 5, 1, 4),
    (1, 1024, 7, 7, 3, 1, 1),  # MobileNet v1's last depthwise layer
    (2, 64, 28, 28, 3, 2, 1),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sm_count", [1, H200_SMS])  # one SM: each thread walks many segments
def test_dw_fwd_cl_rows_matches_conv2d(emulation, case, dtype, sm_count):
    n, c, h, w, k, stride, padding = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, generator=g).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, groups=c)
    out, launch = emulation.depthwise_cl_rows_forward(
        x, weight, bias, stride, padding, padding, expected.shape[2], expected.shape[3], False, sm_count)
    grid_x, grid_y, block_x, block_y = launch
    assert block_x * block_y == 256 and 1 <= grid_y <= 65535
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out, expected, dtype)


@pytest.mark.parametrize("case", [c for c in FORWARD_CASES if c[5] == 1], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dw_fwd_cl_rows_flipped_is_grad_input(emulation, case, dtype):
    """The launcher computes a stride-1 grad_input as the forward kernel on grad_output with the
    taps flipped and padding (k - 1) - padding; that padding is negative when padding > k - 1."""
    n, c, h, w, k, stride, padding = case
    g = torch.Generator().manual_seed(hash(case) % 2**31 + 1)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    y = F.conv2d(x, weight, None, 1, padding, groups=c)
    grad_output = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(y, x, grad_output)
    go = grad_output.to(dtype).contiguous(memory_format=torch.channels_last)
    flipped_pad = (k - 1) - padding
    out, _ = emulation.depthwise_cl_rows_forward(
        go, weight.to(dtype), None, 1, flipped_pad, flipped_pad, h, w, True, H200_SMS)
    _close(out, expected, dtype)


def test_dw_fwd_cl_rows_declines_what_it_does_not_take(emulation):
    x = torch.randn(1, 6, 8, 8).contiguous(memory_format=torch.channels_last)  # C not a multiple of 4
    with pytest.raises(RuntimeError, match="does not take"):
        emulation.depthwise_cl_rows_forward(x, torch.randn(6, 1, 3, 3), None, 1, 1, 1, 8, 8, False, H200_SMS)
    x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="does not take"):  # 7x7 stays on the general kernel
        emulation.depthwise_cl_rows_forward(x, torch.randn(8, 1, 7, 7), None, 1, 3, 3, 8, 8, False, H200_SMS)
