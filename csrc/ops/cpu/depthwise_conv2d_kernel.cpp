// Depthwise 2-D convolution on the CPU: reference op F.conv2d(groups=C), as used by MobileNets
// (Howard et al., 2017) and large-kernel nets (RepLKNet, Ding et al., 2022).
//
// Why it is written this way:
// - NCHW, fp32/fp64 with at least a vector's worth of channels: blocks of 8 (4) channels are
//   transposed (8x8 vector transposes) into zero-padded channels-last tiles, and each tap is one
//   multiply-add over the block's channels, 8 output pixels at a time (transposed in registers
//   and stored straight into the NCHW planes when the map is 8 or more wide). The unit-stride
//   input gradient is gathered (a flipped-kernel forward); strided ones are scattered.
// - NCHW otherwise (fewer channels, fp16/bf16 without the AVX-512 planes below): one (n, c)
//   plane at a time. The plane is copied, zero-padded, converted to the accumulation type and
//   split into width-stride phases, into a per-thread buffer that stays in L1/L2. After that,
//   every tap is an unchecked unit-stride vector load, with 4 output vectors kept in registers
//   across the window. Any input strides are read without a .contiguous() copy.
// - channels_last vectorises over channels: each tap is a multiply-add of channel vectors.
//   Small windows go pixel by pixel; large windows go channel block by channel block.
// - Backward never uses atomics. The weight gradient of a channel (block) is summed by one thread
//   in a fixed order. At unit stride the input gradient is a forward pass with the flipped kernel.
// - Hot loops are compiled for x86-64-v4, v3 and a baseline, picked at load time by GCC's
//   target_clones, with 32-byte GCC vectors (native on AVX2 and AVX-512).
// - On CPUs with AVX-512, fp32 takes the kernels of depthwise_avx512/ instead where they apply:
//   NCHW 3x3/5x5 at stride 1 and 2 (planes read in place, no tiles); channels_last forward and input
//   gradient of any window, weight gradient of 3x3/5x5. bf16 and fp16 take the same kernels:
//   NCHW planes widened to fp32 copies a plane at a time, channels_last rows read as they are
//   (widened in registers); each result is rounded once.
//   Everything else remains the path for other CPUs, dtypes and windows.
// - The NCHW plane loops (AVX-512 planes, bordered planes, and the channel tiles on maps up to
//   14x14) fetch the planes a thread makes next when planes are small (7x7 to 28x28) or strided
//   (see plane_prefetch.h): out of cache, as between a network's layers, a 14x14 plane took a few
//   hundred cycles of waiting on memory, and the loads of one plane reach too few lines at once
//   (32x512x14x14, 2 threads, forward + backward from cold caches: 5.7 -> 2.9 ms).
//
// This file chooses the path of each call and holds the forward, backward and ATen entry points.
// It includes, in this one translation unit, depthwise_conv2d_vector_kernels.h (the portable
// plane, row and tile kernels) and depthwise_conv2d_buffers.h (plane and tile loads and stores).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/depthwise_conv2d_checks.h"
#include "ops/cpu/depthwise_conv2d_avx512.h"
#include "ops/cpu/depthwise_conv2d_buffers.h"
#include "ops/cpu/depthwise_conv2d_vector_kernels.h"
#include "ops/cpu/output_allocator.h"
#include "ops/cpu/plane_prefetch.h"
#include "ops/cpu/streaming_stores.h"

namespace fastcnn {

bool depthwise::avx512::enabled() {
#if FASTCNN_AVX512_PLANES
  static const bool cpu_has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                     __builtin_cpu_supports("avx512vl");
#else
  constexpr bool cpu_has_avx512 = false;
#endif
  if (!cpu_has_avx512) return false;
  const char* flag = std::getenv("FASTCNN_AVX512");
  return !(flag && flag[0] == '0');
}

// AVX512_BF16 (vdpbf16ps) besides enabled()'s; FASTCNN_AVX512_BF16=0 turns it off (read on
// every call: A/B timing, and tests that hold the widened rows to it).
bool depthwise::avx512::bf16_dot_enabled() {
#if FASTCNN_AVX512_PLANES
  static const bool cpu_has_bf16_dot = __builtin_cpu_supports("avx512bf16");
#else
  constexpr bool cpu_has_bf16_dot = false;
#endif
  if (!(cpu_has_bf16_dot && enabled())) return false;
  const char* flag = std::getenv("FASTCNN_AVX512_BF16");
  return !(flag && flag[0] == '0');
}

bool depthwise::avx512::rolled_rows_enabled() {
  const char* flag = std::getenv("FASTCNN_DEPTHWISE_ROLLED");
  return !(flag && flag[0] == '0');
}

bool depthwise::avx512::supports_weight_grad_nhwc(int64_t kernel_h, int64_t kernel_w, int64_t stride_w,
                                                   int64_t dilation_w) {
  if (kernel_h == kernel_w && (kernel_h == 3 || kernel_h == 5)) return true;
  return kernel_w >= 7 && kernel_w <= 9 && stride_w == 1 && dilation_w == 1;
}

bool depthwise::avx512::supports(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                 int64_t dilation_h, int64_t dilation_w) {
  if (kernel_h != kernel_w || !(kernel_h == 3 || kernel_h == 5) || dilation_h != 1) return false;
  return (stride_h == 1 && stride_w == 1) || (stride_h == 2 && stride_w == 2 && dilation_w == 1);
}

// Measured against the 8-lane channel tiles (2 threads, forward): 7x7 on 56x56 maps 1.5x faster,
// 13x13 1.8x, 31x31 1.6x; 3x3 dilated or 1x7 on 56-112 wide maps 0.92-0.96x (few taps: the copy
// costs more). 7x7 windows on 14x14 maps since they run as one block of 14 rows: 1.55x (8x384),
// 1.74x (32x512); on 7x7 maps (7 of 16 lanes) 0.99-1.25x and still below PyTorch: tiles.
bool depthwise::avx512::supports_bordered(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w,
                                          int64_t out_w) {
  return stride_h == 1 && stride_w == 1 && kernel_h * kernel_w >= 25 &&
         (out_w >= 24 || (kernel_h == 7 && kernel_w == 7 && out_w >= 14));
}

namespace {

using depthwise::Geometry;

// Tiles need a vector's worth of channels. Measured here once the tile kernels blocked their
// output pixels (one thread, freed memory reused, ms forward / backward, planes -> tiles):
// 32x64x112x112 stride 2 8.5/23.4 -> 4.9/11.3, 32x32x112x112 5.5/10.6 -> 4.6/8.3,
// 8x128x56x56 7x7 9.0/17.9 -> 5.9/12.1, 31x31 146/281 -> 123/199. At N=1 with unit stride the two
// are within 10% of each other; strided N=1 maps are 2-3x faster in tiles.
template <typename T>
bool use_tiles(const Geometry& g) {
  return g.channels >= Simd<T>::width;
}

PlaneShape plane_shape(const Geometry& g) {
  return make_plane_shape(g.out_h, g.out_w, g.in_w + g.pad_left + g.pad_right, g.kernel_h, g.kernel_w, g.stride_h,
                          g.stride_w, g.dilation_h, g.dilation_w);
}

// Whether a dense channels_last fp32 output is written with streaming stores by the AVX-512 row
// kernels: large enough for a call that reads read_bytes besides (cpu::stream_output_bytes), and
// every channel vector one whole line.
bool stream_channels_last(const at::Tensor& output, int64_t read_bytes = 0) {
  return output.size(1) % depthwise::avx512::kLanes == 0 && reinterpret_cast<uintptr_t>(output.const_data_ptr()) % 64 == 0 &&
         cpu::stream_output_bytes(output.nbytes(), read_bytes);
}

bool use_channels_last(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// fp32 NCHW 3x3 and 5x5 windows at stride 1 or 2 go to the AVX-512 plane kernels where the CPU
// has them (planes read in place: no padded copy, no transpose to channel blocks).
bool use_avx512_planes(const Geometry& g) {
  return depthwise::avx512::supports(g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.dilation_h, g.dilation_w) &&
         depthwise::avx512::enabled();
}

depthwise::avx512::ImageGeometry avx512_image_geometry(const Geometry& g) {
  return {g.channels, g.in_h, g.in_w, g.out_h, g.out_w, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w,
          g.pad_top, g.pad_left, g.dilation_h, g.dilation_w};
}

depthwise::avx512::PlaneGeometry avx512_forward_geometry(const Geometry& g, int64_t in_row_stride,
                                                         int64_t out_row_stride) {
  return {g.in_h,     g.in_w,     in_row_stride, g.out_h,      g.out_w,      out_row_stride,
          g.kernel_h, g.kernel_w, g.pad_top,     g.pad_left,   g.dilation_h, g.dilation_w,
          g.stride_h, false,      depthwise::avx512::rolled_rows_enabled()};
}

// The unit-stride input gradient as a forward convolution: grad_output read through the window
// that reaches (kernel - 1) * dilation - pad beyond it, with the flipped kernel.
depthwise::avx512::PlaneGeometry avx512_grad_input_geometry(const Geometry& g, int64_t go_row_stride,
                                                            int64_t gi_row_stride) {
  return {g.out_h, g.out_w, go_row_stride, g.in_h, g.in_w, gi_row_stride,
          g.kernel_h, g.kernel_w, (g.kernel_h - 1) * g.dilation_h - g.pad_top,
          (g.kernel_w - 1) * g.dilation_w - g.pad_left, g.dilation_h, g.dilation_w, 1,
          false, depthwise::avx512::rolled_rows_enabled()};
}

// 16-bit floats (bf16, fp16), which the AVX-512 fp32 kernels take widened to fp32: NCHW planes a
// plane at a time into a thread's scratch (below), channels_last rows a vector at a time in
// registers (forward_nhwc_native and the row kernels); each result is rounded back once (to
// nearest even, as PyTorch converts).
template <typename scalar_t>
constexpr bool kWidened = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;

template <typename scalar_t>
void to_float(const scalar_t* src, float* dst, int64_t count) {
  static_assert(kWidened<scalar_t> && sizeof(scalar_t) == sizeof(uint16_t), "a 16-bit float");
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    depthwise::avx512::bf16_to_float(bits, dst, count);
  else
    depthwise::avx512::half_to_float(bits, dst, count);
}

template <typename scalar_t>
void from_float(const float* src, scalar_t* dst, int64_t count) {
  static_assert(kWidened<scalar_t> && sizeof(scalar_t) == sizeof(uint16_t), "a 16-bit float");
  auto* bits = reinterpret_cast<uint16_t*>(dst);
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
    depthwise::avx512::float_to_bf16(src, bits, count);
  else
    depthwise::avx512::float_to_half(src, bits, count);
}

// A plane of rows row_stride elements apart to a dense fp32 plane, and back.
template <typename scalar_t>
void widen_plane(const scalar_t* src, int64_t rows, int64_t cols, int64_t row_stride, float* dst) {
  if (row_stride == cols) return to_float(src, dst, rows * cols);
  for (int64_t r = 0; r < rows; ++r) to_float(src + r * row_stride, dst + r * cols, cols);
}

template <typename scalar_t>
void narrow_plane(const float* src, int64_t rows, int64_t cols, scalar_t* dst, int64_t row_stride) {
  if (row_stride == cols) return from_float(src, dst, rows * cols);
  for (int64_t r = 0; r < rows; ++r) from_float(src + r * cols, dst + r * row_stride, cols);
}

template <typename scalar_t>
std::vector<float> float_values(const scalar_t* values, int64_t count) {
  std::vector<float> converted(count);
  for (int64_t i = 0; i < count; ++i) converted[i] = static_cast<float>(values[i]);
  return converted;
}

// ---------------------------------------------------------------------------------------------
// Forward

// bf16/fp16 NCHW through the fp32 AVX-512 plane kernels (use_avx512_planes' windows): each plane
// widened to a dense fp32 plane in the thread's scratch, the fp32 kernel run there, each output
// rounded once, so the result is the fp32 op's output rounded. PyTorch's bf16 NCHW depthwise is
// oneDNN's in bf16; against it the portable plane loops ran 0.34-0.76x on the strided, 14x14 and
// 7x7 MobileNet v1 layers (N=32, 2 threads), these 1.4-4.6x.
template <typename scalar_t>
void forward_nchw_widened(const scalar_t* in, at::IntArrayRef in_strides, const scalar_t* w, const scalar_t* b,
                          scalar_t* out, const Geometry& g) {
  const int64_t kernel_area = g.kernel_h * g.kernel_w, in_area = g.in_h * g.in_w, out_area = g.out_h * g.out_w;
  const auto shape = avx512_forward_geometry(g, g.in_w, g.out_w);
  const std::vector<float> taps = float_values(w, g.channels * kernel_area);
  const std::vector<float> bias = b ? float_values(b, g.channels) : std::vector<float>(g.channels, 0.f);
  depthwise::avx512::FlatPlane flat;
  const bool pairs = depthwise::avx512::pairs_planes(shape);
  const bool use_flat = !pairs && depthwise::avx512::flat_plane(shape, &flat);
  const int64_t ahead = cpu::prefetch_distance(in_area * static_cast<int64_t>(sizeof(scalar_t)), g.stride_h > 1);
  at::parallel_for(0, g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wide_in(2 * in_area), wide_out(2 * out_area);
    cpu::PlanePrefetcher prefetcher(begin, end, ahead, [&](int64_t plane) {
      cpu::prefetch_plane(in + plane / g.channels * in_strides[0] + plane % g.channels * in_strides[1], g.in_h, g.in_w,
                          in_strides[2]);
      cpu::prefetch_plane(out + plane * out_area, g.out_h, g.out_w, g.out_w);
    });
    const auto widen = [&](int64_t plane, float* dst) {
      widen_plane(in + plane / g.channels * in_strides[0] + plane % g.channels * in_strides[1], g.in_h, g.in_w,
                  in_strides[2], dst);
    };
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % g.channels;
      prefetcher.before(plane, pairs ? 2 : 1);
      widen(plane, wide_in.data());
      int64_t planes = 1;
      if (pairs && plane + 1 < end) {
        const int64_t c2 = (plane + 1) % g.channels;
        widen(plane + 1, wide_in.data() + in_area);
        depthwise::avx512::forward_plane_pair(wide_in.data(), wide_in.data() + in_area, &taps[c * kernel_area],
                                              &taps[c2 * kernel_area], bias[c], bias[c2], wide_out.data(),
                                              wide_out.data() + out_area, shape);
        planes = 2;
      } else if (use_flat) {
        depthwise::avx512::forward_plane_flat(wide_in.data(), &taps[c * kernel_area], bias[c], wide_out.data(), flat);
      } else {
        depthwise::avx512::forward_plane(wide_in.data(), &taps[c * kernel_area], bias[c], wide_out.data(), shape);
      }
      // The output is dense NCHW: a pair's planes are adjacent.
      from_float(wide_out.data(), out + plane * out_area, planes * out_area);
      plane += planes - 1;
    }
  });
}

// A thread's copy of the ring's weights, each block of 64 channels made the first time it is
// wanted.
class RingWeights {
 public:
  RingWeights(const depthwise::avx512::ImageGeometry& g, int64_t blocks)
      : g_(g), block_floats_(depthwise::avx512::nhwc_ring_weight_floats(g)), weights_(blocks * block_floats_),
        made_(blocks, false) {}
  const float* of(int64_t block, const float* weight) {
    float* block_weights = weights_.data() + block * block_floats_;
    if (!made_[block])
      depthwise::avx512::nhwc_ring_weights(weight, block * depthwise::avx512::kNhwcRingChannels, g_, block_weights);
    made_[block] = true;
    return block_weights;
  }

 private:
  depthwise::avx512::ImageGeometry g_;
  int64_t block_floats_;
  std::vector<float> weights_;
  std::vector<bool> made_;
};

// fp32 NCHW 7-wide windows at unit stride on maps too narrow for the bordered planes (ConvNeXt's
// 7x7 maps, where a plane's row fills 7 of 16 lanes): 64 planes of an image transposed into
// 64-channel pixels, made by the channels_last ring (see supports_nhwc_ring), and transposed
// back. 8x768x7x7, 2 threads: the 8-lane channel tiles took 0.60-0.74 ms, this 0.32, PyTorch 0.53.
bool forward_nchw_ring(const float* in, at::IntArrayRef in_strides, const float* w, const float* b, float* out,
                       const Geometry& g) {
  const auto image = avx512_image_geometry(g);
  if (!(depthwise::avx512::enabled() && g.kernel_w == 7 && g.stride_h == 1 && g.stride_w == 1 &&
        depthwise::avx512::supports_nhwc_ring(image) &&
        !depthwise::avx512::supports_bordered(g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.out_w) &&
        depthwise::avx512::rolled_rows_enabled()))
    return false;
  constexpr int64_t kBlock = depthwise::avx512::kNhwcRingChannels;
  const int64_t C = g.channels, images = g.batch, blocks = (C + kBlock - 1) / kBlock;
  const int64_t in_area = g.in_h * g.in_w, out_area = g.out_h * g.out_w;
  at::parallel_for(0, images * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(depthwise::avx512::nhwc_ring_floats(image), 0.f);
    std::vector<float> pixels_in(in_area * kBlock), pixels_out(out_area * kBlock);
    RingWeights weights(image, blocks);
    auto block_image = image;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, block = item % blocks, c0 = block * kBlock;
      const int64_t channels = std::min(kBlock, C - c0);
      block_image.channels = channels;
      const float* planes = in + n * in_strides[0] + c0 * in_strides[1];
      for (int64_t y = 0; y < g.in_h; ++y)
        depthwise::avx512::transpose_floats(planes + y * in_strides[2], in_strides[1], channels, g.in_w,
                                            pixels_in.data() + y * g.in_w * channels, channels);
      depthwise::avx512::forward_channels_nhwc_ring(pixels_in.data(), weights.of(block, w), b ? b + c0 : nullptr,
                                                    pixels_out.data(), 0, block_image, scratch.data());
      depthwise::avx512::transpose_floats(pixels_out.data(), channels, out_area, channels,
                                          out + (n * C + c0) * out_area, out_area);
    }
  });
  return true;
}

template <typename scalar_t>
void forward_nchw(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& output,
                  const Geometry& g) {
  using T = at::opmath_type<scalar_t>;
  const PlaneShape s = plane_shape(g);
  const int64_t padded_h = g.in_h + g.pad_top + g.pad_bottom, padded_w = g.in_w + g.pad_left + g.pad_right;
  const auto in_strides = input.strides();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const scalar_t* b = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t kernel_area = g.kernel_h * g.kernel_w;
  const int64_t in_area = g.in_h * g.in_w, out_area = g.out_h * g.out_w;

  if constexpr (kWidened<scalar_t>) {
    if (in_strides[3] == 1 && use_avx512_planes(g)) return forward_nchw_widened(in, in_strides, w, b, out, g);
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (in_strides[3] == 1 && use_avx512_planes(g)) {
      auto shape = avx512_forward_geometry(g, in_strides[2], g.out_w);
      shape.stream_output = cpu::stream_output_bytes(output.nbytes(), input.nbytes());
      depthwise::avx512::FlatPlane flat;
      const bool pairs = depthwise::avx512::pairs_planes(shape);
      const bool use_flat = !pairs && depthwise::avx512::flat_plane(shape, &flat);
      const int64_t ahead = cpu::prefetch_distance(in_area * static_cast<int64_t>(sizeof(float)), g.stride_h > 1);
      at::parallel_for(0, g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
        cpu::PlanePrefetcher prefetcher(begin, end, ahead, [&](int64_t plane) {
          cpu::prefetch_plane(in + plane / g.channels * in_strides[0] + plane % g.channels * in_strides[1], g.in_h,
                              g.in_w, in_strides[2]);
          if (!shape.stream_output) cpu::prefetch_plane(out + plane * out_area, g.out_h, g.out_w, g.out_w);
        });
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / g.channels, c = plane % g.channels;
          const float* in_plane = in + n * in_strides[0] + c * in_strides[1];
          prefetcher.before(plane, pairs ? 2 : 1);
          if (pairs && plane + 1 < end) {
            const int64_t n2 = (plane + 1) / g.channels, c2 = (plane + 1) % g.channels;
            depthwise::avx512::forward_plane_pair(in_plane, in + n2 * in_strides[0] + c2 * in_strides[1],
                                                  w + c * kernel_area, w + c2 * kernel_area, b ? b[c] : 0.f,
                                                  b ? b[c2] : 0.f, out + plane * out_area,
                                                  out + (plane + 1) * out_area, shape);
            ++plane;
            continue;
          }
          if (use_flat)
            depthwise::avx512::forward_plane_flat(in_plane, w + c * kernel_area, b ? b[c] : 0.f,
                                                  out + plane * out_area, flat);
          else
            depthwise::avx512::forward_plane(in_plane, w + c * kernel_area, b ? b[c] : 0.f, out + plane * out_area,
                                             shape);
        }
        if (shape.stream_output) cpu::stream_fence();
      });
      return;
    }
    if (in_strides[3] == 1 && forward_nchw_ring(in, in_strides, w, b, out, g)) return;
    // Other unit-stride windows (7x7, 31x31, rectangular, dilated): a bordered copy per plane.
    // 8x128x56x56 7x7, 2 threads: 5.2 ms on the 8-lane channel tiles below, PyTorch 4.0 ms.
    if (in_strides[3] == 1 && depthwise::avx512::supports_bordered(g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.out_w) &&
        depthwise::avx512::enabled()) {
      const auto shape = avx512_forward_geometry(g, in_strides[2], g.out_w);
      const int64_t ahead = cpu::prefetch_distance(in_area * static_cast<int64_t>(sizeof(float)), false);
      at::parallel_for(0, g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> bordered(depthwise::avx512::bordered_plane_floats(shape), 0.f);
        cpu::PlanePrefetcher prefetcher(begin, end, ahead, [&](int64_t plane) {
          cpu::prefetch_plane(in + plane / g.channels * in_strides[0] + plane % g.channels * in_strides[1], g.in_h,
                              g.in_w, in_strides[2]);
          cpu::prefetch_plane(out + plane * out_area, g.out_h, g.out_w, g.out_w);
        });
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / g.channels, c = plane % g.channels;
          prefetcher.before(plane);
          depthwise::avx512::forward_plane_bordered(in + n * in_strides[0] + c * in_strides[1], w + c * kernel_area,
                                                    b ? b[c] : 0.f, out + plane * out_area, shape, bordered.data());
        }
      });
      return;
    }
  }
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (use_tiles<T>(g)) {
      constexpr int64_t L = Simd<T>::width;
      const int64_t blocks = (g.channels + L - 1) / L;
      // One step ahead, where a step's L planes are at most kPrefetchMaxPlaneBytes (maps up to
      // 14x14): in process from flushed caches, FASTCNN_AVX512=0, N=32, 2 threads: 14x14 and 7x7
      // forward 1.35-1.66x, forward+backward 1.25-1.58x faster; 28x28, and 56x56 at stride 2,
      // 0.92-0.98x with it, so without.
      const int64_t ahead = cpu::prefetch_distance(L * in_area * static_cast<int64_t>(sizeof(scalar_t)), false) > 0;
      at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
        cpu::PlanePrefetcher prefetcher(begin, end, ahead, [&](int64_t item) {
          const int64_t n = item / blocks, c0 = item % blocks * L;
          for (int64_t c = c0; c < std::min(c0 + L, g.channels); ++c) {
            cpu::prefetch_plane(in + n * in_strides[0] + c * in_strides[1], g.in_h, (g.in_w - 1) * in_strides[3] + 1,
                                in_strides[2]);
            cpu::prefetch_plane(out + (n * g.channels + c) * out_area, g.out_h, g.out_w, g.out_w);
          }
        });
        const auto tile_buffer = bordered_tile<T>(padded_h, padded_w, g.pad_top, g.pad_left, g.in_h, g.in_w);
        const bool direct_output = std::is_same_v<T, float> && g.out_w >= L;
        const auto out_buffer = scratch<T>(direct_output ? 0 : out_area * L);
        T* tile = tile_buffer.get();
        T* out_tile = out_buffer.get();
        std::vector<T> block_taps(kernel_area * L), block_bias(L);
        for (int64_t item = begin; item < end; ++item) {
          prefetcher.before(item);
          const int64_t n = item / blocks, c0 = item % blocks * L, lanes = std::min(L, g.channels - c0);
          for (int64_t t = 0; t < kernel_area; ++t)
            for (int64_t l = 0; l < L; ++l) block_taps[t * L + l] = l < lanes ? w[(c0 + l) * kernel_area + t] : T(0);
          for (int64_t l = 0; l < L; ++l) block_bias[l] = b && l < lanes ? b[c0 + l] : T(0);
          load_tile(in + n * in_strides[0] + c0 * in_strides[1], in_strides[1], lanes, g.in_h, g.in_w, in_strides[2],
                    in_strides[3], g.pad_top, g.pad_left, padded_w, tile);
          scalar_t* out_block = out + (n * g.channels + c0) * out_area;
          if constexpr (std::is_same_v<T, float>) {
            if (direct_output) {
              float* planes[L];
              for (int64_t l = 0; l < L; ++l) planes[l] = out_block + std::min(l, lanes - 1) * out_area;
              forward_tile_to_planes(tile, block_taps.data(), block_bias.data(), planes, lanes, g.out_w, s, padded_w);
              continue;
            }
          }
          forward_tile(tile, block_taps.data(), block_bias.data(), out_tile, s, padded_w);
          store_tile(out_tile, 0, 0, g.out_w, lanes, g.out_h, g.out_w, out_block, out_area, g.out_w, 1);
        }
      });
      return;
    }
  }
  at::parallel_for(0, g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    // Two padded buffers: plane i+1 is loaded before plane i is convolved, so the vector loads
    // of a small plane do not hit its own just-issued narrow stores (a store-forwarding stall
    // that made 14x14 maps 2x slower).
    const int64_t padded_size = padded_h * s.row_stride + kSlack;
    std::vector<T> padded(2 * padded_size), taps(kernel_area);
    std::vector<T> out_buffer(std::is_same_v<scalar_t, T> ? 0 : out_area);
    const auto load_plane = [&](int64_t plane) {
      const int64_t n = plane / g.channels, c = plane % g.channels;
      load_window(in + n * in_strides[0] + c * in_strides[1], g.in_h, g.in_w, in_strides[2], in_strides[3], g.pad_top,
                  g.pad_left, padded.data() + (plane % 2) * padded_size, padded_h, padded_w, g.stride_w);
    };
    load_plane(begin);
    for (int64_t plane = begin; plane < end; ++plane) {
      if (plane + 1 < end) load_plane(plane + 1);
      const T* window = padded.data() + (plane % 2) * padded_size;
      const int64_t c = plane % g.channels;
      for (int64_t t = 0; t < kernel_area; ++t) taps[t] = static_cast<T>(w[c * kernel_area + t]);
      const T bias_value = b ? static_cast<T>(b[c]) : T(0);
      scalar_t* out_plane = out + plane * out_area;
      if constexpr (std::is_same_v<scalar_t, T>) {
        forward_plane(window, taps.data(), bias_value, out_plane, s);
      } else {
        forward_plane(window, taps.data(), bias_value, out_buffer.data(), s);
        for (int64_t i = 0; i < out_area; ++i) out_plane[i] = static_cast<scalar_t>(out_buffer[i]);
      }
    }
  });
}

