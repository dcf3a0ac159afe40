"""The Spatial Transformer sampler (Jaderberg et al. 2015), 2-D.

`affine_grid_sample(input, theta, size)` is ``F.grid_sample(input, F.affine_grid(theta, size))``
fused: each output pixel's source coordinate is computed from theta in registers, the N x H x W x 2
grid never exists, and the backward accumulates grad_theta in the same pass as grad_input.
`grid_sample(input, grid)` is ``F.grid_sample`` for a given grid (thin-plate splines, flows...).

Both dispatch to the backend chosen by `fastcnn.backends`: the C++ ops (CPU and CUDA kernels by
dispatch key), the Triton ops, or the reference. Autograd, fake and autocast (as grid_sampler's)
implementations are registered here. Semantics follow PyTorch, with one documented choice for non-finite coordinates: a NaN
source coordinate, or an infinite one under zeros or reflection padding, samples as padding (zero)
and gets a zero gradient. Under zeros padding that is PyTorch's CUDA behaviour (its CPU kernel
returns NaN); under border padding an infinite coordinate clamps to the edge as in PyTorch. A second one,
for non-finite grad_output: the CPU backward of an affine map over 3-8 NCHW channels (zeros
padding) gathers grad_input per input pixel over the taps of positive weight, so an infinite
grad_output at a pixel whose source lies exactly on a pixel column or row does not reach the
neighbouring tap of weight zero (PyTorch's scatter makes it NaN there: 0 * inf).
The backwards are deterministic under ``torch.use_deterministic_algorithms(True)``: the CPU
kernel always is (one batch element per thread, fixed order), CUDA and Triton switch from atomics
to a sorted, fixed-order gather. Gradients of gradients (e.g. a gradient penalty) are PyTorch's:
the backward ops differentiate PyTorch's sampler twice at the saved tensors, so a non-finite
coordinate behaves there as in PyTorch; through the C++ ops the third order raises (the Triton ops
and torch.func, through `second_order`, go to any order). Bicubic sampling is not implemented
(use F.grid_sample).
"""
from typing import List

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import backends, reference
from .._extension import has_ops
from . import _autocast

INTERPOLATIONS = {"bilinear": 0, "nearest": 1}
PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTS = (int, torch.SymInt)


def _codes(op, mode, padding_mode):
    if mode not in INTERPOLATIONS:
        raise ValueError(f"{op}: mode must be 'bilinear' or 'nearest', got {mode!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{op}: padding_mode must be 'zeros', 'border' or 'reflection', got {padding_mode!r}")
    return INTERPOLATIONS[mode], PADDING_MODES[padding_mode]


def _check_input(op, input):
    if not isinstance(input, Tensor) or input.dim() != 4:
        got = f"a {input.dim()}-D tensor of shape {tuple(input.shape)}" if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"{op}: expected input of shape [N, C, H, W] (4-D), got {got}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: expected a floating-point input (fp16, bf16, fp32, fp64), got {input.dtype}")
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"{op}: input must have non-empty spatial dimensions, got {tuple(input.shape)}")


def _check_same(op, name, t, input):
    if t.device != input.device:
        raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}")
    if t.dtype != input.dtype and not _autocast.enabled_for(input):  # autocast: cast by the op's rule
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but input has {input.dtype}")


# The common case of the checks below in one expression each: about 2 us instead of 8 a call
# (a 64x1x28x28 STN forward takes 50-60 us). Whatever they reject, the full checks explain.
def _well_formed_grid(input, grid):
    try:
        shape, grid_shape = input.shape, grid.shape
        return (
            len(shape) == 4
            and shape[2] > 0
            and shape[3] > 0
            and input.dtype in _FLOAT_DTYPES
            and len(grid_shape) == 4
            and grid_shape[0] == shape[0]
            and grid_shape[3] == 2
            and grid.dtype == input.dtype
            and grid.device == input.device
        )
    except AttributeError:
        return False


