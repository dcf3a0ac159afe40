// Depthwise convolution on AVX-512, NCHW planes: the block kernels (3x3 and 5x5 windows, R output
// rows sharing each loaded input row; the rolled kernels' reference), the stride-2 input
// gradient's gather, and stride-2 planes two to a vector. See depthwise_conv2d_avx512.cpp.
#include "ops/cpu/depthwise_avx512/common.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/depthwise_avx512/plane_kernels.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

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
    const __m512i even = even_lanes();
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

// Rows [first, first + count) of a plane with `height` rows, prefetched a column at a time. In a
// dense plane (rows `width` apart) up to `beyond` rows past the last are the next plane's first.
struct RowsAhead {
  const float* rows;
  int64_t count, stride;
  RowsAhead(const float* plane, int64_t first, int64_t wanted, int64_t height, int64_t width, int64_t row_stride,
            int64_t beyond)
      : rows(plane + first * row_stride),
        count(min64(wanted, (row_stride == width ? height + beyond : height) - first)),
        stride(row_stride) {}
  void prefetch(int64_t column) const {
    for (int64_t y = 0; y < count; ++y)
      _mm_prefetch(reinterpret_cast<const char*>(rows + y * stride + column), _MM_HINT_T0);
  }
};

// Output rows oy0.. go to out_rows, out_stride floats apart.
template <int S, int KH, int KW, int R, bool AllInside>
inline void forward_block(const float* in, const __m512* w, __m512 bias, float* out_rows, int64_t out_stride,
                          int64_t oy0, const PlaneGeometry& g) {
  const int64_t rows = min64(R, g.out_h - oy0);
  // Prefetched: the rows the next block adds, a column at a time alongside this block's; past the
  // plane's last row, the next plane's first rows when planes are dense and back to back (NCHW).
  // A burst of the next block's rows before each block, as before, was 8-22% slower forward and
  // 4-36% slower backward (N=32 MobileNet layers, 2 threads), and left each plane's first block
  // cold.
  constexpr int kInputRows = block_input_rows<S, KH, R>();
  const RowsAhead next_rows(in, S * oy0 - g.pad_top + kInputRows, S * R, g.in_h, g.in_w, g.in_row_stride, kInputRows);
  for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
    const Columns<S, KW> cols(x0, g);
    next_rows.prefetch(S * x0);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = bias;
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
      if (r < rows) _mm512_mask_storeu_ps(out_rows + r * out_stride + x0, store, acc[r]);
  }
}

template <int S, int KH, int KW, int R>
void forward_plane_fixed(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  __m512 w[KH * KW];
  for (int t = 0; t < KH * KW; ++t) w[t] = _mm512_set1_ps(taps[t]);
  const __m512 b = _mm512_set1_ps(bias);
  alignas(64) float stage[kStageFloats];
  const bool staged = stageable(g, R, g.out_row_stride, g.out_w);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += R) {
    float* rows = staged ? stage : out + oy0 * g.out_row_stride;
    if (block_inside<S, KH, R>(oy0, g))
      forward_block<S, KH, KW, R, true>(in, w, b, rows, g.out_row_stride, oy0, g);
    else
      forward_block<S, KH, KW, R, false>(in, w, b, rows, g.out_row_stride, oy0, g);
    if (staged) stream_rows(stage, out + oy0 * g.out_row_stride, min64(R, g.out_h - oy0) * g.out_w);
  }
}

