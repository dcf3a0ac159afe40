// NCHW depthwise forward with vector loads: one thread computes V = 2 * VEC adjacent outputs of a
// row from aligned VEC-element loads of the input rows. (Reference op: F.conv2d(x, w, b, stride,
// padding, groups=C); MobileNets, Howard et al. 2017.)
//
// Why: the general fixed-kernel NCHW forward (dw_fwd_nchw_fixed) computes 4 outputs a thread from
// scalar loads, (4 - 1) * S + K per input row: 6 loads of 4 (fp32) or 2 (fp16) bytes at 3x3,
// lanes 16 or 8 bytes apart, so each load instruction uses a quarter of every sector it touches.
// Here a row segment of 8 outputs (fp32/fp16/bf16; 4 in fp64) reads its window as aligned 16-byte
// (fp32, fp64) or 8-byte (fp16, bf16) vectors: 4 loads for 8 outputs at 3x3, stride 1, and
// stores 2 vectors. On an H200 fp16 NCHW ran at 0.46x of cuDNN with the scalar kernel.
//
// It takes square 3x3/5x5/7x7 windows, equal strides 1 or 2, dilation 1, left padding k / 2 (the
// window's offset in the loaded vectors is then a compile-time constant), input and output widths
// that are multiples of VEC (a vector is then wholly inside or wholly outside a row, and rows
// start aligned) and aligned base pointers; other problems stay on dw_fwd_nchw_fixed.
//
// The thread body is plain C++ (C10_HOST_DEVICE, no CUDA intrinsics) so that the CPU tests run it
// for every thread of the launch (tests/cuda_emulation/), as depthwise_conv2d_cl_rows.h.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace fastcnn {
namespace depthwise {
namespace nchw_vec {

constexpr int kThreads = 256;

// Elements per vector load (VEC) and outputs per thread (V).
template <typename scalar_t>
struct Width {
  static constexpr int VEC = sizeof(scalar_t) >= 8 ? 2 : 4;
  static constexpr int V = 2 * VEC;
};

// 32-bit geometry (the launcher checks that every index fits).
struct Geom {
  int32_t NC, C, Hi, Wi, Ho, Wo, pad_top;
  int32_t segments_per_row;  // ceil(Wo / V)
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t>
inline bool supports(int64_t kH, int64_t kW, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t pad_left,
                     int64_t Wi, int64_t Wo, bool aligned) {
  constexpr int VEC = Width<scalar_t>::VEC;
  return kH == kW && (kH == 3 || kH == 5 || kH == 7) && sh == sw && (sh == 1 || sh == 2) && dh == 1 && dw == 1 &&
         pad_left == kW / 2 && Wi % VEC == 0 && Wo % VEC == 0 && aligned;
}

template <typename scalar_t>
inline Geom make_geom(int64_t N, int64_t C, int64_t Hi, int64_t Wi, int64_t Ho, int64_t Wo, int64_t pad_top) {
  constexpr int V = Width<scalar_t>::V;
  return {static_cast<int32_t>(N * C), static_cast<int32_t>(C),  static_cast<int32_t>(Hi),
          static_cast<int32_t>(Wi),    static_cast<int32_t>(Ho), static_cast<int32_t>(Wo),
          static_cast<int32_t>(pad_top), static_cast<int32_t>((Wo + V - 1) / V)};
}

// A 1-D grid of 256-thread blocks, one thread per segment; threads stride over the segments when
// there are more.
inline int64_t launch_blocks(const Geom& g) {
  const int64_t total = int64_t{g.NC} * g.Ho * g.segments_per_row;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// Segments first, first + step, ...: segment i is (plane nc, output row oy, outputs [V*s, V*s + V)).
// `flip` reads the taps in reverse (grad_input as a correlation).
template <typename scalar_t, int K, int S>
C10_HOST_DEVICE inline void forward_thread(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
    scalar_t* __restrict__ out, const Geom& g, bool flip, int32_t first, int32_t step) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int VEC = Width<scalar_t>::VEC;
  constexpr int V = Width<scalar_t>::V;
  constexpr int KK = K * K;
  constexpr int PAD = K / 2;
  constexpr int SPAN = (V - 1) * S + K;             // input columns one segment reads per row
  constexpr int OFFSET = (VEC - PAD % VEC) % VEC;   // column ox0 * S - PAD within the first vector
  constexpr int NV = (OFFSET + SPAN + VEC - 1) / VEC;  // vectors loaded per row
  using pack_t = Pack<scalar_t, VEC>;

  const int32_t Hi = g.Hi, Wi = g.Wi, Ho = g.Ho, Wo = g.Wo;
  const int32_t total = g.NC * Ho * g.segments_per_row;
  for (int32_t i = first; i < total; i += step) {
    const int32_t segment = i % g.segments_per_row;
    const int32_t t = i / g.segments_per_row;
    const int32_t oy = t % Ho;
    const int32_t nc = t / Ho;
    const int32_t c = nc % g.C;

    acc_t w[KK];
#pragma unroll
    for (int k = 0; k < KK; ++k) w[k] = static_cast<acc_t>(weight[c * KK + (flip ? KK - 1 - k : k)]);
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[c]) : acc_t(0);
    acc_t acc[V];
#pragma unroll
    for (int r = 0; r < V; ++r) acc[r] = b;

    const int32_t ox0 = segment * V;
    const int32_t a0 = ox0 * S - PAD - OFFSET;  // first loaded column, a multiple of VEC
    const scalar_t* plane = in + nc * Hi * Wi;
#pragma unroll
    for (int ky = 0; ky < K; ++ky) {
      const int32_t iy = oy * S - g.pad_top + ky;
      if (iy < 0 || iy >= Hi) continue;
      const scalar_t* row = plane + iy * Wi;
      acc_t x[NV * VEC];
#pragma unroll
      for (int v = 0; v < NV; ++v) {
        const int32_t a = a0 + v * VEC;
        // Wi % VEC == 0 and a % VEC == 0: the vector is wholly inside the row or wholly outside.
        if (a >= 0 && a < Wi) {
          const pack_t p = *reinterpret_cast<const pack_t*>(row + a);
#pragma unroll
          for (int j = 0; j < VEC; ++j) x[v * VEC + j] = static_cast<acc_t>(p.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) x[v * VEC + j] = acc_t(0);
        }
      }
#pragma unroll
      for (int kx = 0; kx < K; ++kx) {
#pragma unroll
        for (int r = 0; r < V; ++r) acc[r] += w[ky * K + kx] * x[OFFSET + r * S + kx];
      }
    }
    scalar_t* dst = out + (nc * Ho + oy) * Wo + ox0;
#pragma unroll
    for (int q = 0; q < V / VEC; ++q) {
      if (ox0 + q * VEC < Wo) {  // Wo % VEC == 0: whole vectors
        pack_t p;
#pragma unroll
        for (int j = 0; j < VEC; ++j) p.v[j] = static_cast<scalar_t>(acc[q * VEC + j]);
        *reinterpret_cast<pack_t*>(dst + q * VEC) = p;
      }
    }
  }
}

}  // namespace nchw_vec
}  // namespace depthwise
}  // namespace fastcnn
