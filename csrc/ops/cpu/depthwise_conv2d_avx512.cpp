// Depthwise 2-D convolution, NCHW fp32, stride 1 or 2, AVX-512: reference op
// F.conv2d(groups=C), as in MobileNets (Howard et al., 2017).
//
// Why it is written this way:
// - The planes are read where they lie. 16 output columns are one vector; each tap is one masked
//   load of 16 input columns (stride 2: two loads shared by two taps, and a permute that keeps
//   every other column). Lanes that fall left or right of the image, or past the output row, read
//   as zero without touching memory (AVX-512 masked loads suppress faults), so there is no
//   zero-padded copy and no transpose to channel blocks: the input is read once from memory and
//   the output written once.
// - 3x3 and 5x5 windows keep their weights in registers and share each loaded input row among
//   the R output rows it feeds (R = 7 for 3x3: 112, 56, 28, 14 and 7 are multiples of 7).
// - Row blocks wholly inside the input run without row checks; border blocks load the rows
//   outside with an empty mask. With a branch per row GCC kept the accumulators on the stack, and
//   the weight gradient ran 3x slower.
// - The weight gradient keeps one accumulator per tap, in vector form across planes (a 7x7 plane
//   is 49 pixels: reducing nine vectors per plane cost 3x the arithmetic).
// - The stride-2 input gradient is a gather: each grad_in vector permutes one load of grad_out
//   per kernel row onto the lanes of matching parity; no scatter, no atomics.
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

// Rows [first, first + count) of a plane (rows of `width` floats, `stride` apart, `height` of
// them) into L1 ahead of the row block that reads them. Measured at N=32, 2 threads, reuse:
// 32x32x112x112 forward 6.9 -> 5.9 ms, and the stride-2 forward on 112x112 maps on par with the
// channel-block tiles (which stream 8 planes at once) instead of 20% behind.
inline void prefetch_rows(const float* plane, int64_t first, int64_t count, int64_t height, int64_t width,
                          int64_t stride) {
  for (int64_t y = first < 0 ? 0 : first; y < first + count && y < height; ++y)
    for (int64_t x = 0; x < width; x += kLanes)
      _mm_prefetch(reinterpret_cast<const char*>(plane + y * stride + x), _MM_HINT_T0);
}

// The input columns of the 16 output columns from x0, one vector per kernel column kx:
// Columns<S, KW>::tap(kx, row, inside)[l] = row[S*l + kx*dilation] (`row` points at column `base`
// of an input row), zero outside the input and past the output row. (Member functions, not
// lambdas: GCC ignores unroll pragmas inside a lambda, and the accumulators then spill.)
template <int S, int KW>
struct Columns;

// Stride 1: one masked load per tap.
template <int KW>
struct Columns<1, KW> {
  __mmask16 mask[KW];
  int64_t base, dilation;

  Columns(int64_t x0, const PlaneGeometry& g) : base(x0 - g.pad_left), dilation(g.dilation_w) {
    for (int kx = 0; kx < KW; ++kx) mask[kx] = tap_lanes_mask(x0, base + kx * dilation, g);
  }

  __m512 tap(int kx, const float* row, bool inside) const {
    return _mm512_maskz_loadu_ps(inside ? mask[kx] : 0, row + kx * dilation);
  }
};

// Stride 2 (dilation 1): two loads of 16 adjacent columns from offset 2p hold the columns of taps
// 2p and 2p + 1 (the compiler loads them once for both), and a two-source permute takes their
// even or odd elements.
template <int KW>
struct Columns<2, KW> {
  static constexpr int kPairs = (KW + 1) / 2;
  __mmask16 low[kPairs], high[kPairs], valid;
  int64_t base;

  Columns(int64_t x0, const PlaneGeometry& g) : valid(lane_range(0, g.out_w - x0)), base(2 * x0 - g.pad_left) {
    for (int p = 0; p < kPairs; ++p) {
      low[p] = lane_range(-(base + 2 * p), g.in_w - (base + 2 * p));
      high[p] = lane_range(-(base + 2 * p + kLanes), g.in_w - (base + 2 * p + kLanes));
    }
  }

  __m512 tap(int kx, const float* row, bool inside) const {
    const int p = kx / 2;
    const __m512 lo = _mm512_maskz_loadu_ps(inside ? low[p] : 0, row + 2 * p);
    const __m512 hi = _mm512_maskz_loadu_ps(inside ? high[p] : 0, row + 2 * p + kLanes);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    // Columns past the output row are real pixels: zeroed (an inf there would make a NaN of the
    // weight gradient's zero).
    return _mm512_maskz_permutex2var_ps(valid, lo, kx % 2 ? _mm512_add_epi32(even, _mm512_set1_epi32(1)) : even, hi);
  }
};

