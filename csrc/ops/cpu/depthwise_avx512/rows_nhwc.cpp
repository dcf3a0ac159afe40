// Depthwise convolution on AVX-512, channels_last rows: 16 channels to a vector (fp32, and bf16
// and fp16 widened in registers), forward, input gradient at any stride and weight gradient; and
// the bf16/fp16 conversions of the NCHW planes. See depthwise_conv2d_avx512.cpp.
#include "ops/cpu/depthwise_avx512/common.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/depthwise_avx512/plane_kernels.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

// ---------------------------------------------------------------------------------------------
// channels_last: 16 channels are one vector, so the image's layout is the vector layout. Channel
// tails load and store with a lane mask (no scalar tail).

// Pixels ahead that the channels_last row loops prefetch. Their walk along a row jumps C floats a
// pixel; the hardware prefetchers follow it late, and the window's leading-edge loads waited on
// L2 (32x128x56x56, 2 threads: weight gradient 7.1 -> 4.9 ms; forward and backward of the
// MobileNet layers with 28x28 maps or more 1-10% faster, those below within noise).
constexpr int64_t kPrefetchPixels = 6;

// R adjacent output pixels from ox0 times B channel vectors from c0 (the last one masked by
// `last`), over the taps [kx0, kx1) of each kernel row in [ky0, ky1): R*B independent chains of
// multiply-adds (one chain per pixel ran at the FMA latency on narrow maps), each tap's weights
// loaded once for the R pixels. The caller passes only taps inside the input.
template <int R, int B, typename E>
inline void nhwc_pixels(const E* in, const float* taps, const float* bias, E* out_row, int64_t c0,
                        __mmask16 last, int64_t ox0, int64_t ky0, int64_t ky1, int64_t kx0, int64_t kx1, int64_t iy0,
                        const ImageGeometry& g) {
  const int64_t C = g.channels, kernel_w = g.kernel_w, tap_step = g.dilation_w * C;
  const int64_t pixel_step = g.stride_w * C, row_step = g.dilation_h * g.in_w * C;
  __mmask16 lanes[B];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) lanes[b] = b + 1 < B ? 0xFFFF : last;
  const E* first = in + (iy0 + ky0 * g.dilation_h) * g.in_w * C + (ox0 * g.stride_w - g.pad_left) * C + c0;
  const float* tap_row = taps + ky0 * kernel_w * C + c0;
  __m512 acc[R][B];
#pragma GCC unroll 8
  for (int b = 0; b < B; ++b) {
    const __m512 start = bias ? _mm512_maskz_loadu_ps(lanes[b], bias + c0 + b * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][b] = start;
  }
  for (int64_t ky = ky0; ky < ky1; ++ky, first += row_step, tap_row += kernel_w * C) {
    // The interior: the window's newest columns kPrefetchPixels ahead (see there), in the kernel
    // rows the previous output row did not read (undilated, the last stride_h; the others are in
    // cache from it). Prefetching every row cost more than it hid (in process, 2 threads, N=32, reuse:
    // 32x32x112x112 forward 3.1 -> 2.35 ms, 32x128x56x56 2.5 -> 1.9, stride 2 1.0-1.16x).
    if (R > 1 && (ky >= g.kernel_h - g.stride_h || g.dilation_h != 1)) {
      const E* edge = first + (kx1 - 1) * tap_step + kPrefetchPixels * pixel_step;
      // every column the R pixels' windows advance over: R * stride of them (at stride 2, one a
      // pixel left every other column to the hardware: in-process from flushed caches, 2 threads,
      // 32x64x112x112 forward 1.31x, 32x128x56x56 1.09x slower)
      for (int64_t column = 0; column < R * g.stride_w; ++column)
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b)
          _mm_prefetch(reinterpret_cast<const char*>(edge + column * C + b * kLanes), _MM_HINT_T0);
    }
    for (int64_t kx = kx0; kx < kx1; ++kx) {
      const E* x = first + kx * tap_step;
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) {
        const __m512 w = _mm512_maskz_loadu_ps(lanes[b], tap_row + kx * C + b * kLanes);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          acc[r][b] = _mm512_fmadd_ps(w, load_channels(lanes[b], x + r * pixel_step + b * kLanes), acc[r][b]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b)
      store_channels(out_row + (ox0 + r) * C + c0 + b * kLanes, lanes[b], acc[r][b], g.stream_output);
}

// Wide windows (7 columns and more) at unit stride and dilation along the row: one channel vector
// and kSlideRun output pixels, each input vector of a kernel row loaded once and used for every
// tap that reads it (kSlideRun + KW - 1 loads and KW weight loads for KW * kSlideRun
// multiply-adds; the grouped loop above loads 1.5 vectors per multiply-add, and a 7x7 window's
// rows outgrow L1). Runs cover the whole row, the border pixels too (their columns outside the
// row load as zero): one pixel at a time, a 31-wide window's 15 border pixels a side ran at the
// latency of one chain. 8x128x56x56, 7x7, 2 threads: forward 1.2x, unit-stride input gradient
// 1.4x faster.
constexpr int kSlideRun = 8;

// Checked: some of the run's columns lie outside the input row; they load as zero.
template <int KW, bool Checked, typename E>
inline void nhwc_slide(const E* in, const float* taps, const float* bias, E* out_row, int64_t c0,
                       __mmask16 lanes, int64_t ox0, int64_t ky0, int64_t ky1, int64_t iy0, const ImageGeometry& g) {
  const int64_t C = g.channels, row_step = g.dilation_h * g.in_w * C;
  const __m512 start = bias ? _mm512_maskz_loadu_ps(lanes, bias + c0) : _mm512_setzero_ps();
  __m512 acc[kSlideRun];
#pragma GCC unroll 8
  for (int r = 0; r < kSlideRun; ++r) acc[r] = start;
  const E* first = in + (iy0 + ky0 * g.dilation_h) * g.in_w * C + (ox0 - g.pad_left) * C + c0;
  const float* tap_row = taps + ky0 * KW * C + c0;
  for (int64_t ky = ky0; ky < ky1; ++ky, first += row_step, tap_row += KW * C) {
    _mm_prefetch(reinterpret_cast<const char*>(first + (kSlideRun + KW - 1 + kPrefetchPixels) * C), _MM_HINT_T0);
    __m512 column[kSlideRun + KW - 1];
#pragma GCC unroll 16
    for (int j = 0; j < kSlideRun + KW - 1; ++j)
      column[j] = load_channels(
          !Checked || static_cast<uint64_t>(ox0 - g.pad_left + j) < static_cast<uint64_t>(g.in_w) ? lanes : 0,
          first + j * C);
#pragma GCC unroll 9
    for (int kx = 0; kx < KW; ++kx) {
      const __m512 w = _mm512_maskz_loadu_ps(lanes, tap_row + kx * C);
#pragma GCC unroll 8
      for (int r = 0; r < kSlideRun; ++r) acc[r] = _mm512_fmadd_ps(w, column[r + kx], acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kSlideRun; ++r) store_channels(out_row + (ox0 + r) * C + c0, lanes, acc[r], g.stream_output);
}

// Windows wider than 9 columns: the same runs, the kernel row's taps 8 at a time (KW = 0 in
// nhwc_row_slide). A chunk's taps past the row's last read zero weights, its columns past the
// chunk none. 8x128x56x56, 2 threads, against the grouped loop: 13x13 forward 17 -> 11 ms,
// 31x31 66 -> 46 ms (PyTorch's: 20 and 28 ms).
template <bool Checked, typename E>
inline void nhwc_slide_wide(const E* in, const float* taps, const float* bias, E* out_row, int64_t c0,
                            __mmask16 lanes, int64_t ox0, int64_t ky0, int64_t ky1, int64_t iy0,
                            const ImageGeometry& g) {
  constexpr int kChunkTaps = 8;
  const int64_t C = g.channels, kernel_w = g.kernel_w, row_step = g.dilation_h * g.in_w * C;
  const __m512 start = bias ? _mm512_maskz_loadu_ps(lanes, bias + c0) : _mm512_setzero_ps();
  __m512 acc[kSlideRun];
#pragma GCC unroll 8
  for (int r = 0; r < kSlideRun; ++r) acc[r] = start;
  const E* first = in + (iy0 + ky0 * g.dilation_h) * g.in_w * C + (ox0 - g.pad_left) * C + c0;
  const float* tap_row = taps + ky0 * kernel_w * C + c0;
  for (int64_t ky = ky0; ky < ky1; ++ky, first += row_step, tap_row += kernel_w * C) {
    for (int64_t kx0 = 0; kx0 < kernel_w; kx0 += kChunkTaps) {
      const int64_t taps_here = min64(kChunkTaps, kernel_w - kx0);
      const E* x = first + kx0 * C;
      __m512 column[kSlideRun + kChunkTaps - 1];
#pragma GCC unroll 16
      for (int j = 0; j < kSlideRun + kChunkTaps - 1; ++j)
        column[j] = load_channels(
            j < kSlideRun - 1 + taps_here &&
                    (!Checked || static_cast<uint64_t>(ox0 - g.pad_left + kx0 + j) < static_cast<uint64_t>(g.in_w))
                ? lanes
                : 0,
            x + j * C);
#pragma GCC unroll 8
      for (int kx = 0; kx < kChunkTaps; ++kx) {
        const __m512 w = _mm512_maskz_loadu_ps(kx < taps_here ? lanes : 0, tap_row + (kx0 + kx) * C);
#pragma GCC unroll 8
        for (int r = 0; r < kSlideRun; ++r) acc[r] = _mm512_fmadd_ps(w, column[r + kx], acc[r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kSlideRun; ++r) store_channels(out_row + (ox0 + r) * C + c0, lanes, acc[r], g.stream_output);
}

template <int KW, typename E>
void nhwc_row_slide(const E* in, const float* taps, const float* bias, E* out_row, int64_t ky0, int64_t ky1,
                    int64_t iy0, int64_t inside_first, int64_t inside_last, const ImageGeometry& g) {
  for (int64_t c0 = 0; c0 < g.channels; c0 += kLanes) {
    const __mmask16 lanes = lane_range(0, g.channels - c0);
    int64_t ox = 0;
    for (; ox < g.out_w; ++ox) {
      // A run; at the row's ends its outside columns read zero. The row's last pixels, fewer than
      // a run, take a run that ends at the row's end (some of its pixels made twice) when the row
      // is long enough: one pixel at a time they ran at the latency of one chain (7x7, one image
      // in L2, cycles an output vector: 128x28x28 94 -> 59, 128x14x14 109 -> 60). (5x5 windows
      // keep the grouped pixels: the runs were 1.25x faster on 28x28 maps, 1.2x slower on 14x14.)
      if (ox + kSlideRun > g.out_w && ox > 0 && g.out_w >= kSlideRun) ox = g.out_w - kSlideRun;
      if (ox + kSlideRun <= g.out_w) {
        const bool inside = ox >= inside_first && ox + kSlideRun <= inside_last;
        if (KW == 0 && inside)
          nhwc_slide_wide<false>(in, taps, bias, out_row, c0, lanes, ox, ky0, ky1, iy0, g);
        else if (KW == 0)
          nhwc_slide_wide<true>(in, taps, bias, out_row, c0, lanes, ox, ky0, ky1, iy0, g);
        else if (inside)
          nhwc_slide<KW, false>(in, taps, bias, out_row, c0, lanes, ox, ky0, ky1, iy0, g);
        else
          nhwc_slide<KW, true>(in, taps, bias, out_row, c0, lanes, ox, ky0, ky1, iy0, g);
        ox += kSlideRun - 1;
        continue;
      }
      int64_t kx0, kx1;
      taps_inside(ox, 1, g.pad_left, 1, g.in_w, g.kernel_w, &kx0, &kx1);
      nhwc_pixels<1, 1>(in, taps, bias, out_row, c0, lanes, ox, ky0, ky1, kx0, kx1, iy0, g);
    }
  }
}

// One output row for the B channel vectors from c0: pixels with every tap inside the row two at a
// time, the others one at a time over their inside taps.
template <int B, typename E>
inline void nhwc_row_channels(const E* in, const float* taps, const float* bias, E* out_row, int64_t c0,
                              __mmask16 last, int64_t ky0, int64_t ky1, int64_t iy0, int64_t inside_first,
                              int64_t inside_last, const ImageGeometry& g) {
  constexpr int R = 8 / B;
  const auto border = [&](int64_t ox) {
    int64_t kx0, kx1;
    taps_inside(ox, g.stride_w, g.pad_left, g.dilation_w, g.in_w, g.kernel_w, &kx0, &kx1);
    nhwc_pixels<1, B>(in, taps, bias, out_row, c0, last, ox, ky0, ky1, kx0, kx1, iy0, g);
  };
  int64_t ox = 0;
  for (; ox < inside_first; ++ox) border(ox);
  for (; ox + R <= inside_last; ox += R)
    nhwc_pixels<R, B>(in, taps, bias, out_row, c0, last, ox, ky0, ky1, 0, g.kernel_w, iy0, g);
  for (; ox < inside_last; ++ox)
    nhwc_pixels<1, B>(in, taps, bias, out_row, c0, last, ox, ky0, ky1, 0, g.kernel_w, iy0, g);
  for (; ox < g.out_w; ++ox) border(ox);
}

// One grad_in pixel for the B channel vectors from c0: the sum over the landing taps (rows x cols
// of them, as offsets into grad_out and into the taps) of weight times grad_out.
template <int B, typename E>
inline void nhwc_gather_pixel(const E* go, const float* taps, E* out, int64_t c0, __mmask16 last,
                              const int64_t* go_rows, const int64_t* tap_rows, int64_t rows, const int64_t* go_cols,
                              const int64_t* tap_cols, int64_t cols, bool stream) {
  __mmask16 lanes[B];
  __m512 acc[B];
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) {
    lanes[b] = b + 1 < B ? 0xFFFF : last;
    acc[b] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      const E* grad = go + go_rows[i] + go_cols[j] + c0;
      const float* weight = taps + tap_rows[i] + tap_cols[j] + c0;
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b)
        acc[b] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes[b], weight + b * kLanes),
                                 load_channels(lanes[b], grad + b * kLanes), acc[b]);
    }
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) store_channels(out + c0 + b * kLanes, lanes[b], acc[b], stream);
}

// The weight gradient of one output pixel for B channel vectors: grad_out's vectors times the
// window's, into one accumulator per tap and vector. Checked: some of its columns lie outside the
// row and load as zero.
template <int KH, int KW, int B, bool Checked, typename E>
__attribute__((always_inline)) inline void nhwc_weight_grad_pixel(const __m512* grad, const E* const* rows,
                                                                  const __mmask16* row_lanes, __m512 (*acc)[B],
                                                                  int64_t ox, const ImageGeometry& g) {
  const int64_t C = g.channels, ix0 = ox * g.stride_w - g.pad_left;
#pragma GCC unroll 8
  for (int kx = 0; kx < KW; ++kx) {
    const int64_t ix = ix0 + kx * g.dilation_w;
    const bool inside = !Checked || (ix >= 0 && ix < g.in_w);
    const int64_t offset = (inside ? ix : 0) * C;
#pragma GCC unroll 8
    for (int ky = 0; ky < KH; ++ky)
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        const __mmask16 lanes = inside ? row_lanes[ky * B + b] : 0;
        acc[ky * KW + kx][b] =
            _mm512_fmadd_ps(grad[b], load_channels(lanes, rows[ky] + offset + b * kLanes), acc[ky * KW + kx][b]);
      }
  }
}

// KH x KW taps for the B channel vectors from c0 (the last masked by `last`), over output row
// oy's pixels: one accumulator per tap and vector, added into part once per row.
template <int KH, int KW, int B, bool WithBias, typename E>
void nhwc_weight_grad_channels(const E* in, const E* go_row, float* part, float* part_bias, int64_t c0,
                               __mmask16 last, int64_t oy, int64_t inside_first, int64_t inside_last,
                               const ImageGeometry& g) {
  const int64_t C = g.channels;
  __mmask16 lanes[B];
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) lanes[b] = b + 1 < B ? 0xFFFF : last;
  __m512 acc[KH * KW][B], bias_acc[B];
#pragma GCC unroll 32
  for (int t = 0; t < KH * KW; ++t)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) acc[t][b] = _mm512_maskz_loadu_ps(lanes[b], part + t * C + c0 + b * kLanes);
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b)
    bias_acc[b] = WithBias ? _mm512_maskz_loadu_ps(lanes[b], part_bias + c0 + b * kLanes) : _mm512_setzero_ps();
  // Rows of the window outside the image load with an empty mask from row 0.
  const E* rows[KH];
  __mmask16 row_lanes[KH * B];
#pragma GCC unroll 8
  for (int ky = 0; ky < KH; ++ky) {
    const int64_t iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h;
    const bool inside = row_inside(iy, g.in_h);
    rows[ky] = in + (inside ? iy : 0) * g.in_w * C + c0;
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) row_lanes[ky * B + b] = inside ? lanes[b] : 0;
  }
  // The window's newest column kPrefetchPixels ahead, and grad_out there.
  const int64_t ahead_in = (kPrefetchPixels * g.stride_w + (KW - 1) * g.dilation_w - g.pad_left) * C;
  const auto pixel = [&](int64_t ox, auto checked) {
    __m512 grad[B];
    // every column the windows advance over (see nhwc_pixels; stride-2 forward+backward, 3x3
    // and 5x5, N=32: 1.05-1.13x faster than one a pixel)
    for (int64_t s = 0; s < g.stride_w; ++s)
#pragma GCC unroll 8
      for (int ky = 0; ky < KH; ++ky)
#pragma GCC unroll 4
        for (int b = 0; b < B; ++b)
          _mm_prefetch(reinterpret_cast<const char*>(rows[ky] + (ox * g.stride_w + s) * C + ahead_in + b * kLanes),
                       _MM_HINT_T0);
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b)
      _mm_prefetch(reinterpret_cast<const char*>(go_row + (ox + kPrefetchPixels) * C + c0 + b * kLanes), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) {
      grad[b] = load_channels(lanes[b], go_row + ox * C + c0 + b * kLanes);
      if (WithBias) bias_acc[b] = _mm512_add_ps(bias_acc[b], grad[b]);
    }
    nhwc_weight_grad_pixel<KH, KW, B, decltype(checked)::value>(grad, rows, row_lanes, acc, ox, g);
  };
  int64_t ox = 0;
  for (; ox < inside_first; ++ox) pixel(ox, BoolConstant<true>());
  for (; ox < inside_last; ++ox) pixel(ox, BoolConstant<false>());
  for (; ox < g.out_w; ++ox) pixel(ox, BoolConstant<true>());
