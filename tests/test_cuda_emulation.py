"""CUDA kernels run on the CPU, thread by thread (tests/cuda_emulation/).

A CUDA kernel whose thread body is plain C++ (no shared memory, barrier or warp operation) is
tested here without a GPU: a small extension built from the kernel's own header calls that body
for every (block, thread) of the launch the CUDA launcher makes, and the result is compared with
PyTorch. The output starts as NaN, so a pixel that no thread writes fails the comparison.

Kernels covered: dw_fwd_cl_rows (depthwise channels_last forward and stride-1 grad_input,
csrc/ops/cuda/depthwise_conv2d_cl_rows.h) and dw_fwd_nchw_vec (the NCHW one with vector loads,
depthwise_conv2d_nchw_vec.h), and gs_affine_gather_grad_input (the STN sampler's deterministic
input gradient without a sort, grid_sample_affine_gather.h).
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

    # Built in this checkout's build/ (ignored by git): two checkouts never share a build.
    build_directory = os.path.join(ROOT, "build", "cuda_emulation")
    os.makedirs(build_directory, exist_ok=True)
    return cpp_extension.load(
        name="fastcnn_cuda_emulation",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation", name) for name in ("depthwise.cpp", "grid_sample.cpp")],
        build_directory=build_directory,
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
    x = torch.randn(n, c, h, w, generator=g).to(dtype).to(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k, generator=g).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), stride, padding, groups=c)
    out, launch = emulation.depthwise_cl_rows_forward(
        x, weight, bias, stride, padding, padding, expected.shape[2], expected.shape[3], False, sm_count)
    grid_x, grid_y, block_x, block_y = launch
    assert block_x * block_y == 256 and 1 <= grid_y <= 65535
    assert out.is_contiguous(memory_format=torch.channels_last)
    _close(out, expected, dtype)


def _grad_input_case(case):
    """(grad_output, weight, grad_input) in fp64 of F.conv2d at stride 1 with `padding` all round:
    what the launchers compute as the forward kernel on grad_output with the taps flipped and
    padding (k - 1) - padding (negative when padding > k - 1)."""
    n, c, h, w, k, _, padding = case
    g = torch.Generator().manual_seed(hash(case) % 2**31 + 1)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64)
    y = F.conv2d(x, weight, None, 1, padding, groups=c)
    grad_output = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(y, x, grad_output)
    return grad_output, weight, expected


@pytest.mark.parametrize("case", [c for c in FORWARD_CASES if c[5] == 1], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dw_fwd_cl_rows_flipped_is_grad_input(emulation, case, dtype):
    _, _, h, w, k, _, padding = case
    grad_output, weight, expected = _grad_input_case(case)
    go = grad_output.to(dtype).to(memory_format=torch.channels_last)
    flipped_pad = (k - 1) - padding
    out, _ = emulation.depthwise_cl_rows_forward(
        go, weight.to(dtype), None, 1, flipped_pad, flipped_pad, h, w, True, H200_SMS)
    _close(out, expected, dtype)


def test_dw_fwd_cl_rows_declines_what_it_does_not_take(emulation):
    x = torch.randn(1, 6, 8, 8).to(memory_format=torch.channels_last)  # C not a multiple of 4
    with pytest.raises(RuntimeError, match="does not take"):
        emulation.depthwise_cl_rows_forward(x, torch.randn(6, 1, 3, 3), None, 1, 1, 1, 8, 8, False, H200_SMS)
    x = torch.randn(1, 8, 8, 8).to(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="does not take"):  # 7x7 stays on the general kernel
        emulation.depthwise_cl_rows_forward(x, torch.randn(8, 1, 7, 7), None, 1, 3, 3, 8, 8, False, H200_SMS)


# (N, C, H, W, K, stride, top padding): left/right padding k // 2, as the kernel requires.
NCHW_VEC_CASES = [
    (2, 3, 17, 16, 3, 1, 1),
    (1, 5, 8, 12, 3, 2, 1),
    (2, 2, 9, 8, 3, 1, 0),  # no top padding: bottom rows past the input
    (1, 4, 6, 4, 3, 1, 3),  # top padding past k // 2
    (2, 3, 11, 24, 5, 1, 2),
    (1, 2, 13, 16, 5, 2, 2),
    (2, 3, 10, 28, 7, 1, 3),
    (1, 2, 15, 32, 7, 2, 3),
    (1, 3, 4, 4, 7, 1, 3),  # the window is wider than the image
    (2, 32, 28, 28, 3, 1, 1),  # MobileNet v1's 28x28 layer, batch 2
    (1, 8, 56, 56, 3, 2, 1),
]


def _nchw_vec_expected(x, weight, bias, k, stride, top, out_w):
    """F.conv2d with left/right padding k // 2 and `top` rows on top (bottom: what the height needs)."""
    pad = k // 2
    padded = F.pad(x.double(), (pad, pad, top, k))  # extra bottom rows are cut by out_h
    out_h = (x.shape[2] + top + pad - k) // stride + 1
    y = F.conv2d(padded, weight.double(), None if bias is None else bias.double(), stride, groups=x.shape[1])
    return y[:, :, :out_h, :out_w]


@pytest.mark.parametrize("case", NCHW_VEC_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dw_fwd_nchw_vec_matches_conv2d(emulation, case, dtype):
    n, c, h, w, k, stride, top = case
    vec = 2 if dtype == torch.float64 else 4
    if w % vec or ((w + 2 * (k // 2) - k) // stride + 1) % vec:
        pytest.skip("the kernel needs input and output widths that are multiples of its vector")
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    weight = torch.randn(c, 1, k, k, generator=g).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype)
    out_w = (w + 2 * (k // 2) - k) // stride + 1
    expected = _nchw_vec_expected(x, weight, bias, k, stride, top, out_w)
    out = emulation.depthwise_nchw_vec_forward(
        x, weight, bias, stride, top, k // 2, expected.shape[2], expected.shape[3], False)
    _close(out, expected, dtype)


@pytest.mark.parametrize("case", [c for c in NCHW_VEC_CASES if c[5] == 1 and c[6] == c[4] // 2],
                         ids=lambda c: "x".join(map(str, c)))
def test_dw_fwd_nchw_vec_flipped_is_grad_input(emulation, case):
    _, _, h, w, k, _, padding = case
    grad_output, weight, expected = _grad_input_case(case)
    flipped = (k - 1) - padding
    out = emulation.depthwise_nchw_vec_forward(
        grad_output.float(), weight.float(), None, 1, flipped, flipped, h, w, True)
    _close(out, expected, torch.float32)


def test_dw_fwd_nchw_vec_declines_what_it_does_not_take(emulation):
    weight = torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match="does not take"):  # width 14: not a multiple of 4
        emulation.depthwise_nchw_vec_forward(torch.randn(1, 4, 8, 14), weight, None, 1, 1, 1, 8, 14, False)
    with pytest.raises(RuntimeError, match="does not take"):  # left padding 0
        emulation.depthwise_nchw_vec_forward(torch.randn(1, 4, 8, 16), weight, None, 1, 1, 0, 8, 16, False)


def _theta(kind, n, generator):
    """[n, 2, 3] float64 maps of one kind."""
    def rand(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)

    angle, shift = rand(-3.2, 3.2), rand(-0.3, 0.3)
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    if kind == "rotation":
        s = rand(0.8, 1.2)
        rows = [(s * angle.cos(), -s * angle.sin(), shift), (s * angle.sin(), s * angle.cos(), -shift)]
    elif kind == "zoom_in":  # about 10 output pixels per input pixel and axis: long runs
        rows = [(0.1 * angle.cos(), -0.1 * angle.sin(), shift), (0.1 * angle.sin(), 0.1 * angle.cos(), shift)]
    elif kind == "zoom_out":  # sparse: most input pixels get nothing
        rows = [(2.7 * one, 0.4 * one, shift), (-0.3 * one, 3.1 * one, zero)]
    elif kind == "shear_reflect":
        rows = [(-0.9 * one, 0.6 * one, shift), (0.2 * one, 1.3 * one, -shift)]
    elif kind == "outside":  # samples entirely past the input
        rows = [(one, zero, 3.5 * one), (zero, one, zero)]
    elif kind == "line":  # rank 1: the output collapses onto a diagonal line
        rows = [(0.7 * one, 0.7 * one, shift), (0.7 * one, 0.7 * one, -shift)]
    elif kind == "point":  # theta = 0 but a translation: every output samples one point
        rows = [(zero, zero, 0.13 * one), (zero, zero, -0.41 * one)]
    elif kind == "cancellation":  # large terms that cancel
        rows = [(3000.0 * one, zero, 3000.0 * 0.3 * one), (zero, one, zero)]
    elif kind == "huge_cancellation":  # x = bx + 1e8 (by - by_12) + ...: in fp32, pixels off exact
        rows = [(one, 1e8 * one, rand(-3.0, 3.0)), (zero, one, shift)]
    else:
        raise ValueError(kind)
    return torch.stack([torch.stack(r, 1) for r in rows], 1)


def _sampler_grad_input(x, theta, size, mode, align, grad_output):
    x = x.detach().requires_grad_()
    grid = torch.nn.functional.affine_grid(theta, size, align_corners=align)
    y = torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=align)
    (grad,) = torch.autograd.grad(y, x, grad_output)
    return grad


THETA_KINDS = ["rotation", "zoom_in", "zoom_out", "shear_reflect", "outside", "line", "point", "cancellation"]
# (N, C, Hi, Wi, Ho, Wo)
GATHER_SHAPES = [(2, 1, 13, 17, 13, 17), (2, 3, 9, 8, 15, 11), (1, 6, 7, 12, 5, 9), (1, 2, 5, 1, 4, 1)]


@pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior has changed")
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", THETA_KINDS)
@pytest.mark.parametrize("align", [False, True], ids=["edges", "corners"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_affine_gather_grad_input_fp64(emulation, shape, kind, align, layout):
    n, c, hi, wi, ho, wo = shape
    g = torch.Generator().manual_seed(zlib_seed(shape, kind))
    theta = _theta(kind, n, g)
    x = torch.randn(n, c, hi, wi, generator=g, dtype=torch.float64)
    go = torch.randn(n, c, ho, wo, generator=g, dtype=torch.float64)
    for mode in ("bilinear", "nearest"):
        expected = _sampler_grad_input(x, theta, (n, c, ho, wo), mode, align, go)
        got = emulation.affine_gather_grad_input(go, theta, hi, wi, mode == "nearest", align, layout == "channels_last")
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt)
        assert not torch.isnan(got).any(), "an element was never written"
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{mode}: {m}")


@pytest.mark.parametrize("kind", THETA_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_affine_gather_grad_input_low_precision(emulation, kind, dtype):
    n, c, hi, wi, ho, wo = 2, 3, 19, 23, 21, 18
    g = torch.Generator().manual_seed(zlib_seed(kind, dtype))
    theta = _theta(kind, n, g).to(dtype)
    x = torch.randn(n, c, hi, wi, generator=g).to(dtype)
    go = torch.randn(n, c, ho, wo, generator=g).to(dtype)
    # The truth: fp64 on the values fed to the kernel; the kernel computes coordinates in fp32.
    expected = _sampler_grad_input(x.double(), theta.double(), (n, c, ho, wo), "bilinear", False, go.double())
    got = emulation.affine_gather_grad_input(go, theta, hi, wi, False, False, False)
    _close(got, expected, dtype if dtype != torch.float32 else torch.float32)


@pytest.mark.parametrize("kind", THETA_KINDS + ["huge_cancellation"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("align", [False, True], ids=["edges", "corners"])
def test_affine_gather_is_bitwise_the_scatter(emulation, kind, dtype, align):
    """Against the scatter over output pixels with the kernel's own coordinate arithmetic (what the
    sorted formulation computes): bitwise equal for every map, including ones whose fp32
    coordinates are pixels away from exact arithmetic (the candidate intervals' margin)."""
    if kind == "huge_cancellation" and dtype == torch.float16:
        pytest.skip("theta past fp16's range")
    n, c, hi, wi, ho, wo = 8, 2, 15, 21, 17, 18
    g = torch.Generator().manual_seed(zlib_seed(kind, dtype, align))
    theta = _theta(kind, n, g)
    if kind == "huge_cancellation":  # the huge term cancels on output row 12, up to fp32 rounding
        base = -1 + 2 * 12 / (ho - 1) if align else (2 * 12 + 1 - ho) / ho
        theta[:, 0, 2] -= 1e8 * base
    theta = theta.to(dtype)
    go = torch.randn(n, c, ho, wo, generator=g).to(dtype)
    for nearest in (False, True):
        gathered = emulation.affine_gather_grad_input(go, theta, hi, wi, nearest, align, False)
        scattered = emulation.affine_scatter_grad_input(go, theta, hi, wi, nearest, align)
        assert torch.equal(gathered.double(), scattered), f"nearest={nearest}"
        if kind == "huge_cancellation" and not nearest:
            assert scattered.abs().sum() > 0, "the case must reach the input"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_affine_gather_grad_input_nonfinite_theta(emulation, value):
    """A non-finite theta samples padding everywhere (grid_sample_coords.h): zero gradient."""
    theta = torch.tensor([[[1.0, value, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    go = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    got = emulation.affine_gather_grad_input(go, theta, 5, 8, False, False, False)
    assert torch.equal(got, torch.zeros_like(got))


def zlib_seed(*parts):
    import zlib

    return zlib.crc32(repr(parts).encode())
