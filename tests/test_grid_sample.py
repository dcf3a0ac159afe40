"""grid_sample and affine_grid_sample through the public API on CPU: the C++ kernel against
F.grid_sample and F.affine_grid + F.grid_sample.

The Triton kernels (under the interpreter) and the CUDA kernels have their own files; this one
covers the CPU kernel (scalar fp64/fp16/bf16 path and the AVX2 fp32 path), the registration
(opcheck, autograd, compile), determinism, non-finite coordinates and argument errors.
"""
import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastcnn
from torch._prims_common import suggest_memory_format
from fastcnn import benchmarking
from fastcnn.ops import affine_grid_sample, grid_sample

pytestmark = pytest.mark.skipif(not fastcnn._extension.has_ops(), reason="fastcnn._C is not built")

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border", "reflection"]


def _layout(x, layout):
    if layout == "channels_last":
        return x.to(memory_format=torch.channels_last)
    if layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        wide = torch.randn(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _theta(n, dtype=torch.float64, spread=0.6, generator=None):
    """Random affine maps around the identity: rotations, shears, scales and shifts that sample
    partly outside the input."""
    eye = torch.eye(2, 3, dtype=dtype).repeat(n, 1, 1)
    return eye + spread * torch.randn(n, 2, 3, dtype=dtype, generator=generator)


def _stn_theta(n, generator):
    """The benchmark's transforms: rotation within 30 degrees, scale 0.8-1.2, shift within 0.2."""
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(30)
    scale = 0.8 + 0.4 * torch.rand(n, generator=generator)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * torch.cos(angle)
    theta[:, 0, 1] = -scale * torch.sin(angle)
    theta[:, 1, 0] = scale * torch.sin(angle)
    theta[:, 1, 1] = scale * torch.cos(angle)
    theta[:, :, 2] = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.2
    return theta


def _grads(out, tensors, grad):
    return torch.autograd.grad(out, tensors, grad)


def _check_affine(x, theta, size, mode, padding, align, rtol, atol):
    x = x.detach().requires_grad_()
    theta = theta.detach().requires_grad_()
    out = affine_grid_sample(x, theta, size, mode, padding, align)
    expected = fastcnn.reference.affine_grid_sample(x, theta, size, mode, padding, align)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=suggest_memory_format(x))
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    grad = torch.randn_like(expected)
    for name, a, e in zip(("grad_input", "grad_theta"), _grads(out, (x, theta), grad), _grads(expected, (x, theta), grad)):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def _check_grid(x, grid, mode, padding, align, rtol, atol):
    x = x.detach().requires_grad_()
    grid = grid.detach().requires_grad_()
    out = grid_sample(x, grid, mode, padding, align)
    expected = F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)
    assert out.is_contiguous(memory_format=suggest_memory_format(x))
    torch.testing.assert_close(out, expected, rtol=rtol, atol=atol)
    grad = torch.randn_like(expected)
    for name, a, e in zip(("grad_input", "grad_grid"), _grads(out, (x, grid), grad), _grads(expected, (x, grid), grad)):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


# (N, C, H, W, H_out, W_out): odd sizes, output smaller and larger than the input, 1x1 input,
# channel counts around the 8-lane vector width.
SHAPES = [(2, 3, 7, 9, 7, 9), (3, 5, 6, 11, 9, 4), (1, 9, 1, 1, 3, 5), (2, 1, 13, 5, 2, 17)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_fp64(mode, padding, align, layout):
    torch.manual_seed(0)
    for n, c, h, w, ho, wo in SHAPES:
        x = _layout(torch.randn(n, c, h, w, dtype=torch.float64), layout)
        _check_affine(x, _theta(n), (n, c, ho, wo), mode, padding, align, 1e-12, 1e-12)
        grid = torch.rand(n, ho, wo, 2, dtype=torch.float64) * 3 - 1.5  # about a third outside
        _check_grid(x, grid, mode, padding, align, 1e-12, 1e-12)


@pytest.fixture(params=["1", "0"], ids=["avx512", "avx2"])
def vector_isa(request, monkeypatch):
    """The fp32 CPU kernels on AVX-512 taps and gathers where the CPU has them (FASTCNN_AVX512=1),
    and on the AVX2 ones (FASTCNN_AVX512=0; read on every call)."""
    monkeypatch.setenv("FASTCNN_AVX512", request.param)
    return request.param


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 6, 11, 13])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
def test_matches_fp64_truth_fp32(padding, align, layout, channels, vector_isa):
    """fp32 on rows longer than one chunk, through every AVX2 path (fixed 1 and 3 channels,
    pixel by pixel, plane by plane, wide channels_last): error against the fp64 truth within 2x
    PyTorch's own fp32 error (coordinates of 80 pixels carry ~5e-6 of rounding)."""
    g = torch.Generator().manual_seed(1)
    n, c, h, w = 3, channels, 21, 83
    x = _layout(torch.randn(n, c, h, w, generator=g), layout)
    theta = _theta(n, torch.float32, 0.4, g)
    size = (n, c, 19, 71)
    grad = torch.randn(size, generator=g)
    # The coordinate gradient of bilinear sampling jumps where a coordinate crosses an integer: an
    # fp32 coordinate within rounding of one can land on either side, ours and PyTorch's apart,
    # and move one pixel's whole contribution to grad_theta (seen: 8 and 17 on a grad_theta of
    # 1300, on two CPUs). Output pixels whose source lies within 1e-3 pixel of an integer get a
    # zero gradient, so grad_theta is compared where it is continuous.
    grid = F.affine_grid(theta.double(), size, align_corners=align)
    extent = torch.tensor([w, h], dtype=torch.float64)
    pixel = (grid + 1) / 2 * (extent - 1) if align else ((grid + 1) * extent - 1) / 2
    near_integer = ((pixel - pixel.round()).abs() < 1e-3).any(dim=-1)
    grad = grad.masked_fill(near_integer[:, None], 0.0)

    def run(fn, dtype):
        a, t = x.to(dtype).requires_grad_(), theta.to(dtype).requires_grad_()
        out = fn(a, t, size, "bilinear", padding, align)
        return [out.double()] + [r.double() for r in _grads(out, (a, t), grad.to(dtype))]

    ours = run(affine_grid_sample, torch.float32)
    theirs = run(fastcnn.reference.affine_grid_sample, torch.float32)
    truth = run(fastcnn.reference.affine_grid_sample, torch.float64)
    slack = {"output": 1e-6, "grad_input": 1e-6, "grad_theta": 1e-5}
    for name, o, t, e in zip(("output", "grad_input", "grad_theta"), ours, theirs, truth):
        our_error = (o - e).abs().max().item()
        their_error = (t - e).abs().max().item()
        assert our_error <= 2 * their_error + slack[name] * e.abs().max().item(), (name, our_error, their_error)


