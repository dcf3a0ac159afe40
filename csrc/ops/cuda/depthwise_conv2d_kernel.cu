// CUDA kernels of fastcnn::depthwise_conv2d and fastcnn::_depthwise_conv2d_backward.
//
// Reference op: torch.nn.functional.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias,
// stride, 0, dilation, groups=C), with weight [C, 1, kH, kW] -- the depthwise convolution of
// MobileNets (Howard et al., 2017, "MobileNets: Efficient Convolutional Neural Networks for
// Mobile Vision Applications").
//
// Layouts: NCHW-contiguous and channels_last are both native; any other input is made contiguous
// in input.suggest_memory_format() (the only copy), and outputs follow that format.
//
// Kernels (all deterministic: no atomics anywhere, fixed-order reductions):
//   forward NCHW, 3x3/5x5/7x7, dilation 1, stride_w 1 or 2:
//       each thread computes kRowVec adjacent outputs of one row; the channel's taps live in
//       registers and each input row segment is loaded once into registers and reused by all
//       outputs and all taps of that row.
//       With FASTCNN_CUDA_DEPTHWISE_NCHW=vec, problems with left padding k/2 and widths that are
//       multiples of 4 run dw_fwd_nchw_vec instead (8 outputs a thread from aligned vector loads;
//       depthwise_conv2d_nchw_vec.h): checked on the CPU by emulation, not yet measured on a GPU.
//   forward NCHW, any other shape: same mapping, runtime taps/stride/dilation, no register reuse.
//   forward channels_last: threads run across channels (16-byte vector loads when C allows),
//       the block's taps sit in shared memory laid out [tap][channel]. With
//       FASTCNN_CUDA_DEPTHWISE_CL=rows, 3x3/5x5 at stride 1 or 2 run dw_fwd_cl_rows instead (taps in
//       registers, a row segment per thread; depthwise_conv2d_cl_rows.h), which is checked on the
//       CPU by emulation but not yet measured on a GPU: hence not the default.
//   grad_input, stride 1: the forward kernels on grad_output with the kernel flipped and padding
//       (k-1)*dilation - pad (a gather: each grad_input element is written once by one thread).
//   grad_input, stride > 1: a gather kernel over grad_input elements (NCHW and channels_last).
//   grad_weight / grad_bias: a block per (channel, chunk of rows) [NCHW] or per (32 channels,
//       chunk of pixels) [channels_last] reduces in a fixed order into a partial buffer; a second
//       kernel sums the chunks in a fixed order. The chunking depends only on the shapes.
//
// The window index arithmetic comes from csrc/common/depthwise_conv2d_index.h, shared with the
// CPU kernel so that its tests exercise this arithmetic too.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/depthwise_conv2d_checks.h"
#include "common/depthwise_conv2d_index.h"
#include "ops/cuda/depthwise_conv2d_cl_rows.h"
#include "ops/cuda/depthwise_conv2d_nchw_vec.h"

namespace fastcnn {
namespace {

using depthwise::input_index;
using depthwise::output_index_for_input;

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarps = kThreads / 32;
constexpr int kRowVec = 4;  // NCHW: adjacent outputs of a row computed by one thread
constexpr int64_t kMaxSmemWeightBytes = 32 * 1024;
// Tensors (and thread counts) up to this size use 32-bit index arithmetic; the margin keeps
// `index + grid stride` below 2^31.
constexpr int64_t kMax32 = int64_t{1} << 30;

// Geometry of one depthwise correlation: reads an [N, C, Hi, Wi] tensor, writes [N, C, Ho, Wo].
// out[oy, ox] += w[ky, kx] * in[oy*sh - pt + ky*dh, ox*sw - pl + kx*dw].
struct Geom {
  int64_t N, C, Hi, Wi, Ho, Wo;
  int64_t kH, kW, sh, sw, pt, pl, dh, dw;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Accumulator vectors in shared memory: 16-byte aligned pieces (8 floats load as two LDS.128).
template <typename T, int N>
struct alignas(sizeof(T) * N > 16 ? 16 : sizeof(T) * N) AccVec {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0; the order of additions is fixed
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline unsigned int grid_1d(int64_t total) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, kThreads), 1 << 30)));
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

inline bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

// ------------------------------------------------------------------------------------------------
// Forward (and stride-1 grad_input), NCHW.
// ------------------------------------------------------------------------------------------------

// Fixed KHxKW, dilation 1, stride_w SW; 32-bit indices. Thread i -> (n*C + c, oy, group of
// kRowVec outputs). `flip` reads the taps in reverse order (grad_input as a correlation).
template <typename scalar_t, int KH, int KW, int SW>
__global__ void __launch_bounds__(kThreads) dw_fwd_nchw_fixed(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, const Geom g, const bool flip, const int32_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = KH * KW;
  constexpr int V = kRowVec;
  constexpr int SPAN = (V - 1) * SW + KW;  // input columns read by one thread per row
  const int32_t C = static_cast<int32_t>(g.C), Hi = static_cast<int32_t>(g.Hi), Wi = static_cast<int32_t>(g.Wi);
  const int32_t Ho = static_cast<int32_t>(g.Ho), Wo = static_cast<int32_t>(g.Wo);
  const int32_t groups = (Wo + V - 1) / V;
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
    const int32_t grp = i % groups;
    const int32_t t = i / groups;
    const int32_t oy = t % Ho;
    const int32_t nc = t / Ho;
    const int32_t c = nc % C;

    acc_t w[K];
#pragma unroll
    for (int k = 0; k < K; ++k) w[k] = static_cast<acc_t>(weight[c * K + (flip ? K - 1 - k : k)]);
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
    acc_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = b;

    const int32_t ox0 = grp * V;
    const int32_t ix0 = static_cast<int32_t>(input_index(ox0, 0, SW, g.pl, 1));
    const int32_t iy0 = static_cast<int32_t>(input_index(oy, 0, g.sh, g.pt, 1));
    const bool interior = ix0 >= 0 && ix0 + SPAN <= Wi;
    const scalar_t* plane = in + nc * Hi * Wi;
#pragma unroll
    for (int ky = 0; ky < KH; ++ky) {
      const int32_t iy = iy0 + ky;
      if (iy < 0 || iy >= Hi) continue;
      const scalar_t* row = plane + iy * Wi;
      acc_t x[SPAN];
      if (interior) {
#pragma unroll
        for (int j = 0; j < SPAN; ++j) x[j] = static_cast<acc_t>(row[ix0 + j]);
      } else {
#pragma unroll
        for (int j = 0; j < SPAN; ++j) {
          const int32_t ix = ix0 + j;
          x[j] = (ix >= 0 && ix < Wi) ? static_cast<acc_t>(row[ix]) : acc_t(0);
        }
      }
#pragma unroll
      for (int kx = 0; kx < KW; ++kx) {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += w[ky * KW + kx] * x[v * SW + kx];
      }
    }
    scalar_t* dst = out + (nc * Ho + oy) * Wo + ox0;
    if (ox0 + V <= Wo) {
#pragma unroll
      for (int v = 0; v < V; ++v) dst[v] = static_cast<scalar_t>(acc[v]);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (ox0 + v < Wo) dst[v] = static_cast<scalar_t>(acc[v]);
      }
    }
  }
}

