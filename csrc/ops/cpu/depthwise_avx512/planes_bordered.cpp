// Depthwise convolution on AVX-512: windows of 25 taps and more at unit stride from a
// zero-bordered copy of each plane (7x7 to 31x31, RepLKNet and ConvNeXt), and channels_last
// images through the same planes. See supports_bordered in depthwise_conv2d_avx512.h.
#include "ops/cpu/depthwise_avx512/common.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/depthwise_avx512/plane_kernels.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

// The zero-bordered copy's row stride: every column a chunk of whole vectors reads.
int64_t bordered_row_stride(const PlaneGeometry& g) {
  return (g.out_w + kLanes - 1) / kLanes * kLanes + (g.kernel_w - 1) * g.dilation_w;
}

// Output rows oy..oy+R-1, columns x..x+valid (B vectors), every tap of the window; `top` is the
// bordered row oy at column x. Each loaded input row feeds every output row of the block whose
// window it is in (up to R multiply-adds per load): one output row at a time, each tap's four
// mostly line-splitting loads bounded it at about a quarter of the FMA rate.
template <int R, int B>
inline void bordered_block(const float* top, int64_t row_stride, const float* taps, float bias, float* out,
                           int64_t valid, const PlaneGeometry& g) {
  __m512 acc[R][B];
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < B; ++b) acc[i][b] = _mm512_set1_ps(bias);
  const int64_t span = R + (g.kernel_h - 1) * g.dilation_h;
  int64_t next_ky[R] = {};  // output row i reads input row i + ky * dilation_h with kernel row ky
  for (int64_t r = 0; r < span; ++r) {
    const float* row = top + r * row_stride;
    const float* weights[R];  // output row i's kernel row over input row r, or null
    for (int i = 0; i < R; ++i) {
      const bool hit = next_ky[i] < g.kernel_h && i + next_ky[i] * g.dilation_h == r;
      weights[i] = hit ? taps + next_ky[i]++ * g.kernel_w : nullptr;
    }
    for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
      __m512 v[B];
      for (int b = 0; b < B; ++b) v[b] = _mm512_loadu_ps(row + kx * g.dilation_w + b * kLanes);
      for (int i = 0; i < R; ++i) {
        if (!weights[i]) continue;
        const __m512 w = _mm512_set1_ps(weights[i][kx]);
        for (int b = 0; b < B; ++b) acc[i][b] = _mm512_fmadd_ps(w, v[b], acc[i][b]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int b = 0; b < B; ++b) {
      const int64_t lanes = min64(kLanes, valid - b * kLanes);
      _mm512_mask_storeu_ps(out + i * g.out_row_stride + b * kLanes, static_cast<__mmask16>((1u << lanes) - 1),
                            acc[i][b]);
    }
  }
}

template <int R>
inline void bordered_rows(const float* top, int64_t row_stride, const float* taps, float bias, float* out_row,
                          const PlaneGeometry& g) {
  constexpr int64_t kChunk = 4 * kLanes;
  for (int64_t x = 0; x < g.out_w; x += kChunk) {
    const int64_t valid = min64(kChunk, g.out_w - x);
    switch ((valid + kLanes - 1) / kLanes) {
      case 1: bordered_block<R, 1>(top + x, row_stride, taps, bias, out_row + x, valid, g); break;
      case 2: bordered_block<R, 2>(top + x, row_stride, taps, bias, out_row + x, valid, g); break;
      case 3: bordered_block<R, 3>(top + x, row_stride, taps, bias, out_row + x, valid, g); break;
      default: bordered_block<R, 4>(top + x, row_stride, taps, bias, out_row + x, valid, g); break;
    }
  }
}

// The same block without a test in its loops, for undilated rows and windows of at least R rows.
// Input row r of the block's span feeds output rows LO..HI (kernel row r - i for output row i),
// fixed at compile time: the first R - 1 rows of the span reach fewer output rows, as do the
// last R - 1; the rows between reach all R. `first_tap` is the index of kernel row r in taps.
template <int K, int R, int B, int LO, int HI>
inline __attribute__((always_inline)) void feed_rows(__m512 (&acc)[R][B], const float* row, const float* taps,
                                                     int64_t first_tap, int64_t kernel_w, int64_t dilation_w) {
  if constexpr (K > 0) kernel_w = K, dilation_w = 1;
#pragma GCC unroll 8
  for (int64_t kx = 0; kx < kernel_w; ++kx) {
    __m512 v[B];
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
      v[b] = _mm512_loadu_ps(row + kx * dilation_w + b * kLanes);
      // Kept in a register: GCC otherwise folds the load into each multiply-add that uses it, a
      // line-splitting load per multiply-add in the rows that reach few outputs.
      asm("" : "+v"(v[b]));
    }
#pragma GCC unroll 8
    for (int i = LO; i <= HI; ++i) {
      const __m512 w = _mm512_set1_ps(taps[first_tap - i * kernel_w + kx]);
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) acc[i][b] = _mm512_fmadd_ps(w, v[b], acc[i][b]);
    }
  }
}

// Span rows 0..r: the rows above the block's first full one.
template <int K, int R, int B, int r>
inline __attribute__((always_inline)) void feed_head(__m512 (&acc)[R][B], const float* top, int64_t row_stride,
                                                     const float* taps, int64_t kernel_w, int64_t dilation_w) {
  if constexpr (r > 0) feed_head<K, R, B, r - 1>(acc, top, row_stride, taps, kernel_w, dilation_w);
  feed_rows<K, R, B, 0, r>(acc, top + r * row_stride, taps, r * kernel_w, kernel_w, dilation_w);
}

// Span rows kernel_h - 1 + j onwards: output rows j..R-1 still reach them.
template <int K, int R, int B, int j>
inline __attribute__((always_inline)) void feed_tail(__m512 (&acc)[R][B], const float* top, int64_t row_stride,
                                                     const float* taps, int64_t kernel_h, int64_t kernel_w,
                                                     int64_t dilation_w) {
  const int64_t r = kernel_h - 1 + j;
  feed_rows<K, R, B, j, R - 1>(acc, top + r * row_stride, taps, r * kernel_w, kernel_w, dilation_w);
  if constexpr (j + 1 < R) feed_tail<K, R, B, j + 1>(acc, top, row_stride, taps, kernel_h, kernel_w, dilation_w);
}

// A window of K rows known at compile time: every span row r, output rows max(0, r - K + 1) to
// min(R - 1, r), R may exceed K.
template <int K, int R, int B, int r>
inline __attribute__((always_inline)) void feed_span(__m512 (&acc)[R][B], const float* top, int64_t row_stride,
                                                     const float* taps) {
  constexpr int lo = r - K + 1 > 0 ? r - K + 1 : 0, hi = r < R - 1 ? r : R - 1;
  feed_rows<K, R, B, lo, hi>(acc, top + r * row_stride, taps, r * K, K, 1);
  if constexpr (r + 1 < R + K - 1) feed_span<K, R, B, r + 1>(acc, top, row_stride, taps);
}

template <int K, int R, int B>
inline void bordered_block_undilated(const float* top, int64_t row_stride, const float* taps, float bias, float* out,
                                     int64_t valid, const PlaneGeometry& g) {
  __m512 acc[R][B];
  for (int i = 0; i < R; ++i)
    for (int b = 0; b < B; ++b) acc[i][b] = _mm512_set1_ps(bias);
  if constexpr (K > 0) {
    feed_span<K, R, B, 0>(acc, top, row_stride, taps);
  } else {
    const int64_t kernel_w = g.kernel_w, dilation_w = g.dilation_w;
    if constexpr (R > 1) feed_head<K, R, B, R - 2>(acc, top, row_stride, taps, kernel_w, dilation_w);
    for (int64_t r = R - 1; r < g.kernel_h; ++r)
      feed_rows<K, R, B, 0, R - 1>(acc, top + r * row_stride, taps, r * kernel_w, kernel_w, dilation_w);
    if constexpr (R > 1) feed_tail<K, R, B, 1>(acc, top, row_stride, taps, g.kernel_h, kernel_w, dilation_w);
  }
  for (int i = 0; i < R; ++i) {
    for (int b = 0; b < B; ++b) {
      const int64_t lanes = min64(kLanes, valid - b * kLanes);
      _mm512_mask_storeu_ps(out + i * g.out_row_stride + b * kLanes, static_cast<__mmask16>((1u << lanes) - 1),
                            acc[i][b]);
    }
  }
}

// Rows of R outputs (the last block moved up to end at the plane's bottom row, recomputing rows
// of the one before it: the same values) in column chunks of B vectors.
template <int K, int R, int B>
inline void undilated_rows(const float* bordered, int64_t row_stride, const float* taps, float bias, float* out,
                           int64_t x, int64_t valid, const PlaneGeometry& g) {
  for (int64_t oy = 0; oy < g.out_h; oy += R) {
    const int64_t y = min64(oy, g.out_h - R);
    bordered_block_undilated<K, R, B>(bordered + y * row_stride + x, row_stride, taps, bias,
                                   out + y * g.out_row_stride + x, valid, g);
  }
}

// The blocks without tests take undilated windows of at least 4 rows on planes of at least 4.
// FASTCNN_DEPTHWISE_ROLLED=0 keeps the blocks with tests (the same sums in the same order).
bool undilated_rows_fit(const PlaneGeometry& g, int64_t rows) {
  return g.rolled_rows && g.dilation_h == 1 && g.kernel_h >= rows && g.out_h >= rows;
}

// Block heights: enough accumulators in flight (the FMA latency times two ports is 8) and input
// rows each feeding many: 7x7 windows, unrolled whole, 14 rows of one vector (a 14x14 plane in
// one block), 7 of two, 4 of three or four (6 measured no faster); other windows 7 rows of up
// to two vectors and 6 of three or four (31x31 on 56x56 planes 1.14x faster than 4).
template <int B>
void undilated_chunk(const float* bordered, int64_t row_stride, const float* taps, float bias, float* out, int64_t x,
                     int64_t valid, const PlaneGeometry& g) {
  if (g.kernel_h == 7 && g.kernel_w == 7 && g.dilation_w == 1) {
    if (B == 1 && g.out_h >= 14) return undilated_rows<7, 14, 1>(bordered, row_stride, taps, bias, out, x, valid, g);
    if (B <= 2 && g.out_h >= 7) return undilated_rows<7, 7, B>(bordered, row_stride, taps, bias, out, x, valid, g);
    return undilated_rows<7, 4, B>(bordered, row_stride, taps, bias, out, x, valid, g);
  }
  if (B <= 2 && undilated_rows_fit(g, 7))
    return undilated_rows<0, 7, B>(bordered, row_stride, taps, bias, out, x, valid, g);
  if (B >= 3 && undilated_rows_fit(g, 6))
    return undilated_rows<0, 6, B>(bordered, row_stride, taps, bias, out, x, valid, g);
  undilated_rows<0, 4, B>(bordered, row_stride, taps, bias, out, x, valid, g);
}

}  // namespace

int64_t bordered_plane_floats(const PlaneGeometry& g) {
  return (g.out_h + (g.kernel_h - 1) * g.dilation_h) * bordered_row_stride(g);
}

namespace {

void bordered_compute(const float* bordered, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  const int64_t row_stride = bordered_row_stride(g);
  if (undilated_rows_fit(g, 4)) {
    constexpr int64_t kChunk = 4 * kLanes;
    for (int64_t x = 0; x < g.out_w; x += kChunk) {
      const int64_t valid = min64(kChunk, g.out_w - x);
      switch ((valid + kLanes - 1) / kLanes) {
        case 1: undilated_chunk<1>(bordered, row_stride, taps, bias, out, x, valid, g); break;
        case 2: undilated_chunk<2>(bordered, row_stride, taps, bias, out, x, valid, g); break;
        case 3: undilated_chunk<3>(bordered, row_stride, taps, bias, out, x, valid, g); break;
        default: undilated_chunk<4>(bordered, row_stride, taps, bias, out, x, valid, g); break;
      }
    }
    return;
  }
  constexpr int64_t kRows = 4;
  int64_t oy = 0;
  for (; oy + kRows <= g.out_h; oy += kRows)
    bordered_rows<kRows>(bordered + oy * row_stride, row_stride, taps, bias, out + oy * g.out_row_stride, g);
  switch (g.out_h - oy) {
    case 1: bordered_rows<1>(bordered + oy * row_stride, row_stride, taps, bias, out + oy * g.out_row_stride, g); break;
    case 2: bordered_rows<2>(bordered + oy * row_stride, row_stride, taps, bias, out + oy * g.out_row_stride, g); break;
    case 3: bordered_rows<3>(bordered + oy * row_stride, row_stride, taps, bias, out + oy * g.out_row_stride, g); break;
    default: break;
  }
}

// The bordered rows [r0, r1) and columns [c0, c1) that hold input pixels (pads may be negative).
struct BorderedInterior {
  int64_t r0, r1, c0, c1;
  explicit BorderedInterior(const PlaneGeometry& g) {
    const int64_t rows = g.out_h + (g.kernel_h - 1) * g.dilation_h, row_stride = bordered_row_stride(g);
    r0 = g.pad_top > 0 ? g.pad_top : 0;
    r1 = min64(rows, g.in_h + g.pad_top);
    c0 = g.pad_left > 0 ? g.pad_left : 0;
    c1 = min64(row_stride, g.in_w + g.pad_left);
  }
};

}  // namespace

void forward_plane_bordered(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g,
                            float* bordered) {
  const int64_t row_stride = bordered_row_stride(g);
  // Bordered pixel (r, c) is input pixel (r - pad_top, c - pad_left).
  const BorderedInterior inside(g);
  const int64_t width = inside.c1 - inside.c0;
  for (int64_t r = inside.r0; r < inside.r1; ++r) {
    const float* src = in + (r - g.pad_top) * g.in_row_stride + (inside.c0 - g.pad_left);
    float* dst = bordered + r * row_stride + inside.c0;
    int64_t c = 0;
    for (; c + kLanes <= width; c += kLanes) _mm512_storeu_ps(dst + c, _mm512_loadu_ps(src + c));
    if (c < width) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (width - c)) - 1);
      _mm512_mask_storeu_ps(dst + c, tail, _mm512_maskz_loadu_ps(tail, src + c));
    }
  }
  bordered_compute(bordered, taps, bias, out, g);
}

namespace {

PlaneGeometry plane_of(const ImageGeometry& g) {
  return {g.in_h, g.in_w, g.in_w, g.out_h, g.out_w, g.out_w, g.kernel_h, g.kernel_w,
          g.pad_top, g.pad_left, g.dilation_h, g.dilation_w, 1};
}

}  // namespace

int64_t nhwc_bordered_floats(const ImageGeometry& g) {
  const PlaneGeometry p = plane_of(g);
  return kLanes * (bordered_plane_floats(p) + g.out_h * g.out_w + g.kernel_h * g.kernel_w);
}

void forward_channels_nhwc_bordered(const float* in, const float* taps, const float* bias, float* out, int64_t c0,
                                    const ImageGeometry& g, float* scratch) {
  const PlaneGeometry p = plane_of(g);
  const int64_t C = g.channels, plane_floats = bordered_plane_floats(p), out_area = g.out_h * g.out_w;
  const int64_t kernel_area = g.kernel_h * g.kernel_w;
  float* planes = scratch;
  float* outputs = planes + kLanes * plane_floats;
  float* channel_taps = outputs + kLanes * out_area;
  const int64_t lanes = min64(kLanes, C - c0);
  const __mmask16 live = static_cast<__mmask16>((1u << lanes) - 1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Each input pixel's channel vector scattered to the 16 planes.
  const int64_t row_stride = bordered_row_stride(p);
  const BorderedInterior inside(p);
  const __m512i plane_step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(plane_floats)));
  for (int64_t r = inside.r0; r < inside.r1; ++r) {
    const float* src = in + ((r - g.pad_top) * g.in_w + (inside.c0 - g.pad_left)) * C + c0;
    for (int64_t col = inside.c0; col < inside.c1; ++col, src += C) {
      const __m512i index = _mm512_add_epi32(plane_step, _mm512_set1_epi32(static_cast<int32_t>(r * row_stride + col)));
      _mm512_mask_i32scatter_ps(planes, live, index, _mm512_maskz_loadu_ps(live, src), 4);
    }
  }
  for (int64_t l = 0; l < lanes; ++l) {
    for (int64_t t = 0; t < kernel_area; ++t) channel_taps[t] = taps[t * C + c0 + l];
    bordered_compute(planes + l * plane_floats, channel_taps, bias ? bias[c0 + l] : 0.f, outputs + l * out_area, p);
  }
  // Each output pixel's channel vector gathered from the 16 output planes.
  const __m512i out_step = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(out_area)));
  for (int64_t i = 0; i < out_area; ++i) {
    const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                              _mm512_add_epi32(out_step, _mm512_set1_epi32(static_cast<int32_t>(i))),
                                              outputs, 4);
    _mm512_mask_storeu_ps(out + i * C + c0, live, v);
  }
}

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