@pytest.mark.parametrize("channels", [9, 16, 17, 40])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_wide_images_fp32(mode, padding, align, layout, batch, channels, monkeypatch):
    """fp32 images of more than 8 channels, on AVX-512: the forward of NCHW ones samples a
    channels_last copy of each image (with one image, each thread a share of its channels) and
    transposes 16 x 16 blocks back; the backward runs channel vectors pixel by pixel, NCHW through
    channels_last copies. Against the AVX2 loops (nearest outputs bitwise) and
    PyTorch in fp64, over 67-pixel rows (a chunk and a tail), channel tails, a third of the samples
    outside, and a NaN coordinate (padding, zero gradient)."""
    g = torch.Generator().manual_seed(channels + batch)
    x = _layout(torch.randn(batch, channels, 13, 70, generator=g), layout)
    grid = torch.rand(batch, 5, 67, 2, generator=g) * 3 - 1.5
    grid[0, 1, 3, 0] = float("nan")
    theta = _theta(batch, torch.float32, 0.4, g)
    size = (batch, channels, 11, 67)
    grad_grid_out = torch.randn(batch, channels, 5, 67, generator=g)
    grad_theta_out = torch.randn(size, generator=g)
    runs = {}
    for isa in ("1", "0"):
        monkeypatch.setenv("FASTCNN_AVX512", isa)
        a, gr, t = x.clone().requires_grad_(), grid.clone().requires_grad_(), theta.clone().requires_grad_()
        out = grid_sample(a, gr, mode, padding, align)
        affine = affine_grid_sample(a, t, size, mode, padding, align)
        runs[isa] = [out, affine, *torch.autograd.grad((out, affine), (a, gr, t), (grad_grid_out, grad_theta_out))]
    ours, planes = runs["1"], runs["0"]
    assert ours[0][0, :, 1, 3].eq(0).all() and ours[3][0, 1, 3].eq(0).all()
    assert ours[2].is_contiguous(memory_format=suggest_memory_format(x))
    expected = F.grid_sample(x.double(), grid.double().nan_to_num(0.0), mode, padding, align)
    expected[0, :, 1, 3] = 0.0
    truth = fastcnn.reference.affine_grid_sample(x.double(), theta.double(), size, mode, padding, align)
    if mode == "nearest":  # the same pixels; grad_input's sums may add in another order
        assert torch.equal(ours[0], planes[0]) and torch.equal(ours[1], planes[1])
        torch.testing.assert_close(ours[2], planes[2], rtol=0, atol=1e-6 * planes[2].abs().max().item())
        assert not ours[3].any() and not ours[4].any()
        return
    # fp32 coordinates of 70-pixel rows carry ~1e-5 pixel of rounding, the sample as much again.
    for o, t in ((ours[0], expected), (ours[1], truth)):
        torch.testing.assert_close(o.double(), t, rtol=0, atol=1e-4)
    for name, o, p in zip(("output", "affine output", "grad_input", "grad_grid", "grad_theta"), ours, planes):
        scale = max(1.0, p.abs().max().item())
        torch.testing.assert_close(o, p, rtol=0, atol=2e-5 * scale, msg=name)


def _rotation_theta(angles, scales, shifts):
    theta = torch.zeros(len(angles), 2, 3)
    for i, (angle, scale, shift) in enumerate(zip(angles, scales, shifts)):
        a = math.radians(angle)
        theta[i] = torch.tensor([[scale * math.cos(a), -scale * math.sin(a), shift[0]],
                                 [scale * math.sin(a), scale * math.cos(a), shift[1]]])
    return theta


@pytest.mark.skipif(fastcnn._extension.build_info().get("grid_sample_window_rows", "0") == "0",
                    reason="no AVX-512 forward on this CPU")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("image", [(19, 23), (67, 131)], ids=["small", "large"])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_forward_by_row_windows_is_the_gathers_fp32(padding, align, image, channels, layout, monkeypatch):
    """The AVX-512 forward of an affine map (NCHW, and channels_last of 2-4 channels) reads a
    vector's taps from the few input rows they lie in, as plain vectors picked by permutes, where
    those rows are at most FASTCNN_GRID_SAMPLE_WINDOW_ROWS (measured per machine) and the taps
    span one window (32 floats of a plane, 64 of interleaved pixels); otherwise it gathers. Both
    read the same values into the same arithmetic: bitwise equal, over maps of 1 to 17+ rows a
    vector, too wide (scale 2.3), reaching past every edge, and with a NaN and an infinite entry;
    small 1-2 channel NCHW images go through the zero-bordered copy, the rest through the
    edge-tested rows."""
    g = torch.Generator().manual_seed(channels * 10 + image[0])
    h, w = image
    angles = [0.0, 4.0, -12.0, 28.0, -45.0, 70.0, 90.0, 8.0, 15.0, 0.0, 3.0]
    scales = [1.0, 0.9, 1.2, 0.8, 1.0, 1.1, 0.5, 2.3, 1.6, 1.0, 0.7]
    shifts = [(0.0, 0.0), (0.05, -0.03), (0.4, 0.2), (-0.6, 0.5), (0.0, 0.9), (1.2, -0.1), (0.1, 0.1),
              (0.0, 0.0), (-0.3, -0.8), (3.0, 0.0), (0.02, 0.01)]
    theta = _rotation_theta(angles, scales, shifts)
    theta[9, 1, 1] = float("nan")
    theta[10, 0, 0] = float("inf")
    n = theta.shape[0]
    x = _layout(torch.randn(n, channels, h, w, generator=g), layout)
    # A given grid: a smooth one with noise, a NaN and an infinite coordinate (windows bounded by
    # reductions; a grid's rows need not be monotonic).
    grid = F.affine_grid(theta[:9], (9, channels, h + 3, w - 5), align_corners=align)
    grid = grid + 0.05 * torch.randn(grid.shape, generator=g)
    grid[1, 2, 3, 0], grid[2, 0, 5, 1] = float("nan"), float("inf")
    outputs, grid_outputs = {}, {}
    for rows in ("0", "16"):
        monkeypatch.setenv("FASTCNN_GRID_SAMPLE_WINDOW_ROWS", rows)
        outputs[rows] = affine_grid_sample(x, theta, (n, channels, h + 3, w - 5), "bilinear", padding, align)
        grid_outputs[rows] = grid_sample(x[:9], grid, "bilinear", padding, align)
    assert torch.equal(outputs["0"], outputs["16"])
    assert torch.equal(grid_outputs["0"], grid_outputs["16"])
    reference = fastcnn.reference.affine_grid_sample(x[:9].double(), theta[:9].double(), (9, channels, h + 3, w - 5),
                                                     "bilinear", padding, align)
    torch.testing.assert_close(outputs["16"][:9].double(), reference, rtol=0, atol=1e-4)