// One accumulator per tap, 16 lanes each, carried from plane to plane in `tap_lanes` (see the
// header): input row j feeds the taps (j - S*r, kx) of grad_out row r.
template <int S, int KH, int KW, int R, bool WithBias, bool AllInside>
inline void weight_grad_block(const float* go, const float* in, __m512* acc, __m512& bias_acc, int64_t oy0,
                              const PlaneGeometry& g) {
  const int64_t rows = min64(R, g.out_h - oy0);
  // The next block's new input rows and grad_out rows, a column at a time (see forward_block).
  constexpr int kInputRows = block_input_rows<S, KH, R>();
  const RowsAhead next_rows(in, S * oy0 - g.pad_top + kInputRows, S * R, g.in_h, g.in_w, g.in_row_stride, kInputRows);
  const RowsAhead next_go(go, oy0 + R, R, g.out_h, g.out_w, g.out_row_stride, R);
  for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
    const Columns<S, KW> cols(x0, g);
    const __mmask16 valid = lane_range(0, g.out_w - x0);
    next_rows.prefetch(S * x0);
    next_go.prefetch(x0);
    __m512 grad[R];
    for (int r = 0; r < R; ++r) {
      grad[r] = _mm512_maskz_loadu_ps(r < rows ? valid : 0, go + (oy0 + (r < rows ? r : 0)) * g.out_row_stride + x0);
      if (WithBias) bias_acc = _mm512_add_ps(bias_acc, grad[r]);
    }
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
    if (block_inside<S, KH, R>(oy0, g))
      weight_grad_block<S, KH, KW, R, WithBias, true>(go, in, acc, bias_acc, oy0, g);
    else
      weight_grad_block<S, KH, KW, R, WithBias, false>(go, in, acc, bias_acc, oy0, g);
  }
  for (int t = 0; t < KH * KW; ++t) _mm512_storeu_ps(tap_lanes + t * kLanes, acc[t]);
  if (WithBias) _mm512_storeu_ps(bias_lanes, bias_acc);
}

// Gather form: grad_in column ix = x0 + l takes tap kx from grad_out column (ix + pad_left - kx) / 2
// when that is a whole number. One load of 16 grad_out columns from `first` covers every tap of
// the chunk; a permute spreads them over the lanes of matching parity and zeroes the others. Bands
// of kBandRows rows, column chunk by column chunk within a band, so that a streamed band is
// staged whole.
template <int KH, int KW>
void grad_input_plane_stride2_fixed(const float* go, const float* taps, float* gi, const PlaneGeometry& g) {
  constexpr int64_t kBandRows = 8;
  __m512 w[KH * KW];
  for (int t = 0; t < KH * KW; ++t) w[t] = _mm512_set1_ps(taps[t]);
  const __m512i lane = lane_indices();
  alignas(64) float stage[kStageFloats];
  const bool staged = stageable(g, kBandRows, g.in_row_stride, g.in_w);
  for (int64_t iy0 = 0; iy0 < g.in_h; iy0 += kBandRows) {
    const int64_t band_end = min64(g.in_h, iy0 + kBandRows);
    float* band = staged ? stage : gi + iy0 * g.in_row_stride;
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
      for (int64_t iy = iy0; iy < band_end; ++iy) {
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
        _mm512_mask_storeu_ps(band + (iy - iy0) * g.in_row_stride + x0, store, acc);
      }
    }
    if (staged) stream_rows(stage, gi + iy0 * g.in_row_stride, (band_end - iy0) * g.in_w);
  }
}

}  // namespace

namespace {

// Input row j of the block feeds output row r through kernel row j - 2r.
template <int KH, int KW>
void forward_pair_stride2(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b,
                          float bias_a, float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  constexpr int R = 8;  // output rows per block
  constexpr int kInputRows = 2 * (R - 1) + KH;
  __m512 w[KH * KW];
  for (int t = 0; t < KH * KW; ++t) w[t] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(taps_a[t]), _mm512_set1_ps(taps_b[t]));
  const __m512 bias = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(bias_a), _mm512_set1_ps(bias_b));
  const PairedColumns<KW> cols(g);
  const __m512i upper_half = _mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += R) {
    const int64_t rows = min64(R, g.out_h - oy0);
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = bias;
#pragma GCC unroll 32
    for (int j = 0; j < kInputRows; ++j) {
      __m512 a, b;
      cols.load_row(in_a, in_b, 2 * oy0 - g.pad_top + j, g, &a, &b);
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) {
        const __m512 v = cols.tap(kx, a, b);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          if (j - 2 * r >= 0 && j - 2 * r < KH) acc[r] = _mm512_fmadd_ps(w[(j - 2 * r) * KW + kx], v, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      _mm512_mask_storeu_ps(out_a + (oy0 + r) * g.out_row_stride, cols.half, acc[r]);
      _mm512_mask_storeu_ps(out_b + (oy0 + r) * g.out_row_stride, cols.half,
                            _mm512_permutexvar_ps(upper_half, acc[r]));
    }
  }
}

