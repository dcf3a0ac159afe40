// Argument checks and the shape bookkeeping of depthwise convolution, shared by the CPU and CUDA
// kernels (host code only). Errors name the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/depthwise_conv2d_index.h"

namespace fastcnn {
namespace depthwise {

struct Geometry {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right, dilation_h, dilation_w;
};

inline Geometry check_arguments(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(input.dim() == 4, "depthwise_conv2d: expected input of shape [N, C, H, W] (4-D), got ",
              input.dim(), "-D tensor of shape ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "depthwise_conv2d: expected input of dtype float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t channels = input.size(1);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == channels && weight.size(1) == 1,
              "depthwise_conv2d: expected weight of shape [C, 1, kH, kW] with C = ", channels,
              " (the input's channels), got ", weight.sizes());
  TORCH_CHECK(weight.size(2) >= 1 && weight.size(3) >= 1,
              "depthwise_conv2d: kernel size must be at least 1, got ", weight.sizes().slice(2));
  TORCH_CHECK(weight.device() == input.device(), "depthwise_conv2d: weight is on ", weight.device(),
              " but input is on ", input.device());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "depthwise_conv2d: weight has dtype ",
              weight.scalar_type(), " but input has ", input.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels,
                "depthwise_conv2d: expected bias of shape [", channels, "], got ", bias->sizes());
    TORCH_CHECK(bias->device() == input.device(), "depthwise_conv2d: bias is on ", bias->device(),
                " but input is on ", input.device());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "depthwise_conv2d: bias has dtype ",
                bias->scalar_type(), " but input has ", input.scalar_type());
  }
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0,
              "depthwise_conv2d: stride must be two positive ints, got ", stride);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0,
              "depthwise_conv2d: dilation must be two positive ints, got ", dilation);
  TORCH_CHECK(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
              "depthwise_conv2d: padding must be four non-negative ints [top, bottom, left, right], got ",
              padding);
  Geometry g;
  g.batch = input.size(0);
  g.channels = channels;
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_top = padding[0];
  g.pad_bottom = padding[1];
  g.pad_left = padding[2];
  g.pad_right = padding[3];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.out_h = output_size(g.in_h, g.kernel_h, g.stride_h, g.pad_top, g.pad_bottom, g.dilation_h);
  g.out_w = output_size(g.in_w, g.kernel_w, g.stride_w, g.pad_left, g.pad_right, g.dilation_w);
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "depthwise_conv2d: padded input (", g.in_h + g.pad_top + g.pad_bottom,
              " x ", g.in_w + g.pad_left + g.pad_right, ") is smaller than the dilated kernel (",
              g.dilation_h * (g.kernel_h - 1) + 1, " x ", g.dilation_w * (g.kernel_w - 1) + 1, ")");
  return g;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const Geometry& g) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.batch && grad_output.size(1) == g.channels &&
                  grad_output.size(2) == g.out_h && grad_output.size(3) == g.out_w,
              "depthwise_conv2d backward: expected grad_output of shape [", g.batch, ", ", g.channels, ", ",
              g.out_h, ", ", g.out_w, "], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == input.device() && grad_output.scalar_type() == input.scalar_type(),
              "depthwise_conv2d backward: grad_output must match input's device and dtype (",
              input.device(), ", ", input.scalar_type(), "), got ", grad_output.device(), ", ",
              grad_output.scalar_type());
}

}  // namespace depthwise
}  // namespace fastcnn
