"""depthwise_conv2d through the public API on CPU: the C++ kernel against F.conv2d(groups=C).

The Triton kernel (under the interpreter) and the CUDA kernel have their own files; this one
covers the CPU kernel, the registration (opcheck, autograd, compile), argument errors and
backend selection.
"""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
import fastcnn.benchmarking
from fastcnn.ops import depthwise_conv2d

pytestmark = pytest.mark.skipif(not fastcnn._extension.has_ops(), reason="fastcnn._C is not built")


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.randn(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _reference(x, w, b, stride, padding, dilation):
    return fastcnn.reference.depthwise_conv2d(x, w, b, stride, padding, dilation)


def _random_case(n, c, h, w, kh, kw, dtype, layout, bias=True):
    x = _layout(torch.randn(n, c, h, w, dtype=dtype), layout).requires_grad_()
    weight = torch.randn(c, 1, kh, kw, dtype=dtype, requires_grad=True)
    b = torch.randn(c, dtype=dtype, requires_grad=True) if bias else None
    return x, weight, b


def _grads(out, tensors, grad):
    return torch.autograd.grad(out, [t for t in tensors if t is not None], grad)


# (N, C, H, W, kH, kW, stride, padding, dilation): shapes that bite
CASES = [
    (2, 5, 9, 11, 3, 3, 1, 1, 1),  # odd sizes
    (2, 17, 9, 9, 3, 3, 2, 1, 1),  # stride 2 on odd input, C not a multiple of 16
    (1, 3, 7, 8, 3, 3, 1, 3, 1),  # padding larger than k//2
    (3, 4, 13, 12, 3, 3, 1, 2, 2),  # dilation 2
    (2, 6, 10, 9, 3, 5, (2, 1), (1, 2), 1),  # rectangular kernel, mixed strides
    (1, 8, 1, 1, 1, 1, 1, 0, 1),  # 1x1 spatial, 1x1 kernel
    (1, 2, 1, 1, 3, 3, 1, 1, 1),  # 1x1 spatial, 3x3 kernel: all but the centre tap is padding
    (2, 3, 12, 12, 7, 7, 1, 3, 1),
    (1, 2, 9, 10, 31, 31, 1, 15, 1),  # RepLKNet-size kernel on a small map
    (2, 4, 11, 13, 5, 5, 3, (4, 0), (1, 2)),  # stride 3, asymmetric pad pair
    (2, 4, 8, 8, 4, 2, 1, "same", 1),  # even kernel: PyTorch pads one more at the end
    (2, 4, 9, 8, 3, 3, 1, "same", 2),
    (1, 4, 6, 7, 3, 3, 2, "valid", 1),
    (2, 3, 8, 9, 3, 3, 1, (0, 2, 1, 0), 1),  # explicit (top, bottom, left, right)
    (2, 21, 10, 11, 7, 7, 1, 3, 1),  # vector blocks plus a channel tail, large-window path
    (1, 19, 8, 9, 11, 11, 2, 5, 1),
    (2, 37, 9, 10, 3, 3, 2, 1, 1),  # small-window path: 4-vector block, 1-vector block, tail
    # wider rows, asymmetric padding and dilation on the plane path
    (2, 5, 7, 37, 3, 3, 1, 1, 1),
    (1, 3, 6, 40, 5, 5, 1, (2, 0, 4, 1), (1, 2)),
    (1, 3, 5, 35, 3, 3, 1, 3, 1),
    (2, 4, 9, 36, 3, 3, (2, 1), 1, 1),
    (1, 2, 4, 33, 31, 31, 1, 15, 1),
    (1, 2, 6, 50, 3, 7, 1, "valid", 1),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-s{c[6]}-p{c[7]}-d{c[8]}")
def test_matches_reference_fp64(case, layout):
    n, c, h, w, kh, kw, stride, padding, dilation = case
    x, weight, b = _random_case(n, c, h, w, kh, kw, torch.float64, layout)
    out = depthwise_conv2d(x, weight, b, stride, padding, dilation)
    expected = _reference(x, weight, b, stride, padding, dilation)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    for ours, theirs in zip(_grads(out, (x, weight, b), grad), _grads(expected, (x, weight, b), grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11)
    expected_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=expected_format)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize(
    "shape",
    [
        (2, 5, 17, 19, 3, 1),  # NCHW with fewer channels than a vector: plane kernels
        (2, 3, 21, 19, 5, 2),
        (2, 32, 17, 19, 3, 1),  # NCHW: channel-block tiles
        (2, 16, 20, 40, 3, 1),
        (2, 8, 23, 29, 3, 2),  # strided tiles: scattered input gradient
        (2, 24, 15, 15, 3, 2),  # NCHW: channel-block tiles, vector transposes with an overlapping last block
        (2, 13, 14, 14, 3, 1),  # tiles with a partial channel block
        (2, 16, 7, 7, 3, 1),  # maps narrower than a vector: whole-plane transposes, overlapping pixel blocks
        (3, 11, 5, 6, 3, 2),  # 3x3 output: pixel by pixel, partial channel block
        (2, 9, 2, 3, 3, 1),  # fewer pixels than a vector: element-wise tile loads
        (1, 40, 12, 12, 7, 1),
        (1, 8, 20, 20, 31, 1),
    ],
)
def test_matches_reference_fp32(shape, layout):
    n, c, h, w, k, stride = shape
    x, weight, b = _random_case(n, c, h, w, k, k, torch.float32, layout)
    out = depthwise_conv2d(x, weight, b, stride, k // 2)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, b))
    truth = _reference(x64, w64, b64, stride, k // 2, 1)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5 * k)
    grad = torch.randn_like(out)
    ours = _grads(out, (x, weight, b), grad)
    exact = _grads(truth, (x64, w64, b64), grad.double())
    for g_ours, g_exact in zip(ours, exact):
        scale = g_exact.abs().max().item() + 1
        torch.testing.assert_close(g_ours.double(), g_exact, rtol=1e-5, atol=1e-5 * scale)


# fp32 on the AVX-512 kernels where the CPU has them (FASTCNN_AVX512=1) and on the portable ones
# (FASTCNN_AVX512=0): NCHW planes with 3x3 and 5x5 windows at stride 1 and 2; channels_last rows
# for every window, in groups of 4, 2 and 1 channel vectors with a masked tail.
# (N, C, H, W, k, stride, padding, dilation)
PLANE_CASES = [
    (2, 3, 7, 7, 3, 1, 1, 1),  # one partial vector per row, 7 rows: exactly one row block
    (2, 4, 15, 17, 3, 1, 1, 1),  # a full vector and a one-lane tail; rows past a block's end
    (1, 2, 9, 16, 3, 1, 1, 1),  # rows exactly one vector wide
    (2, 3, 11, 33, 5, 1, 2, 1),
    (1, 2, 6, 5, 3, 1, 4, 1),  # padding beyond the kernel's reach: the gradient's window is a crop
    (2, 3, 10, 20, 3, 1, (0, 2, 1, 0), (1, 2)),  # asymmetric padding, dilation along the rows only
    (1, 2, 1, 1, 3, 1, 1, 1),  # 1x1 map: every tap but the centre is padding
    (1, 2, 20, 3, 5, 1, (2, 0, 3, 1), 1),
    (3, 5, 8, 40, 3, 1, 0, 1),  # no padding: the output is smaller than the input
    (1, 2, 3, 2, 5, 1, 2, 1),  # kernel taller and wider than the map
    (2, 3, 14, 14, 3, 2, 1, 1),  # stride 2: 7x7 output, one partial vector
    (2, 3, 15, 35, 3, 2, 1, 1),  # odd input: the last input column feeds only the last output
    (1, 2, 5, 17, 3, 2, 1, 1),  # the last output's right tap is padding, in the second load of a pair
    (1, 2, 33, 34, 3, 2, (0, 1, 1, 0), 1),  # TF-style "same" padding of a stride-2 layer
    (2, 3, 17, 40, 5, 2, 2, 1),  # 5x5: three load pairs per row
    (1, 2, 9, 9, 5, 2, (4, 0, 0, 4), 1),
    (1, 2, 2, 3, 3, 2, 2, 1),  # padding wider than the map
    (2, 4, 40, 70, 3, 2, 1, 1),  # several row blocks and vectors: rows inside and at the border
    (3, 5, 13, 11, 5, 2, 2, 1),  # stride 2, rows of 6 outputs: two planes per vector, 15 planes
    (1, 3, 19, 14, 3, 2, (1, 0, 1, 0), 1),  # two planes per vector over two blocks of 8 rows
    (2, 70, 9, 12, 3, 1, 1, 1),  # channels_last: a group of 4 vectors, then a 6-channel tail
    (1, 37, 11, 10, 5, 2, 2, 1),  # channels_last: a group of 2 vectors, then a 5-channel tail
    (2, 33, 10, 13, 7, 1, 3, 1),  # other windows: the portable NCHW kernels, AVX-512 channels_last
    (1, 20, 12, 11, 3, 1, 2, 2),
    (1, 20, 9, 30, 7, 1, 3, 1),  # channels_last 7-wide windows: runs of 8 pixels, then single ones
    (1, 17, 5, 28, 9, 1, (1, 3, 4, 4), 1),  # 9-wide, rows of the window cut at the top and bottom
    (1, 18, 7, 26, 11, 1, 5, 1),  # wider than 9: the taps 8 at a time, border runs read zeros
    (1, 16, 5, 20, 17, 1, (6, 6, 8, 8), 1),  # 17-wide: chunks of 8, 8 and 1 taps
    # NCHW planes of at most 64 outputs as wide as the input: one flat array of 4 vectors
    (2, 3, 8, 8, 3, 1, 1, 1),  # 64 outputs: four full vectors
    (2, 5, 7, 7, 5, 1, 2, 1),  # 5x5 window on a 7x7 map
    (1, 3, 4, 9, 3, 1, (0, 2, 2, 0), 1),  # width kept by asymmetric column pads, height by row pads
    (1, 2, 5, 13, 3, 1, (2, 0, 1, 1), 1),  # 65 outputs: the row kernels again
    # unit-stride NCHW windows of 25 taps and more on rows of 24 outputs and more: a zero-bordered
    # copy of the plane, blocks of 4 rows x 4 vectors
    (1, 3, 13, 34, 7, 1, 0, 1),  # no padding: the copy starts inside the input; a 1-row tail block
    (1, 2, 10, 70, 7, 1, 3, 1),  # a chunk of 64 outputs and one of 6; a 2-row tail block
    (1, 2, 19, 24, 7, 1, 9, 3),  # dilated; a 3-row tail block
    (1, 2, 6, 30, (3, 9), 1, (1, 4), 1),  # rectangular windows
    (1, 2, 30, 26, (9, 3), 1, (4, 1), 1),
    (1, 2, 33, 40, 31, 1, 15, 1),  # RepLKNet's 31x31
    # channels_last windows of 169 taps and more the same way, 16 channels scattered into planes
    (2, 17, 12, 30, 13, 1, 6, 1),  # a block of 16 channels and one of 1, two images
    (1, 20, 16, 38, 13, 1, 0, 1),  # no padding
]


@pytest.mark.parametrize("avx512", ["1", "0"], ids=["avx512", "portable"])
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "channels_last"])
@pytest.mark.parametrize("case", PLANE_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[5]}-p{c[6]}-d{c[7]}")
def test_fp32_planes(case, layout, avx512, monkeypatch):
    monkeypatch.setenv("FASTCNN_AVX512", avx512)
    if avx512 == "1" and fastcnn.benchmarking.cpu_isa().get("avx512f"):
        assert fastcnn._extension.build_info()["avx512_depthwise"] == "1"
    _check_fp32_case(case, layout)


# Outputs of 32 MiB and more are written with streaming stores (csrc/ops/cpu/streaming_stores.h);
# FASTCNN_STREAMING_STORES=all streams these small ones. NCHW: blocks of rows staged and streamed
# (rows a whole number of lines or not; stride-2 input-gradient bands of 8 rows with a tail);
# channels_last: streamed when the channels are a multiple of 16, plain stores otherwise.
STREAMED_CASES = [
    (2, 3, 16, 16, 3, 1, 1, 1),  # rows of one line
    (2, 3, 14, 28, 3, 1, 1, 1),  # rows of 1.75 lines: blocks start mid-line
    (1, 2, 9, 30, 3, 1, 1, 1),  # rows of 30 floats
    (2, 3, 17, 34, 3, 2, 1, 1),  # stride 2: a band of 8 rows, another, then 1
    (1, 2, 20, 40, 5, 2, 2, 1),
    (2, 3, 14, 28, 5, 1, 2, 1),  # 5x5 rolled rows, staged: one band
    (1, 2, 19, 40, 5, 1, 2, 1),  # 5x5 rolled rows, staged in bands of 8 and 11
    (2, 32, 9, 12, 3, 1, 1, 1),  # channels_last: two channel vectors
    (1, 64, 10, 10, 3, 1, 1, 1),  # a group of 4 vectors
    (1, 48, 11, 10, 5, 2, 2, 1),  # the strided input gradient's gather
    (1, 16, 9, 30, 7, 1, 3, 1),  # 7-wide windows: runs of 8 pixels
    (1, 20, 9, 12, 3, 1, 1, 1),  # a channel tail: plain stores
]


@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "channels_last"])
@pytest.mark.parametrize("case", STREAMED_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-s{c[5]}-p{c[6]}-d{c[7]}")
def test_fp32_streamed_outputs(case, layout, monkeypatch):
    monkeypatch.setenv("FASTCNN_STREAMING_STORES", "all")
    _check_fp32_case(case, layout)


def _check_fp32_case(case, layout):
    """Forward and every gradient of an fp32 case against the fp64 truth, in `layout`."""
    n, c, h, w, k, stride, padding, dilation = case

    def rows_apart(t):  # rows of a wider tensor: columns adjacent, rows and planes farther apart
        if layout == "channels_last":
            return t.to(memory_format=torch.channels_last)
        if layout == "contiguous":
            return t
        wide = torch.randn(*t.shape[:3], t.shape[3] + 5, dtype=t.dtype)
        wide[..., 2 : 2 + t.shape[3]] = t
        return wide[..., 2 : 2 + t.shape[3]]

    x = rows_apart(torch.randn(n, c, h, w)).requires_grad_()
    kernel = (k, k) if isinstance(k, int) else k
    k = max(kernel)
    weight = torch.randn(c, 1, *kernel, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, b))
    truth = _reference(x64, w64, b64, stride, padding, dilation)
    for _ in range(2):  # freed NaN buffers of the output's size: an unwritten element shows
        torch.empty(truth.shape).fill_(float("nan"))
    out = depthwise_conv2d(x, weight, b, stride, padding, dilation)
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-5 * k)
    grad = rows_apart(torch.randn(truth.shape))
    ours = _grads(out, (x, weight, b), grad)
    exact = _grads(truth, (x64, w64, b64), grad.double())
    for g_ours, g_exact in zip(ours, exact):
        scale = g_exact.abs().max().item() + 1
        torch.testing.assert_close(g_ours.double(), g_exact, rtol=1e-5, atol=1e-5 * scale)
    # The bias gradient alone (weight frozen), and the input gradient alone.
    (g_bias,) = torch.autograd.grad(depthwise_conv2d(x.detach(), weight.detach(), b, stride, padding, dilation), b, grad)
    torch.testing.assert_close(g_bias.double(), exact[2], rtol=1e-5, atol=1e-5 * (exact[2].abs().max().item() + 1))
    (g_input,) = torch.autograd.grad(depthwise_conv2d(x, weight.detach(), None, stride, padding, dilation), x, grad)
    torch.testing.assert_close(g_input, ours[0], rtol=1e-6, atol=1e-6)