def _well_formed_affine(input, theta, size):
    try:
        shape = input.shape
        return (
            len(shape) == 4
            and shape[2] > 0
            and shape[3] > 0
            and input.dtype in _FLOAT_DTYPES
            and theta.shape == (shape[0], 2, 3)
            and theta.dtype == input.dtype
            and theta.device == input.device
            and type(size) in (tuple, list, torch.Size)
            and len(size) == 4
            and size[0] == shape[0]
            and size[1] == shape[1]
            and type(size[2]) is int
            and type(size[3]) is int
            and size[2] > 0
            and size[3] > 0
        )
    except AttributeError:
        return False


def _check_grid_sample(input, grid, mode, padding_mode):
    """Raises the error that names what is wrong; returns the mode codes when nothing is."""
    op = "grid_sample"
    _check_input(op, input)
    codes = _codes(op, mode, padding_mode)
    if not isinstance(grid, Tensor) or grid.dim() != 4 or grid.shape[0] != input.shape[0] or grid.shape[3] != 2:
        got = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
        raise ValueError(f"{op}: expected grid of shape [N, H_out, W_out, 2] with N = {input.shape[0]}, got {got}")
    _check_same(op, "grid", grid, input)
    return codes


def _check_affine_grid_sample(input, theta, size, mode, padding_mode):
    """Raises the error that names what is wrong; returns the mode codes when nothing is."""
    op = "affine_grid_sample"
    _check_input(op, input)
    codes = _codes(op, mode, padding_mode)
    n, c = input.shape[:2]
    if not isinstance(theta, Tensor) or tuple(theta.shape) != (n, 2, 3):
        got = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
        raise ValueError(f"{op}: expected theta of shape [N, 2, 3] with N = {n}, got {got}")
    _check_same(op, "theta", theta, input)
    # tuple covers torch.Size; SymInt entries come from shapes traced with dynamic=True.
    if not isinstance(size, (tuple, list)) or len(size) != 4 or not all(isinstance(s, _INTS) for s in size):
        raise ValueError(f"{op}: size must be the output size (N, C, H_out, W_out) as 4 ints, got {size!r}")
    if size[0] != n or size[1] != c:
        raise ValueError(
            f"{op}: size {tuple(size)} does not match the input: size[0] must be N = {n} and size[1] C = {c}"
        )
    if size[2] <= 0 or size[3] <= 0:
        raise ValueError(f"{op}: output height and width must be positive, got size {tuple(size)}")
    return codes


