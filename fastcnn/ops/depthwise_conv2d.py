"""Depthwise 2-D convolution (MobileNets, Howard et al. 2017): weight [C, 1, kH, kW], groups == C.

`depthwise_conv2d` checks its arguments, normalises stride/padding/dilation and dispatches to the
backend chosen by `fastcnn.backends`: the C++ op `torch.ops.fastcnn.depthwise_conv2d` (CPU and
CUDA kernels by dispatch key), the Triton op `torch.ops.fastcnn._depthwise_conv2d_triton`, or the
reference `F.conv2d(groups=C)`. Both custom ops get autograd, fake and autocast (as conv2d's)
implementations here; the backward ops are differentiable too (gradients of any order).
"""
from typing import List, Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .. import backends, reference
from .._extension import has_ops
from . import _autocast

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pair(value, name):
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise TypeError(f"depthwise_conv2d: {name} must be an int or a pair of ints, got {value!r}")


def _normalize(weight, stride, padding, dilation):
    """Returns (stride, [top, bottom, left, right], dilation) as lists of ints."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if any(s <= 0 for s in stride):
        raise ValueError(f"depthwise_conv2d: stride must be positive, got {stride}")
    if any(d <= 0 for d in dilation):
        raise ValueError(f"depthwise_conv2d: dilation must be positive, got {dilation}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0, 0, 0, 0]
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError("depthwise_conv2d: padding='same' is not supported for strided convolutions")
            pads = []
            # PyTorch puts the odd extra row/column at the bottom/right.
            for d, k in zip(dilation, weight.shape[2:]):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
        else:
            raise ValueError(f"depthwise_conv2d: padding string must be 'same' or 'valid', got {padding!r}")
    elif isinstance(padding, (tuple, list)) and len(padding) == 4:
        pads = list(padding)
    else:
        ph, pw = _pair(padding, "padding")
        pads = [ph, ph, pw, pw]
    if any(not isinstance(p, int) or p < 0 for p in pads):
        raise ValueError(f"depthwise_conv2d: padding must be non-negative, got {padding!r}")
    return list(stride), pads, list(dilation)


def _check(input, weight, bias):
    if not isinstance(input, Tensor) or input.dim() != 4:
        got = f"a {input.dim()}-D tensor of shape {tuple(input.shape)}" if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"depthwise_conv2d: expected input of shape [N, C, H, W] (4-D), got {got}")
    channels = input.shape[1]
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"depthwise_conv2d: expected weight of shape [C, 1, kH, kW] with C = {channels} "
            f"(the input's channels), got {got}"
        )
    if weight.shape[2] < 1 or weight.shape[3] < 1:
        raise ValueError(f"depthwise_conv2d: kernel size must be at least 1, got {tuple(weight.shape[2:])}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (channels,)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"depthwise_conv2d: expected bias of shape [{channels}], got {got}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(f"depthwise_conv2d: {name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype and not _autocast.enabled_for(input):  # autocast: cast by the op's rule
            raise TypeError(f"depthwise_conv2d: {name} has dtype {t.dtype} but input has {input.dtype}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"depthwise_conv2d: expected a floating-point input (fp16, bf16, fp32, fp64), got {input.dtype}")


def _output_hw(input, weight, stride, padding, dilation):
    sizes = []
    for axis in range(2):
        size, k = input.shape[2 + axis], weight.shape[2 + axis]
        span = dilation[axis] * (k - 1) + 1
        padded = size + padding[2 * axis] + padding[2 * axis + 1]
        if padded < span:
            raise ValueError(
                f"depthwise_conv2d: padded input {'HW'[axis]}={padded} is smaller than the dilated "
                f"kernel extent {span}"
            )
        sizes.append((padded - span) // stride[axis] + 1)
    return sizes


def _well_formed(input, weight, bias):
    """The common case of _check in one expression (about 1 us instead of 4: a batch-1 7x7 layer
    takes 60 us); _check explains whatever this rejects."""
    try:
        shape, kernel = input.shape, weight.shape
        return (
            len(shape) == 4
            and len(kernel) == 4
            and kernel[0] == shape[1]
            and kernel[1] == 1
            and kernel[2] >= 1
            and kernel[3] >= 1
            and input.dtype in _FLOAT_DTYPES
            and weight.dtype == input.dtype
            and weight.device == input.device
            and (bias is None or (bias.shape == kernel[:1] and bias.dtype == input.dtype and bias.device == input.device))
        )
    except AttributeError:
        return False


# (H, W, kH, kW, stride, padding, dilation) as passed -> the normalised (stride, padding, dilation),
# for the argument forms that hash (ints, tuples, strings). Bounded: a model has a few dozen.
_GEOMETRY_CACHE = {}
_GEOMETRY_CACHE_SIZE = 1024


def _geometry(input, weight, stride, padding, dilation):
    try:
        key = (*input.shape[2:], *weight.shape[2:], stride, padding, dilation)
        hit = _GEOMETRY_CACHE.get(key)
    except TypeError:  # lists: not hashable
        key, hit = None, None
    if hit is not None:
        return hit
    stride, padding, dilation = _normalize(weight, stride, padding, dilation)
    _output_hw(input, weight, stride, padding, dilation)
    if key is not None and len(_GEOMETRY_CACHE) < _GEOMETRY_CACHE_SIZE:
        _GEOMETRY_CACHE[key] = (stride, padding, dilation)
    return stride, padding, dilation


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """Depthwise convolution, identical to ``F.conv2d(input, weight, bias, stride, padding,
    dilation, groups=C)`` for weight of shape [C, 1, kH, kW].

    padding: int, (pH, pW), 'same', 'valid', or an explicit (top, bottom, left, right).
    Layouts NCHW and channels_last are both native; the output follows the input's layout.
    """
    if not _well_formed(input, weight, bias):
        _check(input, weight, bias)
    stride, padding, dilation = _geometry(input, weight, stride, padding, dilation)
    backend = backends.resolve(input.device)
    if backends.python_autograd_needed():  # torch.func or forward AD (see there)
        if backend in ("cpu", "cuda"):
            from . import _depthwise_functorch

            return _depthwise_functorch.depthwise_conv2d(input, weight, bias, stride, padding, dilation)
        backend = "reference"
    if backend in ("cpu", "cuda"):
        return _native_op(input, weight, bias, stride, padding, dilation)
    if backend == "triton":
        return _triton_op(input, weight, bias, stride, padding, dilation)
    return reference.depthwise_conv2d(input, weight, bias, stride, padding, dilation)


# ----------------------------------------------------------------------------------------------
# Registration: fake (meta) implementations and autograd, shared by the C++ and the Triton op.


def _fake_forward(input, weight, bias, stride, padding, dilation):
    n, c, h, w = input.shape
    kh, kw = weight.shape[2:]
    ho = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return torch.empty(
        (n, c, ho, wo), dtype=input.dtype, device=input.device, memory_format=suggest_memory_format(input)
    )


def _fake_backward(grad_output, input, weight, stride, padding, dilation, output_mask):
    return (
        torch.empty_like(input, memory_format=suggest_memory_format(input)) if output_mask[0] else input.new_empty(0),
        weight.new_empty(weight.shape) if output_mask[1] else input.new_empty(0),
        weight.new_empty(weight.shape[:1]) if output_mask[2] else input.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.config = (stride, padding, dilation)


def _make_backward(backward_op):
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_input, grad_weight, grad_bias = backward_op(grad_output, input, weight, *ctx.config, mask)
        return (
            grad_input if mask[0] else None,
            grad_weight if mask[1] else None,
            grad_bias if mask[2] else None,
            None,
            None,
            None,
        )

    return backward


def _setup_backward_context(ctx, inputs, output):
    grad_output, input, weight, stride, padding, dilation, output_mask = inputs
    ctx.save_for_backward(grad_output, input, weight)
    ctx.config = (stride, padding, dilation)
    ctx.computed = output_mask


def _make_double_backward(forward_op, backward_op):
    """The backward op's own backward, for gradients of gradients, through the two ops themselves
    (the formulas: csrc/ops/autograd/depthwise_conv2d_autograd.cpp, which does the same for the
    C++ op)."""

    def double_backward(ctx, gg_input, gg_weight, gg_bias):
        grad_output, input, weight = ctx.saved_tensors
        # An output the backward did not compute (an empty tensor) has no cotangent worth reading.
        gg_input, gg_weight, gg_bias = (
            g if computed and g is not None else None
            for g, computed in zip((gg_input, gg_weight, gg_bias), ctx.computed)
        )
        d_grad_output = d_input = d_weight = None
        if ctx.needs_input_grad[0]:
            terms = []
            if gg_input is not None:
                terms.append(forward_op(gg_input, weight, gg_bias, *ctx.config))
            elif gg_bias is not None:
                terms.append(gg_bias.view(1, -1, 1, 1).expand_as(grad_output))
            if gg_weight is not None:
                terms.append(forward_op(input, gg_weight, None, *ctx.config))
            d_grad_output = sum(terms[1:], terms[0]) if terms else None
        if ctx.needs_input_grad[1] and gg_weight is not None:
            d_input = backward_op(grad_output, input, gg_weight, *ctx.config, [True, False, False])[0]
        if ctx.needs_input_grad[2] and gg_input is not None:
            d_weight = backward_op(grad_output, gg_input, weight, *ctx.config, [False, True, False])[1]
        return d_grad_output, d_input, d_weight, None, None, None, None

    return double_backward


if has_ops():
    _native_op = torch.ops.fastcnn.depthwise_conv2d.default  # resolved once: attribute lookups cost µs per call
    torch.library.register_fake("fastcnn::depthwise_conv2d")(_fake_forward)
    torch.library.register_fake("fastcnn::_depthwise_conv2d_backward")(_fake_backward)
    # Autograd of the C++ op is registered in C++ (csrc/ops/autograd/): cheaper per call.
    _autocast.register("fastcnn::depthwise_conv2d", _autocast.DEPTHWISE)


@torch.library.triton_op("fastcnn::_depthwise_conv2d_triton", mutates_args=())
def _depthwise_conv2d_triton(
    input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int]
) -> Tensor:
    from ..kernels import depthwise_conv2d as kernels

    return kernels.forward(input, weight, bias, stride, padding, dilation)


@torch.library.triton_op("fastcnn::_depthwise_conv2d_triton_backward", mutates_args=())
def _depthwise_conv2d_triton_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    output_mask: List[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels import depthwise_conv2d as kernels

    return kernels.backward(grad_output, input, weight, stride, padding, dilation, output_mask)


_triton_op = torch.ops.fastcnn._depthwise_conv2d_triton.default
torch.library.register_autograd(
    "fastcnn::_depthwise_conv2d_triton",
    _make_backward(torch.ops.fastcnn._depthwise_conv2d_triton_backward),
    setup_context=_setup_context,
)
torch.library.register_autograd(
    "fastcnn::_depthwise_conv2d_triton_backward",
    _make_double_backward(_triton_op, torch.ops.fastcnn._depthwise_conv2d_triton_backward.default),
    setup_context=_setup_backward_context,
)
_autocast.register("fastcnn::_depthwise_conv2d_triton", _autocast.DEPTHWISE)