# The rolled-row kernels (NCHW 3x3 planes at stride 1 and 2) against the block kernels they
# replace (FASTCNN_DEPTHWISE_ROLLED=0), which test_fp32_planes no longer reaches for these
# windows: both against the fp64 truth, and the forward and input gradient bit for bit (the same
# sums in the same order; the stride-2 input gradient is rolled for padding 0 or 1 on top and
# left); the weight gradient adds in another order. (N, C, H, W, stride, padding)
ROLLED_CASES = [
    (2, 5, 14, 14, 1, 1),  # MobileNet's 14x14 layers: one vector a row
    (1, 3, 28, 28, 1, 1),  # two vectors a row, the second partial
    (1, 2, 9, 32, 1, 0),  # two full vectors, no padding
    (1, 2, 6, 5, 1, 4),  # padding past the window's reach
    (1, 2, 1, 1, 1, 1),  # one output row: the shortest walk
    (1, 2, 17, 20, 1, (0, 2, 1, 0)),
    (2, 3, 19, 40, 1, 1),  # rows of three vectors: bands of 8 rows (8, 8, 3), the next prefetched
    (1, 2, 9, 70, 1, (0, 2, 1, 0)),  # five vectors a row; a band of 8 and one of 3
    (2, 3, 28, 28, 2, 1),  # stride 2: bands of 8 output rows, the last of 6
    (1, 2, 33, 34, 2, (0, 1, 1, 0)),  # TF-style "same" padding; 17 outputs a row
    (2, 3, 15, 35, 2, 1),  # odd input: the last column feeds only the last output
    (1, 2, 40, 70, 2, 1),  # three vectors a row, three bands
    (1, 2, 2, 3, 2, 2),  # padding wider than the map
    (1, 2, 18, 18, 2, 0),  # a band of 8 and one of 1
    (2, 5, 14, 14, 2, 1),  # stride-2 input gradient walks: 7x7 grad_out, one vector a row
    (1, 2, 16, 37, 2, 1),  # even height: the last odd row has no grad_out row below it; 3 chunks
    (1, 2, 50, 112, 2, 1),  # 112 columns: 7 chunks a row; bands of 8 rows and a tail of 2
    (2, 3, 21, 30, 2, (1, 0, 0, 1)),  # padding 1 on top, 0 on the left
    (3, 5, 7, 7, 1, 1),  # 7x7 maps: two channels to a vector, and channels left over
    (2, 3, 7, 7, 1, 0),  # no padding: b's taps past its last output read its own row
    (2, 3, 6, 5, 1, (0, 1, 2, 0)),  # a row and its left padding filling 7 of 8 lanes
]
# 5x5 windows: at unit stride the rolled forward (and so the input gradient) and weight gradient,
# bands of at least four rows, and maps of at most 8 columns two planes to a vector (forward; the
# block kernels' side of these runs the flat planes); at stride 2 the rolled forward and weight
# gradient.
ROLLED_5X5_CASES = [
    (2, 5, 14, 14, 1, 2),  # MobileNet v3's 14x14 layers: one vector a row
    (1, 3, 28, 28, 1, 2),  # two vectors a row, the second partial
    (1, 2, 6, 5, 1, 1),  # four output rows: the shortest walk
    (1, 2, 4, 9, 1, (0, 1, 2, 0)),  # three output rows: the block kernel (and a 5x5 input gradient walk)
    (1, 2, 12, 40, 1, 2),  # wide rows: a band of 8 and one of 4
    (2, 3, 11, 40, 1, 2),  # a remainder of 3 joins the band: one band of 11
    (1, 2, 9, 70, 1, (1, 2, 0, 3)),  # five vectors a row, uneven padding
    (1, 2, 6, 5, 1, 5),  # padding past the window's reach: the input gradient's window a crop
    (1, 2, 20, 20, 1, 0),  # no padding
    (2, 5, 14, 14, 2, 2),  # stride 2: MobileNet v3's 14x14 -> 7x7 layer, one band of 7 rows
    (1, 2, 40, 70, 2, 2),  # bands of 8, 8 and 4 output rows; three vectors a row
    (2, 3, 15, 35, 2, 2),  # odd input: the last column feeds only the last output
    (1, 2, 2, 3, 2, 2),  # one output row: the shortest stride-2 walk
    (1, 2, 33, 34, 2, (1, 2, 1, 2)),  # TF-style "same" padding, 17 outputs a row
    (1, 2, 18, 18, 2, 0),  # no padding: a band of 7
    (1, 2, 20, 23, 2, 3),  # padding past the window's centre: the input gradient's far copy reads left of the map
    (3, 4, 13, 13, 2, 2),  # 13x13 -> 7x7: two planes to a vector (forward, weight gradient), taps past 16 columns zero
    (2, 4, 14, 14, 2, (2, 1, 2, 1)),  # the same with the row filling all 16 columns from -pad_left
    (2, 4, 15, 15, 2, (0, 3, 0, 3)),  # no left padding: a tap past 16 columns would read the other plane
    (3, 5, 7, 7, 1, 2),  # 7x7 maps: the forward two planes to a vector, a channel left over
    (2, 3, 8, 8, 1, 2),  # rows filling both halves' 8 lanes
    (2, 4, 7, 7, 1, (2, 2, 0, 4)),  # no left padding: plane a's right taps would read plane b's row
    (1, 3, 5, 8, 1, (0, 3, 4, 0)),  # left padding 4: plane b's left taps would read plane a's row
    (2, 3, 6, 5, 1, (1, 2, 3, 0)),  # four output rows of four: the shortest paired walk
]