// A block of R output rows from oy0 reads input rows S*oy0 - pad_top + j, j < S*(R-1) + KH; row j
// feeds output row r through kernel row j - S*r. Blocks whose rows all lie in the input take the
// AllInside instantiation, free of per-row checks (GCC turns those into branches and spills the
// accumulators around them).
template <int S, int KH, int R>
constexpr int block_input_rows() {
  return S * (R - 1) + KH;
}

template <int S, int KH, int R>
bool block_inside(int64_t oy0, const PlaneGeometry& g) {
  const int64_t first = S * oy0 - g.pad_top;
  return first >= 0 && first + block_input_rows<S, KH, R>() <= g.in_h;
}

// The rows the block after oy0's reads and oy0's does not.
template <int S, int KH, int R>
void prefetch_next_block(const float* in, int64_t oy0, const PlaneGeometry& g) {
  prefetch_rows(in, S * oy0 - g.pad_top + block_input_rows<S, KH, R>(), S * R, g.in_h, g.in_w, g.in_row_stride);
}

template <int S, int KH, int KW, int R, bool AllInside>
inline void forward_block(const float* in, const __m512* w, __m512 bias, float* out, int64_t oy0,
                          const PlaneGeometry& g) {
  const int64_t rows = min64(R, g.out_h - oy0);
  for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
    const Columns<S, KW> cols(x0, g);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = bias;
    constexpr int kInputRows = block_input_rows<S, KH, R>();
#pragma GCC unroll 32
    for (int j = 0; j < kInputRows; ++j) {
      const int64_t iy = S * oy0 - g.pad_top + j;
      const bool inside = AllInside || row_inside(iy, g.in_h);
      const float* row = in + (inside ? iy : 0) * g.in_row_stride + cols.base;
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) {
        const __m512 v = cols.tap(kx, row, inside);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          if (j - S * r >= 0 && j - S * r < KH) acc[r] = _mm512_fmadd_ps(w[(j - S * r) * KW + kx], v, acc[r]);
      }
    }
    const __mmask16 store = lane_range(0, g.out_w - x0);
    for (int r = 0; r < R; ++r)
      if (r < rows) _mm512_mask_storeu_ps(out + (oy0 + r) * g.out_row_stride + x0, store, acc[r]);
  }
}

template <int S, int KH, int KW, int R>
void forward_plane_fixed(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  __m512 w[KH * KW];
  for (int t = 0; t < KH * KW; ++t) w[t] = _mm512_set1_ps(taps[t]);
  const __m512 b = _mm512_set1_ps(bias);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += R) {
    prefetch_next_block<S, KH, R>(in, oy0, g);
    if (block_inside<S, KH, R>(oy0, g))
      forward_block<S, KH, KW, R, true>(in, w, b, out, oy0, g);
    else
      forward_block<S, KH, KW, R, false>(in, w, b, out, oy0, g);
  }
}

// One accumulator per tap, 16 lanes each, carried from plane to plane in `tap_lanes` (see the
// header): input row j feeds the taps (j - S*r, kx) of grad_out row r.
template <int S, int KH, int KW, int R, bool WithBias, bool AllInside>
inline void weight_grad_block(const float* go, const float* in, __m512* acc, __m512& bias_acc, int64_t oy0,
                              const PlaneGeometry& g) {
  const int64_t rows = min64(R, g.out_h - oy0);
  for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
    const Columns<S, KW> cols(x0, g);
    const __mmask16 valid = lane_range(0, g.out_w - x0);
    __m512 grad[R];
    for (int r = 0; r < R; ++r) {
      grad[r] = _mm512_maskz_loadu_ps(r < rows ? valid : 0, go + (oy0 + (r < rows ? r : 0)) * g.out_row_stride + x0);
      if (WithBias) bias_acc = _mm512_add_ps(bias_acc, grad[r]);
    }
    constexpr int kInputRows = block_input_rows<S, KH, R>();
#pragma GCC unroll 32
    for (int j = 0; j < kInputRows; ++j) {
      const int64_t iy = S * oy0 - g.pad_top + j;
      const bool inside = AllInside || row_inside(iy, g.in_h);
      const float* row = in + (inside ? iy : 0) * g.in_row_stride + cols.base;
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) {
        const __m512 v = cols.tap(kx, row, inside);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          if (j - S * r >= 0 && j - S * r < KH)
            acc[(j - S * r) * KW + kx] = _mm512_fmadd_ps(grad[r], v, acc[(j - S * r) * KW + kx]);
      }
    }
  }
}

template <int S, int KH, int KW, int R, bool WithBias>
void weight_grad_plane_fixed(const float* go, const float* in, float* tap_lanes, float* bias_lanes,
                             const PlaneGeometry& g) {
  __m512 acc[KH * KW];
  for (int t = 0; t < KH * KW; ++t) acc[t] = _mm512_loadu_ps(tap_lanes + t * kLanes);
  __m512 bias_acc = WithBias ? _mm512_loadu_ps(bias_lanes) : _mm512_setzero_ps();
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += R) {
    prefetch_rows(go, oy0 + R, R, g.out_h, g.out_w, g.out_row_stride);
    prefetch_next_block<S, KH, R>(in, oy0, g);
    if (block_inside<S, KH, R>(oy0, g))
      weight_grad_block<S, KH, KW, R, WithBias, true>(go, in, acc, bias_acc, oy0, g);
    else
      weight_grad_block<S, KH, KW, R, WithBias, false>(go, in, acc, bias_acc, oy0, g);
  }
  for (int t = 0; t < KH * KW; ++t) _mm512_storeu_ps(tap_lanes + t * kLanes, acc[t]);
  if (WithBias) _mm512_storeu_ps(bias_lanes, bias_acc);
}