@pytest.mark.skipif(fastcnn._extension.build_info().get("grid_sample_window_rows", "0") == "0",
                    reason="no AVX-512 forward on this CPU")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("image", [(19, 23), (67, 131)], ids=["small", "large"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_coordinate_gradient_by_row_windows_is_the_gathers_fp32(padding, image, channels, layout, monkeypatch):
    """The AVX-512 coordinate gradient (NCHW up to 8 channels, channels_last 2-4: theta's or the
    grid's gradient when the input needs none, and for channels_last images over 32 KiB next to
    grad_input) reads its taps from row windows as the forward does: bitwise the gathers' result,
    for affine maps (as test_forward_by_row_windows_is_the_gathers_fp32) and for a smooth grid
    with noise (the window's extremes by reductions; some vectors too spread for one)."""
    g = torch.Generator().manual_seed(channels * 7 + image[0])
    h, w = image
    theta = _rotation_theta([0.0, 10.0, -25.0, 60.0, 5.0, 0.0], [1.0, 1.1, 0.8, 1.0, 2.3, 0.9],
                            [(0.0, 0.0), (0.3, -0.2), (-0.5, 0.6), (0.1, 0.0), (0.0, 0.1), (1.5, 0.0)])
    n = theta.shape[0]
    size = (n, channels, h - 2, w + 3)
    x = _layout(torch.randn(n, channels, h, w, generator=g), layout)
    grid = F.affine_grid(theta, size, align_corners=False)
    grid = grid + 0.02 * torch.randn(grid.shape, generator=g)
    gout = _layout(torch.randn(size, generator=g), layout)
    grads = {}
    for rows in ("0", "16"):
        monkeypatch.setenv("FASTCNN_GRID_SAMPLE_WINDOW_ROWS", rows)
        t, gr = theta.clone().requires_grad_(), grid.clone().requires_grad_()
        a = x.clone().requires_grad_()
        grads[rows] = [
            *torch.autograd.grad(affine_grid_sample(x, t, size, "bilinear", padding, False), (t,), gout),
            *torch.autograd.grad(grid_sample(x, gr, "bilinear", padding, False), (gr,), gout),
            *torch.autograd.grad(affine_grid_sample(a, t, size, "bilinear", padding, False), (a, t), gout),
        ]
    for name, gathered, windowed in zip(("theta", "grid", "input", "theta with input"), grads["0"], grads["16"]):
        assert torch.equal(gathered, windowed), name


@pytest.mark.parametrize("out_hw", [(37, 41), (28, 27)])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("scale", [3.5, 1.6, 1.0, 0.8, 0.62, 0.5, 0.4, 0.2])
def test_affine_backward_by_scatters_fp32(scale, align, channels, out_hw, monkeypatch):
    """The AVX-512 backward with grad_input of an affine map, 1-2 channels, zeros padding:
    grad_input is added by pair gathers and scatters, 16 output pixels that share no tap at a time
    (pixels k apart in both directions, k from the map's smaller singular value; maps that shrink
    by more than 6 go to the AVX2 loop). A scatter of two pixels onto one element would lose a
    pixel's whole contribution. Scales from 3.5 (k = 1) to 0.2 (none), rotated and sheared, over
    output maps of 2 x 2 tiles (32 pixels) and tails, and of one tile (up to 32 x 32, whose
    per-pixel constants come by permutes, not gathers): against the AVX2 loop and the fp64 truth."""
    g = torch.Generator().manual_seed(int(100 * scale) + channels)
    n, h, w = 3, 45, 52
    ho, wo = out_hw
    x = torch.randn(n, channels, h, w, generator=g)
    angle = torch.tensor([0.3, -0.5, 1.2])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = scale * torch.cos(angle), -scale * torch.sin(angle) + 0.1 * scale
    theta[:, 1, 0], theta[:, 1, 1] = scale * torch.sin(angle), scale * torch.cos(angle)
    theta[:, :, 2] = torch.tensor([[0.1, -0.2], [0.3, 0.05], [-0.25, -0.1]])
    size = (n, channels, ho, wo)
    pixel = F.affine_grid(theta.double(), size, align_corners=align)
    grad = torch.randn(size, generator=g).masked_fill(_near_integer(pixel, w, h, align)[:, None], 0.0)
    runs = {}
    for isa in ("1", "0"):
        monkeypatch.setenv("FASTCNN_AVX512", isa)
        a, t = x.clone().requires_grad_(), theta.clone().requires_grad_()
        runs[isa] = torch.autograd.grad(affine_grid_sample(a, t, size, "bilinear", "zeros", align), (a, t), grad)
    a, t = x.double().requires_grad_(), theta.double().requires_grad_()
    truth = torch.autograd.grad(
        fastcnn.reference.affine_grid_sample(a, t, size, "bilinear", "zeros", align), (a, t), grad.double())
    for name, ours, loop, exact in zip(("grad_input", "grad_theta"), runs["1"], runs["0"], truth):
        scale_of = max(1.0, exact.abs().max().item())
        torch.testing.assert_close(ours, loop, rtol=0, atol=2e-5 * scale_of, msg=name)
        torch.testing.assert_close(ours.double(), exact, rtol=0, atol=2e-5 * scale_of, msg=name)


def test_affine_backward_by_scatters_across_output_sizes(monkeypatch):
    """The scatter backward keeps each thread's pixel orders between calls, for one output size:
    calls that alternate sizes (and the single-thread case) must each use their own."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1, 30, 33, generator=g)
    theta = torch.tensor([[[0.9, -0.3, 0.1], [0.3, 0.9, -0.1]]]).repeat(2, 1, 1)

    def grads(size, isa):
        monkeypatch.setenv("FASTCNN_AVX512", isa)
        a, t = x.clone().requires_grad_(), theta.clone().requires_grad_()
        out = affine_grid_sample(a, t, size)
        return torch.autograd.grad(out, (a, t), torch.ones_like(out))

    saved = torch.get_num_threads()
    try:
        for threads in (saved, 1):
            torch.set_num_threads(threads)
            # Output sizes near the input's: the map's lattice stride stays the same (4).
            for size in [(2, 1, 29, 31), (2, 1, 31, 29), (2, 1, 29, 31), (2, 1, 30, 34)]:
                # grad_input: a stale order would miss or repeat pixels (grad_theta differs at
                # coordinate kinks between the two paths; test_affine_backward_by_scatters_fp32).
                torch.testing.assert_close(grads(size, "1")[0], grads(size, "0")[0], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("out_hw", [(37, 41), (16, 90), (70, 15)])
@pytest.mark.parametrize("channels", [3, 5, 8, 11])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("scale, angle", [
    (1.0, 0.0), (1.0, 0.3), (0.8, -0.52), (1.25, 0.52), (0.62, 0.2), (2.5, -1.0), (1.0, math.pi / 4),
    (1.0, math.pi / 2), (0.1, 0.3), (-1.1, 0.4)])
def test_affine_grad_input_gathered_by_input_pixels_fp32(scale, angle, align, channels, out_hw, monkeypatch):
    """The AVX-512 backward with grad_input of an affine map, 3-8 NCHW channels (and more, four
    planes at a time, when grad_input is all that is wanted), zeros padding: each input pixel sums
    the output pixels whose source lies within a pixel of it, row window by row window
    (avx512::grad_input_image_pull), instead of each output pixel adding to its taps.
    A lane whose candidates start a column late, a row of the parallelogram left out, or a window
    column read past the output row would lose or invent contributions. Maps from the identity
    (no y term) through rotations up to 90 degrees, magnifications and reflections, to ones the
    pull leaves to the scatters (a 10x shrink): against the scatters (FASTCNN_GRID_SAMPLE_PULL=0)
    and the fp64 truth, over outputs narrower and wider than the 32-column window."""
    g = torch.Generator().manual_seed(int(1000 * (scale + angle)) + channels)
    n, h, w = 2, 45, 52
    ho, wo = out_hw
    x = torch.randn(n, channels, h, w, generator=g)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = scale * math.cos(angle), -scale * math.sin(angle)
    theta[:, 1, 0], theta[:, 1, 1] = abs(scale) * math.sin(angle), abs(scale) * math.cos(angle)
    theta[:, :, 2] = torch.tensor([[0.1, -0.2], [-0.7, 0.45]])
    size = (n, channels, ho, wo)
    grad = torch.randn(size, generator=g)
    runs = {}
    for pull in ("1", "0"):
        monkeypatch.setenv("FASTCNN_GRID_SAMPLE_PULL", pull)
        a, t = x.clone().requires_grad_(), theta.clone().requires_grad_()
        runs[pull] = torch.autograd.grad(affine_grid_sample(a, t, size, "bilinear", "zeros", align), a, grad)[0]
    a = x.double().requires_grad_()
    truth = torch.autograd.grad(
        fastcnn.reference.affine_grid_sample(a, theta.double(), size, "bilinear", "zeros", align), a, grad.double())[0]
    scale_of = max(1.0, truth.abs().max().item())
    torch.testing.assert_close(runs["1"], runs["0"], rtol=0, atol=2e-5 * scale_of)
    torch.testing.assert_close(runs["1"].double(), truth, rtol=0, atol=2e-5 * scale_of)


@pytest.mark.parametrize("pull", ["1", "auto"])
@pytest.mark.parametrize("channels", [3, 6, 8])
@pytest.mark.parametrize("align", [False, True])
def test_affine_backward_pull_with_theta_gradient_fp32(align, channels, pull, monkeypatch):
    """Both gradients of an affine map over 3-8 NCHW channels, zeros padding, on AVX-512: where
    the pull takes grad_input (FASTCNN_GRID_SAMPLE_PULL=1, and by default on CPUs whose gathers
    are mitigated) θ's gradient follows in its own pass; elsewhere the pair loop does both. Each
    against the fp64 truth, θ's gradient where it is continuous (as in
    test_matches_fp64_truth_fp32), within 2x PyTorch's own fp32 error."""
    monkeypatch.setenv("FASTCNN_GRID_SAMPLE_PULL", pull)
    g = torch.Generator().manual_seed(channels)
    n, h, w = 2, 29, 45
    x = torch.randn(n, channels, h, w, generator=g)
    theta = _theta(n, torch.float32, 0.3, g)
    size = (n, channels, 23, 51)
    grid = F.affine_grid(theta.double(), size, align_corners=align)
    grad = torch.randn(size, generator=g).masked_fill(_near_integer(grid, w, h, align)[:, None], 0.0)

    def run(fn, dtype):
        a, t = x.to(dtype).requires_grad_(), theta.to(dtype).requires_grad_()
        return [r.double() for r in _grads(fn(a, t, size, "bilinear", "zeros", align), (a, t), grad.to(dtype))]

    ours = run(affine_grid_sample, torch.float32)
    theirs = run(fastcnn.reference.affine_grid_sample, torch.float32)
    truth = run(fastcnn.reference.affine_grid_sample, torch.float64)
    for name, o, t, e in zip(("grad_input", "grad_theta"), ours, theirs, truth):
        our_error, their_error = (o - e).abs().max().item(), (t - e).abs().max().item()
        assert our_error <= 2 * their_error + 1e-5 * e.abs().max().item(), (name, our_error, their_error)


def _near_integer(pixel_grid, w, h, align):
    """Output pixels whose fp64 source lies within 1e-3 pixel of an integer (see above)."""
    extent = torch.tensor([w, h], dtype=torch.float64)
    pixel = (pixel_grid + 1) / 2 * (extent - 1) if align else ((pixel_grid + 1) * extent - 1) / 2
    return ((pixel - pixel.round()).abs() < 1e-3).any(dim=-1)


@pytest.mark.parametrize("layout, channels, in_hw, out_hw", [
    ("contiguous", 1, (17, 37), (13, 35)), ("contiguous", 3, (17, 37), (13, 35)), ("contiguous", 8, (17, 37), (13, 35)),
    ("channels_last", 2, (17, 37), (13, 35)), ("channels_last", 3, (17, 37), (13, 35)),
    ("channels_last", 4, (17, 37), (13, 35)),
    # Over 32 KiB: the coordinate gradient in its own pass after grad_input.
    ("channels_last", 3, (61, 67), (19, 70)),
    # theta's sums over 40k pixels an image (fp32 lanes added in double every 512 pixels): within
    # twice PyTorch's own fp32 error, as everywhere here.
    ("contiguous", 1, (150, 170), (190, 210)), ("contiguous", 3, (150, 170), (190, 210))])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", ["affine", "grid"])
def test_coordinate_gradient_alone_and_grids_fp32(kind, padding, align, layout, channels, in_hw, out_hw, vector_isa):
    """fp32 against the fp64 truth, as above, for what that test leaves out: a given grid (the
    forward computes its taps from the grid's pairs), and the coordinate gradient alone, as an
    STN whose input needs no gradient asks for it (its own AVX-512 paths, NCHW and channels_last
    of 2-4 channels), next to both gradients."""
    g = torch.Generator().manual_seed(2)
    n, c, (h, w) = 2, channels, in_hw
    x = _layout(torch.randn(n, c, h, w, generator=g), layout)
    size = (n, c, *out_hw)
    theta = _theta(n, torch.float32, 0.4, g)
    coords = F.affine_grid(theta.double(), size, align_corners=align).float() if kind == "grid" else theta
    pixel_grid = coords.double() if kind == "grid" else F.affine_grid(theta.double(), size, align_corners=align)
    grad = torch.randn(size, generator=g).masked_fill(_near_integer(pixel_grid, w, h, align)[:, None], 0.0)

    def run(fn, dtype, wants_input):
        a = x.to(dtype).requires_grad_(wants_input)
        t = coords.to(dtype).requires_grad_()
        out = fn(a, t, padding, align) if kind == "grid" else fn(a, t, size, "bilinear", padding, align)
        grads = _grads(out, (a, t) if wants_input else (t,), grad.to(dtype))
        return [out.double(), grads[-1].double()] + ([grads[0].double()] if wants_input else [])

    if kind == "grid":
        ours_fn = lambda a, t, p, al: grid_sample(a, t, "bilinear", p, al)
        ref_fn = lambda a, t, p, al: F.grid_sample(a, t, "bilinear", p, al)
    else:
        ours_fn, ref_fn = affine_grid_sample, fastcnn.reference.affine_grid_sample
    truth = run(ref_fn, torch.float64, True)
    theirs = run(ref_fn, torch.float32, True)
    for wants_input in (False, True):
        ours = run(ours_fn, torch.float32, wants_input)
        for name, o, t, e in zip(("output", "grad_coords", "grad_input"), ours, theirs, truth):
            our_error = (o - e).abs().max().item()
            their_error = (t - e).abs().max().item()
            assert our_error <= 2 * their_error + 1e-5 * e.abs().max().item(), (name, wants_input, our_error, their_error)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("padding", PADDINGS)
def test_nearest_fp32_equals_pytorch(padding, layout, vector_isa):
    """Nearest sampling picks the same pixels as PyTorch (ties to even) on random transforms."""
    g = torch.Generator().manual_seed(2)
    x = _layout(torch.randn(4, 5, 17, 29, generator=g), layout)
    theta = _stn_theta(4, g)
    size = (4, 5, 23, 70)
    out = affine_grid_sample(x, theta, size, "nearest", padding, False)
    expected = fastcnn.reference.affine_grid_sample(x, theta, size, "nearest", padding, False)
    assert torch.equal(out, expected)
    grid = torch.rand(4, 9, 70, 2, generator=g) * 2.4 - 1.2
    assert torch.equal(grid_sample(x, grid, "nearest", padding, True), F.grid_sample(x, grid, "nearest", padding, True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision_error_within_twice_pytorch(dtype, layout):
    """Our error against the fp64 truth is at most 2x PyTorch's own error in that dtype."""
    g = torch.Generator().manual_seed(3)
    x = _layout(torch.randn(2, 12, 15, 13, generator=g), layout).to(dtype).requires_grad_()
    theta = _stn_theta(2, g).to(dtype).requires_grad_()
    size = (2, 12, 11, 17)
    grad = torch.randn(size, generator=g).to(dtype)
    ours = [affine_grid_sample(x, theta, size)]
    ours += _grads(ours[0], (x, theta), grad)
    theirs = [fastcnn.reference.affine_grid_sample(x, theta, size)]
    theirs += _grads(theirs[0], (x, theta), grad)
    x64, t64 = (t.detach().double().requires_grad_() for t in (x, theta))
    truth = [fastcnn.reference.affine_grid_sample(x64, t64, size)]
    truth += _grads(truth[0], (x64, t64), grad.double())
    for name, o, t, e in zip(("output", "grad_input", "grad_theta"), ours, theirs, truth):
        assert o.dtype == dtype
        our_error = (o.double() - e).abs().max().item()
        their_error = (t.double() - e).abs().max().item()
        assert our_error <= 2 * their_error + 1e-3 * e.abs().max().item(), (name, our_error, their_error)


def test_gradcheck():
    torch.manual_seed(4)
    for padding, align in itertools.product(PADDINGS, (False, True)):
        x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
        theta = _theta(2, spread=0.3).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda a, t: affine_grid_sample(a, t, (2, 3, 4, 7), "bilinear", padding, align), (x, theta)
        )
        grid = (torch.rand(2, 3, 4, 2, dtype=torch.float64) * 2.2 - 1.1).requires_grad_()
        xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(lambda a, gr: grid_sample(a, gr, "bilinear", padding, align), (xc, grid))
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    theta = _theta(2, spread=0.3)
    assert torch.autograd.gradcheck(lambda a: affine_grid_sample(a, theta, (2, 3, 4, 4), "nearest"), (x,))


def test_output_size_differs_from_input():
    x = torch.randn(2, 4, 10, 12, dtype=torch.float64)
    out = affine_grid_sample(x, _theta(2), (2, 4, 3, 25))
    assert out.shape == (2, 4, 3, 25)
    _check_affine(x, _theta(2), (2, 4, 1, 1), "bilinear", "zeros", False, 1e-12, 1e-12)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_affine_rows_grazing_the_edges_fp32(padding, channels, layout, vector_isa):
    """Maps that put samples exactly on the image's first and last pixels, or a rounding step
    inside them: the AVX-512 forward samples a vector without edge tests when its end pixels' taps
    are inside, so those ends must be judged as PyTorch does. Rows of 37 pixels (vectors of 16, 16
    and 5); the output must match F.affine_grid + F.grid_sample to fp32 rounding (a wrong edge
    judgement reads the wrong pixel: errors of order 1)."""
    g = torch.Generator().manual_seed(3)
    n, h, w = 6, 12, 37
    x = _layout(torch.randn(n, channels, h, w, generator=g), layout)
    one_below = math.nextafter(1.0, 0.0)
    theta = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],  # align_corners: pixel j samples j exactly
            [[one_below, 0.0, 0.0], [0.0, one_below, 0.0]],
            [[1.0, 0.0, 1.0 / w], [0.0, 1.0, -1.0 / h]],  # half a pixel's shift: one tap off each edge
            [[1.0 - 1.0 / w, 0.0, 0.0], [0.0, 1.0 - 1.0 / h, 0.0]],  # zoomed in to the pixel centres
            [[0.9, 0.3, 0.0], [-0.3, 0.9, 0.0]],  # rotated: some vectors inside, some across an edge
            [[0.5, 0.0, 0.5], [0.0, 0.5, -0.5]],  # a quarter of the image: every vector inside
        ],
        dtype=torch.float32,
    )
    for align in (False, True):
        size = (n, channels, h, w)
        out = affine_grid_sample(x, theta, size, "bilinear", padding, align)
        expected = F.grid_sample(x, F.affine_grid(theta, size, align_corners=align), padding_mode=padding,
                                 align_corners=align)
        # Our map folds unnormalize into it (in fp64), PyTorch rounds the grid first: fp32
        # coordinates a few 1e-6 pixel apart, times value slopes of up to ~6 here.
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", PADDINGS)
def test_sampling_entirely_outside(padding, vector_isa):
    """A shift of 5 (normalised) puts every sample outside the input: zeros pads with zeros,
    border and reflection still match PyTorch."""
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    theta = torch.tensor([[[1.0, 0.0, 5.0], [0.0, 1.0, 0.0]], [[0.5, 0.2, -7.0], [0.1, 2.0, 9.0]]], dtype=torch.float64)
    if padding == "zeros":
        assert torch.equal(affine_grid_sample(x, theta, (2, 3, 8, 9), padding_mode=padding), torch.zeros(2, 3, 8, 9, dtype=torch.float64))
    for mode, align in itertools.product(MODES, (False, True)):
        _check_affine(x, theta, (2, 3, 8, 9), mode, padding, align, 1e-12, 1e-12)
    # Far outside in every direction, for the grid too.
    grid = torch.tensor([-1e6, 1e6, -30.0, 30.0], dtype=torch.float64)[torch.randint(0, 4, (2, 5, 6, 2))]
    for mode, align in itertools.product(MODES, (False, True)):
        _check_grid(x, grid, mode, padding, align, 1e-12, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_coordinates_sample_as_padding(mode, padding, layout, dtype, vector_isa):
    """A NaN coordinate reads as zero padding (PyTorch's CUDA rule; its CPU kernel returns NaN
    under zeros padding), never reaches an integer cast, and leaves every gradient finite. An
    infinite one is padding too, except under border padding, where it clamps to the edge as in
    PyTorch. The finite samples match PyTorch."""
    x = _layout(torch.randn(3, 4, 6, 7, dtype=dtype), layout).requires_grad_()
    grid = torch.rand(3, 5, 8, 2, dtype=dtype) * 2 - 1
    bad = torch.zeros(3, 5, 8, dtype=torch.bool)
    values = (float("nan"), float("inf"), -float("inf"))
    for k, value in enumerate(values):
        grid[k, k + 1, 2 * k, k % 2] = value
        grid[k, 0, 7, :] = value
        if k == 0 or padding != "border":
            bad[k, k + 1, 2 * k] = True
            bad[k, 0, 7] = True
    grid.requires_grad_()
    out = grid_sample(x, grid, mode, padding)
    assert torch.equal(out.permute(0, 2, 3, 1)[bad], torch.zeros_like(out.permute(0, 2, 3, 1)[bad]))
    # PyTorch on the same grid with the padding samples replaced by anything finite; under border,
    # an infinity clamps exactly like a huge finite value.
    finite = torch.where(bad[..., None], 0.0, grid.detach().clamp(-1e6, 1e6))
    expected = F.grid_sample(x, finite, mode, padding, False)
    keep = ~bad[:, None].expand_as(out)
    torch.testing.assert_close(out[keep], expected[keep])
    gx, gg = torch.autograd.grad(out, (x, grid), torch.randn_like(out))
    assert torch.isfinite(gx).all() and torch.isfinite(gg).all()

    theta = _theta(3, dtype).detach()
    theta[1, 0, 1] = float("nan")
    theta[2, 1, 0] = float("nan")
    theta.requires_grad_()
    out = affine_grid_sample(x, theta, (3, 4, 5, 5), mode, padding)
    assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    expected = fastcnn.reference.affine_grid_sample(x[:1], theta[:1], (1, 4, 5, 5), mode, padding)
    torch.testing.assert_close(out[:1], expected)
    gx, gt = torch.autograd.grad(out, (x, theta), torch.randn_like(out))
    assert torch.isfinite(gx).all() and torch.isfinite(gt[:1]).all()


def test_poisoned_outputs_are_fully_written(vector_isa):
    """Every output element is written: NaN-filled freed buffers do not survive into results."""
    x = torch.randn(3, 7, 11, 9)
    theta = _theta(3, torch.float32)
    for inp in (x, x.to(memory_format=torch.channels_last)):
        for mode in MODES:
            for _ in range(3):
                torch.empty(inp.shape).fill_(float("nan"))
            out = torch.ops.fastcnn.affine_grid_sample(inp, theta, [11, 9], MODES.index(mode), 0, False)
            assert torch.isfinite(out).all()
            grads = torch.ops.fastcnn._affine_grid_sample_backward(
                torch.randn_like(out), inp, theta, MODES.index(mode), 0, False, [True, True]
            )
            assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_batch_and_channels(layout):
    for n, c in ((0, 3), (2, 0)):
        x = _layout(torch.randn(n, c, 5, 6), layout).requires_grad_()
        theta = _theta(n, torch.float32).requires_grad_()
        out = affine_grid_sample(x, theta, (n, c, 4, 4))
        assert out.shape == (n, c, 4, 4)
        gx, gt = torch.autograd.grad(out.sum(), (x, theta), allow_unused=True)
        assert gx.shape == x.shape and torch.equal(gt, torch.zeros_like(theta))


@pytest.mark.parametrize("kind", ["sum", "expanded", "permuted"])
def test_backward_with_odd_grad_output_strides(kind):
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64, requires_grad=True)
    theta = _theta(2).requires_grad_()
    size = (2, 6, 7, 8)
    out = affine_grid_sample(x, theta, size)
    expected = fastcnn.reference.affine_grid_sample(x, theta, size)
    if kind == "sum":
        ours, theirs = _grads(out.sum(), (x, theta), None), _grads(expected.sum(), (x, theta), None)
    else:
        if kind == "expanded":
            grad = torch.randn(1, 6, 1, 1, dtype=torch.float64).expand_as(out)
        else:
            grad = torch.randn(8, 7, 6, 2, dtype=torch.float64).permute(3, 2, 1, 0)
        ours, theirs = _grads(out, (x, theta), grad), _grads(expected, (x, theta), grad)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-11)