@pytest.mark.parametrize("layout", ["contiguous", "row_strided"])
@pytest.mark.parametrize(
    "case, k",
    [(case, 3) for case in ROLLED_CASES] + [(case, 5) for case in ROLLED_5X5_CASES],
    ids=lambda c: "x".join(map(str, c[:4])) + f"-s{c[4]}-p{c[5]}" if isinstance(c, tuple) else f"k{c}",
)
def test_rolled_rows_are_the_block_kernels(case, k, layout, monkeypatch):
    if not fastcnn.benchmarking.cpu_isa().get("avx512f"):
        pytest.skip("the plane kernels need AVX-512")
    n, c, h, w, stride, padding = case
    full = (n, c, h, w, k, stride, padding, 1)
    x = torch.randn(n, c, h, w + 5)[..., 2 : 2 + w] if layout == "row_strided" else torch.randn(n, c, h, w)
    x.requires_grad_()
    weight = torch.randn(c, 1, k, k, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    results = {}
    for rolled in ("1", "0"):
        monkeypatch.setenv("FASTCNN_DEPTHWISE_ROLLED", rolled)
        _check_fp32_case(full, layout)
        torch.manual_seed(0)
        out = depthwise_conv2d(x, weight, b, stride, padding)
        results[rolled] = (out.detach(),) + _grads(out, (x, weight, b), torch.randn(out.shape))
    rolled, block = results["1"], results["0"]
    assert torch.equal(rolled[0], block[0]) and torch.equal(rolled[1], block[1])
    torch.testing.assert_close(rolled[2], block[2], rtol=1e-5, atol=1e-5 * (block[2].abs().max().item() + 1))
    torch.testing.assert_close(rolled[3], block[3], rtol=1e-5, atol=1e-5 * (block[3].abs().max().item() + 1))


# Unit-stride NCHW windows of 25 taps and more (the zero-bordered planes): undilated columns of
# blocks take blocks of rows without tests in their loops (7x7 windows unrolled whole), against
# the blocks with tests they replace (FASTCNN_DEPTHWISE_ROLLED=0): forward and input gradient
# (a forward of grad_output) bit for bit. (N, C, H, W, k, padding, dilation)
BORDERED_CASES = [
    (2, 3, 14, 14, 7, 3, 1),  # ConvNeXt's 14x14 maps: a plane in one block of 14 rows of a vector
    (1, 2, 17, 15, 7, 3, 1),  # 17 rows: the second block of 14 moved up to end at the last row
    (1, 2, 9, 20, 7, 3, 1),  # two vectors a row: blocks of 7 rows, the second overlapping
    (1, 2, 5, 14, 7, 3, 1),  # five rows: blocks of 4
    (1, 2, 3, 30, 7, 3, 1),  # three rows: the blocks with tests
    (1, 2, 13, 40, 7, 3, 1),  # three vectors: blocks of 4
    (1, 2, 10, 70, 7, 3, 1),  # a chunk of four vectors, then one of 6 columns
    (1, 2, 20, 20, 7, 0, 1),  # no padding: the copy starts inside the input
    (1, 2, 13, 60, 9, 4, 1),  # a window known only at run time: blocks of 6 rows
    (1, 2, 11, 30, 9, 4, 1),  # blocks of 7 rows of two vectors
    (1, 2, 9, 40, (5, 7), (2, 3), 1),  # a window of 5 rows: blocks of 4
    (1, 2, 12, 30, 7, (3, 6), (1, 2)),  # dilated along the rows only: run-time columns
    (1, 2, 12, 30, 7, 6, 2),  # dilated: the blocks with tests on both sides
    (1, 2, 20, 24, 31, 15, 1),  # RepLKNet's 31x31
]


@pytest.mark.parametrize("case", BORDERED_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-p{c[5]}-d{c[6]}")
def test_bordered_blocks_are_the_tested_blocks(case, monkeypatch):
    if not fastcnn.benchmarking.cpu_isa().get("avx512f"):
        pytest.skip("the plane kernels need AVX-512")
    n, c, h, w, k, padding, dilation = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w, requires_grad=True)
    weight = torch.randn(c, 1, kh, kw, requires_grad=True)
    b = torch.randn(c, requires_grad=True)
    results = {}
    for rolled in ("1", "0"):
        monkeypatch.setenv("FASTCNN_DEPTHWISE_ROLLED", rolled)
        _check_fp32_case((n, c, h, w, k, 1, padding, dilation), "contiguous")
        torch.manual_seed(0)
        out = depthwise_conv2d(x, weight, b, 1, padding, dilation)
        results[rolled] = (out.detach(),) + _grads(out, (x, weight, b), torch.randn(out.shape))
    new, tested = results["1"], results["0"]
    assert torch.equal(new[0], tested[0]) and torch.equal(new[1], tested[1])


# channels_last fp32 5- and 7-wide windows at unit stride (rows of at least 7 outputs), and on
# rows of 7 outputs 3-wide windows and stride 2: 64 channels of an image at a time through a ring
# of 16-channel input rows, against the row kernels it replaces (FASTCNN_DEPTHWISE_ROLLED=0): the
# forward bit for bit (the same sums in the same order; a narrow row's zero columns are skipped,
# which can only change the sign of a zero). (N, C, H, W, k, padding[, stride])
RING_CASES = [
    (2, 64, 14, 14, 7, 3),  # ConvNeXt's 14x14 maps: one run of 14 pixels a row, four vectors
    (1, 96, 28, 28, 7, 3),  # two runs a row; a block of 64 channels and one of 32
    (2, 40, 7, 7, 7, 3),  # 7x7 maps: runs of 7 pixels two vectors at a time, a third alone (masked)
    (1, 16, 9, 11, 7, 3),  # rows of 11: runs of 7, the second moved back to end at the row's end
    (1, 120, 17, 20, 5, 2),  # MobileNet v3's 5x5: a block of 64 and one of 56 (the last vector 8 lanes)
    (3, 5, 9, 8, 5, 2),  # fewer than 16 channels, three images
    (1, 33, 20, 16, 7, 0),  # no padding: 10x10 outputs from the ring's interior
    (1, 20, 6, 15, 7, (5, 1, 2, 4)),  # uneven padding, rows above and below the input
    (1, 18, 4, 19, (3, 7), (2, 3)),  # a window of 3 rows x 7 columns on a map of 4 rows
    (2, 17, 12, 30, 5, 6),  # padding past the window's reach
    (2, 512, 7, 7, 3, 1),  # MobileNet v1's last 3x3 layer: eight blocks of 64 channels
    (1, 40, 14, 14, 3, 1, 2),  # 3x3 at stride 2 onto 7x7: ring columns two apart
    (2, 72, 14, 13, 5, 2, 2),  # MobileNet v3's 5x5 at stride 2: a block of 64 and one of 8
    (1, 24, 13, 14, 7, 3, 2),  # 7x7 at stride 2; 13 input rows, the last window's bottom rows padding
    (1, 20, 9, 7, (5, 3), (2, 1)),  # 5 rows x 3 columns on rows of 7
    (1, 17, 11, 14, 3, 1, (1, 2)),  # stride 2 along the rows only
    (1, 33, 16, 17, 5, 0, 2),  # stride 2 without padding: the ring's first column is the input's
    (2, 16, 8, 9, 3, 3, 2),  # stride 2, padding past the window's reach
    (1, 24, 28, 28, 5, 2),  # 28x28 maps: two runs of 14 a row, forward and input gradient
    (1, 16, 10, 29, 7, 3),  # rows of 29: the last run moved back to end at the row's end
]


# NCHW 7-wide windows on maps too narrow for the bordered planes go through the same ring, 64
# planes transposed into pixels and back (against the channel tiles, to rounding).
NCHW_RING_CASES = [
    (2, 40, 7, 7, 7, 3),  # ConvNeXt's 7x7 maps: a block of 40 planes
    (1, 70, 9, 12, 7, 3),  # a block of 64 and one of 6; rows of 12
    (3, 5, 10, 13, (4, 7), (1, 3)),  # fewer planes than a vector, three images
]


@pytest.mark.parametrize(
    "case, layout",
    [(case, "channels_last") for case in RING_CASES] + [(case, layout) for case in NCHW_RING_CASES
                                                        for layout in ("contiguous", "row_strided")],
    ids=lambda c: "x".join(map(str, c[:5])) + f"-p{c[5]}" + (f"-s{c[6]}" if len(c) > 6 else "")
    if isinstance(c, tuple) else c,
)
def test_ring_is_the_kernels_it_replaces(case, layout, monkeypatch):
    if not fastcnn.benchmarking.cpu_isa().get("avx512f"):
        pytest.skip("the AVX-512 kernels")
    n, c, h, w, k, padding = case[:6]
    stride = case[6] if len(case) > 6 else 1
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "row_strided":
        x = torch.randn(n, c, h, w + 5)[..., 2 : 2 + w]
    weight = torch.randn(c, 1, kh, kw)
    b = torch.randn(c)
    outputs, grads = {}, {}
    for rolled in ("1", "0"):
        monkeypatch.setenv("FASTCNN_DEPTHWISE_ROLLED", rolled)
        _check_fp32_case((n, c, h, w, k, stride, padding, 1), layout)
        leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
        outputs[rolled] = depthwise_conv2d(*leaves, stride, padding)
        grad = torch.randn(outputs[rolled].shape, generator=torch.Generator().manual_seed(0))
        grads[rolled] = _grads(outputs[rolled], leaves, grad.to(memory_format=torch.channels_last))
    if layout == "channels_last":
        assert outputs["1"].is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(outputs["1"], outputs["0"])
        # The unit-stride input gradient of 5- and 7-wide windows is the ring's flipped forward
        # (grad_input_nhwc_ring), bit for bit the fused rows'; on rows of 7 outputs or a multiple
        # of 14 the weight and bias gradients come from the ring too (weight_grad_nhwc_ring), the
        # same sums added in another order (each also checked against fp64 above).
        assert torch.equal(grads["1"][0], grads["0"][0])
        for name, new, tested in zip(("weight", "bias"), grads["1"][1:], grads["0"][1:]):
            torch.testing.assert_close(new, tested, rtol=1e-5, atol=1e-5 * tested.abs().max().item(), msg=name)
    else:
        assert outputs["1"].is_contiguous()
        torch.testing.assert_close(outputs["1"], outputs["0"], rtol=1e-5, atol=1e-5 * kh)


# A pixel right of the last output's window is still read by the vector kernels (a tap of a lane
# past the output row): its grad_output lane is zero, and zero times an inf there would turn a
# finite weight gradient into a NaN. (H, W, stride, padding): the inf sits in the last column,
# which only the rightmost taps of the last output reach.
@pytest.mark.parametrize("avx512", ["1", "0"], ids=["avx512", "portable"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [(14, 14, 1, 0), (12, 30, 1, 0), (9, 9, 1, 0), (15, 17, 2, 0), (10, 35, 2, 0)])
def test_weight_gradient_keeps_an_infinite_pixel_to_its_taps(case, layout, avx512, monkeypatch):
    monkeypatch.setenv("FASTCNN_AVX512", avx512)
    h, w, stride, padding = case
    x = torch.randn(2, 3, h, w)
    x[1, 2, h // 2, w - 1] = float("inf")
    x[0, 1, h // 2, w - 2 if stride == 1 else w - 1] = float("-inf")
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(3, 1, 3, 3, requires_grad=True)
    out = depthwise_conv2d(x, weight, None, stride, padding)
    grad = torch.randn(out.shape)
    (ours,) = torch.autograd.grad(out, weight, grad)
    w64 = weight.detach().double().requires_grad_()
    (exact,) = torch.autograd.grad(_reference(x.double(), w64, None, stride, padding, 1), w64, grad.double())
    assert exact.isfinite().any() and not exact.isfinite().all()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-4, equal_nan=True)


# Maps of rows of at most 8 outputs: planes paired or not (3x3 both ways; 5x5 at stride 1 the
# forward and so the input gradient, at stride 2 the forward and the weight gradient)
@pytest.mark.parametrize("stride, size, k", [(1, 14, 3), (2, 14, 3), (1, 7, 3), (1, 7, 5), (2, 14, 5)])
def test_fp32_planes_do_not_depend_on_threads(stride, size, k):
    """The outputs and gradients are the same bits whatever the split of the planes across threads
    (a thread's last plane may go unpaired; the weight gradient is summed in one order)."""
    x, weight, b = _random_case(3, 9, size, size, k, k, torch.float32, "contiguous")
    grad = torch.randn(3, 9, size // stride, size // stride)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = depthwise_conv2d(x, weight, b, stride, k // 2)
            results.append([out.detach()] + list(_grads(out, (x, weight, b), grad)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)


LOW_PRECISION_CASES = {
    # N, C, H, W, kernel, stride, (top, bottom, left, right), dilation
    "stride2_k5": (2, 24, 15, 13, 5, 2, (2, 2, 2, 2), 1),
    # unit stride: the input gradient is a forward over grad_output, into fp32 planes first
    # (a bf16 run once wrote them through an empty buffer)
    "dilation2": (2, 16, 20, 22, 3, 1, (2, 2, 2, 2), 2),
    # padding past (kernel - 1) * dilation: outputs that read only padding still feed grad_bias
    "asymmetric_padding": (2, 16, 20, 22, 3, 1, (0, 2, 1, 3), 1),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
def test_low_precision_error_within_twice_pytorch(case, dtype, layout):
    """Our error against the fp64 truth is at most 2x PyTorch's own error in that dtype."""
    torch.manual_seed(0)
    n, c, h, w, k, stride, (top, bottom, left, right), dilation = LOW_PRECISION_CASES[case]
    x, weight, b = _random_case(n, c, h, w, k, k, dtype, layout)

    def reference(x, weight, b):  # F.conv2d pads symmetrically: pad first
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, b, stride, 0, dilation, groups=c)

    theirs = [reference(x, weight, b)]
    grad = torch.randn(theirs[0].shape, dtype=dtype)
    theirs += _grads(theirs[0], (x, weight, b), grad)
    ours = [depthwise_conv2d(x, weight, b, stride, (top, bottom, left, right), dilation)]
    ours += _grads(ours[0], (x, weight, b), grad)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, b))
    truth = [reference(x64, w64, b64)]
    truth += _grads(truth[0], (x64, w64, b64), grad.double())
    for name, o, t, e in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours, theirs, truth):
        assert o.dtype == dtype
        our_error = (o.double() - e).abs().max().item()
        their_error = (t.double() - e).abs().max().item()
        assert our_error <= 2 * their_error + 1e-3 * e.abs().max().item(), (name, our_error, their_error)


HALF_DTYPES = [torch.bfloat16, torch.float16]
# The CPUs the AVX-512 depthwise kernels run on (depthwise::avx512::enabled()); elsewhere the
# portable loops run, which sum in another order, and the error rule above covers them.
_ISA = fastcnn.benchmarking.cpu_isa()
needs_avx512_kernels = pytest.mark.skipif(
    not all(_ISA.get(flag) for flag in ("avx512f", "avx512bw", "avx512vl")),
    reason="the 16-bit paths of the AVX-512 kernels need AVX-512F, BW and VL",
)
HALF_ROW_CASES = [
    (2, 32, 9, 11, 3, 1, 1, 1), (3, 17, 8, 7, 3, 2, 1, 1), (2, 40, 10, 9, 5, 1, 2, 1), (2, 24, 12, 13, 3, 1, 2, 2),
    (2, 33, 15, 14, 7, 1, 3, 1), (1, 1, 5, 6, 3, 1, 1, 1), (2, 20, 19, 21, 5, 2, 2, 1), (1, 16, 23, 9, 3, 2, 0, 1),
    # windows of whole output rows that reach only padding
    (1, 16, 6, 6, 3, 1, 3, 1), (1, 8, 4, 4, 3, 2, 4, 1),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "n, c, h, w, k, stride, padding, dilation",
    # and wide windows: the sliding runs (9 columns), and 13 columns, 8 taps at a time; the ring's
    # 7x7 windows on 7x7 maps and on two blocks of channels
    HALF_ROW_CASES + [(1, 20, 12, 30, 9, 1, 4, 1), (1, 16, 15, 17, 13, 1, 6, 1), (1, 40, 7, 7, 7, 1, 3, 1),
                      (2, 70, 9, 16, 7, 1, 3, 1), (2, 80, 7, 7, 3, 1, 1, 1), (1, 72, 14, 14, 5, 2, 2, 1)],
)
@needs_avx512_kernels
def test_half_channels_last_forward_is_the_fp32_kernel_rounded_once(
    n, c, h, w, k, stride, padding, dilation, dtype, monkeypatch
):
    """bf16/fp16 channels_last forward on AVX-512 (forward_nhwc_native, or the ring for 5- and 7-wide
    windows at unit stride and for rows of 7 outputs): the fp32 kernel reading the 16-bit rows widened, each output rounded
    once, so equal to the fp32 op's
    output converted by PyTorch, bit for bit but for NaN's payload (PyTorch's own conversions
    disagree there: 0x7FC0 scalar, 0xFFFF vectorised). bf16 with the pair dot products off
    (FASTCNN_AVX512_BF16=0; they are tested below)."""
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "0")
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = float("nan"), float("inf")
    x = x.to(dtype).to(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, 1, k, k).to(dtype), torch.randn(c).to(dtype)
    for b in (None, bias):
        ours = depthwise_conv2d(x, weight, b, stride, padding, dilation)
        fp32 = depthwise_conv2d(x.float(), weight.float(), None if b is None else b.float(), stride, padding, dilation)
        assert ours.dtype == dtype and ours.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ours, fp32.to(dtype), rtol=0, atol=0, equal_nan=True)
        assert ours.isnan().any() and ours.isinf().any()