def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Identical to ``F.grid_sample(input, grid, mode, padding_mode, align_corners)`` for 4-D input.

    input [N, C, H, W] (NCHW or channels_last; the output follows), grid [N, H_out, W_out, 2] of
    normalised (x, y) in [-1, 1]. mode 'bilinear' or 'nearest'; padding_mode 'zeros', 'border' or
    'reflection'.
    """
    interpolation, padding = INTERPOLATIONS.get(mode), PADDING_MODES.get(padding_mode)
    if interpolation is None or padding is None or not _well_formed_grid(input, grid):
        interpolation, padding = _check_grid_sample(input, grid, mode, padding_mode)
    backend = backends.resolve(input.device)
    if backends.python_autograd_needed():  # torch.func or forward AD (see there)
        if backend in ("cpu", "cuda"):
            from . import _grid_sample_functorch

            return _grid_sample_functorch.grid_sample(input, grid, interpolation, padding, align_corners)
        backend = "reference"
    if backend in ("cpu", "cuda"):
        return _native_grid_sample(input, grid, interpolation, padding, align_corners)
    if backend == "triton":
        return _triton_grid_sample(input, grid, interpolation, padding, align_corners)
    return reference.grid_sample(input, grid, mode, padding_mode, align_corners)


def affine_grid_sample(input, theta, size, mode="bilinear", padding_mode="zeros", align_corners=False):
    """Identical to ``F.grid_sample(input, F.affine_grid(theta, size, align_corners), mode,
    padding_mode, align_corners)``, without building the grid.

    theta [N, 2, 3] maps output to input coordinates, both normalised to [-1, 1]; size is the
    output size (N, C, H_out, W_out), as F.affine_grid takes it; N and C must be the input's.
    """
    interpolation, padding = INTERPOLATIONS.get(mode), PADDING_MODES.get(padding_mode)
    if interpolation is None or padding is None or not _well_formed_affine(input, theta, size):
        interpolation, padding = _check_affine_grid_sample(input, theta, size, mode, padding_mode)
    out_size = [size[2], size[3]]
    backend = backends.resolve(input.device)
    if backends.python_autograd_needed():  # torch.func or forward AD (see there)
        if backend in ("cpu", "cuda"):
            from . import _grid_sample_functorch

            return _grid_sample_functorch.affine_grid_sample(input, theta, out_size, interpolation, padding, align_corners)
        backend = "reference"
    if backend in ("cpu", "cuda"):
        return _native_affine_grid_sample(input, theta, out_size, interpolation, padding, align_corners)
    if backend == "triton":
        return _triton_affine_grid_sample(input, theta, out_size, interpolation, padding, align_corners)
    return reference.affine_grid_sample(input, theta, size, mode, padding_mode, align_corners)


# ----------------------------------------------------------------------------------------------
# Fakes and autograd, shared by the C++ and the Triton ops.


def _fake_output(input, n, out_h, out_w):
    return torch.empty(
        (n, input.shape[1], out_h, out_w), dtype=input.dtype, device=input.device,
        memory_format=suggest_memory_format(input),
    )


def _fake_grid_sample(input, grid, interpolation, padding_mode, align_corners):
    return _fake_output(input, input.shape[0], grid.shape[1], grid.shape[2])


def _fake_affine_grid_sample(input, theta, out_size, interpolation, padding_mode, align_corners):
    return _fake_output(input, input.shape[0], out_size[0], out_size[1])


def _fake_backward(grad_output, input, coords, interpolation, padding_mode, align_corners, output_mask):
    """coords is the grid or theta; its gradient has its shape, contiguous."""
    return (
        torch.empty_like(input, memory_format=suggest_memory_format(input)) if output_mask[0] else input.new_empty(0),
        torch.empty(coords.shape, dtype=coords.dtype, device=coords.device) if output_mask[1] else input.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    input, coords = inputs[0], inputs[1]
    ctx.save_for_backward(input, coords)
    ctx.config = inputs[-3:]  # interpolation, padding_mode, align_corners


def _make_backward(backward_op):
    def backward(ctx, grad_output):
        input, coords = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        grad_input, grad_coords = backward_op(grad_output, input, coords, *ctx.config, mask)
        extra = (None,) * (len(ctx.needs_input_grad) - 2)
        return (grad_input if mask[0] else None, grad_coords if mask[1] else None) + extra

    return backward


def _setup_backward_context(ctx, inputs, output):
    grad_output, input, coords = inputs[:3]
    ctx.save_for_backward(grad_output, input, coords)
    ctx.config = inputs[3:6]  # interpolation, padding_mode, align_corners
    ctx.computed = inputs[6]


def second_order(ctx, affine, gg_input, gg_coords):
    """The backward op's vector-Jacobian product, (d grad_output, d input, d coords): PyTorch's
    sampler differentiated twice by torch.func.vjp, which composes with whatever transforms or
    autograd graph are around it, to any order. ctx holds the saved (grad_output, input, coords),
    config (interpolation, padding_mode, align_corners) and computed (the output_mask)."""
    grad_output, input, coords = ctx.saved_tensors
    interpolation, padding_mode, align_corners = ctx.config

    def sample(input, coords):
        grid = torch.affine_grid_generator(coords, grad_output.shape, align_corners) if affine else coords
        return torch.grid_sampler_2d(input, grid, interpolation, padding_mode, align_corners)

    def first_order(grad_output, input, coords):
        return torch.func.vjp(sample, input, coords)[1](grad_output)

    first, second_order_vjp = torch.func.vjp(first_order, grad_output, input, coords)
    cotangents = tuple(
        g if computed and g is not None else torch.zeros_like(f)
        for g, f, computed in zip((gg_input, gg_coords), first, ctx.computed)
    )
    return second_order_vjp(cotangents)


def _make_double_backward(affine):
    """The Triton backward op's own backward, for gradients of gradients (any order)."""

    def double_backward(ctx, gg_input, gg_coords):
        grads = second_order(ctx, affine, gg_input, gg_coords)
        return tuple(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)) + (None,) * 4

    return double_backward