#pragma GCC unroll 32
  for (int t = 0; t < KH * KW; ++t)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) _mm512_mask_storeu_ps(part + t * C + c0 + b * kLanes, lanes[b], acc[t][b]);
  if (WithBias)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) _mm512_mask_storeu_ps(part_bias + c0 + b * kLanes, lanes[b], bias_acc[b]);
}

template <int KH, int KW, typename E>
void weight_grad_row_nhwc_fixed(const E* in, const E* go_row, float* part, float* part_bias, int64_t oy,
                                const ImageGeometry& g) {
  // Two channel vectors at a time where the accumulators fit (3x3: 18 of 32 registers).
  constexpr int B = KH * KW <= 12 ? 2 : 1;
  int64_t inside_first, inside_last;
  columns_inside(g, &inside_first, &inside_last);
  int64_t c0 = 0;
  for (; c0 + B * kLanes <= g.channels; c0 += B * kLanes) {
    if (part_bias)
      nhwc_weight_grad_channels<KH, KW, B, true>(in, go_row, part, part_bias, c0, 0xFFFF, oy, inside_first, inside_last, g);
    else
      nhwc_weight_grad_channels<KH, KW, B, false>(in, go_row, part, part_bias, c0, 0xFFFF, oy, inside_first, inside_last, g);
  }
  for (; c0 < g.channels; c0 += kLanes) {
    const __mmask16 last = lane_range(0, g.channels - c0);
    if (part_bias)
      nhwc_weight_grad_channels<KH, KW, 1, true>(in, go_row, part, part_bias, c0, last, oy, inside_first, inside_last, g);
    else
      nhwc_weight_grad_channels<KH, KW, 1, false>(in, go_row, part, part_bias, c0, last, oy, inside_first, inside_last, g);
  }
}

}  // namespace

