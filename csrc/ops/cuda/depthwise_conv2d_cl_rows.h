// channels_last depthwise forward, fixed kernel, taps in registers: one thread computes VEC
// channels of a row segment of R output pixels. (Reference op: F.conv2d(x, w, b, stride, padding,
// groups=C) on channels_last tensors; MobileNets, Howard et al. 2017.)
//
// Why: the general channels_last kernel (dw_fwd_cl) computes one pixel per thread with a runtime
// kH x kW loop, reading each tap from shared memory and each input vector from global memory per
// output pixel (9 + 9 loads per 3x3 pixel), and divides the pixel index every pixel; on an H200 it
// ran at 0.3-0.7x of cuDNN. Here a thread keeps its K*K*VEC taps in registers for its whole life
// and reads each input row segment once for the R outputs it feeds: (R - 1) * S + K loads per
// input row for R pixels (4.5 per pixel at K = 3, S = 1, R = 4), no shared memory, no barrier.
//
// The thread body is plain C++ (C10_HOST_DEVICE, no CUDA intrinsics) so that the CPU tests run it
// for every thread of the launch (tests/cuda_emulation/) with the launch configuration below:
// the indexing and bounds of this kernel are checked on machines without a GPU.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace fastcnn {
namespace depthwise {
namespace cl_rows {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // channels per thread: 16-byte loads in fp32, 8-byte in fp16/bf16

// Output pixels per thread, by kernel size: the taps take K*K*kVec registers (36 at 3x3, 100 at 5x5).
template <int K>
struct Segment {
  static constexpr int R = K <= 3 ? 4 : 2;
};

// 32-bit geometry (the launcher checks that every index fits).
struct Geom {
  int32_t N, C, Hi, Wi, Ho, Wo;
  int32_t pad_top, pad_left;  // may be negative (grad_input as a correlation)
  int32_t segments_per_row;  // ceil(Wo / R)
};

template <int K>
inline Geom make_geom(int64_t N, int64_t C, int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo, int64_t pad_top,
                      int64_t pad_left) {
  constexpr int R = Segment<K>::R;
  return {static_cast<int32_t>(N), static_cast<int32_t>(C), static_cast<int32_t>(Hi), static_cast<int32_t>(Wi),
          static_cast<int32_t>(Ho), static_cast<int32_t>(Wo), static_cast<int32_t>(pad_top),
          static_cast<int32_t>(pad_left), static_cast<int32_t>((Wo + R - 1) / R)};
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Whether the kernel takes this problem: square K in {3, 5}, equal strides 1 or 2, dilation 1,
// C a multiple of kVec, input and output aligned for Pack loads.
inline bool supports(int64_t kH, int64_t kW, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t C,
                     bool aligned) {
  return kH == kW && (kH == 3 || kH == 5) && sh == sw && (sh == 1 || sh == 2) && dh == 1 && dw == 1 &&
         C % kVec == 0 && aligned;
}

// Launch shape: x over channel vectors (up to 32 per block: a warp reads 32 adjacent vectors of one
// pixel), y over row segments. The grid stops growing at ~8 blocks per SM so that each thread
// loads its taps once for several segments.
struct Launch {
  int block_x, block_y;
  int64_t grid_x, grid_y;
};

inline Launch launch_shape(const Geom& g, int64_t sm_count) {
  const int64_t total_segments = int64_t{g.N} * g.Ho * g.segments_per_row;
  const int64_t vectors = g.C / kVec;
  int block_x = 1;
  while (block_x < vectors && block_x < 32) block_x *= 2;
  const int block_y = kThreads / block_x;
  const int64_t grid_x = (vectors + block_x - 1) / block_x;
  const int64_t needed = std::max<int64_t>(1, (total_segments + block_y - 1) / block_y);
  const int64_t wanted = std::max<int64_t>(1, (8 * sm_count + grid_x - 1) / grid_x);
  return {block_x, block_y, grid_x, std::min<int64_t>({needed, wanted, 65535})};
}

// The work of thread (vector, first): channels [vector * kVec, +kVec) of segments first,
// first + step, ... of the N * Ho * segments_per_row row segments. `flip` reads the taps in
// reverse (grad_input as a correlation).
template <typename scalar_t, int K, int S>
C10_HOST_DEVICE inline void forward_thread(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, const Geom& g, bool flip, int32_t vector, int32_t first, int32_t step) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr int R = Segment<K>::R;
  constexpr int KK = K * K;
  constexpr int SPAN = (R - 1) * S + K;  // input columns one segment reads per row
  const int32_t c = vector * kVec;
  if (c >= g.C) return;

  acc_t w[KK][kVec];
#pragma unroll
  for (int k = 0; k < KK; ++k) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) w[k][j] = static_cast<acc_t>(weight[(c + j) * KK + (flip ? KK - 1 - k : k)]);
  }
  acc_t b[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) b[j] = bias != nullptr ? static_cast<acc_t>(bias[c + j]) : acc_t(0);

  const int32_t C = g.C, Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const int32_t total = g.N * Ho * g.segments_per_row;
  for (int32_t s = first; s < total; s += step) {
    const int32_t segment = s % g.segments_per_row;
    const int32_t t = s / g.segments_per_row;
    const int32_t oy = t % Ho;
    const int32_t n = t / Ho;
    const int32_t ox0 = segment * R;
    const int32_t ix0 = ox0 * S - g.pad_left;
    const int32_t iy0 = oy * S - g.pad_top;
    const bool interior = ix0 >= 0 && ix0 + SPAN <= Wi;
    const scalar_t* image = in + n * Hi * Wi * C + c;

    acc_t acc[R][kVec];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[r][j] = b[j];
    }
#pragma unroll
    for (int ky = 0; ky < K; ++ky) {
      const int32_t iy = iy0 + ky;
      if (iy < 0 || iy >= Hi) continue;
      const scalar_t* row = image + iy * Wi * C;
      acc_t x[SPAN][kVec];
#pragma unroll
      for (int i = 0; i < SPAN; ++i) {
        const int32_t ix = ix0 + i;
        if (interior || (ix >= 0 && ix < Wi)) {
          const pack_t p = *reinterpret_cast<const pack_t*>(row + ix * C);
#pragma unroll
          for (int j = 0; j < kVec; ++j) x[i][j] = static_cast<acc_t>(p.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) x[i][j] = acc_t(0);
        }
      }
#pragma unroll
      for (int kx = 0; kx < K; ++kx) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[r][j] += w[ky * K + kx][j] * x[r * S + kx][j];
        }
      }
    }
    scalar_t* dst = out + ((n * Ho + oy) * Wo + ox0) * C + c;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (ox0 + r < Wo) {
        pack_t p;
#pragma unroll
        for (int j = 0; j < kVec; ++j) p.v[j] = static_cast<scalar_t>(acc[r][j]);
        *reinterpret_cast<pack_t*>(dst + r * C) = p;
      }
    }
  }
}

}  // namespace cl_rows
}  // namespace depthwise
}  // namespace fastcnn