needs_bf16_dot_products = pytest.mark.skipif(
    not (all(_ISA.get(flag) for flag in ("avx512f", "avx512bw", "avx512vl")) and _ISA.get("avx512_bf16")),
    reason="the bf16 pair dot products need AVX512_BF16 besides AVX-512F, BW and VL",
)


def _bf16_units_in_the_last_place(values):
    """One unit in the last place of each bf16 value (8 significant bits), as fp32."""
    _, exponent = torch.frexp(values.float())
    return torch.ldexp(torch.ones_like(values, dtype=torch.float32), exponent - 8)


def _assert_within_a_bf16_unit(ours, fp32, sum_rounding=None):
    """`ours` (bf16, the fp32 sums in another order) against the fp32 op's `fp32` rounded to bf16:
    NaN and infinities (with their signs) where it has them, every finite value within one bf16
    unit of it or within fp32's rounding of the sum: `sum_rounding` per element, by default 2^-20
    of the largest finite output."""
    rounded = fp32.bfloat16()
    assert torch.equal(ours.isnan(), rounded.isnan())
    assert torch.equal(ours.isinf(), rounded.isinf())
    assert torch.equal(ours[ours.isinf()], rounded[rounded.isinf()])
    finite = rounded.isfinite()
    if not finite.any():
        return
    if sum_rounding is None:
        sum_rounding = torch.full(rounded.shape, 2.0**-20) * rounded[finite].float().abs().max()
    error = (ours.float() - rounded.float()).abs()[finite]
    bound = torch.maximum(_bf16_units_in_the_last_place(rounded[finite]), sum_rounding.float()[finite])
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize(
    "n, c, h, w, k, stride, padding",
    [
        (2, 64, 14, 14, 3, 1, 1),  # two groups of 32 channels, runs of 7; bands of rows
        (3, 96, 9, 10, 3, 1, 1),  # 9 tasks of a group's whole image
        (2, 64, 13, 11, 3, 2, 1),  # rows of 6: runs of 4, the last moved back
        (3, 32, 9, 17, 5, 1, 2),  # rows of 17: runs of 8, the last moved back
        (2, 96, 15, 15, 5, 2, 2),
        (1, 32, 3, 3, 3, 1, 1),  # rows of 3: one pixel at a time
        (1, 32, 6, 6, 3, 1, 0),
        (2, 32, 10, 30, 3, 2, (1, 0)),
        (1, 32, 9, 9, (5, 3), (2, 1), (3, 1)),  # 3 wide, 5 high; padding past the window's reach
        (1, 32, 9, 12, (3, 5), (1, 2), (0, 2)),
        (1, 32, 4, 4, 3, 2, 4),  # windows that reach only padding
        (0, 32, 7, 7, 3, 1, 1),
        (2, 48, 13, 11, 3, 1, 1),  # not a multiple of 32 channels: the widened rows
        (1, 33, 9, 9, 5, 2, 2),
    ],
    ids=["14x14", "whole-images", "s2-rows-of-6", "5x5-17wide", "5x5-s2", "3wide", "valid", "s2-30wide", "5x3",
         "3x5-s2", "only-padding", "batch0", "48ch-widened", "33ch-widened"],
)
@needs_bf16_dot_products
def test_bf16_channels_last_forward_through_pair_dot_products(n, c, h, w, k, stride, padding, monkeypatch):
    """bf16 channels_last forward through vdpbf16ps (rows_nhwc_bf16_dot.cpp; channel counts that are a
    multiple of 32, the others take the widened rows, bit for bit): each output within one
    unit in the last place of the fp32 op's output rounded to bf16 (the sums are fp32's in another
    order), or of fp32's rounding of the sum, under 2^-20 of the largest output; NaN and
    infinities where the fp32 op has them, infinities in the input right of a window's last
    tap included (its lone tap is paired with zero, not with them); and almost every output
    equal to the widened rows' (FASTCNN_AVX512_BF16=0)."""
    torch.manual_seed(0)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, c, h, w)
    if n:
        x[0, 0, 0, 0] = float("nan")
        x[-1, c - 1, h // 2, w // 2] = float("inf")
        x[0, c // 2, h - 1, :: max(1, w // 3)] = float("-inf")
    x = x.bfloat16().to(memory_format=torch.channels_last)
    weight, bias = torch.randn(c, 1, kh, kw).bfloat16(), torch.randn(c).bfloat16()
    for b in (None, bias):
        args = (stride, padding, 1)
        monkeypatch.setenv("FASTCNN_AVX512_BF16", "1")
        ours = depthwise_conv2d(x, weight, b, *args)
        monkeypatch.setenv("FASTCNN_AVX512_BF16", "0")
        widened = depthwise_conv2d(x, weight, b, *args)
        if c % 32:  # a pixel of no whole number of lines: the widened rows (see whole_lines)
            torch.testing.assert_close(ours, widened, rtol=0, atol=0, equal_nan=True)
            continue
        fp32 = depthwise_conv2d(x.float(), weight.float(), None if b is None else b.float(), *args)
        # (an empty batch's output is contiguous in both formats; its strides are NCHW's, as PyTorch's
        # fake conv2d gives them and the fake impl here does; eager F.conv2d keeps channels_last's)
        assert ours.dtype == torch.bfloat16 and (n == 0 or ours.is_contiguous(memory_format=torch.channels_last))
        assert ours.shape == fp32.shape
        _assert_within_a_bf16_unit(ours, fp32)
        finite = fp32.isfinite()
        if finite.any():
            assert (ours != widened)[finite].float().mean() < 0.01


@pytest.mark.parametrize(
    "n, c, h, w, stride, padding",
    [(2, 64, 7, 7, 1, 1), (3, 64, 9, 11, 2, 1), (1, 32, 8, 13, 2, 1), (2, 32, 14, 14, 1, 1), (1, 32, 5, 6, 1, 1),
     (2, 32, 3, 3, 1, 1), (1, 96, 10, 9, 1, 1), (1, 32, 6, 16, 2, 0), (2, 48, 7, 7, 1, 1)],
    ids=["7x7-lone-pixels", "s2", "s2-lone", "14x14", "one-image-two-chunks", "3x3-map", "9-wide",
         "s2-unread-column", "48ch-widened"],
)
@needs_bf16_dot_products
def test_bf16_channels_last_weight_gradient_through_pair_dot_products(n, c, h, w, stride, padding, monkeypatch):
    """bf16 channels_last weight and bias gradient of 3x3 windows through vdpbf16ps (pairs of adjacent
    output pixels; a row of odd width ends with a lone pixel paired with zero): each within one
    bf16 unit of the fp32 op's gradient rounded, or of fp32's rounding of its sum (2^-16 of the sum
    of the products' magnitudes); NaN where the fp32 op has it (a NaN in grad_output reaches every
    tap of its channel, and no other channel; an infinite input column that no window reads, right
    of a lone pixel's window, none). The input gradient within one unit of the fp32 op's rounded
    (at unit stride the flipped forward through the dot products), at stride 2 the widened rows'."""
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w)
    out_shape = depthwise_conv2d(x, torch.ones(c, 1, 3, 3), None, stride, padding).shape
    if (out_shape[-1] - 1) * stride - padding + 2 < w - 1:  # the last column is read by no window
        x[..., -1] = float("inf")
    x = x.bfloat16().to(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, 3, 3).bfloat16()
    grad = torch.randn(out_shape).bfloat16().to(memory_format=torch.channels_last)
    grad[-1, c - 1, -1, -1] = float("nan")
    args = ([stride] * 2, [padding] * 4, [1] * 2, [True, True, True])
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "1")
    ours = torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args)
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "0")
    widened = torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args)
    if c % 32:  # the widened rows (see whole_lines)
        for o, wd in zip(ours, widened):
            torch.testing.assert_close(o, wd, rtol=0, atol=0, equal_nan=True)
        return
    fp32 = torch.ops.fastcnn._depthwise_conv2d_backward(grad.float(), x.float(), weight.float(), *args)
    magnitude = torch.ops.aten.convolution_backward(
        grad.double().abs().nan_to_num(), x.double().abs().nan_to_num(posinf=0.0), weight.double(), [c],
        [stride] * 2, [padding] * 2, [1] * 2, False, [0, 0], c, [False, True, True])
    # the input gradient: at unit stride the flipped forward through the dot products, else the rows
    _assert_within_a_bf16_unit(ours[0], fp32[0])
    if stride == 2:
        torch.testing.assert_close(ours[0], widened[0], rtol=0, atol=0, equal_nan=True)
    for name, o, f, m in (("grad_weight", ours[1], fp32[1], magnitude[1]), ("grad_bias", ours[2], fp32[2], magnitude[2])):
        assert o.dtype == torch.bfloat16, name
        _assert_within_a_bf16_unit(o, f, sum_rounding=2.0**-16 * m.reshape(o.shape))
        assert o.isnan().sum() == (9 if name == "grad_weight" else 1), name