inline int64_t floor_half(int64_t v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

// Gather form: grad_in column ix = x0 + l takes tap kx from grad_out column (ix + pad_left - kx) / 2
// when that is a whole number. One load of 16 grad_out columns from `first` covers every tap of
// the chunk; a permute spreads them over the lanes of matching parity and zeroes the others.
template <int KH, int KW>
void grad_input_plane_stride2_fixed(const float* go, const float* taps, float* gi, const PlaneGeometry& g) {
  __m512 w[KH * KW];
  for (int t = 0; t < KH * KW; ++t) w[t] = _mm512_set1_ps(taps[t]);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t x0 = 0; x0 < g.in_w; x0 += kLanes) {
    const int64_t q = x0 + g.pad_left;
    const int64_t first = floor_half(q - (KW - 1));  // the lowest grad_out column any lane reads
    const __mmask16 in_row = lane_range(-first, g.out_w - first);
    const __mmask16 store = lane_range(0, g.in_w - x0);
    __m512i index[KW];
    __mmask16 parity[KW];
    for (int kx = 0; kx < KW; ++kx) {
      // (q - kx + l) / 2 - first, for the lanes where q - kx + l is even
      index[kx] = _mm512_sub_epi32(_mm512_maskz_srai_epi32(0xFFFF, _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(q - kx))), 1),
                                   _mm512_set1_epi32(static_cast<int>(first)));
      parity[kx] = ((q - kx) % 2 == 0) ? 0x5555 : 0xAAAA;
      parity[kx] &= store;
    }
    for (int64_t iy = 0; iy < g.in_h; ++iy) {
      __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int ky = 0; ky < KH; ++ky) {
        const int64_t t = iy + g.pad_top - ky;
        if (t % 2 != 0 || !row_inside(t / 2, g.out_h)) continue;
        const __m512 row = _mm512_maskz_loadu_ps(in_row, go + (t / 2) * g.out_row_stride + first);
#pragma GCC unroll 8
        for (int kx = 0; kx < KW; ++kx)
          acc = _mm512_fmadd_ps(w[ky * KW + kx], _mm512_maskz_permutexvar_ps(parity[kx], index[kx], row), acc);
      }
      _mm512_mask_storeu_ps(gi + iy * g.in_row_stride + x0, store, acc);
    }
  }
}

}  // namespace

void forward_plane(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  if (g.stride == 2) {
    if (g.kernel_h == 3) return forward_plane_fixed<2, 3, 3, 7>(in, taps, bias, out, g);
    return forward_plane_fixed<2, 5, 5, 2>(in, taps, bias, out, g);
  }
  if (g.kernel_h == 3) return forward_plane_fixed<1, 3, 3, 7>(in, taps, bias, out, g);
  forward_plane_fixed<1, 5, 5, 4>(in, taps, bias, out, g);
}

void grad_input_plane_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g) {
  if (g.kernel_h == 3) return grad_input_plane_stride2_fixed<3, 3>(grad_out, taps, grad_in, g);
  grad_input_plane_stride2_fixed<5, 5>(grad_out, taps, grad_in, g);
}

void weight_grad_plane(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                       const PlaneGeometry& g) {
#define FASTCNN_WEIGHT_GRAD(S, K, R)                                                               \
  return bias_lanes ? weight_grad_plane_fixed<S, K, K, R, true>(grad_out, in, tap_lanes, bias_lanes, g) \
                    : weight_grad_plane_fixed<S, K, K, R, false>(grad_out, in, tap_lanes, bias_lanes, g)
  if (g.stride == 2) {
    if (g.kernel_h == 3) FASTCNN_WEIGHT_GRAD(2, 3, 7);
    FASTCNN_WEIGHT_GRAD(2, 5, 2);
  }
  if (g.kernel_h == 3) FASTCNN_WEIGHT_GRAD(1, 3, 7);
  FASTCNN_WEIGHT_GRAD(1, 5, 2);
#undef FASTCNN_WEIGHT_GRAD
}

#else  // never called: enabled() is false

void forward_plane(const float*, const float*, float, float*, const PlaneGeometry&) {}
void weight_grad_plane(const float*, const float*, float*, float*, const PlaneGeometry&) {}
void grad_input_plane_stride2(const float*, const float*, float*, const PlaneGeometry&) {}

#endif  // FASTCNN_AVX512_PLANES

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn
