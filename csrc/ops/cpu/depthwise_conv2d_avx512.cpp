// Depthwise 2-D convolution, NCHW fp32, unit stride, AVX-512: reference op F.conv2d(groups=C), as
// in MobileNets (Howard et al., 2017) and large-kernel nets (RepLKNet, Ding et al., 2022).
//
// Why it is written this way:
// - The planes are read where they lie. 16 output columns are one vector; each tap is one masked
//   load of 16 input columns. Lanes that fall left or right of the image, or past the output row,
//   read as zero without touching memory (AVX-512 masked loads suppress faults), so there is no
//   zero-padded copy and no transpose to channel blocks: the input is read once from memory and
//   the output written once, and the arithmetic stays well under the copy time.
// - 3x3 and 5x5 windows keep their weights in registers and share each loaded input row among
//   the R output rows it feeds (R = 7 for 3x3: 112, 56, 28, 14 and 7 are multiples of 7). Rows
//   outside the input load with an empty mask instead of branching: with a branch per row GCC
//   kept the accumulators on the stack, and the weight gradient ran 3x slower.
// - The weight gradient keeps one accumulator per tap, in vector form across planes (a 7x7 plane
//   is 49 pixels: reducing nine vectors per plane cost 3x the arithmetic).
//
// Only plain types cross this file's boundary, and it includes no template library headers: it is
// compiled for AVX-512, and an inline function instantiated here could otherwise be picked by the
// linker for code that runs on CPUs without it.
#include "ops/cpu/depthwise_conv2d_avx512.h"

#if FASTCNN_AVX512_PLANES
#pragma GCC target("avx512f")
#include <immintrin.h>
#endif

