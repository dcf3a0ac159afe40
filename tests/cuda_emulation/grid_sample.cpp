// Runs the thread body of the CUDA kernel gs_affine_gather_grad_input
// (csrc/ops/cuda/grid_sample_affine_gather.h) on the CPU for every thread of its launch, one after
// another (the kernel has no shared memory, barrier or warp operation).
#include <torch/extension.h>

#include "ops/cuda/grid_sample_affine_gather.h"

namespace gather = fastcnn::grid_sample::affine_gather;

namespace {

// grad_input [N, C, Hi, Wi] (the input's layout) of the affine sampler, zeros padding, from
// grad_output and theta [N, 2, 3]. Starts as NaN, so an element no thread writes shows.
torch::Tensor affine_gather_grad_input(const torch::Tensor& grad_output, const torch::Tensor& theta, int64_t in_h,
                                       int64_t in_w, bool nearest, bool align_corners, bool channels_last) {
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const torch::Tensor go = grad_output.contiguous(format);
  const torch::Tensor th = theta.contiguous();
  gather::Geom g{go.size(0), go.size(1), in_h, in_w, go.size(2), go.size(3), nearest, align_corners, channels_last};
  torch::Tensor grad_in = torch::empty({g.N, g.C, in_h, in_w}, go.options().memory_format(format));
  grad_in.fill_(NAN);
  const int64_t blocks = gather::launch_blocks(g);
  const int64_t step = blocks * gather::kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "emulate_affine_gather", [&] {
    for (int64_t first = 0; first < step; ++first) {
      gather::grad_input_thread<scalar_t>(go.const_data_ptr<scalar_t>(), th.const_data_ptr<scalar_t>(),
                                          grad_in.mutable_data_ptr<scalar_t>(), g, first, step);
    }
  });
  return grad_in;
}

// The same gradient as a scatter over output pixels in ascending order, with the kernel's own
// coordinate arithmetic (source_pixel): the sorted formulation's sums. The gather must equal it
// bitwise for any theta; a candidate interval too narrow for the forward's rounding drops a term.
torch::Tensor affine_scatter_grad_input(const torch::Tensor& grad_output, const torch::Tensor& theta, int64_t in_h,
                                        int64_t in_w, bool nearest, bool align_corners) {
  const torch::Tensor go = grad_output.contiguous();
  const torch::Tensor th = theta.contiguous();
  gather::Geom g{go.size(0), go.size(1), in_h, in_w, go.size(2), go.size(3), nearest, align_corners, false};
  torch::Tensor grad_in = torch::zeros({g.N, g.C, in_h, in_w}, go.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "emulate_affine_scatter", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    std::vector<acc_t> acc(g.N * g.C * in_h * in_w, acc_t(0));
    for (int64_t n = 0; n < g.N; ++n) {
      acc_t t[6];
      for (int k = 0; k < 6; ++k) t[k] = static_cast<acc_t>(th.const_data_ptr<scalar_t>()[n * 6 + k]);
      for (int64_t oy = 0; oy < g.Ho; ++oy) {
        for (int64_t ox = 0; ox < g.Wo; ++ox) {
          acc_t x, y;
          gather::source_pixel(t, ox, oy, g, &x, &y);
          int64_t xs[4], ys[4];
          acc_t ws[4];
          int taps = 0;
          if (nearest) {
            xs[0] = fastcnn::grid_sample::nearest_index(x);
            ys[0] = fastcnn::grid_sample::nearest_index(y);
            ws[0] = acc_t(1);
            taps = 1;
          } else {
            const auto b = fastcnn::grid_sample::bilinear_taps(x, y);
            const int64_t x0 = b.x0, y0 = b.y0;
            const int64_t bx[4] = {x0, x0 + 1, x0, x0 + 1}, by[4] = {y0, y0, y0 + 1, y0 + 1};
            const acc_t bw[4] = {b.nw(), b.ne(), b.sw(), b.se()};
            for (int k = 0; k < 4; ++k) {
              xs[k] = bx[k];
              ys[k] = by[k];
              ws[k] = bw[k];
            }
            taps = 4;
          }
          for (int k = 0; k < taps; ++k) {
            if (!fastcnn::grid_sample::in_bounds(xs[k], ys[k], in_w, in_h)) continue;
            for (int64_t c = 0; c < g.C; ++c) {
              const acc_t v = static_cast<acc_t>(gop[((n * g.C + c) * g.Ho + oy) * g.Wo + ox]);
              acc[((n * g.C + c) * in_h + ys[k]) * in_w + xs[k]] += ws[k] * v;
            }
          }
        }
      }
    }
    // Rounded to scalar_t as the kernel stores, then widened for the comparison.
    double* out = grad_in.mutable_data_ptr<double>();
    for (size_t i = 0; i < acc.size(); ++i) out[i] = static_cast<double>(static_cast<scalar_t>(acc[i]));
  });
  return grad_in;
}

}  // namespace

void register_grid_sample(pybind11::module& m) {
  m.def("affine_gather_grad_input", &affine_gather_grad_input);
  m.def("affine_scatter_grad_input", &affine_scatter_grad_input);
}