template <bool WithBias>
void weight_grad_pair_stride2(const float* go_a, const float* go_b, const float* in_a, const float* in_b,
                              float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                              const PlaneGeometry& g) {
  constexpr int KH = 3, KW = 3, R = 8;
  constexpr int kInputRows = 2 * (R - 1) + KH;
  constexpr __mmask16 kLow = 0x00FF, kHigh = 0xFF00;
  __m512 acc[KH * KW];
  for (int t = 0; t < KH * KW; ++t)
    acc[t] = _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(kLow, tap_lanes_a + t * kLanes), kHigh, tap_lanes_b + t * kLanes);
  __m512 bias_acc = WithBias ? _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(kLow, bias_lanes_a), kHigh, bias_lanes_b)
                             : _mm512_setzero_ps();
  const PairedColumns<KW> cols(g);
  const __mmask16 half = cols.half;
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += R) {
    const int64_t rows = min64(R, g.out_h - oy0);
    __m512 grad[R];
    for (int r = 0; r < R; ++r) {
      const int64_t row = (oy0 + (r < rows ? r : 0)) * g.out_row_stride;
      // plane a's row in lanes 0.., plane b's expanded into lanes 8..
      grad[r] = _mm512_mask_expandloadu_ps(_mm512_maskz_loadu_ps(r < rows ? half : 0, go_a + row),
                                           r < rows ? static_cast<__mmask16>(half << 8) : 0, go_b + row);
      if (WithBias) bias_acc = _mm512_add_ps(bias_acc, grad[r]);
    }
#pragma GCC unroll 32
    for (int j = 0; j < kInputRows; ++j) {
      __m512 a, b;
      cols.load_row(in_a, in_b, 2 * oy0 - g.pad_top + j, g, &a, &b);
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) {
        const __m512 v = cols.tap(kx, a, b);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          if (j - 2 * r >= 0 && j - 2 * r < KH)
            acc[(j - 2 * r) * KW + kx] = _mm512_fmadd_ps(grad[r], v, acc[(j - 2 * r) * KW + kx]);
      }
    }
  }
  for (int t = 0; t < KH * KW; ++t) {
    _mm512_mask_storeu_ps(tap_lanes_a + t * kLanes, kLow, acc[t]);
    _mm512_mask_storeu_ps(tap_lanes_b + t * kLanes, kHigh, acc[t]);
  }
  if (WithBias) {
    _mm512_mask_storeu_ps(bias_lanes_a, kLow, bias_acc);
    _mm512_mask_storeu_ps(bias_lanes_b, kHigh, bias_acc);
  }
}

}  // namespace

namespace block {

void forward(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  if (g.stride == 2) {
    if (g.kernel_h == 3) return forward_plane_fixed<2, 3, 3, 7>(in, taps, bias, out, g);
    return forward_plane_fixed<2, 5, 5, 2>(in, taps, bias, out, g);
  }
  if (g.kernel_h == 3) return forward_plane_fixed<1, 3, 3, 7>(in, taps, bias, out, g);
  forward_plane_fixed<1, 5, 5, 4>(in, taps, bias, out, g);
}

void weight_grad(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes, const PlaneGeometry& g) {
#define FASTCNN_WEIGHT_GRAD(S, K, R)                                                                    \
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

void grad_input_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g) {
  if (g.kernel_h == 3) return grad_input_plane_stride2_fixed<3, 3>(grad_out, taps, grad_in, g);
  grad_input_plane_stride2_fixed<5, 5>(grad_out, taps, grad_in, g);
}

void forward_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                  float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  if (g.kernel_h == 3) return forward_pair_stride2<3, 3>(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
  forward_pair_stride2<5, 5>(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
}

void weight_grad_pair(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                      float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                      const PlaneGeometry& g) {
  if (bias_lanes_a)
    return weight_grad_pair_stride2<true>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, bias_lanes_a,
                                          bias_lanes_b, g);
  weight_grad_pair_stride2<false>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, nullptr, nullptr, g);
}

}  // namespace block

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