namespace {

template <typename E>
void forward_row(const E* in, const float* taps, const float* bias, E* out_row, int64_t oy, const ImageGeometry& g) {
  constexpr int64_t kGroup = 4 * kLanes;  // channels per group of vectors
  int64_t ky0, ky1, inside_first, inside_last;
  taps_inside(oy, g.stride_h, g.pad_top, g.dilation_h, g.in_h, g.kernel_h, &ky0, &ky1);
  columns_inside(g, &inside_first, &inside_last);
  const int64_t iy0 = oy * g.stride_h - g.pad_top;
  if (g.stride_w == 1 && g.dilation_w == 1 && g.kernel_w >= 7) {
    if (g.kernel_w == 7) return nhwc_row_slide<7>(in, taps, bias, out_row, ky0, ky1, iy0, inside_first, inside_last, g);
    if (g.kernel_w == 8) return nhwc_row_slide<8>(in, taps, bias, out_row, ky0, ky1, iy0, inside_first, inside_last, g);
    if (g.kernel_w == 9) return nhwc_row_slide<9>(in, taps, bias, out_row, ky0, ky1, iy0, inside_first, inside_last, g);
    return nhwc_row_slide<0>(in, taps, bias, out_row, ky0, ky1, iy0, inside_first, inside_last, g);
  }
  int64_t c0 = 0;
  for (; c0 + kGroup <= g.channels; c0 += kGroup)
    nhwc_row_channels<4>(in, taps, bias, out_row, c0, 0xFFFF, ky0, ky1, iy0, inside_first, inside_last, g);
  for (; c0 + kGroup / 2 <= g.channels; c0 += kGroup / 2)
    nhwc_row_channels<2>(in, taps, bias, out_row, c0, 0xFFFF, ky0, ky1, iy0, inside_first, inside_last, g);
  for (; c0 < g.channels; c0 += kLanes)
    nhwc_row_channels<1>(in, taps, bias, out_row, c0, lane_range(0, g.channels - c0), ky0, ky1, iy0, inside_first,
                         inside_last, g);
}

}  // namespace

