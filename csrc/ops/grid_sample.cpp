// Schemas of the Spatial Transformer sampler (Jaderberg et al., 2015), 2-D:
//
//   grid_sample(input, grid, ...)             == F.grid_sample for a given grid [N, Ho, Wo, 2]
//   affine_grid_sample(input, theta, size...) == F.grid_sample(input, F.affine_grid(theta, ...))
//                                                without the grid: coordinates come from theta
//                                                [N, 2, 3] in registers, and the backward
//                                                accumulates grad_theta in the same pass.
//
// interpolation and padding_mode are PyTorch's integer codes (bilinear 0, nearest 1; zeros 0,
// border 1, reflection 2). out_size is the output [Ho, Wo]. output_mask of a backward says which
// of (grad_input, grad_grid | grad_theta) to compute; one not asked for comes back empty.
// The backwards honour torch.use_deterministic_algorithms: the CPU kernel is always
// deterministic, the CUDA kernel switches from atomics to a sorted fixed-order reduction.
// CPU and CUDA kernels register by dispatch key; autograd and fakes live in
// fastcnn/ops/grid_sample.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  m.def(
      "grid_sample(Tensor input, Tensor grid, int interpolation, int padding_mode, bool align_corners) "
      "-> Tensor");
  m.def(
      "_grid_sample_backward(Tensor grad_output, Tensor input, Tensor grid, int interpolation, "
      "int padding_mode, bool align_corners, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "affine_grid_sample(Tensor input, Tensor theta, SymInt[2] out_size, int interpolation, "
      "int padding_mode, bool align_corners) -> Tensor");
  m.def(
      "_affine_grid_sample_backward(Tensor grad_output, Tensor input, Tensor theta, int interpolation, "
      "int padding_mode, bool align_corners, bool[2] output_mask) -> (Tensor, Tensor)");
}
