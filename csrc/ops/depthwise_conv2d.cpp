// Schemas for depthwise convolution (weight [C, 1, kH, kW], groups == C), as in MobileNets
// (Howard et al., 2017). The CPU and CUDA kernels register under the same names by dispatch key;
// autograd and the fake (meta) implementation are registered from fastcnn/ops/depthwise_conv2d.py.
//
// padding is [top, bottom, left, right] so that padding='same' with an even effective kernel
// (PyTorch pads one more on the bottom/right) runs natively, without a padded copy.
// output_mask of the backward says which of (grad_input, grad_weight, grad_bias) to compute;
// an output that was not asked for comes back as an empty tensor.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastcnn, m) {
  m.def(
      "depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, SymInt[2] stride, "
      "SymInt[4] padding, SymInt[2] dilation) -> Tensor");
  m.def(
      "_depthwise_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "SymInt[2] stride, SymInt[4] padding, SymInt[2] dilation, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}