if has_ops():
    # Resolved once: attribute lookups cost microseconds per call.
    _native_grid_sample = torch.ops.fastcnn.grid_sample.default
    _native_affine_grid_sample = torch.ops.fastcnn.affine_grid_sample.default
    torch.library.register_fake("fastcnn::grid_sample")(_fake_grid_sample)
    torch.library.register_fake("fastcnn::affine_grid_sample")(_fake_affine_grid_sample)
    torch.library.register_fake("fastcnn::_grid_sample_backward")(_fake_backward)
    torch.library.register_fake("fastcnn::_affine_grid_sample_backward")(_fake_backward)
    # Autograd of the C++ ops is registered in C++ (csrc/ops/autograd/): cheaper per call.
    _autocast.register("fastcnn::grid_sample", _autocast.SAMPLER)
    _autocast.register("fastcnn::affine_grid_sample", _autocast.SAMPLER)


# ----------------------------------------------------------------------------------------------
# Triton ops (kernels/grid_sample.py). The backward reads the deterministic-algorithms flag when
# it runs, as PyTorch's own kernels do.


@torch.library.triton_op("fastcnn::_grid_sample_triton", mutates_args=())
def _grid_sample_triton(input: Tensor, grid: Tensor, interpolation: int, padding_mode: int, align_corners: bool) -> Tensor:
    from ..kernels import grid_sample as kernels

    return kernels.forward(input, grid, None, (grid.shape[1], grid.shape[2]), interpolation, padding_mode, align_corners)


@torch.library.triton_op("fastcnn::_affine_grid_sample_triton", mutates_args=())
def _affine_grid_sample_triton(
    input: Tensor, theta: Tensor, out_size: List[int], interpolation: int, padding_mode: int, align_corners: bool
) -> Tensor:
    from ..kernels import grid_sample as kernels

    return kernels.forward(input, None, theta, tuple(out_size), interpolation, padding_mode, align_corners)


def _triton_backward(grad_output, input, grid, theta, interpolation, padding_mode, align_corners, output_mask):
    from ..kernels import grid_sample as kernels

    return kernels.backward(
        grad_output, input, grid, theta, interpolation, padding_mode, align_corners, output_mask,
        torch.are_deterministic_algorithms_enabled(),
    )


@torch.library.triton_op("fastcnn::_grid_sample_triton_backward", mutates_args=())
def _grid_sample_triton_backward(
    grad_output: Tensor, input: Tensor, grid: Tensor, interpolation: int, padding_mode: int, align_corners: bool,
    output_mask: List[bool],
) -> tuple[Tensor, Tensor]:
    return _triton_backward(grad_output, input, grid, None, interpolation, padding_mode, align_corners, output_mask)


@torch.library.triton_op("fastcnn::_affine_grid_sample_triton_backward", mutates_args=())
def _affine_grid_sample_triton_backward(
    grad_output: Tensor, input: Tensor, theta: Tensor, interpolation: int, padding_mode: int, align_corners: bool,
    output_mask: List[bool],
) -> tuple[Tensor, Tensor]:
    return _triton_backward(grad_output, input, None, theta, interpolation, padding_mode, align_corners, output_mask)


_triton_grid_sample = torch.ops.fastcnn._grid_sample_triton.default
_triton_affine_grid_sample = torch.ops.fastcnn._affine_grid_sample_triton.default
torch.library.register_autograd(
    "fastcnn::_grid_sample_triton", _make_backward(torch.ops.fastcnn._grid_sample_triton_backward.default),
    setup_context=_setup_context,
)
torch.library.register_autograd(
    "fastcnn::_affine_grid_sample_triton",
    _make_backward(torch.ops.fastcnn._affine_grid_sample_triton_backward.default),
    setup_context=_setup_context,
)
for _name, _affine in (("_grid_sample_triton_backward", False), ("_affine_grid_sample_triton_backward", True)):
    torch.library.register_autograd(
        f"fastcnn::{_name}", _make_double_backward(_affine), setup_context=_setup_backward_context
    )
_autocast.register("fastcnn::_grid_sample_triton", _autocast.SAMPLER)
_autocast.register("fastcnn::_affine_grid_sample_triton", _autocast.SAMPLER)