// Fixed K x K, stride S both ways, dilation 1, left padding K / 2, 32-bit indices; see
// depthwise_conv2d_nchw_vec.h.
template <typename scalar_t, int K, int S>
__global__ void __launch_bounds__(depthwise::nchw_vec::kThreads) dw_fwd_nchw_vec(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, const depthwise::nchw_vec::Geom g, const bool flip) {
  depthwise::nchw_vec::forward_thread<scalar_t, K, S>(in, weight, bias, out, g, flip,
                                                      static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x),
                                                      static_cast<int32_t>(blockDim.x * gridDim.x));
}

// Any kernel size, stride and dilation.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) dw_fwd_nchw_any(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, const Geom g, const bool flip, const index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = kRowVec;
  const index_t C = g.C, Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const index_t kH = g.kH, kW = g.kW, K = g.kH * g.kW, sw = g.sw, dw = g.dw;
  const index_t groups = (Wo + V - 1) / V;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const index_t grp = i % groups;
    const index_t t = i / groups;
    const index_t oy = t % Ho;
    const index_t nc = t / Ho;
    const index_t c = nc % C;

    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
    acc_t acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = b;

    const index_t ox0 = grp * V;
    const index_t ix0 = static_cast<index_t>(input_index(ox0, 0, g.sw, g.pl, g.dw));
    const scalar_t* plane = in + nc * Hi * Wi;
    const scalar_t* wc = weight + c * K;
    for (index_t ky = 0; ky < kH; ++ky) {
      const index_t iy = static_cast<index_t>(input_index(oy, ky, g.sh, g.pt, g.dh));
      if (!(iy >= 0 && iy < Hi)) continue;
      const scalar_t* row = plane + iy * Wi;
      for (index_t kx = 0; kx < kW; ++kx) {
        const index_t k = ky * kW + kx;
        const acc_t wv = static_cast<acc_t>(wc[flip ? K - 1 - k : k]);
        const index_t ix = ix0 + kx * dw;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const index_t x = ix + v * sw;
          if (x >= 0 && x < Wi) acc[v] += wv * static_cast<acc_t>(row[x]);
        }
      }
    }
    scalar_t* dst = out + (nc * Ho + oy) * Wo + ox0;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (ox0 + v < Wo) dst[v] = static_cast<scalar_t>(acc[v]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// channels_last: block (tc, 256/tc): x runs over vectors of VEC channels, y over pixels.
// ------------------------------------------------------------------------------------------------

// Copies the taps of the block's channels to shared memory as [tap][channel] (acc_t); channels
// past C get zeros. Caller syncs.
template <typename scalar_t, typename index_t, int VEC>
__device__ __forceinline__ void load_weight_tile(
    const scalar_t* __restrict__ weight, at::opmath_type<scalar_t>* tile, index_t C, index_t K, index_t c_base,
    bool flip) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t width = static_cast<index_t>(blockDim.x) * VEC;
  const index_t n = K * width;
  const index_t tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (index_t i = tid; i < n; i += static_cast<index_t>(blockDim.x) * blockDim.y) {
    const index_t k = i / width;
    const index_t c = c_base + (i - k * width);
    tile[i] = c < C ? static_cast<acc_t>(weight[c * K + (flip ? K - 1 - k : k)]) : acc_t(0);
  }
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void load_taps(
    const at::opmath_type<scalar_t>* tile, const scalar_t* __restrict__ weight, bool use_tile, int64_t tile_offset,
    int64_t c, int64_t K, int64_t kk, at::opmath_type<scalar_t> (&w)[VEC]) {
  using acc_t = at::opmath_type<scalar_t>;
  if (use_tile) {
    const AccVec<acc_t, VEC> t = *reinterpret_cast<const AccVec<acc_t, VEC>*>(tile + tile_offset);
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[j] = t.v[j];
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) w[j] = static_cast<acc_t>(weight[(c + j) * K + kk]);
  }
}

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads) dw_fwd_cl(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, const Geom g, const bool flip, const bool use_tile) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const index_t C = g.C, Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const index_t kH = g.kH, kW = g.kW, K = g.kH * g.kW;
  const index_t width = static_cast<index_t>(blockDim.x) * VEC;
  const index_t c_base = static_cast<index_t>(blockIdx.x) * width;
  if (use_tile) {
    load_weight_tile<scalar_t, index_t, VEC>(weight, tile, C, K, c_base, flip);
    __syncthreads();
  }
  const index_t c = c_base + static_cast<index_t>(threadIdx.x) * VEC;
  if (c >= C) return;  // no barrier below

  acc_t b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) b[j] = bias != nullptr ? static_cast<acc_t>(bias[c + j]) : acc_t(0);

  const index_t P = g.N * Ho * Wo;
  const index_t step = static_cast<index_t>(blockDim.y) * gridDim.y;
  for (index_t p = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; p < P; p += step) {
    const index_t ox = p % Wo;
    const index_t t = p / Wo;
    const index_t oy = t % Ho;
    const index_t n = t / Ho;
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = b[j];
    const scalar_t* img = in + n * Hi * Wi * C + c;
    for (index_t ky = 0; ky < kH; ++ky) {
      const index_t iy = static_cast<index_t>(input_index(oy, ky, g.sh, g.pt, g.dh));
      if (!(iy >= 0 && iy < Hi)) continue;
      for (index_t kx = 0; kx < kW; ++kx) {
        const index_t ix = static_cast<index_t>(input_index(ox, kx, g.sw, g.pl, g.dw));
        if (!(ix >= 0 && ix < Wi)) continue;
        const index_t k = ky * kW + kx;
        const Vec<scalar_t, VEC> x = *reinterpret_cast<const Vec<scalar_t, VEC>*>(img + (iy * Wi + ix) * C);
        acc_t w[VEC];
        load_taps<scalar_t, VEC>(tile, weight, use_tile, k * width + threadIdx.x * VEC, c, K, flip ? K - 1 - k : k, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += w[j] * static_cast<acc_t>(x.v[j]);
      }
    }
    Vec<scalar_t, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = static_cast<scalar_t>(acc[j]);
    *reinterpret_cast<Vec<scalar_t, VEC>*>(out + p * C + c) = y;
  }
}

