// Argument checks of the Spatial Transformer sampler, shared by the CPU and CUDA kernels (host
// code only). Errors name the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/grid_sample_coords.h"

namespace fastcnn {
namespace grid_sample {

struct Geometry {
  int64_t batch, channels, in_h, in_w, out_h, out_w;
  Interpolation interpolation;
  Padding padding;
  bool align_corners;
};

inline Geometry check_common(const char* op, const at::Tensor& input, int64_t interpolation, int64_t padding_mode,
                             bool align_corners) {
  TORCH_CHECK(input.dim() == 4, op, ": expected input of shape [N, C, H, W] (4-D), got ", input.dim(),
              "-D tensor of shape ", input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": expected input of dtype float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(interpolation == 0 || interpolation == 1, op,
              ": interpolation must be 0 (bilinear) or 1 (nearest), got ", interpolation);
  TORCH_CHECK(padding_mode >= 0 && padding_mode <= 2, op,
              ": padding_mode must be 0 (zeros), 1 (border) or 2 (reflection), got ", padding_mode);
  TORCH_CHECK(input.size(2) > 0 && input.size(3) > 0, op, ": input must have non-empty spatial dimensions, got ",
              input.sizes());
  Geometry g;
  g.batch = input.size(0);
  g.channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.interpolation = static_cast<Interpolation>(interpolation);
  g.padding = static_cast<Padding>(padding_mode);
  g.align_corners = align_corners;
  return g;
}

inline void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but input has ", input.scalar_type());
}

inline Geometry check_grid_sample(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                                  int64_t padding_mode, bool align_corners) {
  Geometry g = check_common("grid_sample", input, interpolation, padding_mode, align_corners);
  TORCH_CHECK(grid.dim() == 4 && grid.size(0) == g.batch && grid.size(3) == 2,
              "grid_sample: expected grid of shape [N, H_out, W_out, 2] with N = ", g.batch, ", got ",
              grid.sizes());
  check_same("grid_sample", "grid", grid, input);
  g.out_h = grid.size(1);
  g.out_w = grid.size(2);
  return g;
}

inline Geometry check_affine_grid_sample(const at::Tensor& input, const at::Tensor& theta, int64_t out_h,
                                         int64_t out_w, int64_t interpolation, int64_t padding_mode,
                                         bool align_corners) {
  Geometry g = check_common("affine_grid_sample", input, interpolation, padding_mode, align_corners);
  TORCH_CHECK(theta.dim() == 3 && theta.size(0) == g.batch && theta.size(1) == 2 && theta.size(2) == 3,
              "affine_grid_sample: expected theta of shape [N, 2, 3] with N = ", g.batch, ", got ", theta.sizes());
  check_same("affine_grid_sample", "theta", theta, input);
  TORCH_CHECK(out_h > 0 && out_w > 0, "affine_grid_sample: output size must be positive, got [", out_h, ", ",
              out_w, "]");
  g.out_h = out_h;
  g.out_w = out_w;
  return g;
}

inline void check_grad_output(const char* op, const at::Tensor& grad_output, const at::Tensor& input,
                              const Geometry& g) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.batch && grad_output.size(1) == g.channels &&
                  grad_output.size(2) == g.out_h && grad_output.size(3) == g.out_w,
              op, " backward: expected grad_output of shape [", g.batch, ", ", g.channels, ", ", g.out_h, ", ",
              g.out_w, "], got ", grad_output.sizes());
  check_same(op, "grad_output", grad_output, input);
}

}  // namespace grid_sample
}  // namespace fastcnn