// Weights as [kH*kW][C] in the accumulation type, so each tap is a contiguous channel vector.
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
std::vector<T> taps_by_channel(const at::Tensor& weight, const Geometry& g) {
  const int64_t kernel_area = g.kernel_h * g.kernel_w;
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  std::vector<T> taps(kernel_area * g.channels);
  // In blocks of 16 channels x 8 taps: a channel's taps are C floats apart, and with C a multiple
  // of 1024 every write of a channel-outer loop fell in one L1 set (1x1024x7x7: 230 us, the
  // convolution 50 us); 8 taps' lines fit in a set's ways.
  constexpr int64_t kChannelBlock = 16, kTapBlock = 8;
  for (int64_t c0 = 0; c0 < g.channels; c0 += kChannelBlock) {
    const int64_t c1 = std::min(g.channels, c0 + kChannelBlock);
    for (int64_t t0 = 0; t0 < kernel_area; t0 += kTapBlock) {
      const int64_t t1 = std::min(kernel_area, t0 + kTapBlock);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t t = t0; t < t1; ++t) taps[t * g.channels + c] = static_cast<T>(w[c * kernel_area + t]);
    }
  }
  return taps;
}

// Reads `channels` values of a channels_last pixel as T (no copy when scalar_t is T already).
template <typename scalar_t, typename T>
FASTCNN_INLINE const T* channel_vector(const scalar_t* src, int64_t channels, T* buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return src;
  } else {
    for (int64_t c = 0; c < channels; ++c) buffer[c] = static_cast<T>(src[c]);
    return buffer;
  }
}

RowShape row_shape(const Geometry& g) {
  return {g.channels, g.in_h, g.in_w, g.out_w, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w,
          g.pad_top, g.pad_left, g.dilation_h, g.dilation_w};
}

// channels_last windows of this many taps and more (at unit stride, rows of 24 outputs and more)
// run through bordered planes: 16 channels scattered into planes and gathered back. In-process
// against the sliding rows, 8x128x56x56, 2 threads: 31x31 1.34x faster, 13x13 1.14x, 11x11 even.
constexpr int64_t kNhwcBorderedTaps = 169;

// bf16/fp16 channels_last rows, read and written as they are by the AVX-512 row kernels
// (forward_row_nhwc_bf16 / _fp16 and the input- and weight-gradient rows): each 16-bit vector is
// widened to fp32 as it is loaded, each output rounded once as it is stored, so a result is the
// fp32 kernel's on the widened tensor, rounded. Against PyTorch's bf16 (oneDNN, which moves half
// the bytes of fp32; 2 threads, N=32): the portable loops ran 0.42x (32x128x56x56) and 0.49x
// (32x512x14x14) forward; the rows widened to fp32 in bands of 8 into a thread's scratch
// 0.96-1.02x and 0.89-1.09x (0.88x over the 13 MobileNet v1 layers); reading the 16-bit rows in
// the kernel 1.4-1.9x faster than the bands.
template <typename scalar_t>
const uint16_t* bits_of(const scalar_t* values) {
  static_assert(kWidened<scalar_t>, "a 16-bit float");
  return reinterpret_cast<const uint16_t*>(values);
}

template <typename scalar_t>
uint16_t* bits_of(scalar_t* values) {
  static_assert(kWidened<scalar_t>, "a 16-bit float");
  return reinterpret_cast<uint16_t*>(values);
}

// The forward (image: avx512_image_geometry) or unit-stride input gradient (flipped taps,
// flipped_image_geometry over grad_output).
template <typename scalar_t>
void forward_nhwc_native(const scalar_t* in, const float* taps, const float* bias, scalar_t* out, int64_t images,
                         const depthwise::avx512::ImageGeometry& image) {
  const int64_t C = image.channels;
  at::parallel_for(0, images * image.out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint16_t* image_in = bits_of(in) + row / image.out_h * image.in_h * image.in_w * C;
      uint16_t* out_row = bits_of(out) + row * image.out_w * C;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
        depthwise::avx512::forward_row_nhwc_bf16(image_in, taps, bias, out_row, row % image.out_h, image);
      else
        depthwise::avx512::forward_row_nhwc_fp16(image_in, taps, bias, out_row, row % image.out_h, image);
    }
  });
}

// The input gradient at any stride, gathered (image: avx512_image_geometry, whose out_* are
// grad_output's).
template <typename scalar_t>
void grad_input_nhwc_native(const scalar_t* grad_out, const float* taps, scalar_t* grad_in, int64_t images,
                            const depthwise::avx512::ImageGeometry& image) {
  const int64_t C = image.channels;
  at::parallel_for(0, images * image.in_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint16_t* image_go = bits_of(grad_out) + row / image.in_h * image.out_h * image.out_w * C;
      uint16_t* gi_row = bits_of(grad_in) + row * image.in_w * C;
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
        depthwise::avx512::grad_input_row_nhwc_bf16(image_go, taps, gi_row, row % image.in_h, image);
      else
        depthwise::avx512::grad_input_row_nhwc_fp16(image_go, taps, gi_row, row % image.in_h, image);
    }
  });
}

// The weight (and bias) gradient into the fp32 partials of backward_nhwc: its fixed chunks of
// output rows, added in the same order as the fp32 path.
template <typename scalar_t>
void weight_grad_nhwc_native(const scalar_t* grad_out, const scalar_t* in, float* partials, int64_t chunks,
                             bool want_bias, const Geometry& g) {
  const auto image = avx512_image_geometry(g);
  const int64_t C = g.channels, kernel_area = g.kernel_h * g.kernel_w, partial_size = (kernel_area + 1) * C;
  const int64_t rows = g.batch * g.out_h;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partials + chunk * partial_size;
      float* part_bias = want_bias ? part + kernel_area * C : nullptr;
      for (int64_t row = chunk * rows / chunks; row < (chunk + 1) * rows / chunks; ++row) {
        const uint16_t* image_in = bits_of(in) + row / g.out_h * g.in_h * g.in_w * C;
        const uint16_t* go_row = bits_of(grad_out) + row * g.out_w * C;
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
          depthwise::avx512::weight_grad_row_nhwc_bf16(image_in, go_row, part, part_bias, row % g.out_h, image);
        else
          depthwise::avx512::weight_grad_row_nhwc_fp16(image_in, go_row, part, part_bias, row % g.out_h, image);
      }
    }
  });
}

// The bf16 weight gradient through the pair dot products where the CPU has them (see
// rows_nhwc_bf16_dot.cpp): the same fixed chunks of output rows as weight_grad_nhwc_native, each
// chunk's rows one image and one group of 32 channels at a time into the chunk's sums.
bool weight_grad_nhwc_bf16_dot(const at::BFloat16* grad_out, const at::BFloat16* in, float* partials, int64_t chunks,
                               bool want_bias, const Geometry& g) {
  const auto image = avx512_image_geometry(g);
  if (!(depthwise::avx512::bf16_dot_enabled() && depthwise::avx512::supports_nhwc_bf16_dot_weight_grad(image)))
    return false;
  const int64_t C = g.channels, kernel_area = g.kernel_h * g.kernel_w, partial_size = (kernel_area + 1) * C;
  const int64_t rows = g.batch * g.out_h, groups = depthwise::avx512::nhwc_bf16_dot_groups(image);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(depthwise::avx512::nhwc_bf16_dot_weight_grad_floats(image));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(sums.begin(), sums.end(), 0.f);
      const int64_t first = chunk * rows / chunks, last = (chunk + 1) * rows / chunks;
      for (int64_t row = first; row < last;) {
        const int64_t n = row / g.out_h, oy0 = row % g.out_h, oy1 = std::min(g.out_h, oy0 + (last - row));
        for (int64_t group = 0; group < groups; ++group)
          depthwise::avx512::weight_grad_block_nhwc_bf16_dot(bits_of(in) + n * g.in_h * g.in_w * C,
                                                             bits_of(grad_out) + n * g.out_h * g.out_w * C, oy0, oy1,
                                                             group, image, sums.data());
        row += oy1 - oy0;
      }
      float* part = partials + chunk * partial_size;
      depthwise::avx512::nhwc_bf16_dot_weight_grad_add(sums.data(), part, want_bias ? part + kernel_area * C : nullptr,
                                                       image);
    }
  });
  return true;
}