// Fixed K x K, stride S both ways, dilation 1, 32-bit indices; see depthwise_conv2d_cl_rows.h.
template <typename scalar_t, int K, int S>
__global__ void __launch_bounds__(depthwise::cl_rows::kThreads) dw_fwd_cl_rows(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, const depthwise::cl_rows::Geom g, const bool flip) {
  depthwise::cl_rows::forward_thread<scalar_t, K, S>(
      in, weight, bias, out, g, flip, static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x),
      static_cast<int32_t>(blockIdx.y * blockDim.y + threadIdx.y), static_cast<int32_t>(blockDim.y * gridDim.y));
}

// ------------------------------------------------------------------------------------------------
// grad_input for stride > 1: gather. Geometry is the forward one (Hi x Wi = grad_input,
// Ho x Wo = grad_output). S > 0 fixes both strides at compile time (cheap divisibility tests).
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t, int S>
__global__ void __launch_bounds__(kThreads) dw_bwd_input_nchw(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_in,
    const Geom g, const index_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t C = g.C, Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const index_t kH = g.kH, kW = g.kW, K = g.kH * g.kW;
  const int64_t sh = S > 0 ? S : g.sh, sw = S > 0 ? S : g.sw;
  const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const index_t ix = i % Wi;
    const index_t t = i / Wi;
    const index_t iy = t % Hi;
    const index_t nc = t / Hi;
    const index_t c = nc % C;
    const scalar_t* go = grad_out + nc * Ho * Wo;
    const scalar_t* wc = weight + c * K;
    acc_t acc = 0;
    for (index_t ky = 0; ky < kH; ++ky) {
      const index_t oy = static_cast<index_t>(output_index_for_input(iy, ky, sh, g.pt, g.dh, Ho));
      if (oy < 0) continue;
      for (index_t kx = 0; kx < kW; ++kx) {
        const index_t ox = static_cast<index_t>(output_index_for_input(ix, kx, sw, g.pl, g.dw, Wo));
        if (ox < 0) continue;
        acc += static_cast<acc_t>(wc[ky * kW + kx]) * static_cast<acc_t>(go[oy * Wo + ox]);
      }
    }
    grad_in[i] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename index_t, int VEC, int S>
__global__ void __launch_bounds__(kThreads) dw_bwd_input_cl(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_in,
    const Geom g, const bool use_tile) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  const index_t C = g.C, Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const index_t kH = g.kH, kW = g.kW, K = g.kH * g.kW;
  const int64_t sh = S > 0 ? S : g.sh, sw = S > 0 ? S : g.sw;
  const index_t width = static_cast<index_t>(blockDim.x) * VEC;
  const index_t c_base = static_cast<index_t>(blockIdx.x) * width;
  if (use_tile) {
    load_weight_tile<scalar_t, index_t, VEC>(weight, tile, C, K, c_base, false);
    __syncthreads();
  }
  const index_t c = c_base + static_cast<index_t>(threadIdx.x) * VEC;
  if (c >= C) return;  // no barrier below

  const index_t P = g.N * Hi * Wi;
  const index_t step = static_cast<index_t>(blockDim.y) * gridDim.y;
  for (index_t p = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; p < P; p += step) {
    const index_t ix = p % Wi;
    const index_t t = p / Wi;
    const index_t iy = t % Hi;
    const index_t n = t / Hi;
    acc_t acc[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) acc[j] = 0;
    const scalar_t* img = grad_out + n * Ho * Wo * C + c;
    for (index_t ky = 0; ky < kH; ++ky) {
      const index_t oy = static_cast<index_t>(output_index_for_input(iy, ky, sh, g.pt, g.dh, Ho));
      if (oy < 0) continue;
      for (index_t kx = 0; kx < kW; ++kx) {
        const index_t ox = static_cast<index_t>(output_index_for_input(ix, kx, sw, g.pl, g.dw, Wo));
        if (ox < 0) continue;
        const index_t k = ky * kW + kx;
        const Vec<scalar_t, VEC> go = *reinterpret_cast<const Vec<scalar_t, VEC>*>(img + (oy * Wo + ox) * C);
        acc_t w[VEC];
        load_taps<scalar_t, VEC>(tile, weight, use_tile, k * width + threadIdx.x * VEC, c, K, k, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += w[j] * static_cast<acc_t>(go.v[j]);
      }
    }
    Vec<scalar_t, VEC> y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) y.v[j] = static_cast<scalar_t>(acc[j]);
    *reinterpret_cast<Vec<scalar_t, VEC>*>(grad_in + p * C + c) = y;
  }
}

// ------------------------------------------------------------------------------------------------
// grad_weight / grad_bias. Column j of a channel is tap j (j < K) or the bias (j == K).
// Stage 1 writes, per (chunk s, channel c), the chunk's sum of each column: straight into
// grad_weight / grad_bias when there is one chunk, else into partial[s][c][K + 1] (acc_t).
// Stage 2 sums the chunks in order.
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct WeightGradOut {
  at::opmath_type<scalar_t>* partial;  // [S][C][K + 1]; unused when S == 1
  scalar_t* grad_weight;               // [C][K] or nullptr when not requested
  scalar_t* grad_bias;                 // [C] or nullptr when not requested

  __device__ __forceinline__ void store(int64_t s, int64_t S, int64_t c, int64_t C, int64_t K, int64_t j,
                                        at::opmath_type<scalar_t> value) const {
    if (S > 1) {
      partial[(s * C + c) * (K + 1) + j] = value;
    } else if (j < K) {
      if (grad_weight != nullptr) grad_weight[c * K + j] = static_cast<scalar_t>(value);
    } else {
      if (grad_bias != nullptr) grad_bias[c] = static_cast<scalar_t>(value);
    }
  }
};