void forward_row_nhwc(const float* in, const float* taps, const float* bias, float* out_row, int64_t oy,
                      const ImageGeometry& g) {
  forward_row(in, taps, bias, out_row, oy, g);
}

void forward_row_nhwc_bf16(const uint16_t* in, const float* taps, const float* bias, uint16_t* out_row, int64_t oy,
                           const ImageGeometry& g) {
  forward_row(reinterpret_cast<const Bf16*>(in), taps, bias, reinterpret_cast<Bf16*>(out_row), oy, g);
}

void forward_row_nhwc_fp16(const uint16_t* in, const float* taps, const float* bias, uint16_t* out_row, int64_t oy,
                           const ImageGeometry& g) {
  forward_row(reinterpret_cast<const Fp16*>(in), taps, bias, reinterpret_cast<Fp16*>(out_row), oy, g);
}

namespace {

template <typename E>
void grad_input_row(const E* grad_out, const float* taps, E* grad_in_row, int64_t iy, const ImageGeometry& g) {
  const int64_t C = g.channels;
  // Output index o of input index i through tap k: i + pad - k*dilation = o*stride.
  int64_t go_rows[64], tap_rows[64], go_cols[64], tap_cols[64], rows = 0;
  for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
    const int64_t t = iy + g.pad_top - ky * g.dilation_h;
    if (t < 0 || t % g.stride_h != 0 || t / g.stride_h >= g.out_h) continue;
    go_rows[rows] = t / g.stride_h * g.out_w * C;
    tap_rows[rows++] = ky * g.kernel_w * C;
  }
  for (int64_t ix = 0; ix < g.in_w; ++ix) {
    int64_t cols = 0;
    for (int64_t kx = 0; kx < g.kernel_w; ++kx) {
      const int64_t t = ix + g.pad_left - kx * g.dilation_w;
      if (t < 0 || t % g.stride_w != 0 || t / g.stride_w >= g.out_w) continue;
      go_cols[cols] = t / g.stride_w * C;
      tap_cols[cols++] = kx * C;
    }
    E* out = grad_in_row + ix * C;
    int64_t c0 = 0;
    for (; c0 + 4 * kLanes <= C; c0 += 4 * kLanes)
      nhwc_gather_pixel<4>(grad_out, taps, out, c0, 0xFFFF, go_rows, tap_rows, rows, go_cols, tap_cols, cols,
                           g.stream_output);
    for (; c0 < C; c0 += kLanes)
      nhwc_gather_pixel<1>(grad_out, taps, out, c0, lane_range(0, C - c0), go_rows, tap_rows, rows, go_cols, tap_cols,
                           cols, g.stream_output);
  }
}

}  // namespace

