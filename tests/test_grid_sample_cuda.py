"""CUDA kernels of the Spatial Transformer sampler (Jaderberg et al. 2015): fastcnn::grid_sample,
fastcnn::affine_grid_sample and their backwards.

The reference is stock PyTorch: F.grid_sample for a given grid, F.affine_grid + F.grid_sample for
theta, and their autograd gradients. The truth is that reference evaluated in float64 on the values
actually fed to the kernels; a result passes when its error against the truth is at most twice
PyTorch's own error in the same dtype, plus a small floor relative to the truth's size. Nearest
sampling may legitimately pick the other pixel at a near-tie when the coordinate arithmetic
differs in the last bit (the fused affine op never rounds a grid), so nearest cases allow a few
elements past the bound.

Every test here needs an NVIDIA GPU and skips without one.
"""
import contextlib
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from kernel_test_support import ERROR_FLOOR as FLOOR, LAYOUTS, cuda_kernel_marks
import fastcnn
from fastcnn.ops import affine_grid_sample, grid_sample


pytestmark = cuda_kernel_marks("fastcnn::grid_sample")

DEVICE = "cuda"
MODES = {"bilinear": 0, "nearest": 1}
PADDINGS = {"zeros": 0, "border": 1, "reflection": 2}
OPS = ["grid", "affine"]


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    # The fp32 yardstick (F.affine_grid is a bmm) must be true fp32, not TF32.
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def deterministic(enabled=True):
    saved = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved, warn_only=warn_only)


# ------------------------------------------------------------------------------------------------
# Inputs, reference and our ops.


def randn(*shape, dtype, memory_format=torch.contiguous_format):
    t = torch.randn(*shape, dtype=torch.float64, device=DEVICE).to(dtype)
    return t.contiguous(memory_format=memory_format)


def random_grid(N, Ho, Wo, dtype, spread=1.3):
    """Normalised coordinates in [-spread, spread]: some samples fall outside the input."""
    return ((torch.rand(N, Ho, Wo, 2, dtype=torch.float64, device=DEVICE) * 2 - 1) * spread).to(dtype)


def random_theta(N, dtype, shift=0.4):
    """Rotation, anisotropic scale, shear and translation: part of each output samples outside."""
    angle = torch.rand(N, dtype=torch.float64, device=DEVICE) * 6.283
    sx = 0.6 + 0.8 * torch.rand(N, dtype=torch.float64, device=DEVICE)
    sy = 0.6 + 0.8 * torch.rand(N, dtype=torch.float64, device=DEVICE)
    shear = 0.3 * torch.randn(N, dtype=torch.float64, device=DEVICE)
    tx, ty = (shift * torch.randn(2, N, dtype=torch.float64, device=DEVICE)).unbind(0)
    c, s = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([sx * c, -sy * s + shear, tx], 1), torch.stack([sx * s, sy * c, ty], 1)], 1
    )
    return theta.to(dtype)


def reference(x, coords, op, out_hw, mode, padding, align):
    if op == "affine":
        size = [x.shape[0], x.shape[1], *out_hw]
        if min(out_hw) == 1 and coords.dtype in (torch.float16, torch.bfloat16):
            # F.affine_grid cannot build a half-precision grid with an output dimension of 1
            # (at::tensor(0) of that dtype): build it in fp32 and round it, as the fp16 path would.
            grid = F.affine_grid(coords.float(), size, align_corners=align).to(coords.dtype)
        else:
            grid = F.affine_grid(coords, size, align_corners=align)
    else:
        grid = coords
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)


def reference_grads(x, coords, grad_out, op, out_hw, mode, padding, align):
    x = x.detach().requires_grad_()
    coords = coords.detach().requires_grad_()
    y = reference(x, coords, op, out_hw, mode, padding, align)
    grads = torch.autograd.grad(y, [x, coords], grad_out)
    return y.detach(), grads


def ours(x, coords, op, out_hw, mode, padding, align):
    if op == "affine":
        return torch.ops.fastcnn.affine_grid_sample(x, coords, list(out_hw), MODES[mode], PADDINGS[padding], align)
    return torch.ops.fastcnn.grid_sample(x, coords, MODES[mode], PADDINGS[padding], align)


def ours_backward(grad_out, x, coords, op, mode, padding, align, mask=(True, True)):
    fn = torch.ops.fastcnn._affine_grid_sample_backward if op == "affine" else torch.ops.fastcnn._grid_sample_backward
    return fn(grad_out, x, coords, MODES[mode], PADDINGS[padding], align, list(mask))