@pytest.mark.parametrize(
    "n, c, h, w, k, padding",
    [(2, 64, 7, 7, 3, 1), (1, 64, 9, 12, 5, 2), (2, 32, 10, 9, 5, 0), (1, 32, 6, 17, 3, 0), (1, 32, 5, 5, 5, 5)],
    ids=["3x3", "5x5", "5x5-valid", "3x3-valid", "padding-past-reach"],
)
@needs_bf16_dot_products
def test_bf16_channels_last_input_gradient_through_pair_dot_products(n, c, h, w, k, padding, monkeypatch):
    """bf16 channels_last input gradient at unit stride: the forward of grad_output under the flipped
    window (padding k - 1 - p) through the dot products, within one bf16 unit of the fp32 op's
    rounded, NaN and infinities where it has them; padding past the window's reach (a negative
    flipped padding) takes the widened rows, bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w).bfloat16().to(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k).bfloat16()
    out_shape = depthwise_conv2d(x, weight, None, 1, padding).shape
    grad = torch.randn(out_shape)
    grad[0, 0, 0, 0], grad[-1, c - 1, out_shape[2] // 2, -1] = float("nan"), float("inf")
    grad = grad.bfloat16().to(memory_format=torch.channels_last)
    args = ([1, 1], [padding] * 4, [1, 1], [True, False, False])
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "1")
    ours = torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args)[0]
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "0")
    widened = torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args)[0]
    fp32 = torch.ops.fastcnn._depthwise_conv2d_backward(grad.float(), x.float(), weight.float(), *args)[0]
    assert ours.dtype == torch.bfloat16 and ours.is_contiguous(memory_format=torch.channels_last)
    if padding > k - 1:
        torch.testing.assert_close(ours, widened, rtol=0, atol=0, equal_nan=True)
        return
    _assert_within_a_bf16_unit(ours, fp32)
    assert ours.isnan().any() and ours.isinf().any()
    assert (ours != widened)[fp32.isfinite()].float().mean() < 0.01


@needs_bf16_dot_products
def test_bf16_dot_products_flush_denormals_as_pytorch_does(monkeypatch):
    """vdpbf16ps reads denormal inputs as zero and flushes denormal sums, whatever MXCSR says; PyTorch's
    own bf16 channels_last kernels (oneDNN, the same instruction here) give the same zeros, forward
    and weight gradient. The widened rows keep them."""
    x = torch.zeros(1, 32, 5, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    weight = torch.zeros(32, 1, 3, 3, dtype=torch.bfloat16)
    for value, tap in ((2.0**-130, 1.0), (2.0**-100, 2.0**-30)):  # a denormal input; a denormal product
        x[0, :, 2, 2], weight[:, 0, 1, 1] = value, tap
        monkeypatch.setenv("FASTCNN_AVX512_BF16", "1")
        assert (depthwise_conv2d(x, weight, None, 1, 1) == 0).all()
        monkeypatch.setenv("FASTCNN_AVX512_BF16", "0")
        assert depthwise_conv2d(x, weight, None, 1, 1)[0, :, 2, 2].float().eq(value * tap).all()
        assert (torch.nn.functional.conv2d(x, weight, None, 1, 1, 1, 32) == 0).all()
    # the weight gradient of a denormal input under a grad_output of one
    grad = torch.zeros(1, 32, 5, 5, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    grad[0, :, 2, 2], x[0, :, 2, 2] = 1.0, 2.0**-130
    args = ([1, 1], [1] * 4, [1, 1], [False, True, False])
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "1")
    assert (torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args)[1] == 0).all()
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "0")
    assert torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args)[1][:, 0, 1, 1].float().eq(2.0**-130).all()
    torch_weight_grad = torch.ops.aten.convolution_backward(grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                            32, [False, True, False])[1]
    assert (torch_weight_grad == 0).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "n, c, h, w, k, stride, padding, dilation",
    # and the input gradient of 5- and 7-wide windows through the ring: two blocks of channels,
    # rows of 14 and of 16 (a run moved back)
    HALF_ROW_CASES + [(1, 72, 14, 14, 5, 1, 2, 1), (2, 70, 9, 16, 7, 1, 3, 1), (1, 40, 7, 7, 7, 1, 3, 1)],
)
@needs_avx512_kernels
def test_half_channels_last_backward_is_the_fp32_kernels_rounded_once(
    n, c, h, w, k, stride, padding, dilation, dtype, monkeypatch
):
    """bf16/fp16 channels_last backward on AVX-512 (grad_input_nhwc_native, weight_grad_nhwc_native,
    and the flipped forward_nhwc_native, or for 5- and 7-wide windows at unit stride the flipped
    forward through the ring): the fp32 kernels reading the 16-bit rows widened in registers, the
    weight gradient summed in fp32 in the fp32 rows' order, so every gradient is the fp32 op's
    gradient on the rows (FASTCNN_DEPTHWISE_ROLLED=0: fp32 would sum some weight gradients in the
    ring's order, which the 16-bit path does not take) rounded once, bit for bit. bf16 with the
    pair dot products off (FASTCNN_AVX512_BF16=0; tested below)."""
    monkeypatch.setenv("FASTCNN_AVX512_BF16", "0")
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w).to(dtype).to(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, k, k).to(dtype)
    out_shape = depthwise_conv2d(x, weight, None, stride, padding, dilation).shape
    grad = torch.randn(out_shape).to(dtype).to(memory_format=torch.channels_last)
    grad[0, 0, 0, 0] = float("nan")
    args = ([stride] * 2, [padding] * 4, [dilation] * 2, [True, True, True])
    ours = torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args)
    monkeypatch.setenv("FASTCNN_DEPTHWISE_ROLLED", "0")
    fp32 = torch.ops.fastcnn._depthwise_conv2d_backward(grad.float(), x.float(), weight.float(), *args)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for name, o, f in zip(("grad_input", "grad_weight", "grad_bias"), ours, fp32):
        assert o.dtype == dtype, name
        torch.testing.assert_close(o, f.to(dtype), rtol=0, atol=0, equal_nan=True, msg=name)
    assert ours[2].isnan().any()


@pytest.mark.parametrize(
    "n, c, h, w, k, stride, padding",
    [(2, 5, 9, 11, 3, 1, 1), (3, 4, 13, 10, 3, 2, 1), (2, 3, 12, 9, 5, 1, 2), (2, 3, 11, 12, 5, 2, 2),
     (2, 6, 14, 14, 3, 2, 1), (2, 4, 14, 14, 5, 2, 2), (2, 4, 7, 7, 3, 1, 1), (1, 1, 5, 6, 3, 1, 0),
     (3, 5, 4, 4, 3, 2, 4)],
    ids=["3x3", "3x3-s2", "5x5", "5x5-s2", "14x14-s2-pairs", "14x14-5x5-s2-pairs", "7x7-flat", "c1-valid",
         "only-padding"],
)
@pytest.mark.parametrize("rows", ["dense", "strided"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["bf16", "fp16"])
@needs_avx512_kernels
def test_half_nchw_is_the_fp32_plane_kernels_rounded_once(n, c, h, w, k, stride, padding, rows, dtype):
    """bf16/fp16 NCHW on AVX-512 (forward_nchw_widened, backward_nchw_avx512_planes): each plane widened
    to fp32, the fp32 plane kernels run on it, every output and gradient rounded once, so
    bit for bit the fp32 op's results rounded; rows that are not dense (a slice of a wider
    tensor) are widened row by row."""
    torch.manual_seed(0)
    wide = torch.randn(n, c, h, w + (3 if rows == "strided" else 0)).to(dtype)
    x = wide[..., :w]
    weight, bias = torch.randn(c, 1, k, k).to(dtype), torch.randn(c).to(dtype)
    args = ([stride] * 2, [padding] * 4, [1, 1])
    out = torch.ops.fastcnn.depthwise_conv2d(x, weight, bias, *args)
    out32 = torch.ops.fastcnn.depthwise_conv2d(x.float(), weight.float(), bias.float(), *args)
    torch.testing.assert_close(out, out32.to(dtype), rtol=0, atol=0)
    grad = torch.randn(out.shape).to(dtype)
    ours = torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args, [True, True, True])
    fp32 = torch.ops.fastcnn._depthwise_conv2d_backward(grad.float(), x.float(), weight.float(), *args, [True, True, True])
    for name, o, f in zip(("grad_input", "grad_weight", "grad_bias"), ours, fp32):
        assert o.dtype == dtype, name
        torch.testing.assert_close(o, f.to(dtype), rtol=0, atol=0, msg=name)
    grad_input_only = torch.ops.fastcnn._depthwise_conv2d_backward(grad, x, weight, *args, [True, False, False])
    torch.testing.assert_close(grad_input_only[0], ours[0], rtol=0, atol=0)


def test_gradcheck():
    x, weight, b = _random_case(2, 3, 6, 7, 3, 3, torch.float64, "contiguous")
    assert torch.autograd.gradcheck(lambda *a: depthwise_conv2d(*a, stride=2, padding=(1, 2), dilation=1), (x, weight, b))
    x, weight, b = _random_case(1, 4, 5, 6, 3, 2, torch.float64, "channels_last")
    assert torch.autograd.gradcheck(lambda *a: depthwise_conv2d(*a, stride=1, padding="same", dilation=2), (x, weight, b))


# Gradients of gradients (gradient penalties, Hessian-vector products): the backward op is
# differentiable through the two ops themselves (csrc/ops/autograd/depthwise_conv2d_autograd.cpp).
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradgradcheck(layout):
    x, weight, b = _random_case(2, 3, 7, 8, 3, 3, torch.float64, layout)
    assert torch.autograd.gradgradcheck(lambda *a: depthwise_conv2d(*a, stride=(2, 1), padding=(1, 2, 0, 1), dilation=(1, 2)), (x, weight, b))
    x, weight, b = _random_case(1, 4, 6, 9, 5, 3, torch.float64, layout)
    assert torch.autograd.gradgradcheck(lambda *a: depthwise_conv2d(*a, stride=1, padding="same", dilation=1), (x, weight, b))


def _three_orders(f, tensors):
    """Gradients of orders 1-3 of a loss built so that every order depends on every tensor."""
    first = torch.autograd.grad(f(*tensors).pow(2).sum(), tensors, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in first), tensors, create_graph=True)
    third = torch.autograd.grad(sum((g * g).sum() for g in second), tensors)
    return first + second + third


@pytest.mark.parametrize("case", [(2, 5, 9, 8, 3, 3, 2, 1, 1), (1, 3, 11, 10, 5, 5, 1, (2, 1), 2), (2, 4, 7, 9, 7, 7, 1, 3, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_of_every_order_match_conv2d(case, layout, bias):
    n, c, h, w, kh, kw, stride, padding, dilation = case
    x, weight, b = _random_case(n, c, h, w, kh, kw, torch.float64, layout, bias)
    tensors = (x, weight) if b is None else (x, weight, b)

    def with_bias(op):
        return lambda x, weight, b=None: op(x, weight, b, stride, padding, dilation)

    ours = _three_orders(with_bias(depthwise_conv2d), tensors)
    theirs = _three_orders(with_bias(_reference), tensors)
    for index, (a, e) in enumerate(zip(ours, theirs)):
        # fp64 sums in another order, of terms up to 1e5 that cancel: the error is relative to the
        # tensor's scale, not to each element
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * e.abs().max().item(),
                                   msg=f"order {index // len(tensors) + 1}, tensor {index % len(tensors)}")


def test_gradient_penalty_on_the_input_alone():
    """The common use: a penalty on the input gradient (WGAN-GP, R1), backward into the weights."""
    x, weight, b = _random_case(3, 6, 10, 10, 3, 3, torch.float32, "channels_last")
    x_only = x.detach().requires_grad_()

    def penalised(conv):
        (grad_x,) = torch.autograd.grad(conv(x_only).tanh().sum(), x_only, create_graph=True)
        return torch.autograd.grad(grad_x.pow(2).sum(), (weight, b))

    ours = penalised(lambda t: depthwise_conv2d(t, weight, b, 1, 1))
    theirs = penalised(lambda t: _reference(t, weight, b, 1, 1, 1))
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    assert ours[0].abs().sum() > 0


def test_first_order_backward_records_nothing():
    """A plain backward runs with grad mode off: the backward op goes straight to its kernel, and
    its results carry no graph; with create_graph they do."""
    x, weight, b = _random_case(2, 5, 8, 8, 3, 3, torch.float32, "contiguous")
    plain = torch.autograd.grad(depthwise_conv2d(x, weight, b, 1, 1).sum(), (x, weight, b))
    assert all(g.grad_fn is None and not g.requires_grad for g in plain)
    graphed = torch.autograd.grad(depthwise_conv2d(x, weight, b, 1, 1).pow(2).sum(), (x, weight, b), create_graph=True)
    assert all(g.grad_fn is not None for g in graphed)


def _func_case():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 7, 8, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    return x, w, b


# Every torch.func transform, against the same transform of the reference; each also counts the
# C++ kernel calls, so a transform that fell back to the reference (or failed over to
# PyTorch's conv) would fail here.
_FUNC_GEOMETRY = ([2, 1], [1, 2, 0, 1], [1, 2])
_FUNC_TRANSFORMS = {
    "grad": lambda op, x, w, b: torch.func.grad(_func_loss(op), argnums=(0, 1, 2))(x, w, b),
    "per_sample_grad": lambda op, x, w, b: torch.func.vmap(
        torch.func.grad(lambda w, b, xi: _func_loss(op)(xi[None], w, b), argnums=(0, 1)), in_dims=(None, None, 0)
    )(w, b, x),
    "ensemble_weights": lambda op, x, w, b: torch.func.vmap(lambda w, b: op(x, w, b))(
        torch.stack([w, w.flip(3), 2 * w]), torch.stack([b, -b, b])),
    "vmap_dim_1_input_and_weight": lambda op, x, w, b: torch.func.vmap(lambda x, w: op(x, w, b), in_dims=(1, 1))(
        torch.stack([x, x.flip(3)], 1), torch.stack([w, w.flip(2)], 1)),
    "vmap_dim_2_input": lambda op, x, w, b: torch.func.vmap(lambda x: op(x, w, b), in_dims=2)(torch.stack([x, x.flip(3)], 2)),
    "jvp": lambda op, x, w, b: torch.func.jvp(op, (x, w, b), (x.cos(), w.sin(), b.cos())),
    "jvp_bias_only": lambda op, x, w, b: torch.func.jvp(lambda b: op(x, w, b), (b,), (b.cos(),)),
    "vjp": lambda op, x, w, b: torch.func.vjp(lambda x, w: op(x, w, b), x, w)[1](torch.ones(3, 4, 4, 5, dtype=torch.float64)),
    "jacfwd": lambda op, x, w, b: torch.func.jacfwd(_func_loss(op), argnums=1)(x, w, b),
    "hessian_weight": lambda op, x, w, b: torch.func.hessian(_func_loss(op), argnums=1)(x, w, b),
    "hessian_input": lambda op, x, w, b: torch.func.hessian(_func_loss(op), argnums=0)(x[:1, :2, :5, :5], w[:2], b[:2]),
    "grad_of_input_grad": lambda op, x, w, b: torch.func.grad(
        lambda w: torch.func.grad(_func_loss(op), argnums=0)(x, w, b).pow(2).sum())(w),
    "grad_of_weight_grad": lambda op, x, w, b: torch.func.grad(
        lambda x, b: sum(g.pow(2).sum() for g in torch.func.grad(_func_loss(op), argnums=(1, 2))(x, w, b)),
        argnums=(0, 1))(x, b),
}


def _func_loss(op):
    return lambda x, w, b: op(x, w, b).tanh().sum()


# Importing torch.autograd.forward_ad (jvp) runs torch.jit.script inside PyTorch, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("transform", list(_FUNC_TRANSFORMS))
def test_torch_func_transforms_on_the_kernels(transform, monkeypatch):
    """torch.func cannot see into the C++ autograd functions: under a transform the op runs the
    kernels through fastcnn/ops/_depthwise_functorch.py (backward, jvp and vmap rules)."""
    from fastcnn.ops import _depthwise_functorch

    calls = []
    for name in ("_forward_op", "_backward_op"):
        kernel = getattr(_depthwise_functorch, name)
        monkeypatch.setattr(_depthwise_functorch, name, lambda *a, kernel=kernel: calls.append(1) or kernel(*a))
    x, w, b = _func_case()
    ours = _FUNC_TRANSFORMS[transform](lambda x, w, b: depthwise_conv2d(x, w, b, *_FUNC_GEOMETRY), x, w, b)
    theirs = _FUNC_TRANSFORMS[transform](lambda x, w, b: _reference(x, w, b, *_FUNC_GEOMETRY), x, w, b)
    assert calls, "the transform did not reach the kernels"
    for a, e in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12 * max(1.0, e.abs().max().item()))


def test_poisoned_outputs_are_fully_written(monkeypatch):
    """Every output element is written: NaN-filled fresh buffers do not survive into results."""
    real_empty = torch.empty

    x, weight, b = _random_case(3, 7, 11, 9, 3, 3, torch.float32, "contiguous")
    x_cl = x.detach().to(memory_format=torch.channels_last)
    for inp in (x.detach(), x_cl):
        # The C++ op allocates with at::empty: ask the caching allocator to hand back NaN-filled
        # memory by freeing NaN buffers of the same sizes right before the call.
        for _ in range(3):
            real_empty(inp.shape, dtype=inp.dtype).fill_(float("nan"))
        out = torch.ops.fastcnn.depthwise_conv2d(inp, weight.detach(), b.detach(), [2, 1], [1, 1, 1, 1], [1, 1])
        assert torch.isfinite(out).all()
        grads = torch.ops.fastcnn._depthwise_conv2d_backward(
            torch.randn_like(out), inp, weight.detach(), [2, 1], [1, 1, 1, 1], [1, 1], [True, True, True]
        )
        assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_zero_and_channel_edge(layout):
    x, weight, b = _random_case(0, 5, 7, 7, 3, 3, torch.float32, layout)
    out = depthwise_conv2d(x, weight, b, 1, 1)
    assert out.shape == (0, 5, 7, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("kind", ["sum", "expanded", "permuted"])
def test_backward_with_odd_grad_output_strides(kind):
    x, weight, b = _random_case(2, 6, 9, 10, 3, 3, torch.float64, "contiguous")
    out = depthwise_conv2d(x, weight, b, 2, 1)
    expected = _reference(x, weight, b, 2, 1, 1)
    if kind == "sum":
        ours, theirs = _grads(out.sum(), (x, weight, b), None), _grads(expected.sum(), (x, weight, b), None)
    else:
        if kind == "expanded":
            grad = torch.randn(1, 6, 1, 1, dtype=torch.float64).expand_as(out)
        else:
            grad = torch.randn(out.shape[3], out.shape[2], out.shape[1], out.shape[0], dtype=torch.float64).permute(3, 2, 1, 0)
        ours, theirs = _grads(out, (x, weight, b), grad), _grads(expected, (x, weight, b), grad)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_backward_only_what_is_needed():
    x, weight, b = _random_case(2, 4, 8, 8, 3, 3, torch.float64, "contiguous")
    (gx,) = torch.autograd.grad(depthwise_conv2d(x, weight.detach(), None, 1, 1).sum(), x)
    (ex,) = torch.autograd.grad(_reference(x, weight.detach(), None, 1, 1, 1).sum(), x)
    torch.testing.assert_close(gx, ex)
    (gw,) = torch.autograd.grad(depthwise_conv2d(x.detach(), weight, None, 1, 1).sum(), weight)
    (ew,) = torch.autograd.grad(_reference(x.detach(), weight, None, 1, 1, 1).sum(), weight)
    torch.testing.assert_close(gw, ew)


# Importing torch.autograd.forward_ad runs torch.jit.script inside PyTorch, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_graph_only_where_a_gradient_is_recorded():
    """No graph node when nothing needs a gradient (the C++ autograd kernel skips Function::apply),
    the same output; a bias that requires grad alone still records. Forward-mode AD: the C++ op
    itself rejects a dual tensor (apply has no jvp) rather than drop its tangent; through
    fastcnn.ops an open dual level takes the Python path with a jvp rule (_depthwise_functorch)."""
    import torch.autograd.forward_ad as fwAD

    x, weight, b = _random_case(2, 5, 9, 8, 3, 3, torch.float32, "contiguous")
    recorded = depthwise_conv2d(x, weight, b, 1, 1)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        unrecorded = depthwise_conv2d(x, weight, b, 1, 1)
    detached = depthwise_conv2d(x.detach(), weight.detach(), b.detach(), 1, 1)
    for out in (unrecorded, detached):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, recorded.detach())
    assert depthwise_conv2d(x.detach(), weight.detach(), b, 1, 1).grad_fn is not None
    tangents = torch.randn_like(x), torch.randn_like(weight), torch.randn_like(b)
    results = []
    for op in (lambda *a: depthwise_conv2d(*a, 2, 1), lambda *a: _reference(*a, 2, 1, 1)):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t.detach(), tangent) for t, tangent in zip((x, weight, b), tangents)]
            results.append(fwAD.unpack_dual(op(*duals)))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.fastcnn.depthwise_conv2d(dual, weight.detach(), None, [1, 1], [1, 1, 1, 1], [1, 1])


# 28x28 7x7 channels_last: the ring's input and weight gradients (several 64-channel blocks)
@pytest.mark.parametrize("size, k, c", [(20, 5, 12), (28, 7, 80)])
def test_backward_is_deterministic(size, k, c):
    for layout in ("contiguous", "channels_last"):
        x, weight, b = _random_case(4, c, size, size, k, k, torch.float32, layout)
        grad = torch.randn(4, c, size, size)
        first = _grads(depthwise_conv2d(x, weight, b, 1, k // 2), (x, weight, b), grad)
        second = _grads(depthwise_conv2d(x, weight, b, 1, k // 2), (x, weight, b), grad)
        for a, e in zip(first, second):
            assert torch.equal(a, e)


def _opcheck_samples():
    samples = []
    for layout in ("contiguous", "channels_last", "strided"):
        for requires_grad in (False, True):
            x = _layout(torch.randn(2, 5, 7, 9), layout)
            w = torch.randn(5, 1, 3, 3)
            b = torch.randn(5)
            for t in (x, w, b):
                t.requires_grad_(requires_grad)
            samples.append((x, w, b, [2, 1], [1, 1, 2, 0], [1, 1]))
            samples.append((x, w, None, [1, 1], [0, 0, 0, 0], [2, 1]))
    return samples


@pytest.mark.parametrize("index", range(12))
def test_opcheck(index):
    args = _opcheck_samples()[index]
    torch.library.opcheck(torch.ops.fastcnn.depthwise_conv2d.default, args)


def test_opcheck_backward_op():
    x = torch.randn(2, 5, 7, 9).to(memory_format=torch.channels_last)
    w = torch.randn(5, 1, 3, 3)
    go = torch.randn(2, 5, 4, 9).to(memory_format=torch.channels_last)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(
            torch.ops.fastcnn._depthwise_conv2d_backward.default, (go, x, w, [2, 1], [1, 1, 1, 1], [1, 1], mask),
            test_utils=("test_schema", "test_faketensor"),
        )
        # with inputs that require grad: the backward op's own autograd kernel
        args = (go.clone().requires_grad_(), x.clone().requires_grad_(), w.clone().requires_grad_())
        torch.library.opcheck(
            torch.ops.fastcnn._depthwise_conv2d_backward.default, (*args, [2, 1], [1, 1, 1, 1], [1, 1], mask),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, w, b):
        return depthwise_conv2d(x, w, b, stride=2, padding=1).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x, weight, b = _random_case(2, 6, 9, 9, 3, 3, torch.float32, "channels_last")
    loss = compiled(x, weight, b)
    grads = torch.autograd.grad(loss, (x, weight, b))
    expected_loss = f(x, weight, b)
    expected = torch.autograd.grad(expected_loss, (x, weight, b))
    torch.testing.assert_close(loss, expected_loss)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stride, padding, dilation",
    [(1, 1, 1), ((1, 1), (1, 1), (1, 1)), ([1, 1], [1, 1], [1, 1]), (1, "same", 1), (1, (1, 1, 1, 1), 1)],
)
def test_argument_forms_agree_on_every_call(stride, padding, dilation):
    """Normalised arguments are cached per form: the second call (from the cache) and an unhashable
    list form give what the first gave, and a bad form after a good one still raises."""
    x, weight, b = (t.detach() for t in _random_case(2, 3, 7, 6, 3, 3, torch.float64, "contiguous"))
    expected = _reference(x, weight, b, 1, 1, 1)
    for _ in range(2):
        torch.testing.assert_close(depthwise_conv2d(x, weight, b, stride, padding, dilation), expected)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        depthwise_conv2d(x[:, :, :1, :1], weight, b, stride, 0, dilation)


# Errors


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(3, 8, 8), torch.randn(3, 1, 3, 3), None, {}), "input of shape \\[N, C, H, W\\]"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(4, 1, 3, 3), None, {}), "weight of shape \\[C, 1, kH, kW\\] with C = 3"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 2, 3, 3), None, {}), "weight of shape"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), torch.randn(4), {}), "bias of shape \\[3\\]"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3).double(), None, {}), "weight has dtype"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), None, {"padding": -1}), "padding must be non-negative"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), None, {"stride": 0}), "stride must be positive"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), None, {"dilation": 0}), "dilation must be positive"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), None, {"padding": "full"}), "'same' or 'valid'"),
        (lambda: (torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), None, {"padding": "same", "stride": 2}), "strided"),
        (lambda: (torch.randn(1, 3, 2, 2), torch.randn(3, 1, 5, 5), None, {}), "smaller than the dilated kernel"),
        (lambda: (torch.randint(0, 5, (1, 3, 8, 8)), torch.randint(0, 5, (3, 1, 3, 3)), None, {}), "floating-point"),
    ],
)
def test_errors_name_the_argument(make, match):
    x, w, b, kwargs = make()
    with pytest.raises((ValueError, TypeError), match=match):
        depthwise_conv2d(x, w, b, **kwargs)


def test_cpp_op_checks_its_arguments_too():
    # The whole message, numbers included: a _C linked with its own static libstdc++ printed
    # "with C = " and stopped there (and crashed on the GPU machines, see setup.py).
    with pytest.raises(RuntimeError, match="expected weight of shape \\[C, 1, kH, kW\\] with C = 3 "
                       "\\(the input's channels\\), got \\[4, 1, 3, 3\\]$"):
        torch.ops.fastcnn.depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 1, 3, 3), None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="padding must be four non-negative ints"):
        torch.ops.fastcnn.depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), None, [1, 1], [1, -1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        torch.ops.fastcnn.depthwise_conv2d(torch.ones(1, 3, 8, 8, dtype=torch.int32), torch.ones(3, 1, 3, 3, dtype=torch.int32), None, [1, 1], [1, 1, 1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="expected grad_output of shape"):
        torch.ops.fastcnn._depthwise_conv2d_backward(
            torch.randn(1, 3, 7, 8), torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1], [True] * 3
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.cuda
def test_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match="weight is on cuda"):
        depthwise_conv2d(torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3, device="cuda"))


# ---------------------------------------------------------------------------------------------
# Backend selection


def test_backends_listed_with_reasons():
    status = fastcnn.backends.status()
    assert set(status) == {"cpu", "cuda", "triton", "reference"}
    assert status["cpu"][0] and status["reference"][0]
    assert "cpu" in fastcnn.backends.available()
    assert all(isinstance(reason, str) and reason for _, reason in status.values())


def test_use_backend_selects_and_restores(monkeypatch):
    x, weight, b = _random_case(1, 3, 6, 6, 3, 3, torch.float32, "contiguous")
    calls = []
    real = fastcnn.reference.depthwise_conv2d
    monkeypatch.setattr(fastcnn.reference, "depthwise_conv2d", lambda *a: calls.append(1) or real(*a))
    with fastcnn.use_backend("reference"):
        depthwise_conv2d(x, weight, b, 1, 1)
    assert calls == [1]
    depthwise_conv2d(x, weight, b, 1, 1)
    assert calls == [1]  # auto picks the C++ kernel again
    monkeypatch.setenv("FASTCNN_BACKEND", "reference")
    depthwise_conv2d(x, weight, b, 1, 1)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="unknown fastcnn backend"):
        with fastcnn.use_backend("fast"):
            pass
    monkeypatch.setenv("FASTCNN_BACKEND", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            depthwise_conv2d(x, weight, b, 1, 1)