void grad_input_row_nhwc(const float* grad_out, const float* taps, float* grad_in_row, int64_t iy,
                         const ImageGeometry& g) {
  grad_input_row(grad_out, taps, grad_in_row, iy, g);
}

void grad_input_row_nhwc_bf16(const uint16_t* grad_out, const float* taps, uint16_t* grad_in_row, int64_t iy,
                              const ImageGeometry& g) {
  grad_input_row(reinterpret_cast<const Bf16*>(grad_out), taps, reinterpret_cast<Bf16*>(grad_in_row), iy, g);
}

void grad_input_row_nhwc_fp16(const uint16_t* grad_out, const float* taps, uint16_t* grad_in_row, int64_t iy,
                              const ImageGeometry& g) {
  grad_input_row(reinterpret_cast<const Fp16*>(grad_out), taps, reinterpret_cast<Fp16*>(grad_in_row), iy, g);
}

namespace {

// The weight gradient of wide windows (7 to 9 columns, unit stride and dilation along the row),
// one channel vector and one kernel row at a time: KW accumulators, and runs of kSlideRun output
// pixels whose input columns are loaded once for every tap that reads them (see nhwc_slide).
template <int KW, typename E>
void weight_grad_row_nhwc_slide(const E* in, const E* go_row, float* part, float* part_bias, int64_t oy,
                                const ImageGeometry& g) {
  const int64_t C = g.channels;
  int64_t inside_first, inside_last;
  columns_inside(g, &inside_first, &inside_last);
  for (int64_t c0 = 0; c0 < C; c0 += kLanes) {
    const __mmask16 lanes = lane_range(0, C - c0);
    if (part_bias) {
      __m512 sum = _mm512_maskz_loadu_ps(lanes, part_bias + c0);
      for (int64_t ox = 0; ox < g.out_w; ++ox)
        sum = _mm512_add_ps(sum, load_channels(lanes, go_row + ox * C + c0));
      _mm512_mask_storeu_ps(part_bias + c0, lanes, sum);
    }
    for (int64_t ky = 0; ky < g.kernel_h; ++ky) {
      const int64_t iy = oy * g.stride_h - g.pad_top + ky * g.dilation_h;
      if (!row_inside(iy, g.in_h)) continue;
      const E* row = in + iy * g.in_w * C + c0;
      float* tap_part = part + ky * KW * C + c0;
      __m512 acc[KW];
#pragma GCC unroll 9
      for (int kx = 0; kx < KW; ++kx) acc[kx] = _mm512_maskz_loadu_ps(lanes, tap_part + kx * C);
      int64_t ox = 0;
      while (ox < g.out_w) {
        if (ox >= inside_first && ox + kSlideRun <= inside_last) {
          const E* x = row + (ox - g.pad_left) * C;
          _mm_prefetch(reinterpret_cast<const char*>(x + (kSlideRun + KW - 1 + kPrefetchPixels) * C), _MM_HINT_T0);
          __m512 column[kSlideRun + KW - 1];
#pragma GCC unroll 16
          for (int j = 0; j < kSlideRun + KW - 1; ++j) column[j] = load_channels(lanes, x + j * C);
#pragma GCC unroll 8
          for (int r = 0; r < kSlideRun; ++r) {
            const __m512 grad = load_channels(lanes, go_row + (ox + r) * C + c0);
#pragma GCC unroll 9
            for (int kx = 0; kx < KW; ++kx) acc[kx] = _mm512_fmadd_ps(grad, column[r + kx], acc[kx]);
          }
          ox += kSlideRun;
          continue;
        }
        const __m512 grad = load_channels(lanes, go_row + ox * C + c0);
#pragma GCC unroll 9
        for (int kx = 0; kx < KW; ++kx) {
          const int64_t ix = ox - g.pad_left + kx;
          const __mmask16 inside = row_inside(ix, g.in_w) ? lanes : 0;
          acc[kx] = _mm512_fmadd_ps(grad, load_channels(inside, row + (inside ? ix : 0) * C), acc[kx]);
        }
        ++ox;
      }
#pragma GCC unroll 9
      for (int kx = 0; kx < KW; ++kx) _mm512_mask_storeu_ps(tap_part + kx * C, lanes, acc[kx]);
    }
  }
}

template <typename E>
void weight_grad_row(const E* in, const E* grad_out_row, float* part, float* part_bias, int64_t oy,
                     const ImageGeometry& g) {
  if (g.kernel_w == 7) return weight_grad_row_nhwc_slide<7>(in, grad_out_row, part, part_bias, oy, g);
  if (g.kernel_w == 8) return weight_grad_row_nhwc_slide<8>(in, grad_out_row, part, part_bias, oy, g);
  if (g.kernel_w == 9) return weight_grad_row_nhwc_slide<9>(in, grad_out_row, part, part_bias, oy, g);
  if (g.kernel_h == 3) return weight_grad_row_nhwc_fixed<3, 3>(in, grad_out_row, part, part_bias, oy, g);
  weight_grad_row_nhwc_fixed<5, 5>(in, grad_out_row, part, part_bias, oy, g);
}

}  // namespace