// channels_last windows the ring takes (see supports_nhwc_ring; bf16 and fp16
// widened as the ring is filled): 64 channels of one image at a time, images outermost (with more
// images than threads, each thread's whole): two threads on one image's neighbouring blocks write
// the same lines where a pixel's C values are no whole number of lines (against the images of a
// block one after another, fp32, 2 threads: 32x72x28x28 5x5 2.29 -> 1.40 ms, 32x120x28x28 3.24
// -> 2.84, 8x128x56x56 7x7 3.58 -> 3.41).
//
// 3-wide windows and stride 2 (rows of 7 outputs) take the ring only while the input is at most
// kRingCachedInputBytes, 3x3 windows at stride 2 (the fewest multiply-adds an input byte) an
// eighth of that: a call reads a 64-channel slice of every pixel, a line in four or more, and when
// the image must come from memory rather than cache those strided reads wait where the rows'
// whole-row reads stream (2 threads, in process, ms ring / rows: 1x672x14x14 5x5 stride 2 0.045 /
// 0.068, 8x 0.22 / 0.25, 16x 0.38 / 0.45, 32x 1.09 / 0.96; 1x1024x7x7 3x3 0.034 / 0.051, 8x 0.14
// / 0.17, 32x 0.60 / 0.63; 512x14x14 3x3 stride 2 1x 0.030 / 0.037, 8x 0.141 / 0.126).
constexpr int64_t kRingCachedInputBytes = int64_t{8} << 20;

template <typename scalar_t>
bool forward_nhwc_ring(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& output,
                       const Geometry& g) {
  auto shape = avx512_image_geometry(g);
  shape.stream_output = std::is_same_v<scalar_t, float> && stream_channels_last(output, input.nbytes());
  if (!(depthwise::avx512::supports_nhwc_ring(shape) && depthwise::avx512::rolled_rows_enabled())) return false;
  const bool wide_unit_stride = g.stride_h == 1 && g.stride_w == 1 && (g.kernel_w == 5 || g.kernel_w == 7);
  const int64_t cached = g.kernel_w == 3 && g.stride_w == 2 ? kRingCachedInputBytes / 8 : kRingCachedInputBytes;
  if (!wide_unit_stride && static_cast<int64_t>(input.nbytes()) > cached) return false;
  const int64_t C = g.channels, images = g.batch;
  constexpr int64_t kBlock = depthwise::avx512::kNhwcRingChannels;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  const at::Tensor weight_fp32 = weight.to(at::kFloat), bias_fp32 = bias.defined() ? bias.to(at::kFloat) : bias;
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const float* w = weight_fp32.const_data_ptr<float>();
  const float* b = bias_fp32.defined() ? bias_fp32.const_data_ptr<float>() : nullptr;
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, images * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(depthwise::avx512::nhwc_ring_floats(shape), 0.f);
    RingWeights weights(shape, blocks);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, block = item % blocks, c0 = block * kBlock;
      const scalar_t* image_in = in + n * g.in_h * g.in_w * C;
      scalar_t* image_out = out + n * g.out_h * g.out_w * C;
      if constexpr (std::is_same_v<scalar_t, float>)
        depthwise::avx512::forward_channels_nhwc_ring(image_in, weights.of(block, w), b, image_out, c0, shape,
                                                      scratch.data());
      else if constexpr (std::is_same_v<scalar_t, at::BFloat16>)
        depthwise::avx512::forward_channels_nhwc_ring_bf16(bits_of(image_in), weights.of(block, w), b,
                                                           bits_of(image_out), c0, shape, scratch.data());
      else
        depthwise::avx512::forward_channels_nhwc_ring_fp16(bits_of(image_in), weights.of(block, w), b,
                                                           bits_of(image_out), c0, shape, scratch.data());
    }
    if (shape.stream_output) cpu::stream_fence();
  });
  return true;
}

// bf16 channels_last through AVX512_BF16's pair dot products where the CPU has them and the
// window is one they take (see rows_nhwc_bf16_dot.cpp).
bool takes_nhwc_bf16_dot(const Geometry& g) {
  return depthwise::avx512::bf16_dot_enabled() && depthwise::avx512::supports_nhwc_bf16_dot(avx512_image_geometry(g));
}

bool forward_nhwc_bf16_dot(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                           at::Tensor& output, const Geometry& g) {
  if (!takes_nhwc_bf16_dot(g)) return false;
  const auto shape = avx512_image_geometry(g);
  std::vector<uint32_t> words(depthwise::avx512::nhwc_bf16_dot_weight_words(shape));
  std::vector<float> bias_lanes(depthwise::avx512::nhwc_bf16_dot_bias_floats(shape));
  depthwise::avx512::nhwc_bf16_dot_weights(bits_of(weight.const_data_ptr<at::BFloat16>()),
                                           bias.defined() ? bits_of(bias.const_data_ptr<at::BFloat16>()) : nullptr,
                                           shape, words.data(), bias_lanes.data());
  const uint16_t* in = bits_of(input.const_data_ptr<at::BFloat16>());
  uint16_t* out = bits_of(output.mutable_data_ptr<at::BFloat16>());
  const int64_t image_in = g.in_h * g.in_w * g.channels, image_out = g.out_h * g.out_w * g.channels;
  const int64_t groups = depthwise::avx512::nhwc_bf16_dot_groups(shape);
  // A task is one group's rows of one image (a band of them where there are too few tasks for the
  // threads): a group's input lines stay in L1 from one output row to the next, where walking
  // every group of a row evicted them (in process, 2 threads, N=32, against rows outer: 14x14 and
  // 7x7 maps 1.1x, 32x128x56x56 stride 2 1.6x, 56x56 at unit stride within noise).
  const int64_t wanted = 4 * at::get_num_threads(), images_groups = g.batch * groups;
  const int64_t bands = std::min(g.out_h, std::max<int64_t>(1, (wanted + images_groups - 1) / images_groups));
  const int64_t band = (g.out_h + bands - 1) / bands;
  at::parallel_for(0, g.batch * groups * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / (groups * bands), group = task / bands % groups, oy0 = task % bands * band;
      depthwise::avx512::forward_block_nhwc_bf16_dot(in + n * image_in, words.data(), bias_lanes.data(),
                                                     out + n * image_out, oy0, std::min(g.out_h, oy0 + band), group,
                                                     group + 1, shape);
    }
  });
  return true;
}

template <typename scalar_t>
void forward_nhwc(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& output,
                  const Geometry& g) {
  using T = at::opmath_type<scalar_t>;
  const int64_t C = g.channels;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (forward_nhwc_bf16_dot(input, weight, bias, output, g)) return;
  }
  if constexpr (std::is_same_v<scalar_t, float> || kWidened<scalar_t>) {
    if (depthwise::avx512::enabled() && forward_nhwc_ring<scalar_t>(input, weight, bias, output, g)) return;
  }
  const std::vector<T> taps = taps_by_channel<scalar_t>(weight, g);
  std::vector<T> bias_values(C, T(0));
  if (bias.defined())
    for (int64_t c = 0; c < C; ++c) bias_values[c] = static_cast<T>(bias.const_data_ptr<scalar_t>()[c]);
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();

  if constexpr (std::is_same_v<scalar_t, float>) {
    if (depthwise::avx512::enabled()) {
      const auto shape = avx512_image_geometry(g);
      if (g.kernel_h * g.kernel_w >= kNhwcBorderedTaps &&
          depthwise::avx512::supports_bordered(g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.out_w)) {
        const int64_t blocks = (C + depthwise::avx512::kLanes - 1) / depthwise::avx512::kLanes;
        at::parallel_for(0, g.batch * blocks, 1, [&](int64_t begin, int64_t end) {
          std::vector<float> scratch(depthwise::avx512::nhwc_bordered_floats(shape), 0.f);
          for (int64_t item = begin; item < end; ++item) {
            const int64_t n = item / blocks, c0 = item % blocks * depthwise::avx512::kLanes;
            depthwise::avx512::forward_channels_nhwc_bordered(
                in + n * g.in_h * g.in_w * C, taps.data(), bias.defined() ? bias_values.data() : nullptr,
                out + n * g.out_h * g.out_w * C, c0, shape, scratch.data());
          }
        });
        return;
      }
      auto rows_shape = shape;
      rows_shape.stream_output = stream_channels_last(output, input.nbytes());
      at::parallel_for(0, g.batch * g.out_h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / g.out_h, oy = row % g.out_h;
          depthwise::avx512::forward_row_nhwc(in + n * g.in_h * g.in_w * C, taps.data(),
                                              bias.defined() ? bias_values.data() : nullptr, out + row * g.out_w * C,
                                              oy, rows_shape);
        }
        if (rows_shape.stream_output) cpu::stream_fence();
      });
      return;
    }
  }
  if constexpr (kWidened<scalar_t>) {
    if (depthwise::avx512::enabled()) {
      forward_nhwc_native(in, taps.data(), bias.defined() ? bias_values.data() : nullptr, out, g.batch,
                          avx512_image_geometry(g));
      return;
    }
  }
  if constexpr (std::is_same_v<scalar_t, T>) {
    const RowShape shape = row_shape(g);
    const std::vector<T> zeros(kSlack, T(0));
    at::parallel_for(0, g.batch * g.out_h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.out_h, oy = row % g.out_h;
        forward_row_nhwc(in + n * g.in_h * g.in_w * C, taps.data(), bias.defined() ? bias_values.data() : nullptr,
                         out + row * g.out_w * C, zeros.data(), oy, shape);
      }
    });
    return;
  }
  at::parallel_for(0, g.batch * g.out_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(C), converted(C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oy = row % g.out_h;
      for (int64_t ox = 0; ox < g.out_w; ++ox) {
        std::copy(bias_values.begin(), bias_values.end(), acc.begin());
        for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
          const int64_t iy = depthwise::input_index(oy, ky, g.stride_h, g.pad_top, g.dilation_h);
          if (!(iy >= 0 && iy < g.in_h)) continue;
          for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
            const int64_t ix = depthwise::input_index(ox, kx, g.stride_w, g.pad_left, g.dilation_w);
            if (!(ix >= 0 && ix < g.in_w)) continue;
            const T* x = channel_vector(in + ((n * g.in_h + iy) * g.in_w + ix) * C, C, converted.data());
            channel_axpy_n(acc.data(), taps.data() + (ky * g.kernel_w + kx) * C, x, C);
          }
        }
        scalar_t* dst = out + ((n * g.out_h + oy) * g.out_w + ox) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias_opt, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const Geometry g = depthwise::check_arguments(input, weight, bias_opt, stride, padding, dilation);
  TORCH_CHECK(input.device().is_cpu(), "depthwise_conv2d (CPU kernel): expected CPU tensors, got ", input.device());
  const auto memory_format = input.suggest_memory_format();
  at::Tensor output = cpu::empty_output({g.batch, g.channels, g.out_h, g.out_w}, input.options(), memory_format);
  if (output.numel() == 0) return output;
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias = bias_opt.has_value() && bias_opt->defined() ? bias_opt->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "depthwise_conv2d_cpu", [&] {
    if (use_channels_last(input)) {
      forward_nhwc<scalar_t>(input.contiguous(at::MemoryFormat::ChannelsLast), weight_c, bias, output, g);
    } else {
      forward_nchw<scalar_t>(input, weight_c, bias, output, g);
    }
  });
  return output;
}

// ---------------------------------------------------------------------------------------------
// Backward