// NCHW, fixed KHxKW, 32-bit indices. Block (c, s); 256 threads run over the chunk's outputs
// (rows [r0, r1) of the N*Ho rows of channel c), each keeping K + 1 running sums.
template <typename scalar_t, int KH, int KW>
__global__ void __launch_bounds__(kThreads) dw_bwd_weight_nchw_fixed(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ in, const WeightGradOut<scalar_t> dst,
    const Geom g, const int32_t rows_per_chunk, const bool need_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = KH * KW;
  constexpr int M = K + 1;
  __shared__ acc_t red[kWarps * M];
  const int32_t C = static_cast<int32_t>(g.C), Hi = static_cast<int32_t>(g.Hi), Wi = static_cast<int32_t>(g.Wi);
  const int32_t Ho = static_cast<int32_t>(g.Ho), Wo = static_cast<int32_t>(g.Wo);
  const int32_t c = blockIdx.x, s = blockIdx.y;
  const int32_t rows = static_cast<int32_t>(g.N) * Ho;
  const int32_t r0 = s * rows_per_chunk;
  const int32_t r1 = min(rows, r0 + rows_per_chunk);
  const int32_t count = (r1 - r0) * Wo;

  acc_t acc[M];
#pragma unroll
  for (int j = 0; j < M; ++j) acc[j] = 0;
  for (int32_t e = threadIdx.x; e < count; e += kThreads) {
    const int32_t r = r0 + e / Wo;
    const int32_t ox = e % Wo;
    const int32_t n = r / Ho;
    const int32_t oy = r % Ho;
    const int32_t plane = n * C + c;
    const acc_t go = static_cast<acc_t>(grad_out[(plane * Ho + oy) * Wo + ox]);
    acc[K] += go;
    if (!need_weight) continue;
    const scalar_t* img = in + plane * Hi * Wi;
#pragma unroll
    for (int ky = 0; ky < KH; ++ky) {
      const int32_t iy = static_cast<int32_t>(input_index(oy, ky, g.sh, g.pt, g.dh));
      if (!(iy >= 0 && iy < Hi)) continue;
#pragma unroll
      for (int kx = 0; kx < KW; ++kx) {
        const int32_t ix = static_cast<int32_t>(input_index(ox, kx, g.sw, g.pl, g.dw));
        if (!(ix >= 0 && ix < Wi)) continue;
        acc[ky * KW + kx] += go * static_cast<acc_t>(img[iy * Wi + ix]);
      }
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < M; ++j) {
    const acc_t v = warp_sum(acc[j]);
    if (lane == 0) red[warp * M + j] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < M; j += kThreads) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red[w * M + j];
    dst.store(s, gridDim.y, c, C, K, j, total);
  }
}

// NCHW, any kernel size: one pass over the chunk per column.
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) dw_bwd_weight_nchw_any(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ in, const WeightGradOut<scalar_t> dst,
    const Geom g, const index_t rows_per_chunk, const bool need_weight, const bool need_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kWarps];
  const index_t C = g.C, Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const index_t kW = g.kW, K = g.kH * g.kW;
  const index_t c = blockIdx.x, s = blockIdx.y;
  const index_t rows = g.N * Ho;
  const index_t r0 = s * rows_per_chunk;
  const index_t r1 = rows < r0 + rows_per_chunk ? rows : r0 + rows_per_chunk;
  const index_t count = (r1 - r0) * Wo;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (index_t j = need_weight ? 0 : K; j <= K; ++j) {
    if (j == K && !need_bias) break;
    const index_t ky = j / kW, kx = j % kW;
    acc_t acc = 0;
    for (index_t e = threadIdx.x; e < count; e += kThreads) {
      const index_t r = r0 + e / Wo;
      const index_t ox = e % Wo;
      const index_t n = r / Ho;
      const index_t oy = r % Ho;
      const index_t plane = n * C + c;
      const acc_t go = static_cast<acc_t>(grad_out[(plane * Ho + oy) * Wo + ox]);
      if (j == K) {
        acc += go;
        continue;
      }
      const index_t iy = static_cast<index_t>(input_index(oy, ky, g.sh, g.pt, g.dh));
      const index_t ix = static_cast<index_t>(input_index(ox, kx, g.sw, g.pl, g.dw));
      if (iy >= 0 && iy < Hi && ix >= 0 && ix < Wi) {
        acc += go * static_cast<acc_t>(in[(plane * Hi + iy) * Wi + ix]);
      }
    }
    acc = warp_sum(acc);
    if (lane == 0) red[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += red[w];
      dst.store(s, gridDim.y, c, C, K, j, total);
    }
    __syncthreads();
  }
}