def test_backward_only_what_is_needed():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    theta = _theta(2).requires_grad_()
    (gx,) = torch.autograd.grad(affine_grid_sample(x, theta.detach(), (2, 4, 8, 8)).sum(), x)
    (ex,) = torch.autograd.grad(fastcnn.reference.affine_grid_sample(x, theta.detach(), (2, 4, 8, 8)).sum(), x)
    torch.testing.assert_close(gx, ex)
    (gt,) = torch.autograd.grad(affine_grid_sample(x.detach(), theta, (2, 4, 8, 8)).sum(), theta)
    (et,) = torch.autograd.grad(fastcnn.reference.affine_grid_sample(x.detach(), theta, (2, 4, 8, 8)).sum(), theta)
    torch.testing.assert_close(gt, et)


# Importing torch.autograd.forward_ad runs torch.jit.script inside PyTorch, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_graph_only_where_a_gradient_is_recorded():
    """The C++ autograd kernel skips Function::apply when nothing needs a gradient (grad mode off,
    or no input requiring one): no graph node, the same output. Forward-mode AD is refused, as
    PyTorch refuses it for grid_sampler_2d, rather than the tangent silently dropped: by the C++
    op's apply (no jvp), and through fastcnn.ops by the Python path's jvp (_grid_sample_functorch);
    inputs without a tangent under an open dual level sample as usual."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(2, 3, 8, 9, requires_grad=True)
    theta = _theta(2, torch.float32).requires_grad_()
    recorded = affine_grid_sample(x, theta, (2, 3, 7, 6))
    assert recorded.grad_fn is not None
    with torch.no_grad():
        unrecorded = affine_grid_sample(x, theta, (2, 3, 7, 6))
    detached = affine_grid_sample(x.detach(), theta.detach(), (2, 3, 7, 6))
    for out in (unrecorded, detached):
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, recorded.detach())
    grid = F.affine_grid(theta.detach(), (2, 3, 7, 6), align_corners=False)
    assert grid_sample(x, grid).grad_fn is not None
    assert grid_sample(x.detach(), grid).grad_fn is None
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.randn_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            affine_grid_sample(dual, theta.detach(), (2, 3, 7, 6))
        with pytest.raises(RuntimeError, match="jvp"):
            torch.ops.fastcnn.affine_grid_sample(dual, theta.detach(), [7, 6], 0, 0, False)
        plain = affine_grid_sample(x.detach(), theta.detach(), (2, 3, 7, 6))
    torch.testing.assert_close(plain, recorded.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_is_deterministic_across_runs_and_threads(layout):
    """Bitwise identical gradients run to run and with 1 or 2 threads, in deterministic mode."""
    g = torch.Generator().manual_seed(5)
    x = _layout(torch.randn(5, 6, 30, 31, generator=g), layout).requires_grad_()
    theta = _stn_theta(5, g).requires_grad_()
    grid = (torch.rand(5, 17, 40, 2, generator=g) * 2.2 - 1.1).requires_grad_()
    grad = torch.randn(5, 6, 17, 40, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        with benchmarking.deterministic_algorithms():
            for num_threads in (threads, threads, 1):
                torch.set_num_threads(num_threads)
                a = _grads(affine_grid_sample(x, theta, (5, 6, 17, 40)), (x, theta), grad)
                b = _grads(grid_sample(x, grid), (x, grid), grad)
                results.append(a + b)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, e in zip(results[0], other):
            assert torch.equal(a, e)


def _opcheck_samples():
    samples = []
    for layout in ("contiguous", "channels_last", "strided"):
        for requires_grad in (False, True):
            x = _layout(torch.randn(2, 5, 7, 9), layout).requires_grad_(requires_grad)
            theta = _theta(2, torch.float32).requires_grad_(requires_grad)
            grid = (torch.rand(2, 4, 6, 2) * 2.4 - 1.2).requires_grad_(requires_grad)
            samples.append((torch.ops.fastcnn.affine_grid_sample.default, (x, theta, [6, 8], 0, 0, False)))
            samples.append((torch.ops.fastcnn.affine_grid_sample.default, (x, theta, [3, 11], 1, 2, True)))
            samples.append((torch.ops.fastcnn.grid_sample.default, (x, grid, 0, 1, False)))
            samples.append((torch.ops.fastcnn.grid_sample.default, (x, grid, 1, 0, True)))
    return samples


@pytest.mark.parametrize("index", range(24))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    x = torch.randn(2, 5, 7, 9).to(memory_format=torch.channels_last)
    theta = _theta(2, torch.float32)
    grid = torch.rand(2, 4, 6, 2) * 2 - 1
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(
            torch.ops.fastcnn._affine_grid_sample_backward.default,
            (torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last), x, theta, 0, 2, False, mask),
            test_utils=("test_schema", "test_faketensor"),
        )
        torch.library.opcheck(
            torch.ops.fastcnn._grid_sample_backward.default,
            (torch.randn(2, 5, 4, 6), x, grid, 0, 1, True, mask),
            test_utils=("test_schema", "test_faketensor"),
        )


# ---------------------------------------------------------------------------------------------
# Gradients of gradients: the backward ops differentiate PyTorch's sampler twice at the saved
# tensors (csrc/ops/autograd/grid_sample_autograd.cpp); the third order raises.


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
def test_gradgradcheck(mode, padding):
    torch.manual_seed(0)  # a coordinate within the numerical step of a pixel boundary would fail
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    theta = _theta(2, spread=0.3).requires_grad_()
    grid = (torch.rand(2, 4, 3, 2, dtype=torch.float64) * 2.4 - 1.2).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, t: affine_grid_sample(a, t, (2, 3, 4, 5), mode, padding), (x, theta))
    assert torch.autograd.gradgradcheck(lambda a, g: grid_sample(a, g, mode, padding, True), (x, grid))


def _second_order(f, tensors):
    first = torch.autograd.grad(f(*tensors).pow(2).sum(), tensors, create_graph=True)
    return first + torch.autograd.grad(sum((g * g).sum() for g in first), tensors)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("align", [False, True])
def test_second_order_matches_pytorch(layout, align):
    x = _layout(torch.randn(3, 4, 9, 8, dtype=torch.float64), layout).requires_grad_()
    theta = _theta(3, spread=0.4).requires_grad_()
    size = (3, 4, 7, 10)
    ours = _second_order(lambda a, t: affine_grid_sample(a, t, size, "bilinear", "border", align), (x, theta))
    theirs = _second_order(
        lambda a, t: F.grid_sample(a, F.affine_grid(t, size, align_corners=align), padding_mode="border", align_corners=align),
        (x, theta),
    )
    grid = F.affine_grid(theta.detach(), size, align_corners=align).requires_grad_()
    ours += _second_order(lambda a, g: grid_sample(a, g, "bilinear", "zeros", align), (x, grid))
    theirs += _second_order(lambda a, g: F.grid_sample(a, g, align_corners=align), (x, grid))
    for index, (a, e) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * e.abs().max().item(), msg=f"gradient {index}")


def test_gradient_penalty_on_theta_alone():
    """A penalty on grad_theta, backward into the input and theta; only theta requires grad first."""
    x = torch.randn(4, 3, 10, 10)
    theta = _theta(4, torch.float32, spread=0.3).requires_grad_()

    def penalised(sample):
        x_leaf = x.clone().requires_grad_()
        (grad_theta,) = torch.autograd.grad(sample(x_leaf, theta).tanh().sum(), theta, create_graph=True)
        return torch.autograd.grad(grad_theta.pow(2).sum(), (theta, x_leaf))

    ours = penalised(lambda a, t: affine_grid_sample(a, t, (4, 3, 8, 8)))
    theirs = penalised(lambda a, t: fastcnn.reference.affine_grid_sample(a, t, (4, 3, 8, 8)))
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())
    assert ours[0].abs().sum() > 0


def test_third_order_is_refused():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    theta = _theta(2, spread=0.3).requires_grad_()
    for op, coords, call in (
        ("affine_grid_sample", theta, lambda a, t: affine_grid_sample(a, t, (2, 3, 5, 5))),
        ("grid_sample", F.affine_grid(theta.detach(), (2, 3, 5, 5), False).requires_grad_(), grid_sample),
    ):
        first = torch.autograd.grad(call(x, coords).pow(2).sum(), (x, coords), create_graph=True)
        with pytest.raises(RuntimeError, match=f"fastcnn::{op}: gradients of order three and higher are not supported"):
            torch.autograd.grad(sum(g.pow(2).sum() for g in first), (x, coords), create_graph=True)


def test_first_order_backward_records_nothing():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    theta = _theta(2, torch.float32).requires_grad_()
    plain = torch.autograd.grad(affine_grid_sample(x, theta, (2, 3, 5, 5)).sum(), (x, theta))
    assert all(g.grad_fn is None and not g.requires_grad for g in plain)
    graphed = torch.autograd.grad(affine_grid_sample(x, theta, (2, 3, 5, 5)).pow(2).sum(), (x, theta), create_graph=True)
    assert all(g.grad_fn is not None for g in graphed)


def test_opcheck_backward_ops_with_autograd():
    x = torch.randn(2, 5, 7, 9).to(memory_format=torch.channels_last)
    theta = _theta(2, torch.float32)
    grid = torch.rand(2, 4, 6, 2) * 2 - 1
    for mask in ([True, True], [True, False], [False, True]):
        for op, coords, grad_output in (
            (torch.ops.fastcnn._affine_grid_sample_backward.default, theta, torch.randn(2, 5, 3, 4)),
            (torch.ops.fastcnn._grid_sample_backward.default, grid, torch.randn(2, 5, 4, 6)),
        ):
            args = tuple(t.clone().requires_grad_() for t in (grad_output, x, coords))
            torch.library.opcheck(
                op, (*args, 0, 1, False, mask), test_utils=("test_schema", "test_autograd_registration", "test_faketensor")
            )


def _func_case():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
    theta = torch.eye(2, 3, dtype=torch.float64).repeat(3, 1, 1) + 0.3 * torch.randn(3, 2, 3, dtype=torch.float64, generator=g)
    grid = torch.rand(3, 4, 7, 2, dtype=torch.float64, generator=g) * 2.4 - 1.2
    return x, theta, grid


def _func_loss(op):
    return lambda x, c: op(x, c).tanh().sum()


_FUNC_TRANSFORMS = {
    "grad": lambda op, x, c: torch.func.grad(_func_loss(op), argnums=(0, 1))(x, c),
    "per_sample_grad": lambda op, x, c: torch.func.vmap(
        torch.func.grad(lambda c, xi: _func_loss(op)(xi[None], c[None])))(c, x),
    "vmap_shared_coords": lambda op, x, c: torch.func.vmap(lambda xi: op(xi, c), in_dims=1)(torch.stack([x, 2 * x], 1)),
    "vjp": lambda op, x, c: torch.func.vjp(op, x, c)[1](torch.ones_like(op(x, c))),
    "jacrev_of_jacrev": lambda op, x, c: torch.func.jacrev(torch.func.jacrev(_func_loss(op), argnums=1), argnums=1)(x, c),
    "third_order": lambda op, x, c: torch.func.grad(
        lambda c: torch.func.grad(lambda c: torch.func.grad(_func_loss(op))(x, c).pow(2).sum())(c).pow(2).sum())(c),
}


# PyTorch's own batching fallback for affine_grid_generator warns
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("transform", list(_FUNC_TRANSFORMS))
@pytest.mark.parametrize("op", ["affine", "grid"])
def test_torch_func_transforms_on_the_kernels(transform, op, monkeypatch):
    """torch.func cannot see into the C++ autograd functions: under a transform the samplers run
    the kernels through fastcnn/ops/_grid_sample_functorch.py (backward and vmap rules; the second
    order through torch.func's vjp of PyTorch's sampler), against the same transform of PyTorch."""
    from fastcnn.ops import _grid_sample_functorch

    calls = []
    for table in ("_FORWARD", "_BACKWARD"):
        kernels = dict(getattr(_grid_sample_functorch, table))
        monkeypatch.setattr(_grid_sample_functorch, table, {
            affine: (lambda *a, kernel=kernel: calls.append(1) or kernel(*a)) for affine, kernel in kernels.items()})
    x, theta, grid = _func_case()
    if op == "affine":
        ours = lambda x, t: affine_grid_sample(x, t, (x.shape[0], 2, 4, 5), padding_mode="border")  # noqa: E731
        theirs = lambda x, t: F.grid_sample(  # noqa: E731
            x, F.affine_grid(t, (x.shape[0], 2, 4, 5), align_corners=False), padding_mode="border", align_corners=False)
        coords = theta
    else:
        ours = lambda x, g: grid_sample(x, g, "bilinear", "reflection", True)  # noqa: E731
        theirs = lambda x, g: F.grid_sample(x, g, padding_mode="reflection", align_corners=True)  # noqa: E731
        coords = grid
    got = _FUNC_TRANSFORMS[transform](ours, x, coords)
    expected = _FUNC_TRANSFORMS[transform](theirs, x, coords)
    assert calls, "the transform did not reach the kernels"
    for a, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12 * max(1.0, e.abs().max().item()))


# Importing torch.autograd.forward_ad (jvp) runs torch.jit.script inside PyTorch, which warns.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torch_func_forward_mode_is_refused():
    x, theta, _ = _func_case()
    with pytest.raises(NotImplementedError, match="forward-mode AD .* is not implemented, as for PyTorch"):
        torch.func.jvp(lambda t: affine_grid_sample(x, t, (3, 2, 4, 5)), (theta,), (theta,))


@pytest.mark.parametrize("backend", ["auto", "cpu"])
def test_torch_compile_fullgraph(backend):
    """fullgraph: the backend choice traces without a break, also for a backend named explicitly
    (its availability check once read the extension's build string through a torch op)."""
    torch._dynamo.reset()

    def f(x, theta, grid):
        warped = affine_grid_sample(x, theta, (2, 3, 8, 8), padding_mode="border")
        return grid_sample(warped, grid).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x = torch.randn(2, 3, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    theta = _theta(2, torch.float32).requires_grad_()
    grid = (torch.rand(2, 5, 6, 2) * 2 - 1).requires_grad_()
    with fastcnn.use_backend(backend):
        loss = compiled(x, theta, grid)
    grads = torch.autograd.grad(loss, (x, theta, grid))
    expected_loss = f(x, theta, grid)
    expected = torch.autograd.grad(expected_loss, (x, theta, grid))
    torch.testing.assert_close(loss, expected_loss)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e)


def test_reference_backend_and_cpu_backend_agree():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    theta = _theta(2)
    with fastcnn.use_backend("reference"):
        ref = affine_grid_sample(x, theta, (2, 3, 5, 5), "bilinear", "reflection", True)
    with fastcnn.use_backend("cpu"):
        ours = affine_grid_sample(x, theta, (2, 3, 5, 5), "bilinear", "reflection", True)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Errors

X = torch.randn(2, 3, 5, 5)
THETA = torch.zeros(2, 2, 3)
GRID = torch.zeros(2, 4, 4, 2)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: affine_grid_sample(X, torch.zeros(2, 3, 3), (2, 3, 5, 5)), ValueError, r"theta of shape \[N, 2, 3\]"),
        (lambda: affine_grid_sample(X, torch.zeros(3, 2, 3), (2, 3, 5, 5)), ValueError, r"theta .* N = 2"),
        (lambda: affine_grid_sample(X, THETA, (2, 4, 5, 5)), ValueError, r"size .* does not match .* C = 3"),
        (lambda: affine_grid_sample(X, THETA, (3, 3, 5, 5)), ValueError, r"size .* does not match .* N = 2"),
        (lambda: affine_grid_sample(X, THETA, (2, 3, 5)), ValueError, r"size must be the output size"),
        (lambda: affine_grid_sample(X, THETA, (2, 3, 0, 5)), ValueError, r"positive"),
        (lambda: affine_grid_sample(X, THETA.double(), (2, 3, 5, 5)), TypeError, r"theta has dtype torch.float64"),
        (lambda: affine_grid_sample(X, THETA, (2, 3, 5, 5), mode="bicubic"), ValueError, r"mode must be"),
        (lambda: affine_grid_sample(X, THETA, (2, 3, 5, 5), padding_mode="wrap"), ValueError, r"padding_mode must be"),
        (lambda: affine_grid_sample(X[0], THETA, (2, 3, 5, 5)), ValueError, r"input of shape \[N, C, H, W\]"),
        (lambda: affine_grid_sample(X.long(), THETA, (2, 3, 5, 5)), TypeError, r"floating-point input"),
        (lambda: grid_sample(X, torch.zeros(2, 4, 4, 3)), ValueError, r"grid of shape \[N, H_out, W_out, 2\]"),
        (lambda: grid_sample(X, torch.zeros(1, 4, 4, 2)), ValueError, r"grid .* N = 2"),
        (lambda: grid_sample(X, GRID.half()), TypeError, r"grid has dtype torch.float16"),
        (lambda: grid_sample(X, GRID, mode="area"), ValueError, r"mode must be"),
    ],
)
def test_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_valid_calls_take_the_one_expression_check():
    # The wrappers check the common case in one expression and leave the explanations (the cases
    # above) to the full checks; a valid call must pass that first check, or every call pays both.
    module = importlib.import_module("fastcnn.ops.grid_sample")  # fastcnn.ops.grid_sample is the function
    for x in (X, X.to(memory_format=torch.channels_last), X.double()):
        theta = THETA.to(x.dtype)
        for size in ((2, 3, 5, 5), [2, 3, 7, 4], torch.Size((2, 3, 1, 9))):
            assert module._well_formed_affine(x, theta, size)
        assert module._well_formed_grid(x, GRID.to(x.dtype))
    assert not module._well_formed_affine(X, THETA, (2, 3, 5, 5.0))
    assert not module._well_formed_affine(X, THETA, (2, 3, 5, True))
    assert not module._well_formed_grid(X, None)


def test_cpp_ops_check_their_arguments_too():
    with pytest.raises(RuntimeError, match=r"theta of shape \[N, 2, 3\]"):
        torch.ops.fastcnn.affine_grid_sample(X, torch.zeros(2, 3, 2), [5, 5], 0, 0, False)
    with pytest.raises(RuntimeError, match=r"grid of shape"):
        torch.ops.fastcnn.grid_sample(X, torch.zeros(2, 4, 4), 0, 0, False)
    with pytest.raises(RuntimeError, match=r"interpolation must be 0 \(bilinear\) or 1 \(nearest\)"):
        torch.ops.fastcnn.grid_sample(X, GRID, 2, 0, False)
    with pytest.raises(RuntimeError, match=r"padding_mode must be"):
        torch.ops.fastcnn.affine_grid_sample(X, THETA, [5, 5], 0, 3, False)
    with pytest.raises(RuntimeError, match=r"expected grad_output of shape"):
        torch.ops.fastcnn._grid_sample_backward(torch.zeros(2, 3, 4, 5), X, GRID, 0, 0, False, [True, True])