// The unit-stride input gradient of an NCHW fp32 window that forward_nchw runs bordered: a forward
// pass of the flipped kernel over grad_output (8x128x56x56, 2 threads: 31x31 about 2x faster
// than the channel tiles). False, and nothing written, for other windows or layouts.
bool grad_input_bordered(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                         const Geometry& g) {
  const auto go_strides = grad_output.strides(), gi_strides = grad_input.strides();
  if (!(g.stride_h == 1 && g.stride_w == 1 && go_strides[3] == 1 && gi_strides[3] == 1 && !use_avx512_planes(g) &&
        depthwise::avx512::supports_bordered(g.kernel_h, g.kernel_w, 1, 1, g.in_w) && depthwise::avx512::enabled()))
    return false;
  const auto shape = avx512_grad_input_geometry(g, go_strides[2], gi_strides[2]);
  const int64_t kernel_area = g.kernel_h * g.kernel_w;
  const float* go = grad_output.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  float* gi = grad_input.mutable_data_ptr<float>();
  std::vector<float> flipped(g.channels * kernel_area);
  for (int64_t c = 0; c < g.channels; ++c)
    for (int64_t t = 0; t < kernel_area; ++t) flipped[c * kernel_area + kernel_area - 1 - t] = w[c * kernel_area + t];
  const int64_t ahead = cpu::prefetch_distance(g.out_h * g.out_w * static_cast<int64_t>(sizeof(float)), false);
  at::parallel_for(0, g.batch * g.channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> bordered(depthwise::avx512::bordered_plane_floats(shape), 0.f);
    cpu::PlanePrefetcher prefetcher(begin, end, ahead, [&](int64_t plane) {
      const int64_t n = plane / g.channels, c = plane % g.channels;
      cpu::prefetch_plane(go + n * go_strides[0] + c * go_strides[1], g.out_h, g.out_w, go_strides[2]);
      cpu::prefetch_plane(gi + n * gi_strides[0] + c * gi_strides[1], g.in_h, g.in_w, gi_strides[2]);
    });
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t n = plane / g.channels, c = plane % g.channels;
      prefetcher.before(plane);
      depthwise::avx512::forward_plane_bordered(go + n * go_strides[0] + c * go_strides[1], &flipped[c * kernel_area],
                                                0.f, gi + n * gi_strides[0] + c * gi_strides[1], shape,
                                                bordered.data());
    }
  });
  return true;
}

// The backward on the AVX-512 plane kernels (use_avx512_planes' windows): fp32 planes read and
// written in place; bf16/fp16 planes each widened to a dense fp32 plane in the thread's scratch,
// and each input-gradient plane rounded once (as forward_nchw_widened). The weight gradient is
// summed in fp32 either way, so the 16-bit gradients are the fp32 gradients of the widened tensors,
// rounded. False, and nothing done, where a plane's columns are not adjacent.
template <typename scalar_t>
bool backward_nchw_avx512_planes(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias,
                                 const Geometry& g) {
  constexpr bool widened = kWidened<scalar_t>;
  const bool want_input = grad_input.defined(), want_weight = grad_weight.defined(), want_bias = grad_bias.defined();
  const auto go_strides = grad_output.strides(), in_strides = input.strides();
  const auto gi_strides = want_input ? grad_input.strides() : at::IntArrayRef();
  if (!(go_strides[3] == 1 && (!want_weight || in_strides[3] == 1) && (!want_input || gi_strides[3] == 1) &&
        use_avx512_planes(g)))
    return false;
  const int64_t kernel_area = g.kernel_h * g.kernel_w, in_area = g.in_h * g.in_w, out_area = g.out_h * g.out_w;
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* gi = want_input ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gw = want_weight ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = want_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
  std::vector<float> widened_weights;
  const float* w;
  if constexpr (widened) {
    widened_weights = float_values(weight.const_data_ptr<scalar_t>(), g.channels * kernel_area);
    w = widened_weights.data();
  } else {
    w = weight.const_data_ptr<float>();
  }
  // The row strides the kernels see: the tensors' own, or the dense widened planes'.
  const int64_t go_row = widened ? g.out_w : go_strides[2], in_row = widened ? g.in_w : in_strides[2];
  const int64_t gi_row = widened ? g.in_w : want_input ? gi_strides[2] : 0;
  const auto forward_shape = avx512_forward_geometry(g, in_row, go_row);
  const bool unit_stride = g.stride_h == 1;
  // stride 1: a forward pass over grad_output with the flipped kernel; stride 2: a gather.
  auto grad_input_shape = unit_stride ? avx512_grad_input_geometry(g, go_row, gi_row)
                                      : avx512_forward_geometry(g, gi_row, go_row);
  grad_input_shape.stream_output = !widened && want_input && cpu::stream_output_bytes(grad_input.nbytes());
  // Maps whose rows fill half a vector (7x7 at unit stride, 14x14 -> 7x7 at stride 2): two
  // channels at once. At stride 2 only the weight gradient (the input gradient's rows are twice
  // as wide); at unit stride both, and the planes left over take the rolled rows, whose sums are
  // the pairs' lane for lane (the flat planes' are not: the weight gradient would then depend on
  // how the channels fall to threads).
  const bool weight_pairs = want_weight && depthwise::avx512::pairs_weight_grad_planes(forward_shape);
  const bool input_pairs = want_input && unit_stride && depthwise::avx512::pairs_planes(grad_input_shape);
  depthwise::avx512::FlatPlane flat_forward, flat_grad_input;
  const bool weight_flat =
      want_weight && !weight_pairs && depthwise::avx512::flat_plane(forward_shape, &flat_forward);
  const bool input_flat = want_input && unit_stride && !input_pairs &&
                          depthwise::avx512::flat_plane(grad_input_shape, &flat_grad_input);
  // One thread owns a range of channels for the whole batch: each weight gradient is summed
  // without atomics, image after image, the same on every run and thread count. The thread
  // walks its channels image by image, so its planes are read in address order (channel by
  // channel for the whole batch jumped C planes between reads: 2.6x slower on 7x7 maps). Each
  // input-gradient plane is written just before the weight gradient reads the same
  // grad_output plane again, from cache.
  // Planes ahead to fetch: by the larger of a grad_output and an input plane.
  const int64_t ahead =
      cpu::prefetch_distance(std::max(in_area, out_area) * static_cast<int64_t>(sizeof(scalar_t)), g.stride_h > 1);
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t L = depthwise::avx512::kLanes;
    const int64_t count = end - begin, lanes_per_channel = (kernel_area + 1) * L;
    std::vector<float> flipped(count * kernel_area), lanes(count * lanes_per_channel, 0.f);
    for (int64_t c = begin; c < end; ++c)
      for (int64_t t = 0; t < kernel_area; ++t)
        flipped[(c - begin) * kernel_area + kernel_area - 1 - t] = w[c * kernel_area + t];
    // bf16/fp16: two channels' widened grad_output, input and input-gradient planes (slots 0 and 1).
    std::vector<float> scratch(widened ? 2 * (out_area + 2 * in_area) : 0);
    const auto go_plane = [&](int64_t n, int64_t c, int slot) -> const float* {
      const scalar_t* src = go + n * go_strides[0] + c * go_strides[1];
      if constexpr (widened) {
        float* dst = scratch.data() + slot * out_area;
        widen_plane(src, g.out_h, g.out_w, go_strides[2], dst);
        return dst;
      } else {
        return src;
      }
    };
    const auto in_plane = [&](int64_t n, int64_t c, int slot) -> const float* {
      const scalar_t* src = in + n * in_strides[0] + c * in_strides[1];
      if constexpr (widened) {
        float* dst = scratch.data() + 2 * out_area + slot * in_area;
        widen_plane(src, g.in_h, g.in_w, in_strides[2], dst);
        return dst;
      } else {
        return src;
      }
    };
    const auto gi_plane = [&](int64_t n, int64_t c, int slot) -> float* {
      if constexpr (widened) {
        return scratch.data() + 2 * out_area + (2 + slot) * in_area;
      } else {
        return gi + n * gi_strides[0] + c * gi_strides[1];
      }
    };
    const auto gi_done = [&](int64_t n, int64_t c, int slot) {
      if constexpr (widened)
        narrow_plane(gi_plane(n, c, slot), g.in_h, g.in_w, gi + n * gi_strides[0] + c * gi_strides[1], gi_strides[2]);
    };
    const auto grad_input_of = [&](int64_t n, int64_t c, const float* go_c, int slot) {
      float* gi_c = gi_plane(n, c, slot);
      if (input_flat)
        depthwise::avx512::forward_plane_flat(go_c, &flipped[(c - begin) * kernel_area], 0.f, gi_c, flat_grad_input);
      else if (unit_stride)
        depthwise::avx512::forward_plane(go_c, &flipped[(c - begin) * kernel_area], 0.f, gi_c, grad_input_shape);
      else
        depthwise::avx512::grad_input_plane_stride2(go_c, w + c * kernel_area, gi_c, grad_input_shape);
      gi_done(n, c, slot);
    };
    const auto weight_grad_of = [&](int64_t n, int64_t c, const float* go_c, int slot) {
      float* tap_lanes = &lanes[(c - begin) * lanes_per_channel];
      float* bias_lanes = tap_lanes + kernel_area * L;
      if (weight_flat)
        depthwise::avx512::weight_grad_plane_flat(go_c, in_plane(n, c, slot), tap_lanes,
                                                  want_bias ? bias_lanes : nullptr, flat_forward);
      else if (want_weight)
        depthwise::avx512::weight_grad_plane(go_c, in_plane(n, c, slot), tap_lanes, want_bias ? bias_lanes : nullptr,
                                             forward_shape);
      else if (want_bias)
        for (int64_t y = 0; y < g.out_h; ++y)
          for (int64_t x = 0; x < g.out_w; ++x) bias_lanes[x % L] += go_c[y * go_row + x];
    };
    // The thread's planes in the order it makes them: step n * count + (c - begin).
    cpu::PlanePrefetcher prefetcher(0, g.batch * count, ahead, [&](int64_t step) {
      const int64_t n = step / count, c = begin + step % count;
      cpu::prefetch_plane(go + n * go_strides[0] + c * go_strides[1], g.out_h, g.out_w, go_strides[2]);
      if (want_weight) cpu::prefetch_plane(in + n * in_strides[0] + c * in_strides[1], g.in_h, g.in_w, in_strides[2]);
      if (want_input && !grad_input_shape.stream_output)
        cpu::prefetch_plane(gi + n * gi_strides[0] + c * gi_strides[1], g.in_h, g.in_w, gi_strides[2]);
    });
    for (int64_t n = 0; n < g.batch; ++n) {
      for (int64_t c = begin; c < end; ++c) {
        prefetcher.before(n * count + (c - begin), weight_pairs || input_pairs ? 2 : 1);
        const float* go_c = go_plane(n, c, 0);
        if ((weight_pairs || input_pairs) && c + 1 < end) {  // this plane and the next channel's, together
          const int64_t c2 = c + 1;
          const float* go_c2 = go_plane(n, c2, 1);
          if (input_pairs) {
            depthwise::avx512::forward_plane_pair(go_c, go_c2, &flipped[(c - begin) * kernel_area],
                                                  &flipped[(c2 - begin) * kernel_area], 0.f, 0.f, gi_plane(n, c, 0),
                                                  gi_plane(n, c2, 1), grad_input_shape);
            gi_done(n, c, 0);
            gi_done(n, c2, 1);
          } else if (want_input) {
            grad_input_of(n, c, go_c, 0);
            grad_input_of(n, c2, go_c2, 1);
          }
          if (weight_pairs) {
            float* tap_lanes = &lanes[(c - begin) * lanes_per_channel];
            float* tap_lanes2 = tap_lanes + lanes_per_channel;
            depthwise::avx512::weight_grad_plane_pair(go_c, go_c2, in_plane(n, c, 0), in_plane(n, c2, 1), tap_lanes,
                                                      tap_lanes2, want_bias ? tap_lanes + kernel_area * L : nullptr,
                                                      want_bias ? tap_lanes2 + kernel_area * L : nullptr,
                                                      forward_shape);
          } else {
            weight_grad_of(n, c, go_c, 0);
            weight_grad_of(n, c2, go_c2, 1);
          }
          ++c;
          continue;
        }
        if (want_input) grad_input_of(n, c, go_c, 0);
        weight_grad_of(n, c, go_c, 0);
      }
    }
    const auto lane_sum = [](const float* partial) {
      float sum = 0.f;
      for (int64_t l = 0; l < L; ++l) sum += partial[l];
      return static_cast<scalar_t>(sum);
    };
    for (int64_t c = begin; c < end; ++c) {
      const float* tap_lanes = &lanes[(c - begin) * lanes_per_channel];
      for (int64_t t = 0; want_weight && t < kernel_area; ++t) gw[c * kernel_area + t] = lane_sum(tap_lanes + t * L);
      if (want_bias) gb[c] = lane_sum(tap_lanes + kernel_area * L);
    }
    if (grad_input_shape.stream_output) cpu::stream_fence();
  });
  return true;
}

template <typename scalar_t>
void backward_nchw(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                   at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias, const Geometry& g) {
  using T = at::opmath_type<scalar_t>;
  const PlaneShape s = plane_shape(g);
  const int64_t padded_h = g.in_h + g.pad_top + g.pad_bottom, padded_w = g.in_w + g.pad_left + g.pad_right;
  const int64_t kernel_area = g.kernel_h * g.kernel_w;
  const bool want_input = grad_input.defined(), want_weight = grad_weight.defined(), want_bias = grad_bias.defined();
  const auto go_strides = grad_output.strides();
  const auto in_strides = input.strides();
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  scalar_t* gi = want_input ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gw = want_weight ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gb = want_bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
  const auto gi_strides = want_input ? grad_input.strides() : at::IntArrayRef();
  // grad_input planes the kernels can write directly: dense, and already of the compute type
  // (fp16/bf16 planes are computed in fp32 into a buffer and converted).
  const bool gi_dense = want_input && gi_strides[3] == 1 && gi_strides[2] == g.in_w && std::is_same_v<scalar_t, T>;
  // With unit strides the input gradient is a forward convolution of grad_output, zero-padded
  // by the window below, with the kernel flipped: it then runs on the fast forward kernels.
  const bool transpose_as_forward = g.stride_h == 1 && g.stride_w == 1;
  const int64_t window_top = (g.kernel_h - 1) * g.dilation_h - g.pad_top;
  const int64_t window_left = (g.kernel_w - 1) * g.dilation_w - g.pad_left;
  const int64_t window_h = g.in_h + (g.kernel_h - 1) * g.dilation_h;
  const int64_t window_w = g.in_w + (g.kernel_w - 1) * g.dilation_w;
  const PlaneShape transposed =
      make_plane_shape(g.in_h, g.in_w, window_w, g.kernel_h, g.kernel_w, 1, 1, g.dilation_h, g.dilation_w);
  // grad_output's rows inside the transposed window, when the window holds all of them: the
  // weight and bias gradients then read them there instead of from a second copy. Padding past
  // (kernel - 1) * dilation at the bottom or right makes outputs that read only padding: the
  // window crops their grad_output (no input gradient comes from it), the bias gradient needs it.
  const bool go_in_window = transpose_as_forward && want_input && window_top >= 0 && window_left >= 0 &&
                            window_top + g.out_h <= window_h && window_left + g.out_w <= window_w;

  if constexpr (std::is_same_v<scalar_t, float> || kWidened<scalar_t>) {
    if (backward_nchw_avx512_planes<scalar_t>(grad_output, input, weight, grad_input, grad_weight, grad_bias, g)) return;
  }

  if constexpr (std::is_same_v<scalar_t, T>) {
    if (use_tiles<T>(g)) {
      // One thread owns a block of channels for the whole batch (deterministic weight gradient).
      constexpr int64_t L = Simd<T>::width;
      const int64_t blocks = (g.channels + L - 1) / L;
      // At unit stride, with the window holding all of grad_output, the input gradient is
      // gathered: grad_output goes into the zero-padded transposed window and is convolved with
      // the flipped kernel by the forward tile kernel. Otherwise every output's gradient is
      // scattered through every tap (read-modify-writes that wait on each other: about 2x slower).
      const bool gather_input = want_input && transpose_as_forward && window_top >= 0 && window_left >= 0 &&
                                (g.kernel_h - 1) * g.dilation_h >= g.pad_bottom &&
                                (g.kernel_w - 1) * g.dilation_w >= g.pad_right;
      const int64_t go_h = gather_input ? window_h : g.out_h, go_w = gather_input ? window_w : g.out_w;
      const int64_t go_top = gather_input ? window_top : 0, go_left = gather_input ? window_left : 0;
      const int64_t grad_in_area = gather_input ? g.in_h * g.in_w : padded_h * padded_w;
      // One step ahead (L planes of one image; the walk jumps C planes between steps), on the
      // maps the forward's tiles prefetch.
      const int64_t in_area = g.in_h * g.in_w;
      const int64_t ahead =
          cpu::prefetch_distance(L * std::max(in_area, g.out_h * g.out_w) * static_cast<int64_t>(sizeof(scalar_t)),
                                 false) > 0;
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        // step (block - begin) * batch + n
        cpu::PlanePrefetcher prefetcher(0, (end - begin) * g.batch, ahead, [&](int64_t step) {
          const int64_t n = step % g.batch, c0 = (begin + step / g.batch) * L;
          for (int64_t c = c0; c < std::min(c0 + L, g.channels); ++c) {
            cpu::prefetch_plane(go + n * go_strides[0] + c * go_strides[1], g.out_h,
                                (g.out_w - 1) * go_strides[3] + 1, go_strides[2]);
            if (want_weight)
              cpu::prefetch_plane(in + n * in_strides[0] + c * in_strides[1], g.in_h,
                                  (g.in_w - 1) * in_strides[3] + 1, in_strides[2]);
            if (want_input)
              cpu::prefetch_plane(gi + n * gi_strides[0] + c * gi_strides[1], g.in_h,
                                  (g.in_w - 1) * gi_strides[3] + 1, gi_strides[2]);
          }
        });
        const auto in_buffer = want_weight ? bordered_tile<T>(padded_h, padded_w, g.pad_top, g.pad_left, g.in_h, g.in_w)
                                           : scratch<T>(0);
        const auto go_buffer = bordered_tile<T>(go_h, go_w, go_top, go_left, g.out_h, g.out_w);
        const bool direct_input = std::is_same_v<T, float> && gather_input && g.in_w >= L && gi_strides[3] == 1;
        const auto grad_in_buffer = scratch<T>(want_input && !direct_input ? grad_in_area * L : 0);
        T* in_tile = in_buffer.get();
        T* go_tile = go_buffer.get();
        T* grad_in_tile = grad_in_buffer.get();
        std::vector<T> block_taps(kernel_area * L), flipped_taps(gather_input ? kernel_area * L : 0), zero_bias(L, T(0)),
            grad_taps(kernel_area * L);
        const T* go_pixels = go_tile + (go_top * go_w + go_left) * L;
        for (int64_t block = begin; block < end; ++block) {
          const int64_t c0 = block * L, lanes = std::min(L, g.channels - c0);
          for (int64_t t = 0; t < kernel_area; ++t)
            for (int64_t l = 0; l < L; ++l) block_taps[t * L + l] = l < lanes ? w[(c0 + l) * kernel_area + t] : T(0);
          for (int64_t t = 0; t < (gather_input ? kernel_area : 0); ++t)
            for (int64_t l = 0; l < L; ++l) flipped_taps[t * L + l] = block_taps[(kernel_area - 1 - t) * L + l];
          std::fill(grad_taps.begin(), grad_taps.end(), T(0));
          T bias_sums[L] = {};
          for (int64_t n = 0; n < g.batch; ++n) {
            prefetcher.before((block - begin) * g.batch + n);
            load_tile(go + n * go_strides[0] + c0 * go_strides[1], go_strides[1], lanes, g.out_h, g.out_w,
                      go_strides[2], go_strides[3], go_top, go_left, go_w, go_tile);
            if (want_bias)
              for (int64_t oy = 0; oy < g.out_h; ++oy)
                for (int64_t ox = 0; ox < g.out_w; ++ox)
                  for (int64_t l = 0; l < L; ++l) bias_sums[l] += go_pixels[(oy * go_w + ox) * L + l];
            if (want_weight)
              load_tile(in + n * in_strides[0] + c0 * in_strides[1], in_strides[1], lanes, g.in_h, g.in_w,
                        in_strides[2], in_strides[3], g.pad_top, g.pad_left, padded_w, in_tile);
            if (want_input && !gather_input) std::fill(grad_in_tile, grad_in_tile + grad_in_area * L, T(0));
            T* scatter_into = want_input && !gather_input ? grad_in_tile : nullptr;
            if (want_weight || scatter_into)
              backward_tile(go_pixels, go_w, in_tile, block_taps.data(), scatter_into,
                            want_weight ? grad_taps.data() : nullptr, s, padded_w);
            scalar_t* gi_block = want_input ? gi + n * gi_strides[0] + c0 * gi_strides[1] : nullptr;
            if constexpr (std::is_same_v<T, float>) {
              if (direct_input) {
                float* planes[L];
                for (int64_t l = 0; l < L; ++l) planes[l] = gi_block + std::min(l, lanes - 1) * gi_strides[1];
                forward_tile_to_planes(go_tile, flipped_taps.data(), zero_bias.data(), planes, lanes,
                                       gi_strides[2], transposed, window_w);
                continue;
              }
            }
            if (gather_input)
              forward_tile(go_tile, flipped_taps.data(), zero_bias.data(), grad_in_tile, transposed,
                           window_w);
            if (want_input)
              store_tile(grad_in_tile, gather_input ? 0 : g.pad_top, gather_input ? 0 : g.pad_left,
                         gather_input ? g.in_w : padded_w, lanes, g.in_h, g.in_w, gi_block, gi_strides[1],
                         gi_strides[2], gi_strides[3]);
          }
          for (int64_t l = 0; l < lanes; ++l) {
            if (want_weight)
              for (int64_t t = 0; t < kernel_area; ++t) gw[(c0 + l) * kernel_area + t] = grad_taps[t * L + l];
            if (want_bias) gb[c0 + l] = bias_sums[l];
          }
        }
      });
      return;
    }
  }

  // One thread owns a channel for the whole batch: the weight gradient is summed without atomics
  // and in the same order on every run.
  at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
    // Windows for two images: image n+1's are loaded before image n is processed, so small planes
    // are not read back while their narrow stores are still in flight (see forward_nchw).
    const int64_t padded_size = want_weight ? padded_h * s.row_stride + kSlack : 0;
    const int64_t window_size = want_input && transpose_as_forward ? window_h * window_w + kSlack : 0;
    std::vector<T> padded_pair(2 * padded_size), go_window_pair(2 * window_size);
    std::vector<T> padded_grad(want_input && !transpose_as_forward ? padded_h * s.row_stride : 0);
    std::vector<T> gi_buffer(want_input && transpose_as_forward && !gi_dense ? g.in_h * g.in_w : 0);
    std::vector<T> go_buffer, taps(kernel_area), flipped(kernel_area), grad_taps(kernel_area);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = 0; t < kernel_area; ++t) taps[t] = static_cast<T>(w[c * kernel_area + t]);
      for (int64_t t = 0; t < kernel_area; ++t) flipped[kernel_area - 1 - t] = taps[t];
      std::fill(grad_taps.begin(), grad_taps.end(), T(0));
      T bias_sum = T(0);
      const auto load_image = [&](int64_t n) {
        if (window_size)
          load_window(go + n * go_strides[0] + c * go_strides[1], g.out_h, g.out_w, go_strides[2], go_strides[3],
                      window_top, window_left, go_window_pair.data() + n % 2 * window_size, window_h, window_w, 1);
        if (padded_size)
          load_window(in + n * in_strides[0] + c * in_strides[1], g.in_h, g.in_w, in_strides[2], in_strides[3],
                      g.pad_top, g.pad_left, padded_pair.data() + n % 2 * padded_size, padded_h, padded_w, g.stride_w);
      };
      if (g.batch > 0) load_image(0);
      for (int64_t n = 0; n < g.batch; ++n) {
        if (n + 1 < g.batch) load_image(n + 1);
        const T* go_window = go_window_pair.data() + n % 2 * window_size;
        const T* padded = padded_pair.data() + n % 2 * padded_size;
        const scalar_t* go_src = go + n * go_strides[0] + c * go_strides[1];
        scalar_t* gi_plane = want_input ? gi + n * gi_strides[0] + c * gi_strides[1] : nullptr;
        const T* go_plane;
        int64_t go_stride = g.out_w;
        if (go_in_window) {
          go_plane = go_window + window_top * window_w + window_left;
          go_stride = window_w;
        } else {
          go_plane = dense_plane<scalar_t, T>(go_src, g.out_h, g.out_w, go_strides[2], go_strides[3], go_buffer,
                                              /*with_slack=*/want_weight);
        }
        if (want_bias) {
          T plane_sum = T(0);
          for (int64_t y = 0; y < g.out_h; ++y)
            for (int64_t x = 0; x < g.out_w; ++x) plane_sum += go_plane[y * go_stride + x];
          bias_sum += plane_sum;
        }
        if (want_weight) backward_weight_plane(go_plane, go_stride, padded, grad_taps.data(), s);
        if (want_input && transpose_as_forward) {
          if constexpr (std::is_same_v<scalar_t, T>) {
            if (gi_dense) {
              forward_plane(go_window, flipped.data(), T(0), gi_plane, transposed);
              continue;
            }
          }
          forward_plane(go_window, flipped.data(), T(0), gi_buffer.data(), transposed);
          store_plane(gi_buffer.data(), g.in_h, g.in_w, gi_plane, gi_strides[2], gi_strides[3], g.in_w, 0);
        } else if (want_input) {
          std::fill(padded_grad.begin(), padded_grad.end(), T(0));
          backward_input_plane(go_plane, taps.data(), padded_grad.data(), s);
          store_phased_plane(padded_grad.data(), s, g.pad_top, g.pad_left, g.in_h, g.in_w, gi_plane, gi_strides[2],
                             gi_strides[3]);
        }
      }
      if (want_weight)
        for (int64_t t = 0; t < kernel_area; ++t) gw[c * kernel_area + t] = static_cast<scalar_t>(grad_taps[t]);
      if (want_bias) gb[c] = static_cast<scalar_t>(bias_sum);
    }
  });
}

// [kernel_area][C] taps with the window flipped, and the geometry of the forward over grad_output
// they serve: at unit stride the channels_last input gradient is that forward.
template <typename T>
std::vector<T> flipped_taps(const std::vector<T>& taps, int64_t kernel_area, int64_t C) {
  std::vector<T> flipped(taps.size());
  for (int64_t t = 0; t < kernel_area; ++t)
    std::copy(taps.begin() + t * C, taps.begin() + (t + 1) * C, flipped.begin() + (kernel_area - 1 - t) * C);
  return flipped;
}

// (Its padding is negative where the forward's reaches past the window.)
Geometry flipped_geometry(const Geometry& g) {
  Geometry flipped = g;
  flipped.in_h = g.out_h;
  flipped.in_w = g.out_w;
  flipped.out_h = g.in_h;
  flipped.out_w = g.in_w;
  flipped.stride_h = flipped.stride_w = 1;
  flipped.pad_top = (g.kernel_h - 1) * g.dilation_h - g.pad_top;
  flipped.pad_bottom = (g.kernel_h - 1) * g.dilation_h - g.pad_bottom;
  flipped.pad_left = (g.kernel_w - 1) * g.dilation_w - g.pad_left;
  flipped.pad_right = (g.kernel_w - 1) * g.dilation_w - g.pad_right;
  return flipped;
}

// A flipped window whose padding is negative (the forward's padding past its reach) crops the
// image, which the forward kernels taking it here do not do.
bool pads_nonnegative(const Geometry& g) {
  return g.pad_top >= 0 && g.pad_bottom >= 0 && g.pad_left >= 0 && g.pad_right >= 0;
}

depthwise::avx512::ImageGeometry flipped_image_geometry(const Geometry& g) {
  return avx512_image_geometry(flipped_geometry(g));
}

// The channels_last weight gradient sums output rows in this many fixed chunks, each into its own
// partial ([kernel_area][C] taps, then [C] bias sums), added in chunk order by
// write_weight_partials: the same thread count gives the same bits, whichever path ran.
int64_t weight_grad_chunks(const Geometry& g) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.batch * g.out_h));
}

template <typename scalar_t, typename T>
void write_weight_partials(std::vector<T>& partials, int64_t chunks, const Geometry& g, at::Tensor& grad_weight,
                           at::Tensor& grad_bias) {
  const int64_t C = g.channels, kernel_area = g.kernel_h * g.kernel_w, partial_size = (kernel_area + 1) * C;
  for (int64_t chunk = 1; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < partial_size; ++i) partials[i] += partials[chunk * partial_size + i];
  if (grad_weight.defined()) {
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < kernel_area; ++t) gw[c * kernel_area + t] = static_cast<scalar_t>(partials[t * C + c]);
  }
  if (grad_bias.defined()) {
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) gb[c] = static_cast<scalar_t>(partials[kernel_area * C + c]);
  }
}

// The channels_last fp32 backward on AVX-512 in one pass: each thread takes a fixed range of
// output rows and, row by row, adds the row's weight gradient and writes the input-gradient rows
// that sit under it, while grad_output's rows are still in cache. Two passes read grad_output
// from memory twice (32x128x56x56, 2 threads: ~1.5 ms of 10.6). Needs in_h == out_h * stride_h,
// so that the input rows split with the output rows; returns false (nothing done) otherwise.
bool backward_nhwc_fused_avx512(const float* go, const float* in, const at::Tensor& weight, at::Tensor& grad_input,
                                at::Tensor& grad_weight, at::Tensor& grad_bias, const Geometry& g) {
  if (!(grad_input.defined() && grad_weight.defined() && depthwise::avx512::enabled() &&
        depthwise::avx512::supports_weight_grad_nhwc(g.kernel_h, g.kernel_w, g.stride_w, g.dilation_w) &&
        g.in_h == g.out_h * g.stride_h))
    return false;
  const int64_t C = g.channels, kernel_area = g.kernel_h * g.kernel_w;
  const bool unit_stride = g.stride_h == 1 && g.stride_w == 1;
  std::vector<float> taps = taps_by_channel<float>(weight, g);
  if (unit_stride) taps = flipped_taps(taps, kernel_area, C);  // grad_input: the flipped forward
  auto flipped_image = flipped_image_geometry(g);
  auto image = avx512_image_geometry(g);
  flipped_image.stream_output = image.stream_output = stream_channels_last(grad_input);
  float* gi = grad_input.mutable_data_ptr<float>();
  const bool want_bias = grad_bias.defined();
  const int64_t rows = g.batch * g.out_h, chunks = weight_grad_chunks(g);
  const int64_t partial_size = (kernel_area + 1) * C;
  std::vector<float> partials(chunks * partial_size, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partials.data() + chunk * partial_size;
      for (int64_t row = chunk * rows / chunks; row < (chunk + 1) * rows / chunks; ++row) {
        const int64_t n = row / g.out_h, oy = row % g.out_h;
        const float* go_image = go + n * g.out_h * g.out_w * C;
        depthwise::avx512::weight_grad_row_nhwc(in + n * g.in_h * g.in_w * C, go + row * g.out_w * C, part,
                                                want_bias ? part + kernel_area * C : nullptr, oy, image);
        for (int64_t iy = oy * g.stride_h; iy < (oy + 1) * g.stride_h; ++iy) {
          float* gi_row = gi + (n * g.in_h + iy) * g.in_w * C;
          if (unit_stride)
            depthwise::avx512::forward_row_nhwc(go_image, taps.data(), nullptr, gi_row, iy, flipped_image);
          else
            depthwise::avx512::grad_input_row_nhwc(go_image, taps.data(), gi_row, iy, image);
        }
      }
    }
    if (image.stream_output) cpu::stream_fence();
  });
  write_weight_partials<float>(partials, chunks, g, grad_weight, grad_bias);
  return true;
}

// The unit-stride input gradient of channels_last fp32 5- and 7-wide windows: the flipped forward
// through the ring (forward_nhwc_ring) over grad_output, bit for bit the row kernels' flipped
// forward that backward_nhwc_fused_avx512 runs, while grad_output is at most kRingGradInputBytes
// or (any_size) the weight gradient takes the ring too on rows of 14 outputs or more. The weight
// gradient then reads grad_output a second time, on its own; in process, 2 threads, ms backward,
// ring input gradient + ring weight gradient / the fused rows: 8x384x14x14 7x7 0.96 / 1.80,
// 8x768x7x7 0.79 / 1.40, 8x192x28x28 2.21 / 3.82, 1x960x7x7 5x5 0.12 / 0.16; larger tensors:
// 8x128x56x56 7x7 5.72 / 7.24, 8x96x56x56 3.80 / 4.56, 32x120x28x28 5x5 4.92 / 5.73, 32x72x28x28
// 2.56 / 3.32, but on rows of 7 32x960x7x7 2.72 / 2.49 (with the rows' weight gradient the ring
// lost past 5 MiB too: 32x960x7x7 2.75 / 2.57, 8x128x56x56 6.48 / 5.85). False, and nothing
// written, where it does not apply (padding beyond the window's reach, which the flipped window
// would need negative, included).
constexpr int64_t kRingGradInputBytes = int64_t{5} << 20;

template <typename scalar_t>
bool grad_input_nhwc_ring(const at::Tensor& grad_output, const at::Tensor& weight, at::Tensor& grad_input,
                          const Geometry& g, bool any_size) {
  if (!(grad_input.defined() && depthwise::avx512::enabled() && g.stride_h == 1 && g.stride_w == 1 &&
        (g.kernel_w == 5 || g.kernel_w == 7) && (any_size || grad_output.nbytes() <= kRingGradInputBytes)))
    return false;
  const Geometry flipped = flipped_geometry(g);
  if (!pads_nonnegative(flipped)) return false;
  return forward_nhwc_ring<scalar_t>(grad_output, weight.flip({2, 3}), at::Tensor(), grad_input, flipped);
}

// The weight (and bias) gradient of channels_last fp32 5- and 7-wide windows at unit stride on
// rows of 7 outputs or a multiple of 14, from the ring (weight_grad_channels_nhwc_ring): the items
// (image, 64-channel block), images outermost, in as many fixed chunks as threads (at most one an
// item), each chunk's sums in its own partial, added in chunk order. Not the rows' order of
// addition: the same bits for the same thread count, not the rows' bits. False, and nothing
// written, elsewhere.
bool weight_grad_nhwc_ring(const at::Tensor& grad_output, const at::Tensor& input, at::Tensor& grad_weight,
                           at::Tensor& grad_bias, const Geometry& g) {
  const auto image = avx512_image_geometry(g);
  if (!(grad_weight.defined() && depthwise::avx512::enabled() && depthwise::avx512::rolled_rows_enabled() &&
        depthwise::avx512::supports_nhwc_ring_weight_grad(image)))
    return false;
  constexpr int64_t kBlock = depthwise::avx512::kNhwcRingChannels, L = depthwise::avx512::kLanes;
  const int64_t C = g.channels, kernel_area = g.kernel_h * g.kernel_w, blocks = (C + kBlock - 1) / kBlock;
  const int64_t items = g.batch * blocks, chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  const int64_t partial_size = (kernel_area + 1) * C;
  const bool with_bias = grad_bias.defined();
  std::vector<float> partials(chunks * partial_size, 0.f);
  const float* go = grad_output.const_data_ptr<float>();
  const float* in = input.const_data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(depthwise::avx512::nhwc_ring_floats(image), 0.f);
    std::vector<float> sums(depthwise::avx512::nhwc_ring_weight_grad_sum_floats(image));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* part = partials.data() + chunk * partial_size;
      for (int64_t item = chunk * items / chunks; item < (chunk + 1) * items / chunks; ++item) {
        const int64_t n = item / blocks, c0 = item % blocks * kBlock;
        std::fill(sums.begin(), sums.end(), 0.f);
        depthwise::avx512::weight_grad_channels_nhwc_ring(in + n * g.in_h * g.in_w * C, go + n * g.out_h * g.out_w * C,
                                                          sums.data(), with_bias, c0, image, scratch.data());
        // sums are [vector][tap][lane]; the partial [tap][C], written a tap row at a time
        for (int64_t t = 0; t <= kernel_area; ++t)
          for (int64_t c = c0; c < std::min(C, c0 + kBlock); ++c)
            part[t * C + c] += sums[((c - c0) / L * (kernel_area + 1) + t) * L + (c - c0) % L];
      }
    }
  });
  write_weight_partials<float>(partials, chunks, g, grad_weight, grad_bias);
  return true;
}

