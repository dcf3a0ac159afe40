"""depthwise_conv2d under torch.func transforms (grad, vjp, jvp, vmap, jacrev, jacfwd, hessian),
on the C++ kernels.

functorch cannot see into the op's C++ autograd functions (csrc/ops/autograd/), so under a
transform the op goes through the two Python autograd.Functions here instead: the forward op and
the backward op, each with the rules functorch asks for.

- backward: the backward op; its own backward is the same bilinear algebra as the C++ double
  backward (see depthwise_conv2d_autograd.cpp): depthwise_conv2d.py's _make_double_backward,
  given these Functions so that it nests.
- jvp: both ops are bilinear, so a tangent is the op applied with one argument replaced by its
  tangent, summed over the arguments.
- vmap: a depthwise convolution treats every channel alone, so a batch of B problems is one
  problem with B times the channels: the vmapped dimension moves next to the channels and folds
  into them (weights and bias too, expanded where only the input is batched). Where the weights
  are shared, the forward folds the batch into N instead; the backward op always folds into the
  channels (each problem has its own weight gradient). Per-sample gradients (vmap of grad over
  one-image batches) fold without a copy.
"""
import torch

from .depthwise_conv2d import _make_double_backward, _output_hw

_forward_op = torch.ops.fastcnn.depthwise_conv2d.default
_backward_op = torch.ops.fastcnn._depthwise_conv2d_backward.default


def _batched_first(t, dim, batch):
    """t with its vmapped dimension first, expanded to `batch` where it has none."""
    return t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)


def _fold_channels(t, dim, batch):
    """[B, N, C, H, W] (vmapped at `dim`) -> [N, B*C, H, W]."""
    t = _batched_first(t, dim, batch)
    return t.transpose(0, 1).reshape(t.shape[1], -1, *t.shape[3:])


def _fold_weight(t, dim, batch):
    """[B, C, ...] (vmapped at `dim`) -> [B*C, ...]; None stays None."""
    return None if t is None else _batched_first(t, dim, batch).flatten(0, 1)


def _sum(terms):
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


class Forward(torch.autograd.Function):
    """The forward op."""

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation):
        return _forward_op(input, weight, bias, stride, padding, dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation = inputs
        ctx.save_for_backward(input, weight)
        ctx.save_for_forward(input, weight)
        ctx.has_bias = bias is not None
        ctx.config = (stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = Backward.apply(grad_output, input, weight, *ctx.config, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None, None, None)

    @staticmethod
    def jvp(ctx, input_tangent, weight_tangent, bias_tangent, *_):
        input, weight = ctx.saved_tensors
        return _sum([
            None if input_tangent is None else Forward.apply(input_tangent, weight, bias_tangent, *ctx.config),
            None if weight_tangent is None else Forward.apply(input, weight_tangent, None, *ctx.config),
            None if bias_tangent is None or input_tangent is not None else bias_tangent.view(1, -1, 1, 1).expand(
                input.shape[0], -1, *_output_hw(input, weight, *ctx.config)),
        ])

    @staticmethod
    def vmap(info, in_dims, input, weight, bias, stride, padding, dilation):
        input_dim, weight_dim, bias_dim = in_dims[:3]
        batch = info.batch_size
        if weight_dim is None and bias_dim is None:  # shared weights: the batch joins N
            input = _batched_first(input, input_dim, batch)
            output = Forward.apply(input.flatten(0, 1), weight, bias, stride, padding, dilation)
            return output.unflatten(0, (batch, -1)), 0
        output = Forward.apply(
            _fold_channels(input, input_dim, batch), _fold_weight(weight, weight_dim, batch),
            _fold_weight(bias, bias_dim, batch), stride, padding, dilation)
        return output.unflatten(1, (batch, -1)), 1


class Backward(torch.autograd.Function):
    """The backward op (grad_input, grad_weight, grad_bias; the ones output_mask leaves out empty)."""

    @staticmethod
    def forward(grad_output, input, weight, stride, padding, dilation, output_mask):
        return _backward_op(grad_output, input, weight, stride, padding, dilation, output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, weight, stride, padding, dilation, output_mask = inputs
        ctx.save_for_backward(grad_output, input, weight)
        ctx.save_for_forward(grad_output, input, weight)
        ctx.config = (stride, padding, dilation)
        ctx.computed = output_mask

    @staticmethod
    def backward(ctx, gg_input, gg_weight, gg_bias):
        return _double_backward(ctx, gg_input, gg_weight, gg_bias)

    @staticmethod
    def jvp(ctx, grad_output_tangent, input_tangent, weight_tangent, *_):
        grad_output, input, weight = ctx.saved_tensors
        grad_input_wanted, grad_weight_wanted, _ = ctx.computed

        def backward(go, x, w, mask):
            return Backward.apply(go, x, w, *ctx.config, mask)

        empty = grad_output.new_empty(0)
        grad_input = grad_weight = grad_bias = empty
        if grad_output_tangent is not None:
            grad_input, grad_weight, grad_bias = backward(grad_output_tangent, input, weight, ctx.computed)
        if weight_tangent is not None and grad_input_wanted:
            through_weight = backward(grad_output, input, weight_tangent, [True, False, False])[0]
            grad_input = through_weight if grad_output_tangent is None else grad_input + through_weight
        if input_tangent is not None and grad_weight_wanted:
            through_input = backward(grad_output, input_tangent, weight, [False, True, False])[1]
            grad_weight = through_input if grad_output_tangent is None else grad_weight + through_input
        zeros = [torch.zeros_like(input), torch.zeros_like(weight), weight.new_zeros(weight.shape[:1])]
        return tuple(t if t.numel() or not wanted else zero
                     for t, wanted, zero in zip((grad_input, grad_weight, grad_bias), ctx.computed, zeros))

    @staticmethod
    def vmap(info, in_dims, grad_output, input, weight, stride, padding, dilation, output_mask):
        # Per-problem weight gradients: every case folds into the channels.
        batch = info.batch_size
        grad_input, grad_weight, grad_bias = Backward.apply(
            _fold_channels(grad_output, in_dims[0], batch), _fold_channels(input, in_dims[1], batch),
            _fold_weight(weight, in_dims[2], batch), stride, padding, dilation, output_mask)
        outputs = (grad_input.unflatten(1, (batch, -1)) if output_mask[0] else grad_input,
                   grad_weight.unflatten(0, (batch, -1)) if output_mask[1] else grad_weight,
                   grad_bias.unflatten(0, (batch, -1)) if output_mask[2] else grad_bias)
        return outputs, (1 if output_mask[0] else None, 0 if output_mask[1] else None, 0 if output_mask[2] else None)


# The backward op's backward: the same rule as the Triton op's, written with these Functions
_double_backward = _make_double_backward(Forward.apply, Backward.apply)


def depthwise_conv2d(input, weight, bias, stride, padding, dilation):
    return Forward.apply(input, weight, bias, stride, padding, dilation)