def poison_allocator(*shapes, dtype):
    """Best effort: leave NaN-filled blocks of the outputs' sizes in the caching allocator, so that an
    output element the kernel forgets to write shows up as NaN."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEVICE) for shape in shapes]
    del blocks


def assert_matches(name, got, torch_same_dtype, truth, nearest=False):
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    assert got.dtype == torch_same_dtype.dtype, f"{name}: dtype {got.dtype} != {torch_same_dtype.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element left unwritten?)"
    if truth.numel() == 0:
        return
    err = (got.double() - truth).abs()
    torch_err = (torch_same_dtype.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    bound = 2 * torch_err + FLOOR[got.dtype] * scale
    if nearest:
        # a near-tie may round to the other pixel: allow 1% of the elements past the bound
        over = (err > bound).sum().item()
        assert over <= max(1, truth.numel() // 100), (
            f"{name}: {over} of {truth.numel()} elements past {bound:.3e} (max error {err.max().item():.3e})"
        )
        return
    assert err.max().item() <= bound, (
        f"{name}: max error {err.max().item():.3e} against the fp64 truth exceeds {bound:.3e} "
        f"(PyTorch's own error in {got.dtype}: {torch_err:.3e}, max |truth| {scale:.3e})"
    )


def mask_coordinate_kinks(go, theta, H, W, Ho, Wo, align):
    """grad_output zeroed at output pixels whose fp64 source lies within 1e-3 pixel of a whole or
    half pixel. The coordinate gradient of bilinear sampling jumps there (cell edges; reflection
    folds and border clips at halves): an fp32 coordinate ~1e-5 pixel off, ours (from theta in
    registers) and PyTorch's (a matmul) on different sides, moves one pixel's whole contribution
    to grad_theta, hundreds of times the tolerance at 224x224. The CPU tests mask the same way."""
    grid = F.affine_grid(theta.double(), [theta.shape[0], 1, Ho, Wo], align_corners=align)

    def source(v, n):
        return (v + 1) / 2 * (n - 1) if align else ((v + 1) * n - 1) / 2

    def kink(s):
        return ((2 * s) - (2 * s).round()).abs() < 2e-3

    near = kink(source(grid[..., 0], W)) | kink(source(grid[..., 1], H))
    return go.masked_fill_(near[:, None], 0)  # in place: keeps go's layout


def run_case(
    op, N, C, H, W, Ho, Wo, mode="bilinear", padding="zeros", align=False, dtype=torch.float32, layout="nchw",
    grad_out_kind="dense", coords=None, deterministic_mode=False,
):
    fmt = LAYOUTS[layout]
    x = randn(N, C, H, W, dtype=dtype, memory_format=fmt)
    if coords is None:
        coords = random_theta(N, dtype) if op == "affine" else random_grid(N, Ho, Wo, dtype)
    if grad_out_kind == "dense":
        go = randn(N, C, Ho, Wo, dtype=dtype, memory_format=fmt)
    elif grad_out_kind == "expanded":  # zero strides, as from y.sum().backward()
        go = randn(1, C, 1, 1, dtype=dtype).expand(N, C, Ho, Wo)
    elif grad_out_kind == "other_layout":
        other = torch.contiguous_format if fmt == torch.channels_last else torch.channels_last
        go = randn(N, C, Ho, Wo, dtype=dtype, memory_format=other)
    elif grad_out_kind == "permuted":  # neither layout: [N, Wo, C, Ho] storage
        go = randn(N, Wo, C, Ho, dtype=dtype).permute(0, 2, 3, 1)
    else:
        raise ValueError(grad_out_kind)
    if op == "affine" and mode == "bilinear" and grad_out_kind == "dense":
        go = mask_coordinate_kinks(go, coords, H, W, Ho, Wo, align)
    args = (op, (Ho, Wo), mode, padding, align)
    y64, g64 = reference_grads(x.double(), coords.double(), go.double(), *args)
    y_t, g_t = reference_grads(x, coords, go, *args)
    nearest = mode == "nearest"

    # the format outputs follow (NCHW for an ambiguous 1x1 channels_last input)
    fmt = suggest_memory_format(x)
    poison_allocator((N, C, Ho, Wo), dtype=dtype)
    y = ours(x, coords, *args)
    assert y.is_contiguous(memory_format=fmt), "output must follow the input's memory format"
    assert_matches("output", y, y_t, y64, nearest)

    poison_allocator(tuple(x.shape), tuple(coords.shape), dtype=dtype)
    with deterministic(deterministic_mode):
        gx, gc = ours_backward(go, x, coords, op, mode, padding, align)
    assert gx.is_contiguous(memory_format=fmt), "grad_input must follow the input's memory format"
    assert gc.is_contiguous() and gc.dtype == coords.dtype
    assert_matches("grad_input", gx, g_t[0], g64[0], nearest)
    assert_matches("grad_theta" if op == "affine" else "grad_grid", gc, g_t[1], g64[1], nearest)
    return x, coords, go


# ------------------------------------------------------------------------------------------------
# Every mode, padding, align_corners and layout.


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("align", [False, True], ids=["no_align", "align"])
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", OPS)
def test_fp32_all_modes(op, mode, padding, align, layout):
    torch.manual_seed(zlib.crc32(f"{op}-{mode}-{padding}-{align}-{layout}".encode()))
    # odd sizes, output size != input size
    run_case(op, 2, 5, 11, 13, 9, 7, mode, padding, align, torch.float32, layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", OPS)
def test_fp64(op, mode, padding, layout):
    torch.manual_seed(11)
    run_case(op, 2, 4, 10, 9, 7, 12, mode, padding, True, torch.float64, layout)
    run_case(op, 2, 4, 10, 9, 7, 12, mode, padding, False, torch.float64, layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("padding", ["zeros", "reflection"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_half_precision(op, dtype, mode, padding, layout):
    torch.manual_seed(12)
    # C = 16 takes the vectorised channels_last path in both dtypes, C = 5 the scalar one
    run_case(op, 2, 16, 15, 17, 13, 11, mode, padding, False, dtype, layout)
    run_case(op, 2, 5, 15, 17, 13, 11, mode, padding, True, dtype, layout)


# (N, C, H, W, Ho, Wo)
SHAPES = {
    "upsample": (2, 6, 7, 9, 21, 19),
    "downsample": (2, 6, 31, 29, 5, 7),
    "one_by_one_input": (2, 5, 1, 1, 4, 3),
    "one_by_one_output": (3, 5, 9, 8, 1, 1),
    "one_row_output": (2, 5, 9, 8, 1, 13),
    "channels_1_mnist": (4, 1, 28, 28, 28, 28),
    "channels_3": (2, 3, 20, 22, 17, 15),
    "channels_17_tail": (2, 17, 12, 13, 10, 11),
    "channels_64_vector": (2, 64, 12, 13, 10, 11),
    "batch_1": (1, 8, 12, 13, 10, 11),
    "theta_many_chunks": (2, 3, 40, 50, 67, 71),  # > 4 chunks of 1024 pixels per image
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(name, op, dtype, layout):
    torch.manual_seed(len(name))
    run_case(op, *SHAPES[name], "bilinear", "zeros", False, dtype, layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", OPS)
def test_stn_224(op, layout):
    torch.manual_seed(13)
    run_case(op, 2, 3, 224, 224, 224, 224, "bilinear", "zeros", False, torch.float32, layout)


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("align", [False, True], ids=["no_align", "align"])
def test_theta_sampling_outside(padding, align):
    # translations of +-2.5 move the whole output (or most of it) outside the input
    torch.manual_seed(14)
    theta = random_theta(4, torch.float32, shift=0.0)
    theta[:, 0, 2] = torch.tensor([2.5, -2.5, 0.0, 1.7], device=DEVICE)
    theta[:, 1, 2] = torch.tensor([0.0, 0.5, -3.0, 1.7], device=DEVICE)
    for layout in LAYOUTS:
        run_case("affine", 4, 6, 13, 11, 9, 10, "bilinear", padding, align, torch.float32, layout, coords=theta)


def test_identity_theta():
    torch.manual_seed(15)
    x = randn(2, 5, 12, 17, dtype=torch.float32)
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=DEVICE).expand(2, 2, 3)
    for align in (False, True):
        y = ours(x, theta, "affine", (12, 17), "bilinear", "zeros", align)
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Non-finite coordinates, gradients' strides, masks, determinism, empty tensors.


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODES))
def test_nonfinite_coordinates_zeros_padding(mode, layout):
    # Under zeros padding PyTorch's CUDA kernel samples NaN/Inf coordinates as zero, as we do.
    torch.manual_seed(16)
    fmt = LAYOUTS[layout]
    x = randn(2, 8, 9, 10, dtype=torch.float32, memory_format=fmt)
    grid = random_grid(2, 7, 6, torch.float32)
    grid[0, 0, 0, 0] = float("nan")
    grid[0, 1, 2, 1] = float("inf")
    grid[1, 3, 4, 0] = -float("inf")
    grid[1, 5, 5] = float("nan")
    go = randn(2, 8, 7, 6, dtype=torch.float32, memory_format=fmt)
    y_t, (gx_t, gg_t) = reference_grads(x, grid, go, "grid", (7, 6), mode, "zeros", False)
    y = ours(x, grid, "grid", (7, 6), mode, "zeros", False)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    assert (y[0, :, 0, 0] == 0).all() and (y[1, :, 5, 5] == 0).all()
    for det in (False, True):
        with deterministic(det):
            gx, gg = ours_backward(go, x, grid, "grid", mode, "zeros", False)
        torch.testing.assert_close(gx, gx_t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gg, gg_t, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("padding", ["border", "reflection"])
def test_nonfinite_coordinates_other_paddings(padding):
    # fastcnn's rule (grid_sample_coords.h): a NaN coordinate samples zero under every padding
    # mode (PyTorch's CUDA forward clamps it to pixel 0 under border/reflection); +-Inf is clipped
    # to the edge under border and samples zero under reflection. Gradients stay finite.
    torch.manual_seed(17)
    x = randn(1, 4, 6, 7, dtype=torch.float32)
    grid = random_grid(1, 3, 3, torch.float32)
    grid[0, 0, 0] = float("nan")
    grid[0, 1, 1, 0] = float("inf")
    grid[0, 1, 1, 1] = 0.25
    go = randn(1, 4, 3, 3, dtype=torch.float32)
    y = ours(x, grid, "grid", (3, 3), "bilinear", padding, False)
    assert torch.isfinite(y).all()
    assert (y[0, :, 0, 0] == 0).all()
    if padding == "border":
        finite = grid.clone()
        finite[0, 1, 1, 0] = 1e3  # clipped to the right edge like +Inf
        expected = F.grid_sample(x, finite, padding_mode="border", align_corners=False)
        torch.testing.assert_close(y[..., 1, 1], expected[..., 1, 1])
    else:
        assert (y[0, :, 1, 1] == 0).all()
    for det in (False, True):
        with deterministic(det):
            gx, gg = ours_backward(go, x, grid, "grid", "bilinear", padding, False)
        assert torch.isfinite(gx).all() and torch.isfinite(gg).all()
        assert (gg[0, 0, 0] == 0).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["expanded", "other_layout", "permuted"])
@pytest.mark.parametrize("op", OPS)
def test_grad_output_strides(op, kind, layout):
    torch.manual_seed(18)
    run_case(op, 2, 8, 11, 12, 9, 10, "bilinear", "border", False, torch.float32, layout, grad_out_kind=kind)


@pytest.mark.parametrize("op", OPS)
def test_sum_backward_through_autograd(op):
    # grad_output of y.sum() arrives with zero strides.
    torch.manual_seed(19)
    x = randn(2, 6, 11, 12, dtype=torch.float32, memory_format=torch.channels_last).requires_grad_()
    coords = (random_theta(2, torch.float32) if op == "affine" else random_grid(2, 9, 10, torch.float32))
    coords.requires_grad_()
    with fastcnn.use_backend("cuda"):
        if op == "affine":
            y = affine_grid_sample(x, coords, (2, 6, 9, 10), padding_mode="reflection")
        else:
            y = grid_sample(x, coords, padding_mode="reflection")
    gx, gc = torch.autograd.grad(y.sum(), [x, coords])
    y_r = reference(x, coords, op, (9, 10), "bilinear", "reflection", False)
    gx_r, gc_r = torch.autograd.grad(y_r.sum(), [x, coords])
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, gc_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", OPS)
def test_output_mask(op, mode, layout):
    torch.manual_seed(20)
    fmt = LAYOUTS[layout]
    x = randn(2, 8, 12, 13, dtype=torch.float32, memory_format=fmt)
    coords = random_theta(2, torch.float32) if op == "affine" else random_grid(2, 9, 11, torch.float32)
    go = randn(2, 8, 9, 11, dtype=torch.float32, memory_format=fmt)
    for det in (False, True):
        with deterministic(det):
            full = ours_backward(go, x, coords, op, mode, "zeros", False)
            for mask in [(True, False), (False, True), (False, False)]:
                got = ours_backward(go, x, coords, op, mode, "zeros", False, mask)
                for i, wanted in enumerate(mask):
                    if wanted:
                        if det or i == 1:  # the coordinate gradient never uses atomics
                            assert torch.equal(got[i], full[i]), (mask, i, det)
                        else:
                            torch.testing.assert_close(got[i], full[i], rtol=1e-5, atol=1e-6)
                    else:
                        assert got[i].numel() == 0, (mask, i)
    if mode == "nearest":
        assert torch.equal(full[1], torch.zeros_like(full[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", OPS)
def test_deterministic(op, mode, layout, dtype):
    torch.manual_seed(21)
    fmt = LAYOUTS[layout]
    # upsampling: many output pixels read each input pixel, so the scatter really collides
    x = randn(2, 16, 23, 21, dtype=dtype, memory_format=fmt)
    coords = random_theta(2, dtype) if op == "affine" else random_grid(2, 60, 57, dtype, spread=0.9)
    go = randn(2, 16, 60, 57, dtype=dtype, memory_format=fmt)
    with deterministic():
        first = ours_backward(go, x, coords, op, mode, "border", True)
        second = ours_backward(go, x, coords, op, mode, "border", True)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two deterministic backward runs must be bitwise equal"
    atomic = ours_backward(go, x, coords, op, mode, "border", True)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(first[0], atomic[0], rtol=tol, atol=tol)
    assert torch.equal(first[1], atomic[1])
    # and against the reference, under the same rule as everything else
    run_case(op, 2, 16, 23, 21, 60, 57, mode, "border", True, dtype, layout, coords=coords, deterministic_mode=True)


@pytest.mark.parametrize("variant", ["sort32", "gather"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("padding,align", [("zeros", False), ("zeros", True), ("border", False)])
def test_deterministic_variants_are_bitwise_the_default(op, mode, layout, dtype, padding, align, variant, monkeypatch):
    """FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC=sort32 (int32 keys and entries, a radix sort over the
    key bits in use) and =gather (affine, zeros padding: no sort, grid_sample_affine_gather.h) must
    give bitwise the int64 at::sort path's results: the same sums in the same order. What a variant
    declines (gather: the grid op, border padding; sort32: past the sort-length limit of
    test_deterministic_sort_in_image_runs) falls back to that path."""
    torch.manual_seed(23)
    fmt = LAYOUTS[layout]
    x = randn(3, 12, 23, 21, dtype=dtype, memory_format=fmt)  # 1449 keys: an 11-bit sort
    coords = random_theta(3, dtype) if op == "affine" else random_grid(3, 40, 37, dtype, spread=1.3)
    go = randn(3, 12, 40, 37, dtype=dtype, memory_format=fmt)
    with deterministic():
        default = ours_backward(go, x, coords, op, mode, padding, align)
        monkeypatch.setenv("FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC", variant)
        first = ours_backward(go, x, coords, op, mode, padding, align)
        again = ours_backward(go, x, coords, op, mode, padding, align)
        monkeypatch.setenv("FASTCNN_MAX_SORT_ENTRIES", str(40 * 37 * 4))
        limited = ours_backward(go, x, coords, op, mode, padding, align)
    for a, b, c, d in zip(default, first, again, limited):
        assert torch.equal(a, b) and torch.equal(b, c) and torch.equal(a, d)
    monkeypatch.delenv("FASTCNN_MAX_SORT_ENTRIES")
    run_case(op, 3, 12, 23, 21, 40, 37, mode, padding, align, dtype, layout, coords=coords, deterministic_mode=True)


@pytest.mark.parametrize("kind", ["zoom_in", "zoom_out", "line", "point", "outside", "huge"])
def test_deterministic_gather_extreme_maps(kind, monkeypatch):
    """The gather walks, per input pixel, the output pixels an inverted map sends there: runs of
    hundreds (zoom in), none (zoom out, outside), a map of rank one or zero (every output row
    walked) and terms of 1e8 that cancel (fp32 coordinates pixels away from exact arithmetic):
    bitwise the sorted path's result every time."""
    torch.manual_seed(29)
    rows = {
        "zoom_in": [[0.05, -0.02, 0.1], [0.02, 0.05, -0.2]],
        "zoom_out": [[2.7, 0.4, 0.1], [-0.3, 3.1, 0.0]],
        "line": [[0.7, 0.7, 0.1], [0.7, 0.7, -0.1]],
        "point": [[0.0, 0.0, 0.13], [0.0, 0.0, -0.41]],
        "outside": [[1.0, 0.0, 3.5], [0.0, 1.0, 0.0]],
        # x = bx + 1e8 (by - by_12) + 0.3 on a 17-row output: cancels on row 12, up to fp32 rounding
        "huge": [[1.0, 1e8, 0.3 - 1e8 * (2 * 12 + 1 - 17) / 17], [0.0, 1.0, 0.1]],
    }[kind]
    theta = torch.tensor([rows, rows], dtype=torch.float64, device=DEVICE).to(torch.float32)
    x = randn(2, 3, 15, 21, dtype=torch.float32)
    go = randn(2, 3, 17, 18, dtype=torch.float32)
    for mode in MODES:
        with deterministic():
            default = ours_backward(go, x, theta, "affine", mode, "zeros", False)
            monkeypatch.setenv("FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC", "gather")
            gathered = ours_backward(go, x, theta, "affine", mode, "zeros", False)
            monkeypatch.delenv("FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC")
        assert torch.equal(default[0], gathered[0]), mode