void weight_grad_row_nhwc(const float* in, const float* grad_out_row, float* part, float* part_bias, int64_t oy,
                          const ImageGeometry& g) {
  weight_grad_row(in, grad_out_row, part, part_bias, oy, g);
}

void weight_grad_row_nhwc_bf16(const uint16_t* in, const uint16_t* grad_out_row, float* part, float* part_bias,
                               int64_t oy, const ImageGeometry& g) {
  weight_grad_row(reinterpret_cast<const Bf16*>(in), reinterpret_cast<const Bf16*>(grad_out_row), part, part_bias, oy, g);
}

void weight_grad_row_nhwc_fp16(const uint16_t* in, const uint16_t* grad_out_row, float* part, float* part_bias,
                               int64_t oy, const ImageGeometry& g) {
  weight_grad_row(reinterpret_cast<const Fp16*>(in), reinterpret_cast<const Fp16*>(grad_out_row), part, part_bias, oy, g);
}

namespace {

// A run of 16-bit floats to fp32 and back, a vector at a time (the tail under a lane mask), with
// the row kernels' loads and rounding stores.
template <typename E>
void widen_run(const uint16_t* in, float* out, int64_t count) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const __mmask16 lanes = lane_range(0, count - i);
    _mm512_mask_storeu_ps(out + i, lanes, load_channels(lanes, reinterpret_cast<const E*>(in) + i));
  }
}

template <typename E>
void narrow_run(const float* in, uint16_t* out, int64_t count) {
  for (int64_t i = 0; i < count; i += kLanes) {
    const __mmask16 lanes = lane_range(0, count - i);
    store_channels(reinterpret_cast<E*>(out) + i, lanes, _mm512_maskz_loadu_ps(lanes, in + i), false);
  }
}

}  // namespace

void bf16_to_float(const uint16_t* in, float* out, int64_t count) { widen_run<Bf16>(in, out, count); }
void float_to_bf16(const float* in, uint16_t* out, int64_t count) { narrow_run<Bf16>(in, out, count); }
void half_to_float(const uint16_t* in, float* out, int64_t count) { widen_run<Fp16>(in, out, count); }
void float_to_half(const float* in, uint16_t* out, int64_t count) { narrow_run<Fp16>(in, out, count); }

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