template <typename scalar_t>
void backward_nhwc(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                   at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias, const Geometry& g) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const bool weight_by_ring = grad_weight.defined() && depthwise::avx512::rolled_rows_enabled() &&
                                depthwise::avx512::supports_nhwc_ring_weight_grad(avx512_image_geometry(g));
    if (grad_input_nhwc_ring<float>(grad_output, weight, grad_input, g, weight_by_ring && g.out_w >= 14)) {
      at::Tensor input_done;  // undefined: the weight and bias gradients alone
      backward_nhwc<float>(grad_output, input, weight, input_done, grad_weight, grad_bias, g);
      return;
    }
    if (!grad_input.defined() && weight_grad_nhwc_ring(grad_output, input, grad_weight, grad_bias, g)) return;
    if (backward_nhwc_fused_avx512(grad_output.const_data_ptr<float>(), input.const_data_ptr<float>(), weight,
                                   grad_input, grad_weight, grad_bias, g))
      return;
  }
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    // bf16 at unit stride: the input gradient is the forward of grad_output under the flipped
    // window, through the pair dot products where they take it (see forward_nhwc_bf16_dot).
    if (grad_input.defined() && g.stride_h == 1 && g.stride_w == 1) {
      const Geometry flipped = flipped_geometry(g);
      if (pads_nonnegative(flipped) && takes_nhwc_bf16_dot(flipped)) {
        forward_nhwc_bf16_dot(grad_output, weight.flip({2, 3}), at::Tensor(), grad_input, flipped);
        at::Tensor input_done;  // undefined: the weight and bias gradients alone
        backward_nhwc<scalar_t>(grad_output, input, weight, input_done, grad_weight, grad_bias, g);
        return;
      }
    }
  }
  if constexpr (kWidened<scalar_t>) {
    // bf16/fp16: the input gradient through the ring at any size, bit for bit the rows' (below):
    // their input gradient is a pass of its own here, not fp32's one pass with the weight gradient.
    if (grad_input_nhwc_ring<scalar_t>(grad_output, weight, grad_input, g, /*any_size=*/true)) {
      at::Tensor input_done;  // undefined: the weight and bias gradients alone
      backward_nhwc<scalar_t>(grad_output, input, weight, input_done, grad_weight, grad_bias, g);
      return;
    }
  }
  using T = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, kernel_area = g.kernel_h * g.kernel_w;
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const scalar_t* in = input.const_data_ptr<scalar_t>();

  if (grad_input.defined()) {
    const std::vector<T> taps = taps_by_channel<scalar_t>(weight, g);
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    bool fast_path = false;
    if constexpr (kWidened<scalar_t>) {
      if (depthwise::avx512::enabled() && g.kernel_h <= 64 && g.kernel_w <= 64) {
        if (g.stride_h == 1 && g.stride_w == 1)
          forward_nhwc_native(go, flipped_taps(taps, kernel_area, C).data(), nullptr, gi, g.batch,
                              flipped_image_geometry(g));
        else
          grad_input_nhwc_native(go, taps.data(), gi, g.batch, avx512_image_geometry(g));
        fast_path = true;
      }
    }
    if constexpr (std::is_same_v<scalar_t, T>) {
      if (g.stride_h == 1 && g.stride_w == 1) {
        // A forward convolution of grad_output with the flipped kernel (see backward_nchw).
        const std::vector<T> flipped = flipped_taps(taps, kernel_area, C);
        const std::vector<T> zeros(kSlack, T(0));
        const auto image = flipped_image_geometry(g);
        const RowShape shape{C, g.out_h, g.out_w, g.in_w, g.kernel_h, g.kernel_w, 1, 1,
                             image.pad_top, image.pad_left, g.dilation_h, g.dilation_w};
        const bool avx512 = std::is_same_v<T, float> && depthwise::avx512::enabled();
        at::parallel_for(0, g.batch * g.in_h, 1, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t n = row / g.in_h, iy = row % g.in_h;
            if constexpr (std::is_same_v<T, float>) {
              if (avx512) {
                depthwise::avx512::forward_row_nhwc(go + n * g.out_h * g.out_w * C, flipped.data(), nullptr,
                                                    gi + row * g.in_w * C, iy, image);
                continue;
              }
            }
            forward_row_nhwc(go + n * g.out_h * g.out_w * C, flipped.data(), nullptr, gi + row * g.in_w * C,
                             zeros.data(), iy, shape);
          }
        });
        fast_path = true;
      } else if (g.kernel_h <= 64 && g.kernel_w <= 64) {
        const RowShape shape = row_shape(g);
        const auto image = avx512_image_geometry(g);
        const bool avx512 = std::is_same_v<T, float> && depthwise::avx512::enabled();
        at::parallel_for(0, g.batch * g.in_h, 1, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            const int64_t n = row / g.in_h, iy = row % g.in_h;
            if constexpr (std::is_same_v<T, float>) {
              if (avx512) {
                depthwise::avx512::grad_input_row_nhwc(go + n * g.out_h * g.out_w * C, taps.data(),
                                                       gi + row * g.in_w * C, iy, image);
                continue;
              }
            }
            grad_input_row_nhwc(go + n * g.out_h * g.out_w * C, taps.data(), gi + row * g.in_w * C, iy, g.out_h, shape);
          }
        });
        fast_path = true;
      }
    }
    if (!fast_path) at::parallel_for(0, g.batch * g.in_h, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> acc(C), converted(C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.in_h, iy = row % g.in_h;
        for (int64_t ix = 0; ix < g.in_w; ++ix) {
          std::fill(acc.begin(), acc.end(), T(0));
          for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
            const int64_t oy =
                depthwise::output_index_for_input(iy, ky, g.stride_h, g.pad_top, g.dilation_h, g.out_h);
            if (oy < 0) continue;
            for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
              const int64_t ox =
                  depthwise::output_index_for_input(ix, kx, g.stride_w, g.pad_left, g.dilation_w, g.out_w);
              if (ox < 0) continue;
              const T* dy = channel_vector(go + ((n * g.out_h + oy) * g.out_w + ox) * C, C, converted.data());
              channel_axpy_n(acc.data(), taps.data() + (ky * g.kernel_w + kx) * C, dy, C);
            }
          }
          scalar_t* dst = gi + ((n * g.in_h + iy) * g.in_w + ix) * C;
          for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    });
  }

  const bool want_weight = grad_weight.defined(), want_bias = grad_bias.defined();
  if (!want_weight && !want_bias) return;
  const int64_t rows = g.batch * g.out_h, chunks = weight_grad_chunks(g);
  const int64_t partial_size = (kernel_area + 1) * C;  // taps, then the bias sum
  std::vector<T> partials(chunks * partial_size, T(0));
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (want_weight && weight_grad_nhwc_bf16_dot(go, in, partials.data(), chunks, want_bias, g))
      return write_weight_partials<scalar_t>(partials, chunks, g, grad_weight, grad_bias);
  }
  if constexpr (kWidened<scalar_t>) {
    if (want_weight && depthwise::avx512::enabled() &&
        depthwise::avx512::supports_weight_grad_nhwc(g.kernel_h, g.kernel_w, g.stride_w, g.dilation_w)) {
      weight_grad_nhwc_native(go, in, partials.data(), chunks, want_bias, g);
      return write_weight_partials<scalar_t>(partials, chunks, g, grad_weight, grad_bias);
    }
  }
  if constexpr (std::is_same_v<scalar_t, T>) {
    const RowShape shape = row_shape(g);
    const auto image = avx512_image_geometry(g);
    const bool avx512 = std::is_same_v<T, float> && want_weight && depthwise::avx512::enabled() &&
                        depthwise::avx512::supports_weight_grad_nhwc(g.kernel_h, g.kernel_w, g.stride_w, g.dilation_w);
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        T* part = partials.data() + chunk * partial_size;
        for (int64_t row = chunk * rows / chunks; row < (chunk + 1) * rows / chunks; ++row) {
          const int64_t n = row / g.out_h, oy = row % g.out_h;
          if constexpr (std::is_same_v<T, float>) {
            if (avx512) {
              depthwise::avx512::weight_grad_row_nhwc(in + n * g.in_h * g.in_w * C, go + row * g.out_w * C, part,
                                                      want_bias ? part + kernel_area * C : nullptr, oy, image);
              continue;
            }
          }
          weight_grad_row_nhwc(in + n * g.in_h * g.in_w * C, go + row * g.out_w * C, want_weight ? part : nullptr,
                               want_bias ? part + kernel_area * C : nullptr, oy, shape);
        }
      }
    });
  } else {
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> converted_go(C), converted_in(C);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      T* part = partials.data() + chunk * partial_size;
      for (int64_t row = chunk * rows / chunks; row < (chunk + 1) * rows / chunks; ++row) {
        const int64_t n = row / g.out_h, oy = row % g.out_h;
        for (int64_t ox = 0; ox < g.out_w; ++ox) {
          const T* dy = channel_vector(go + ((n * g.out_h + oy) * g.out_w + ox) * C, C, converted_go.data());
          if (want_bias)
            for (int64_t c = 0; c < C; ++c) part[kernel_area * C + c] += dy[c];
          if (!want_weight) continue;
          for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
            const int64_t iy = depthwise::input_index(oy, ky, g.stride_h, g.pad_top, g.dilation_h);
            if (!(iy >= 0 && iy < g.in_h)) continue;
            for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
              const int64_t ix = depthwise::input_index(ox, kx, g.stride_w, g.pad_left, g.dilation_w);
              if (!(ix >= 0 && ix < g.in_w)) continue;
              const T* x = channel_vector(in + ((n * g.in_h + iy) * g.in_w + ix) * C, C, converted_in.data());
              channel_axpy_n(part + (ky * g.kernel_w + kx) * C, dy, x, C);
            }
          }
        }
      }
    }
  });
  }
  write_weight_partials<scalar_t>(partials, chunks, g, grad_weight, grad_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const Geometry g = depthwise::check_arguments(input, weight, c10::nullopt, stride, padding, dilation);
  depthwise::check_grad_output(grad_output, input, g);
  TORCH_CHECK(input.device().is_cpu(), "depthwise_conv2d backward (CPU kernel): expected CPU tensors, got ",
              input.device());
  const auto memory_format = input.suggest_memory_format();
  at::Tensor grad_input =
      output_mask[0] ? cpu::empty_output(input.sizes(), input.options(), memory_format) : at::Tensor();
  at::Tensor grad_weight = output_mask[1] ? at::empty(weight.sizes(), weight.options()) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::empty({g.channels}, weight.options()) : at::Tensor();
  const bool no_work = g.batch == 0 || g.channels == 0 || (grad_input.defined() && grad_input.numel() == 0 &&
                                                           !grad_weight.defined() && !grad_bias.defined());
  if (no_work) {
    if (grad_weight.defined()) grad_weight.zero_();
    if (grad_bias.defined()) grad_bias.zero_();
  } else {
    const at::Tensor weight_c = weight.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "depthwise_conv2d_backward_cpu", [&] {
      if (use_channels_last(input)) {
        const auto cl = at::MemoryFormat::ChannelsLast;
        backward_nhwc<scalar_t>(grad_output.contiguous(cl), input.contiguous(cl), weight_c, grad_input, grad_weight,
                                grad_bias, g);
      } else {
        // The windows the bordered forward takes: their unit-stride input gradient by it, the
        // rest (weight and bias) by backward_nchw.
        at::Tensor rest_grad_input = grad_input;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (grad_input.defined() && grad_input_bordered(grad_output, weight_c, grad_input, g))
            rest_grad_input = at::Tensor();
        }
        backward_nchw<scalar_t>(grad_output, input, weight_c, rest_grad_input, grad_weight, grad_bias, g);
      }
    });
  }
  // Outputs not asked for are distinct empty tensors: a custom op's outputs may not alias.
  const auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, input.options()); };
  return {or_empty(grad_input), or_empty(grad_weight), or_empty(grad_bias)};
}

}  // namespace
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("depthwise_conv2d", &fastcnn::depthwise_conv2d_cpu);
  m.impl("_depthwise_conv2d_backward", &fastcnn::depthwise_conv2d_backward_cpu);
}