namespace fastcnn {
namespace depthwise {
namespace avx512 {

#if FASTCNN_AVX512_PLANES
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Lanes l with lo <= l < hi (clamped to the vector).
inline __mmask16 lane_range(int64_t lo, int64_t hi) {
  lo = lo < 0 ? 0 : lo;
  hi = hi > kLanes ? kLanes : hi;
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

// The lanes of output columns x0..x0+15 whose tap at input column offset `column` (the input
// column of lane 0) is inside the input row and whose output column exists.
inline __mmask16 tap_lanes_mask(int64_t x0, int64_t column, const PlaneGeometry& g) {
  return lane_range(-column, min64(g.in_w - column, g.out_w - x0));
}

inline bool row_inside(int64_t iy, int64_t h) { return iy >= 0 && iy < h; }

// R output rows from oy0, kernel KH x KW, dilation_h 1: input row oy0 - pad_top + j feeds output
// row r through kernel row j - r, so each of its KW loads serves up to min(R, KH) rows.
template <int KH, int KW, int R>
inline void forward_rows_fixed(const float* in, const __m512* w, __m512 bias, float* out, int64_t oy0,
                               const PlaneGeometry& g) {
  const int64_t rows = min64(R, g.out_h - oy0);
  for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
    __mmask16 mask[KW];
    for (int kx = 0; kx < KW; ++kx) mask[kx] = tap_lanes_mask(x0, x0 - g.pad_left + kx * g.dilation_w, g);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = bias;
#pragma GCC unroll 16
    for (int j = 0; j < R + KH - 1; ++j) {
      const int64_t iy = oy0 - g.pad_top + j;
      const bool inside = row_inside(iy, g.in_h);
      const float* row = in + (inside ? iy : 0) * g.in_row_stride + x0 - g.pad_left;
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) {
        const __m512 v = _mm512_maskz_loadu_ps(inside ? mask[kx] : 0, row + kx * g.dilation_w);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          if (j - r >= 0 && j - r < KH) acc[r] = _mm512_fmadd_ps(w[(j - r) * KW + kx], v, acc[r]);
      }
    }
    const __mmask16 store = lane_range(0, g.out_w - x0);
    for (int r = 0; r < R; ++r)
      if (r < rows) _mm512_mask_storeu_ps(out + (oy0 + r) * g.out_row_stride + x0, store, acc[r]);
  }
}

template <int KH, int KW, int R>
void forward_plane_fixed(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  __m512 w[KH * KW];
  for (int t = 0; t < KH * KW; ++t) w[t] = _mm512_set1_ps(taps[t]);
  const __m512 b = _mm512_set1_ps(bias);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += R) forward_rows_fixed<KH, KW, R>(in, w, b, out, oy0, g);
}

// KH x KW, dilation_h 1: one accumulator per tap, 16 lanes each, carried from plane to plane in
// `tap_lanes` (see the header); input row j feeds the taps (j - r, kx) of grad_out row r.
template <int KH, int KW, int R, bool WithBias>
void weight_grad_plane_fixed(const float* go, const float* in, float* tap_lanes, float* bias_lanes,
                             const PlaneGeometry& g) {
  __m512 acc[KH * KW];
  for (int t = 0; t < KH * KW; ++t) acc[t] = _mm512_loadu_ps(tap_lanes + t * kLanes);
  __m512 bias_acc = WithBias ? _mm512_loadu_ps(bias_lanes) : _mm512_setzero_ps();
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += R) {
    const int64_t rows = min64(R, g.out_h - oy0);
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const __mmask16 valid = lane_range(0, g.out_w - x0);
      __m512 grad[R];
      for (int r = 0; r < R; ++r) {
        grad[r] = _mm512_maskz_loadu_ps(r < rows ? valid : 0, go + (oy0 + (r < rows ? r : 0)) * g.out_row_stride + x0);
        if (WithBias) bias_acc = _mm512_add_ps(bias_acc, grad[r]);
      }
      __mmask16 mask[KW];
      for (int kx = 0; kx < KW; ++kx) mask[kx] = tap_lanes_mask(x0, x0 - g.pad_left + kx * g.dilation_w, g);
#pragma GCC unroll 16
      for (int j = 0; j < R + KH - 1; ++j) {
        const int64_t iy = oy0 - g.pad_top + j;
        const bool inside = row_inside(iy, g.in_h);
        const float* row = in + (inside ? iy : 0) * g.in_row_stride + x0 - g.pad_left;
#pragma GCC unroll 8
        for (int kx = 0; kx < KW; ++kx) {
          const __m512 v = _mm512_maskz_loadu_ps(inside ? mask[kx] : 0, row + kx * g.dilation_w);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r)
            if (j - r >= 0 && j - r < KH) acc[(j - r) * KW + kx] = _mm512_fmadd_ps(grad[r], v, acc[(j - r) * KW + kx]);
        }
      }
    }
  }
  for (int t = 0; t < KH * KW; ++t) _mm512_storeu_ps(tap_lanes + t * kLanes, acc[t]);
  if (WithBias) _mm512_storeu_ps(bias_lanes, bias_acc);
}

}  // namespace

void forward_plane(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  if (g.kernel_h == 3) return forward_plane_fixed<3, 3, 7>(in, taps, bias, out, g);
  forward_plane_fixed<5, 5, 4>(in, taps, bias, out, g);
}

void weight_grad_plane(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                       const PlaneGeometry& g) {
  if (g.kernel_h == 3) {
    if (bias_lanes) return weight_grad_plane_fixed<3, 3, 4, true>(grad_out, in, tap_lanes, bias_lanes, g);
    return weight_grad_plane_fixed<3, 3, 4, false>(grad_out, in, tap_lanes, bias_lanes, g);
  }
  if (bias_lanes) return weight_grad_plane_fixed<5, 5, 2, true>(grad_out, in, tap_lanes, bias_lanes, g);
  weight_grad_plane_fixed<5, 5, 2, false>(grad_out, in, tap_lanes, bias_lanes, g);
}

#else  // never called: enabled() is false

void forward_plane(const float*, const float*, float, float*, const PlaneGeometry&) {}
void weight_grad_plane(const float*, const float*, float*, float*, const PlaneGeometry&) {}

#endif  // FASTCNN_AVX512_PLANES

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn
