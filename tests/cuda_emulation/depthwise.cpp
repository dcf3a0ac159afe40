// Runs the thread bodies of the CUDA depthwise kernels dw_fwd_cl_rows and dw_fwd_nchw_vec
// (csrc/ops/cuda/depthwise_conv2d_cl_rows.h, depthwise_conv2d_nchw_vec.h) on the CPU for every
// thread of the launch their CUDA launchers would make, one thread after another. The kernels have
// no shared memory, barrier or warp operation, so this serial run computes what the GPU computes
// (up to fused multiply-adds): their indexing, bounds and coverage are tested here.
#include <torch/extension.h>

#include "ops/cuda/depthwise_conv2d_cl_rows.h"
#include "ops/cuda/depthwise_conv2d_nchw_vec.h"

namespace rows = fastcnn::depthwise::cl_rows;
namespace vec = fastcnn::depthwise::nchw_vec;

namespace {

// Returns the launch shape it ran.
template <typename scalar_t, int K, int S>
rows::Launch run_launch(const torch::Tensor& in, const torch::Tensor& weight, const torch::Tensor& bias,
                        torch::Tensor& out, int64_t pad_top, int64_t pad_left, bool flip, int64_t sm_count) {
  const rows::Geom g = rows::make_geom<K>(in.size(0), in.size(1), in.size(2), in.size(3), out.size(2), out.size(3),
                                          pad_top, pad_left);
  const rows::Launch l = rows::launch_shape(g, sm_count);
  const int32_t step = static_cast<int32_t>(l.block_y * l.grid_y);
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  for (int64_t by = 0; by < l.grid_y; ++by) {
    for (int64_t bx = 0; bx < l.grid_x; ++bx) {
      for (int ty = 0; ty < l.block_y; ++ty) {
        for (int tx = 0; tx < l.block_x; ++tx) {
          rows::forward_thread<scalar_t, K, S>(
              in.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b, out.mutable_data_ptr<scalar_t>(), g,
              flip, static_cast<int32_t>(bx * l.block_x + tx), static_cast<int32_t>(by * l.block_y + ty), step);
        }
      }
    }
  }
  return l;
}

// input [N, C, Hi, Wi] channels_last; out_h x out_w as the caller computed them. The output starts as
// NaN, so a pixel no thread writes shows. Returns the output and the launch shape.
std::tuple<torch::Tensor, std::vector<int64_t>> forward(
    const torch::Tensor& input, const torch::Tensor& weight, const std::optional<torch::Tensor>& bias, int64_t stride,
    int64_t pad_top, int64_t pad_left, int64_t out_h, int64_t out_w, bool flip, int64_t sm_count) {
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast), "input: channels_last 4-D");
  const int64_t K = weight.size(2);
  const bool aligned = reinterpret_cast<uintptr_t>(input.const_data_ptr()) % (input.element_size() * rows::kVec) == 0;
  TORCH_CHECK(rows::supports(K, weight.size(3), stride, stride, 1, 1, input.size(1), aligned),
              "dw_fwd_cl_rows does not take this problem");
  torch::Tensor out = torch::empty({input.size(0), input.size(1), out_h, out_w},
                                   input.options().memory_format(at::MemoryFormat::ChannelsLast));
  out.fill_(NAN);
  const torch::Tensor w = weight.contiguous();
  const torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  rows::Launch l{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emulate_dw_fwd_cl_rows", [&] {
    if (K == 3 && stride == 1) l = run_launch<scalar_t, 3, 1>(input, w, b, out, pad_top, pad_left, flip, sm_count);
    if (K == 3 && stride == 2) l = run_launch<scalar_t, 3, 2>(input, w, b, out, pad_top, pad_left, flip, sm_count);
    if (K == 5 && stride == 1) l = run_launch<scalar_t, 5, 1>(input, w, b, out, pad_top, pad_left, flip, sm_count);
    if (K == 5 && stride == 2) l = run_launch<scalar_t, 5, 2>(input, w, b, out, pad_top, pad_left, flip, sm_count);
  });
  return {out, {l.grid_x, l.grid_y, l.block_x, l.block_y}};
}

template <typename scalar_t, int K, int S>
void run_nchw_vec_launch(const torch::Tensor& in, const torch::Tensor& weight, const torch::Tensor& bias,
                         torch::Tensor& out, int64_t pad_top, bool flip) {
  const vec::Geom g = vec::make_geom<scalar_t>(in.size(0), in.size(1), in.size(2), in.size(3), out.size(2),
                                               out.size(3), pad_top);
  const int64_t blocks = vec::launch_blocks(g);
  const int32_t step = static_cast<int32_t>(blocks * vec::kThreads);
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  for (int64_t block = 0; block < blocks; ++block) {
    for (int thread = 0; thread < vec::kThreads; ++thread) {
      vec::forward_thread<scalar_t, K, S>(in.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), b,
                                          out.mutable_data_ptr<scalar_t>(), g, flip,
                                          static_cast<int32_t>(block * vec::kThreads + thread), step);
    }
  }
}

// input [N, C, Hi, Wi] contiguous; left padding k // 2 (what the kernel takes), top padding and the
// output size as the caller computed them. Output starts as NaN.
torch::Tensor nchw_vec_forward(const torch::Tensor& input, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& bias, int64_t stride, int64_t pad_top,
                               int64_t pad_left, int64_t out_h, int64_t out_w, bool flip) {
  TORCH_CHECK(input.dim() == 4 && input.is_contiguous(), "input: contiguous 4-D");
  const int64_t K = weight.size(2);
  torch::Tensor out = torch::empty({input.size(0), input.size(1), out_h, out_w}, input.options());
  out.fill_(NAN);
  const torch::Tensor w = weight.contiguous();
  const torch::Tensor b = bias.has_value() ? bias->contiguous() : torch::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "emulate_dw_fwd_nchw_vec", [&] {
    const auto vec_bytes = static_cast<uintptr_t>(sizeof(scalar_t) * vec::Width<scalar_t>::VEC);
    const bool aligned = reinterpret_cast<uintptr_t>(input.const_data_ptr()) % vec_bytes == 0 &&
                         reinterpret_cast<uintptr_t>(out.const_data_ptr()) % vec_bytes == 0;
    TORCH_CHECK(vec::supports<scalar_t>(K, weight.size(3), stride, stride, 1, 1, pad_left, input.size(3), out_w,
                                        aligned),
                "dw_fwd_nchw_vec does not take this problem");
    if (K == 3 && stride == 1) run_nchw_vec_launch<scalar_t, 3, 1>(input, w, b, out, pad_top, flip);
    if (K == 3 && stride == 2) run_nchw_vec_launch<scalar_t, 3, 2>(input, w, b, out, pad_top, flip);
    if (K == 5 && stride == 1) run_nchw_vec_launch<scalar_t, 5, 1>(input, w, b, out, pad_top, flip);
    if (K == 5 && stride == 2) run_nchw_vec_launch<scalar_t, 5, 2>(input, w, b, out, pad_top, flip);
    if (K == 7 && stride == 1) run_nchw_vec_launch<scalar_t, 7, 1>(input, w, b, out, pad_top, flip);
    if (K == 7 && stride == 2) run_nchw_vec_launch<scalar_t, 7, 2>(input, w, b, out, pad_top, flip);
  });
  return out;
}

}  // namespace

void register_grid_sample(pybind11::module& m);  // grid_sample.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("depthwise_cl_rows_forward", &forward);
  m.def("depthwise_nchw_vec_forward", &nchw_vec_forward);
  register_grid_sample(m);
}
