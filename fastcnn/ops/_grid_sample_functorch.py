"""grid_sample and affine_grid_sample under torch.func transforms (grad, vjp, vmap, jacrev), on the
C++ kernels; see _depthwise_functorch.py for why this path exists.

- backward: the backward ops; their own backward is grid_sample.py's `second_order` (PyTorch's
  sampler differentiated twice by torch.func.vjp, which composes with the transforms around it:
  every order).
- vmap: every image is sampled alone, so a batch of B problems is one problem of B*N images: the
  vmapped dimension folds into N (input and grid or theta; an unbatched one is expanded).
- jvp: none, as PyTorch has none for grid_sampler_2d; forward-mode transforms raise.
"""
import torch

from .grid_sample import second_order

_FORWARD = {False: torch.ops.fastcnn.grid_sample.default, True: torch.ops.fastcnn.affine_grid_sample.default}
_BACKWARD = {
    False: torch.ops.fastcnn._grid_sample_backward.default,
    True: torch.ops.fastcnn._affine_grid_sample_backward.default,
}


def _fold(t, dim, batch):
    """[B, N, ...] (vmapped at `dim`; expanded where None) -> [B*N, ...]."""
    t = t.movedim(dim, 0) if dim is not None else t.expand(batch, *t.shape)
    return t.flatten(0, 1)


class Sample(torch.autograd.Function):
    """affine: coords is theta [N, 2, 3] and out_size [Ho, Wo]; else coords is the grid."""

    @staticmethod
    def forward(affine, input, coords, out_size, interpolation, padding_mode, align_corners):
        if affine:
            return _FORWARD[True](input, coords, out_size, interpolation, padding_mode, align_corners)
        return _FORWARD[False](input, coords, interpolation, padding_mode, align_corners)

    @staticmethod
    def setup_context(ctx, inputs, output):
        affine, input, coords, _, interpolation, padding_mode, align_corners = inputs
        ctx.save_for_backward(input, coords)
        ctx.config = (affine, interpolation, padding_mode, align_corners)

    @staticmethod
    def backward(ctx, grad_output):
        input, coords = ctx.saved_tensors
        mask = [ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        grad_input, grad_coords = SampleBackward.apply(grad_output, input, coords, *ctx.config, mask)
        return None, grad_input if mask[0] else None, grad_coords if mask[1] else None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"fastcnn::{'affine_grid_sample' if ctx.config[0] else 'grid_sample'}: forward-mode AD (jvp, jacfwd, "
            "hessian) is not implemented, as for PyTorch's grid_sampler_2d; jacrev and vjp work")

    @staticmethod
    def vmap(info, in_dims, affine, input, coords, out_size, interpolation, padding_mode, align_corners):
        batch = info.batch_size
        output = Sample.apply(affine, _fold(input, in_dims[1], batch), _fold(coords, in_dims[2], batch), out_size,
                              interpolation, padding_mode, align_corners)
        return output.unflatten(0, (batch, -1)), 0


class SampleBackward(torch.autograd.Function):
    @staticmethod
    def forward(grad_output, input, coords, affine, interpolation, padding_mode, align_corners, output_mask):
        return _BACKWARD[affine](grad_output, input, coords, interpolation, padding_mode, align_corners, output_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_output, input, coords, affine, interpolation, padding_mode, align_corners, output_mask = inputs
        ctx.save_for_backward(grad_output, input, coords)
        ctx.affine = affine
        ctx.config = (interpolation, padding_mode, align_corners)
        ctx.computed = output_mask

    @staticmethod
    def backward(ctx, gg_input, gg_coords):
        return (*second_order(ctx, ctx.affine, gg_input, gg_coords), None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, grad_output, input, coords, affine, interpolation, padding_mode, align_corners,
             output_mask):
        batch = info.batch_size
        grads = SampleBackward.apply(
            _fold(grad_output, in_dims[0], batch), _fold(input, in_dims[1], batch), _fold(coords, in_dims[2], batch),
            affine, interpolation, padding_mode, align_corners, output_mask)
        return (tuple(g.unflatten(0, (batch, -1)) if wanted else g for g, wanted in zip(grads, output_mask)),
                tuple(0 if wanted else None for wanted in output_mask))


def grid_sample(input, grid, interpolation, padding_mode, align_corners):
    return Sample.apply(False, input, grid, None, interpolation, padding_mode, align_corners)


def affine_grid_sample(input, theta, out_size, interpolation, padding_mode, align_corners):
    return Sample.apply(True, input, theta, out_size, interpolation, padding_mode, align_corners)