def test_deterministic_sort_in_image_runs(monkeypatch):
    """torch.sort takes at most 2**31 - 1 elements on CUDA: past that the deterministic backward
    sorts its (sample, tap) entries a run of whole images at a time. FASTCNN_MAX_SORT_ENTRIES
    lowers the limit: runs of one image and of two, bitwise equal to one sort; an image over the
    limit is a clear error."""
    torch.manual_seed(31)
    x = randn(5, 3, 20, 24, dtype=torch.float32)
    theta = random_theta(5, torch.float32)
    go = randn(5, 3, 18, 22, dtype=torch.float32)
    per_image = 4 * 18 * 22
    with deterministic():
        whole = ours_backward(go, x, theta, "affine", "bilinear", "zeros", False)
        for limit in (per_image, 2 * per_image + 7):
            monkeypatch.setenv("FASTCNN_MAX_SORT_ENTRIES", str(limit))
            for a, b in zip(ours_backward(go, x, theta, "affine", "bilinear", "zeros", False), whole):
                assert torch.equal(a, b), limit
        monkeypatch.setenv("FASTCNN_MAX_SORT_ENTRIES", str(per_image - 1))
        with pytest.raises(RuntimeError, match="entries for one image"):
            ours_backward(go, x, theta, "affine", "bilinear", "zeros", False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", OPS)
def test_batch_zero(op, layout):
    fmt = LAYOUTS[layout]
    x = torch.randn(0, 5, 9, 10, device=DEVICE).contiguous(memory_format=fmt)
    coords = torch.randn(0, 2, 3, device=DEVICE) if op == "affine" else torch.randn(0, 7, 8, 2, device=DEVICE)
    y = ours(x, coords, op, (7, 8), "bilinear", "zeros", False)
    assert y.shape == (0, 5, 7, 8)
    go = torch.randn(0, 5, 7, 8, device=DEVICE)
    for det in (False, True):
        with deterministic(det):
            gx, gc = ours_backward(go, x, coords, op, "bilinear", "zeros", False)
        assert gx.shape == x.shape and gc.shape == coords.shape


@pytest.mark.parametrize("op", OPS)
def test_empty_channels_and_output(op):
    # C = 0: no gradient reaches the coordinates. Ho = 0 (grid only): none reaches the input.
    x = torch.randn(2, 0, 9, 10, device=DEVICE)
    coords = random_theta(2, torch.float32) if op == "affine" else random_grid(2, 7, 8, torch.float32)
    poison_allocator(tuple(coords.shape), dtype=torch.float32)
    gx, gc = ours_backward(torch.randn(2, 0, 7, 8, device=DEVICE), x, coords, op, "bilinear", "zeros", False)
    assert gx.shape == x.shape and torch.equal(gc, torch.zeros_like(gc))
    if op == "grid":
        x = torch.randn(2, 4, 9, 10, device=DEVICE)
        poison_allocator(tuple(x.shape), dtype=torch.float32)
        grid = torch.randn(2, 0, 8, 2, device=DEVICE)
        gx, gg = ours_backward(torch.randn(2, 4, 0, 8, device=DEVICE), x, grid, op, "bilinear", "zeros", False)
        assert torch.equal(gx, torch.zeros_like(x)) and gg.shape == grid.shape


def test_non_contiguous_inputs():
    torch.manual_seed(22)
    base = randn(2, 6, 11, 26, dtype=torch.float32)
    x = base[..., ::2]  # neither layout
    grid = random_grid(2, 18, 10, torch.float32).transpose(1, 2)  # non-contiguous grid [2, 10, 18, 2]
    theta = random_theta(2, torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
    y = ours(x, grid, "grid", (10, 18), "bilinear", "zeros", False)
    torch.testing.assert_close(y, ours(x.contiguous(), grid.contiguous(), "grid", (10, 18), "bilinear", "zeros", False),
                               rtol=0, atol=0)
    y = ours(x, theta, "affine", (10, 18), "bilinear", "zeros", False)
    torch.testing.assert_close(y, reference(x, theta, "affine", (10, 18), "bilinear", "zeros", False),
                               rtol=1e-5, atol=1e-5)
    go = randn(2, 6, 10, 18, dtype=torch.float32)
    gx, gt = ours_backward(go, x, theta, "affine", "bilinear", "zeros", False)
    _, (gx_r, gt_r) = reference_grads(x, theta, go, "affine", (10, 18), "bilinear", "zeros", False)
    torch.testing.assert_close(gx, gx_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gt, gt_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channels_last_unaligned_storage(dtype):
    # A channels_last tensor whose data does not start on a 16-byte boundary: the vectorised
    # channel loads must fall back to scalar ones.
    torch.manual_seed(23)
    N, C, H, W = 2, 32, 12, 13
    storage = randn(N * C * H * W + 1, dtype=dtype)
    x = storage[1:].as_strided((N, C, H, W), (H * W * C, 1, W * C, C))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    aligned = x.clone(memory_format=torch.channels_last)
    grid = random_grid(N, 9, 10, dtype)
    y = ours(x, grid, "grid", (9, 10), "bilinear", "zeros", False)
    torch.testing.assert_close(y, ours(aligned, grid, "grid", (9, 10), "bilinear", "zeros", False), rtol=0, atol=0)
    go = randn(N, C, 9, 10, dtype=dtype, memory_format=torch.channels_last)
    with deterministic():
        got = ours_backward(go, x, grid, "grid", "bilinear", "zeros", False)
        want = ours_backward(go, aligned, grid, "grid", "bilinear", "zeros", False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Registration: gradcheck, opcheck, torch.compile, streams, errors.


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op, padding):
    torch.manual_seed(24)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    if op == "affine":
        coords = random_theta(1, torch.float64).requires_grad_()
        fn = lambda x, t: affine_grid_sample(x, t, (1, 2, 4, 3), padding_mode=padding)  # noqa: E731
    else:
        coords = random_grid(1, 4, 3, torch.float64).requires_grad_()
        fn = lambda x, g: grid_sample(x, g, padding_mode=padding)  # noqa: E731
    with fastcnn.use_backend("cuda"):  # fp64 atomics: reentrant backward equal up to rounding
        assert torch.autograd.gradcheck(fn, (x, coords), eps=1e-6, atol=1e-5, nondet_tol=1e-12)


def _opcheck_samples():
    samples = []
    for layout in ("contiguous", "channels_last", "strided"):
        for requires_grad in (False, True):
            x = torch.randn(2, 5, 7, 9 * (2 if layout == "strided" else 1), device=DEVICE)
            if layout == "strided":
                x = x[..., ::2]
            elif layout == "channels_last":
                x = x.to(memory_format=torch.channels_last)
            grid = random_grid(2, 6, 4, torch.float32)
            theta = random_theta(2, torch.float32)
            for t in (x, grid, theta):
                t.requires_grad_(requires_grad)
            samples.append(("grid", (x, grid, 0, 0, False)))
            samples.append(("grid", (x, grid, 1, 2, True)))
            samples.append(("affine", (x, theta, [6, 4], 0, 1, False)))
            samples.append(("affine", (x, theta, [3, 8], 1, 0, True)))
    return samples


@pytest.mark.parametrize("index", range(24))
def test_opcheck(index):
    op, args = _opcheck_samples()[index]
    fn = torch.ops.fastcnn.affine_grid_sample.default if op == "affine" else torch.ops.fastcnn.grid_sample.default
    torch.library.opcheck(fn, args)


def test_opcheck_backward_ops():
    x = randn(2, 5, 7, 9, dtype=torch.float32, memory_format=torch.channels_last)
    go = randn(2, 5, 6, 4, dtype=torch.float32)
    grid = random_grid(2, 6, 4, torch.float32)
    theta = random_theta(2, torch.float32)
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(
            torch.ops.fastcnn._grid_sample_backward.default, (go, x, grid, 0, 1, False, mask),
            test_utils=("test_schema", "test_faketensor"),
        )
        torch.library.opcheck(
            torch.ops.fastcnn._affine_grid_sample_backward.default, (go, x, theta, 0, 2, True, mask),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(x, theta):
        return affine_grid_sample(x, theta, (2, 6, 10, 11), padding_mode="border").relu().sum()

    torch.manual_seed(25)
    x = randn(2, 6, 13, 12, dtype=torch.float32, memory_format=torch.channels_last).requires_grad_()
    theta = random_theta(2, torch.float32).requires_grad_()
    with fastcnn.use_backend("cuda"):
        compiled = torch.compile(f, fullgraph=True)
        loss = compiled(x, theta)
    grads = torch.autograd.grad(loss, (x, theta))
    ref = reference(x, theta, "affine", (10, 11), "bilinear", "border", False).relu().sum()
    ref_grads = torch.autograd.grad(ref, (x, theta))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_current_stream():
    torch.manual_seed(26)
    x = randn(2, 32, 56, 56, dtype=torch.float32)
    theta = random_theta(2, torch.float32)
    go = randn(2, 32, 56, 56, dtype=torch.float32)
    expected = ours(x, theta, "affine", (56, 56), "bilinear", "zeros", False)
    with deterministic():
        expected_grads = ours_backward(go, x, theta, "affine", "bilinear", "zeros", False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), deterministic():
        y = ours(x, theta, "affine", (56, 56), "bilinear", "zeros", False)
        grads = ours_backward(go, x, theta, "affine", "bilinear", "zeros", False)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(y, expected)
    for a, b in zip(grads, expected_grads):
        assert torch.equal(a, b)


def test_errors():
    x = torch.randn(2, 4, 8, 9, device=DEVICE)
    grid = torch.randn(2, 5, 6, 2, device=DEVICE)
    theta = torch.randn(2, 2, 3, device=DEVICE)
    gs, ags = torch.ops.fastcnn.grid_sample, torch.ops.fastcnn.affine_grid_sample
    with pytest.raises(RuntimeError, match="grid"):
        gs(x, grid.cpu(), 0, 0, False)
    with pytest.raises(RuntimeError, match="dtype"):
        gs(x, grid.double(), 0, 0, False)
    with pytest.raises(RuntimeError, match=r"grid of shape \[N, H_out, W_out, 2\]"):
        gs(x, torch.randn(2, 5, 6, 3, device=DEVICE), 0, 0, False)
    with pytest.raises(RuntimeError, match=r"theta of shape \[N, 2, 3\]"):
        ags(x, torch.randn(2, 3, 3, device=DEVICE), [5, 6], 0, 0, False)
    with pytest.raises(RuntimeError, match="4-D"):
        gs(x[0], grid, 0, 0, False)
    with pytest.raises(RuntimeError, match="interpolation"):
        gs(x, grid, 2, 0, False)
    with pytest.raises(RuntimeError, match="padding_mode"):
        ags(x, theta, [5, 6], 0, 3, False)
    with pytest.raises(RuntimeError, match="positive"):
        ags(x, theta, [0, 6], 0, 0, False)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.fastcnn._grid_sample_backward(torch.randn(2, 4, 5, 7, device=DEVICE), x, grid, 0, 0, False,
                                                 [True, True])
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.fastcnn._affine_grid_sample_backward(torch.randn(2, 3, 5, 6, device=DEVICE), x, theta, 0, 0,
                                                        False, [True, True])
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        gs(x.int(), grid.int(), 0, 0, False)


@pytest.mark.parametrize("op", OPS)
def test_modes_through_public_api(op):
    # The public functions (string modes, autograd) on the CUDA backend, every mode combination.
    torch.manual_seed(27)
    x = randn(2, 5, 9, 11, dtype=torch.float32).requires_grad_()
    for mode, padding, align in itertools.product(MODES, PADDINGS, (False, True)):
        if op == "affine":
            coords = random_theta(2, torch.float32).requires_grad_()
            with fastcnn.use_backend("cuda"):
                y = affine_grid_sample(x, coords, (2, 5, 8, 7), mode, padding, align)
        else:
            coords = random_grid(2, 8, 7, torch.float32).requires_grad_()
            with fastcnn.use_backend("cuda"):
                y = grid_sample(x, coords, mode, padding, align)
        y_r = reference(x, coords, op, (8, 7), mode, padding, align)
        go = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, coords), go)
        want = torch.autograd.grad(y_r, (x, coords), go)
        if mode == "nearest":  # near-ties aside, nearest is exact
            assert (y != y_r).float().mean() < 0.02
            continue
        torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_gradients_of_gradients(op):
    """Order 2 in fp64 (PyTorch's sampler differentiated twice on the GPU) against F.grid_sample's;
    order 3 refused."""
    torch.manual_seed(20)
    x = randn(2, 5, 11, 12, dtype=torch.float64, memory_format=torch.channels_last).requires_grad_()
    coords = (random_theta(2, torch.float64) if op == "affine" else random_grid(2, 9, 10, torch.float64))
    coords.requires_grad_()

    def first_two(sample):
        first = torch.autograd.grad(sample(x, coords).pow(2).sum(), (x, coords), create_graph=True)
        return first + torch.autograd.grad(sum((g * g).sum() for g in first), (x, coords))

    def ours(x, coords):
        if op == "affine":
            return affine_grid_sample(x, coords, (2, 5, 9, 10), padding_mode="reflection")
        return grid_sample(x, coords, padding_mode="reflection")

    with fastcnn.use_backend("cuda"):
        got = first_two(ours)
    expected = first_two(lambda x, coords: reference(x, coords, op, (9, 10), "bilinear", "reflection", False))
    for index, (a, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10 * e.abs().max().item(), msg=f"gradient {index}")
    with fastcnn.use_backend("cuda"):
        first = torch.autograd.grad(ours(x, coords).pow(2).sum(), (x, coords), create_graph=True)
    with pytest.raises(RuntimeError, match="gradients of order three and higher are not supported"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in first), (x, coords), create_graph=True)