// channels_last, fixed KHxKW, 32-bit indices. Block (32, 8): x = channel (coalesced), y = pixel
// slot; block (channel block, s) covers pixels [p0, p1) of the N*Ho*Wo output pixels.
template <typename scalar_t, int KH, int KW>
__global__ void __launch_bounds__(kThreads) dw_bwd_weight_cl_fixed(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ in, const WeightGradOut<scalar_t> dst,
    const Geom g, const int32_t pixels_per_chunk, const bool need_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int K = KH * KW;
  constexpr int M = K + 1;
  __shared__ acc_t red[kWarps][32];
  const int32_t C = static_cast<int32_t>(g.C), Hi = static_cast<int32_t>(g.Hi), Wi = static_cast<int32_t>(g.Wi);
  const int32_t Ho = static_cast<int32_t>(g.Ho), Wo = static_cast<int32_t>(g.Wo);
  const int32_t c = blockIdx.x * 32 + threadIdx.x;
  const int32_t s = blockIdx.y;
  const bool active = c < C;
  const int32_t P = static_cast<int32_t>(g.N) * Ho * Wo;
  const int32_t p0 = s * pixels_per_chunk;
  const int32_t p1 = min(P, p0 + pixels_per_chunk);

  acc_t acc[M];
#pragma unroll
  for (int j = 0; j < M; ++j) acc[j] = 0;
  if (active) {
    for (int32_t p = p0 + threadIdx.y; p < p1; p += kWarps) {
      const int32_t ox = p % Wo;
      const int32_t t = p / Wo;
      const int32_t oy = t % Ho;
      const int32_t n = t / Ho;
      const acc_t go = static_cast<acc_t>(grad_out[p * C + c]);
      acc[K] += go;
      if (!need_weight) continue;
      const scalar_t* img = in + n * Hi * Wi * C + c;
#pragma unroll
      for (int ky = 0; ky < KH; ++ky) {
        const int32_t iy = static_cast<int32_t>(input_index(oy, ky, g.sh, g.pt, g.dh));
        if (!(iy >= 0 && iy < Hi)) continue;
#pragma unroll
        for (int kx = 0; kx < KW; ++kx) {
          const int32_t ix = static_cast<int32_t>(input_index(ox, kx, g.sw, g.pl, g.dw));
          if (!(ix >= 0 && ix < Wi)) continue;
          acc[ky * KW + kx] += go * static_cast<acc_t>(img[(iy * Wi + ix) * C]);
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < M; ++j) {
    red[threadIdx.y][threadIdx.x] = acc[j];
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      acc_t total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += red[w][threadIdx.x];
      dst.store(s, gridDim.y, c, C, K, j, total);
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads) dw_bwd_weight_cl_any(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ in, const WeightGradOut<scalar_t> dst,
    const Geom g, const index_t pixels_per_chunk, const bool need_weight, const bool need_bias) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kWarps][32];
  const index_t C = g.C, Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const index_t kW = g.kW, K = g.kH * g.kW;
  const index_t c = static_cast<index_t>(blockIdx.x) * 32 + threadIdx.x;
  const index_t s = blockIdx.y;
  const bool active = c < C;
  const index_t P = g.N * Ho * Wo;
  const index_t p0 = s * pixels_per_chunk;
  const index_t p1 = P < p0 + pixels_per_chunk ? P : p0 + pixels_per_chunk;

  for (index_t j = need_weight ? 0 : K; j <= K; ++j) {
    if (j == K && !need_bias) break;
    const index_t ky = j / kW, kx = j % kW;
    acc_t acc = 0;
    if (active) {
      for (index_t p = p0 + threadIdx.y; p < p1; p += kWarps) {
        const acc_t go = static_cast<acc_t>(grad_out[p * C + c]);
        if (j == K) {
          acc += go;
          continue;
        }
        const index_t ox = p % Wo;
        const index_t t = p / Wo;
        const index_t oy = t % Ho;
        const index_t n = t / Ho;
        const index_t iy = static_cast<index_t>(input_index(oy, ky, g.sh, g.pt, g.dh));
        const index_t ix = static_cast<index_t>(input_index(ox, kx, g.sw, g.pl, g.dw));
        if (iy >= 0 && iy < Hi && ix >= 0 && ix < Wi) {
          acc += go * static_cast<acc_t>(in[((n * Hi + iy) * Wi + ix) * C + c]);
        }
      }
    }
    red[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && active) {
      acc_t total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) total += red[w][threadIdx.x];
      dst.store(s, gridDim.y, c, C, K, j, total);
    }
    __syncthreads();
  }
}

// Stage 2: column j of [C][K + 1], summed over the S chunks in order. Block (32, 8).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) dw_bwd_weight_finish(
    const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ grad_weight,
    scalar_t* __restrict__ grad_bias, const int64_t C, const int64_t K, const int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[kWarps][32];
  const int64_t J = C * (K + 1);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  acc_t acc = 0;
  if (j < J) {
    for (int64_t s = threadIdx.y; s < S; s += kWarps) acc += partial[s * J + j];
  }
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < J) {
    acc_t total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += red[w][threadIdx.x];
    const int64_t c = j / (K + 1), k = j % (K + 1);
    if (k < K) {
      if (grad_weight != nullptr) grad_weight[c * K + k] = static_cast<scalar_t>(total);
    } else {
      if (grad_bias != nullptr) grad_bias[c] = static_cast<scalar_t>(total);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers.
// ------------------------------------------------------------------------------------------------

template <typename F>
void dispatch_index(bool use32, F&& f) {
  if (use32) {
    f(int32_t{0});
  } else {
    f(int64_t{0});
  }
}

// Which square kernel sizes have a fixed-size specialisation.
inline bool fixed_kernel(const Geom& g) {
  return g.kH == g.kW && (g.kH == 3 || g.kH == 5 || g.kH == 7);
}

// Block shape and tap placement of the channels_last kernels over P pixels.
template <typename scalar_t>
struct ClLaunch {
  int vec;
  bool use_tile;
  dim3 grid, block;
  size_t smem;

  ClLaunch(int64_t C, int64_t K, int64_t P, bool can_vectorize) {
    using acc_t = at::opmath_type<scalar_t>;
    vec = can_vectorize ? static_cast<int>(16 / sizeof(scalar_t)) : 1;
    const int64_t vectors = ceil_div(C, vec);
    int tc = std::min(32, next_pow2(vectors));
    auto tile_bytes = [&](int t) { return K * t * vec * static_cast<int64_t>(sizeof(acc_t)); };
    int t = tc;
    while (t > 8 && tile_bytes(t) > kMaxSmemWeightBytes) t /= 2;
    use_tile = tile_bytes(t) <= kMaxSmemWeightBytes;
    if (use_tile) tc = t;
    smem = use_tile ? static_cast<size_t>(tile_bytes(tc)) : 0;
    const int ty = kThreads / tc;
    const int64_t gx = ceil_div(vectors, tc);
    int64_t gy = ceil_div(P, ty);
    // Large problems: four pixels per thread, so each block's tap tile is reused.
    if (gx * gy >= 4096) gy = ceil_div(gy, 4);
    gy = std::max<int64_t>(1, std::min<int64_t>(gy, 65535));
    grid = dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
    block = dim3(static_cast<unsigned int>(tc), static_cast<unsigned int>(ty));
  }
};

// FASTCNN_CUDA_DEPTHWISE_CL=rows selects dw_fwd_cl_rows where it applies; read every call (tests
// and benchmarks switch it in process; a getenv is ~0.1 us).
inline bool cl_rows_selected() {
  const char* value = std::getenv("FASTCNN_CUDA_DEPTHWISE_CL");
  return value != nullptr && std::strcmp(value, "rows") == 0;
}

// SMs of the current device (ATen's device-properties header needs cuSPARSE's headers; this does not).
inline int64_t multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  const int device = c10::cuda::current_device();
  int count = device < kMaxDevices ? cache[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

template <typename scalar_t>
bool try_launch_cl_rows(
    const scalar_t* in, const scalar_t* weight, const scalar_t* bias, scalar_t* out, const Geom& g, bool flip,
    bool use32, cudaStream_t stream) {
  namespace rows = depthwise::cl_rows;
  const auto pack_bytes = static_cast<uintptr_t>(sizeof(scalar_t) * rows::kVec);
  const bool aligned = aligned_to(in, pack_bytes) && aligned_to(out, pack_bytes);
  if (!use32 || !cl_rows_selected() || !rows::supports(g.kH, g.kW, g.sh, g.sw, g.dh, g.dw, g.C, aligned)) return false;
  const int64_t sm_count = multiprocessor_count();
  auto run = [&](auto k_tag, auto s_tag) {
    constexpr int K = decltype(k_tag)::value;
    constexpr int S = decltype(s_tag)::value;
    const rows::Geom rg = rows::make_geom<K>(g.N, g.C, g.Hi, g.Wi, g.Ho, g.Wo, g.pt, g.pl);
    const rows::Launch l = rows::launch_shape(rg, sm_count);
    const dim3 grid(static_cast<unsigned int>(l.grid_x), static_cast<unsigned int>(l.grid_y));
    const dim3 block(static_cast<unsigned int>(l.block_x), static_cast<unsigned int>(l.block_y));
    dw_fwd_cl_rows<scalar_t, K, S><<<grid, block, 0, stream>>>(in, weight, bias, out, rg, flip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using K3 = std::integral_constant<int, 3>;
  using K5 = std::integral_constant<int, 5>;
  using S1 = std::integral_constant<int, 1>;
  using S2 = std::integral_constant<int, 2>;
  if (g.kH == 3) {
    g.sh == 1 ? run(K3{}, S1{}) : run(K3{}, S2{});
  } else {
    g.sh == 1 ? run(K5{}, S1{}) : run(K5{}, S2{});
  }
  return true;
}

// FASTCNN_CUDA_DEPTHWISE_NCHW=vec selects dw_fwd_nchw_vec where it applies (read every call).
inline bool nchw_vec_selected() {
  const char* value = std::getenv("FASTCNN_CUDA_DEPTHWISE_NCHW");
  return value != nullptr && std::strcmp(value, "vec") == 0;
}

template <typename scalar_t>
bool try_launch_nchw_vec(
    const scalar_t* in, const scalar_t* weight, const scalar_t* bias, scalar_t* out, const Geom& g, bool flip,
    bool use32, cudaStream_t stream) {
  namespace nv = depthwise::nchw_vec;
  const auto vec_bytes = static_cast<uintptr_t>(sizeof(scalar_t) * nv::Width<scalar_t>::VEC);
  const bool aligned = aligned_to(in, vec_bytes) && aligned_to(out, vec_bytes);
  if (!use32 || !nchw_vec_selected() ||
      !nv::supports<scalar_t>(g.kH, g.kW, g.sh, g.sw, g.dh, g.dw, g.pl, g.Wi, g.Wo, aligned)) {
    return false;
  }
  const nv::Geom vg = nv::make_geom<scalar_t>(g.N, g.C, g.Hi, g.Wi, g.Ho, g.Wo, g.pt);
  const auto blocks = static_cast<unsigned int>(nv::launch_blocks(vg));
  auto run = [&](auto k_tag, auto s_tag) {
    constexpr int K = decltype(k_tag)::value;
    constexpr int S = decltype(s_tag)::value;
    dw_fwd_nchw_vec<scalar_t, K, S><<<blocks, nv::kThreads, 0, stream>>>(in, weight, bias, out, vg, flip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using S1 = std::integral_constant<int, 1>;
  using S2 = std::integral_constant<int, 2>;
  auto with_stride = [&](auto k_tag) { g.sh == 1 ? run(k_tag, S1{}) : run(k_tag, S2{}); };
  if (g.kH == 3) {
    with_stride(std::integral_constant<int, 3>{});
  } else if (g.kH == 5) {
    with_stride(std::integral_constant<int, 5>{});
  } else {
    with_stride(std::integral_constant<int, 7>{});
  }
  return true;
}

// out = correlation of `in` (g.Hi x g.Wi) with the taps (flipped when `flip`), plus bias.
template <typename scalar_t>
void launch_forward(
    const scalar_t* in, const scalar_t* weight, const scalar_t* bias, scalar_t* out, const Geom& g, bool flip,
    bool channels_last, bool use32, cudaStream_t stream) {
  const int64_t K = g.kH * g.kW;
  if (!channels_last) {
    if (try_launch_nchw_vec<scalar_t>(in, weight, bias, out, g, flip, use32, stream)) return;
    const int64_t total = g.N * g.C * g.Ho * ceil_div(g.Wo, kRowVec);
    const bool fast = use32 && total <= kMax32 && g.dh == 1 && g.dw == 1 && fixed_kernel(g) && (g.sw == 1 || g.sw == 2);
    if (fast) {
      const auto t32 = static_cast<int32_t>(total);
#define FASTCNN_DW_FWD_FIXED(KS, SWV)                                                                       \
  dw_fwd_nchw_fixed<scalar_t, KS, KS, SWV><<<grid_1d(total), kThreads, 0, stream>>>(in, weight, bias, out, g, \
                                                                                     flip, t32)
      if (g.sw == 1) {
        if (g.kH == 3) FASTCNN_DW_FWD_FIXED(3, 1);
        else if (g.kH == 5) FASTCNN_DW_FWD_FIXED(5, 1);
        else FASTCNN_DW_FWD_FIXED(7, 1);
      } else {
        if (g.kH == 3) FASTCNN_DW_FWD_FIXED(3, 2);
        else if (g.kH == 5) FASTCNN_DW_FWD_FIXED(5, 2);
        else FASTCNN_DW_FWD_FIXED(7, 2);
      }
#undef FASTCNN_DW_FWD_FIXED
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    dispatch_index(use32 && total <= kMax32, [&](auto idx) {
      using index_t = decltype(idx);
      dw_fwd_nchw_any<scalar_t, index_t>
          <<<grid_1d(total), kThreads, 0, stream>>>(in, weight, bias, out, g, flip, static_cast<index_t>(total));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  if (try_launch_cl_rows<scalar_t>(in, weight, bias, out, g, flip, use32, stream)) return;
  constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
  const bool can_vectorize = g.C % kVec == 0 && aligned16(in) && aligned16(out);
  const ClLaunch<scalar_t> cfg(g.C, K, g.N * g.Ho * g.Wo, can_vectorize);
  dispatch_index(use32, [&](auto idx) {
    using index_t = decltype(idx);
    if (cfg.vec == kVec) {
      dw_fwd_cl<scalar_t, index_t, kVec>
          <<<cfg.grid, cfg.block, cfg.smem, stream>>>(in, weight, bias, out, g, flip, cfg.use_tile);
    } else {
      dw_fwd_cl<scalar_t, index_t, 1>
          <<<cfg.grid, cfg.block, cfg.smem, stream>>>(in, weight, bias, out, g, flip, cfg.use_tile);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_input (g.Hi x g.Wi) from grad_output (g.Ho x g.Wo); g is the forward geometry.
template <typename scalar_t>
void launch_grad_input(
    const scalar_t* grad_out, const scalar_t* weight, scalar_t* grad_in, const Geom& g, bool channels_last,
    bool use32, cudaStream_t stream) {
  if (g.sh == 1 && g.sw == 1) {
    // grad_in[iy] = sum_k grad_out[iy + pt - k*d] w[k] = sum_k' grad_out[iy - pt' + k'*d] w[kH-1-k'],
    // pt' = (kH-1)*d - pt: a stride-1 correlation of grad_out with the flipped taps.
    Geom t = g;
    t.Hi = g.Ho;
    t.Wi = g.Wo;
    t.Ho = g.Hi;
    t.Wo = g.Wi;
    t.pt = (g.kH - 1) * g.dh - g.pt;
    t.pl = (g.kW - 1) * g.dw - g.pl;
    launch_forward<scalar_t>(grad_out, weight, nullptr, grad_in, t, /*flip=*/true, channels_last, use32, stream);
    return;
  }
  const bool stride2 = g.sh == 2 && g.sw == 2;
  if (!channels_last) {
    const int64_t total = g.N * g.C * g.Hi * g.Wi;
    dispatch_index(use32, [&](auto idx) {
      using index_t = decltype(idx);
      const auto n = static_cast<index_t>(total);
      if (stride2) {
        dw_bwd_input_nchw<scalar_t, index_t, 2><<<grid_1d(total), kThreads, 0, stream>>>(grad_out, weight, grad_in, g, n);
      } else {
        dw_bwd_input_nchw<scalar_t, index_t, 0><<<grid_1d(total), kThreads, 0, stream>>>(grad_out, weight, grad_in, g, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
  const bool can_vectorize = g.C % kVec == 0 && aligned16(grad_out) && aligned16(grad_in);
  const ClLaunch<scalar_t> cfg(g.C, g.kH * g.kW, g.N * g.Hi * g.Wi, can_vectorize);
  dispatch_index(use32, [&](auto idx) {
    using index_t = decltype(idx);
    if (cfg.vec == kVec) {
      if (stride2) {
        dw_bwd_input_cl<scalar_t, index_t, kVec, 2>
            <<<cfg.grid, cfg.block, cfg.smem, stream>>>(grad_out, weight, grad_in, g, cfg.use_tile);
      } else {
        dw_bwd_input_cl<scalar_t, index_t, kVec, 0>
            <<<cfg.grid, cfg.block, cfg.smem, stream>>>(grad_out, weight, grad_in, g, cfg.use_tile);
      }
    } else {
      if (stride2) {
        dw_bwd_input_cl<scalar_t, index_t, 1, 2>
            <<<cfg.grid, cfg.block, cfg.smem, stream>>>(grad_out, weight, grad_in, g, cfg.use_tile);
      } else {
        dw_bwd_input_cl<scalar_t, index_t, 1, 0>
            <<<cfg.grid, cfg.block, cfg.smem, stream>>>(grad_out, weight, grad_in, g, cfg.use_tile);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Chunking of the weight-gradient reduction: a function of the shapes only, so that results are
// bitwise reproducible on any GPU.
constexpr int64_t kTargetBlocks = 512;
constexpr int64_t kMinElemsPerBlock = 2048;  // NCHW: 8 outputs per thread
constexpr int64_t kMinPixelsPerBlock = 128;  // channels_last: 16 pixels per thread row

template <typename scalar_t>
void launch_grad_weight(
    const scalar_t* grad_out, const scalar_t* in, scalar_t* grad_weight, scalar_t* grad_bias, const Geom& g,
    bool channels_last, bool use32, const at::TensorOptions& options, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = g.kH * g.kW;
  const bool need_weight = grad_weight != nullptr, need_bias = grad_bias != nullptr;
  const bool fixed = use32 && fixed_kernel(g);

  // units: rows (NCHW) or pixels (channels_last) to split into S chunks
  int64_t units, S, per_chunk;
  dim3 grid, block;
  if (!channels_last) {
    units = g.N * g.Ho;
    S = std::min(ceil_div(units * g.Wo, kMinElemsPerBlock), ceil_div(kTargetBlocks, g.C));
    S = std::max<int64_t>(1, std::min(S, units));
    per_chunk = ceil_div(units, S);
    S = ceil_div(units, per_chunk);
    grid = dim3(static_cast<unsigned int>(g.C), static_cast<unsigned int>(S));
    block = dim3(kThreads);
  } else {
    units = g.N * g.Ho * g.Wo;
    const int64_t gx = ceil_div(g.C, 32);
    S = std::min(ceil_div(units, kMinPixelsPerBlock), ceil_div(kTargetBlocks, gx));
    S = std::max<int64_t>(1, std::min(S, units));
    per_chunk = ceil_div(units, S);
    S = ceil_div(units, per_chunk);
    grid = dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(S));
    block = dim3(32, kWarps);
  }

  at::Tensor partial;
  WeightGradOut<scalar_t> dst{nullptr, grad_weight, grad_bias};
  if (S > 1) {
    partial = at::empty({S * g.C * (K + 1)}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
    dst.partial = partial.data_ptr<acc_t>();
  }

  if (fixed) {
    const auto chunk32 = static_cast<int32_t>(per_chunk);
#define FASTCNN_DW_BWD_WEIGHT(KERNEL, KS) \
  KERNEL<scalar_t, KS, KS><<<grid, block, 0, stream>>>(grad_out, in, dst, g, chunk32, need_weight)
    if (!channels_last) {
      if (g.kH == 3) FASTCNN_DW_BWD_WEIGHT(dw_bwd_weight_nchw_fixed, 3);
      else if (g.kH == 5) FASTCNN_DW_BWD_WEIGHT(dw_bwd_weight_nchw_fixed, 5);
      else FASTCNN_DW_BWD_WEIGHT(dw_bwd_weight_nchw_fixed, 7);
    } else {
      if (g.kH == 3) FASTCNN_DW_BWD_WEIGHT(dw_bwd_weight_cl_fixed, 3);
      else if (g.kH == 5) FASTCNN_DW_BWD_WEIGHT(dw_bwd_weight_cl_fixed, 5);
      else FASTCNN_DW_BWD_WEIGHT(dw_bwd_weight_cl_fixed, 7);
    }
#undef FASTCNN_DW_BWD_WEIGHT
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    dispatch_index(use32, [&](auto idx) {
      using index_t = decltype(idx);
      const auto chunk = static_cast<index_t>(per_chunk);
      if (!channels_last) {
        dw_bwd_weight_nchw_any<scalar_t, index_t>
            <<<grid, block, 0, stream>>>(grad_out, in, dst, g, chunk, need_weight, need_bias);
      } else {
        dw_bwd_weight_cl_any<scalar_t, index_t>
            <<<grid, block, 0, stream>>>(grad_out, in, dst, g, chunk, need_weight, need_bias);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  if (S > 1) {
    const int64_t J = g.C * (K + 1);
    dw_bwd_weight_finish<scalar_t><<<static_cast<unsigned int>(ceil_div(J, 32)), dim3(32, kWarps), 0, stream>>>(
        dst.partial, grad_weight, grad_bias, g.C, K, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ------------------------------------------------------------------------------------------------
// Argument checks and the registered functions.
// ------------------------------------------------------------------------------------------------

// The shared checks (csrc/common) name the argument; the kernels take their result as a Geom.
Geom to_geom(const depthwise::Geometry& c) {
  Geom g;
  g.N = c.batch;
  g.C = c.channels;
  g.Hi = c.in_h;
  g.Wi = c.in_w;
  g.kH = c.kernel_h;
  g.kW = c.kernel_w;
  g.sh = c.stride_h;
  g.sw = c.stride_w;
  g.pt = c.pad_top;
  g.pl = c.pad_left;
  g.dh = c.dilation_h;
  g.dw = c.dilation_w;
  g.Ho = c.out_h;
  g.Wo = c.out_w;
  return g;
}

// Whether every tensor the kernels index (input, output, weight) fits 32-bit index arithmetic, and
// every input coordinate a tap computes (padding, stride and dilation are any int64: a huge one
// would wrap to a row inside the input, and the bounds test runs on the wrapped value).
bool fits32(const Geom& g) {
  const int64_t reach = std::max({g.pt, g.pl, (g.Ho - 1) * g.sh + (g.kH - 1) * g.dh + g.pt,
                                  (g.Wo - 1) * g.sw + (g.kW - 1) * g.dw + g.pl});
  return reach <= kMax32 && g.N * g.C * g.Hi * g.Wi <= kMax32 && g.N * g.C * g.Ho * g.Wo <= kMax32 &&
         g.C * g.kH * g.kW <= kMax32;
}

at::Tensor depthwise_conv2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation) {
  constexpr const char* op = "fastcnn::depthwise_conv2d";
  const at::Tensor* bias_ptr = bias.has_value() && bias->defined() ? &*bias : nullptr;
  TORCH_CHECK(input.is_cuda(), op, ": expected input to be a CUDA tensor, but got a tensor on ", input.device());
  const Geom g = to_geom(depthwise::check_arguments(input, weight, bias, stride, padding, dilation));
  c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  at::Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, input.options().memory_format(format));
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(format);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias_ptr != nullptr ? bias_ptr->contiguous() : at::Tensor();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastcnn_depthwise_conv2d_cuda", [&] {
    launch_forward<scalar_t>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), g, /*flip=*/false, channels_last, fits32(g), stream);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "fastcnn::_depthwise_conv2d_backward";
  TORCH_CHECK(input.is_cuda(), op, ": expected input to be a CUDA tensor, but got a tensor on ", input.device());
  const depthwise::Geometry checked = depthwise::check_arguments(input, weight, std::nullopt, stride, padding, dilation);
  depthwise::check_grad_output(grad_output, input, checked);
  const Geom g = to_geom(checked);
  c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const bool use32 = fits32(g);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor grad_input = at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({0}, input.options());
  at::Tensor grad_bias = at::empty({0}, input.options());
  if (output_mask[0]) grad_input = at::empty(input.sizes(), input.options().memory_format(format));
  if (output_mask[1]) grad_weight = at::empty(weight.sizes(), weight.options());
  if (output_mask[2]) grad_bias = at::empty({g.C}, input.options());
  const bool need_input = output_mask[0] && grad_input.numel() > 0;
  const bool need_params = (output_mask[1] && grad_weight.numel() > 0) || (output_mask[2] && grad_bias.numel() > 0);
  if (!need_input && !need_params) return {grad_input, grad_weight, grad_bias};

  if (need_params && grad_output.numel() == 0) {
    // N == 0: nothing flows into the parameters.
    if (output_mask[1]) grad_weight.zero_();
    if (output_mask[2]) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor go = grad_output.contiguous(format);  // also materialises expanded (zero-stride) gradients
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastcnn_depthwise_conv2d_backward_cuda", [&] {
    if (need_input) {
      launch_grad_input<scalar_t>(
          go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), g,
          channels_last, use32, stream);
    }
    if (need_params) {
      const at::Tensor x = input.contiguous(format);
      launch_grad_weight<scalar_t>(
          go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
          output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
          output_mask[2] ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr, g, channels_last, use32, input.options(),
          stream);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("depthwise_conv2d", TORCH_FN(fastcnn::depthwise_conv2d_cuda));
  m.impl("_depthwise_conv2d_backward", TORCH_FN(fastcnn::depthwise_conv2d_backward_cuda));
}
