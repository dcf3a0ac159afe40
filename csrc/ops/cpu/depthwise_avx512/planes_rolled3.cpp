// Depthwise convolution on AVX-512, NCHW planes: 3x3 windows (dilation 1) as rolled rows, at
// stride 1 (with two 7x7 maps to a vector) and stride 2 (forward, weight gradient, and the input
// gradient's gather for padding 0 or 1). See depthwise_conv2d_avx512.cpp for the whole design.
#include "ops/cpu/depthwise_avx512/common.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/depthwise_avx512/plane_kernels.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

// ---------------------------------------------------------------------------------------------
// 3x3 windows at unit stride and dilation: rolled rows. A column chunk walks down the plane and
// loads each input row once, as its 16 columns and the two after (two masked loads), the three
// taps made by valignd. The forward carries the two output rows an input row completes later in
// registers and stores each as it completes; the weight gradient carries the three grad_out rows
// that meet an input row. All named registers: the block kernels above keep theirs in arrays
// indexed by unrolled loops, and GCC spilled those to the stack. Against forward_plane_fixed<1,
// 3, 3, 7> and weight_grad_plane_fixed, planes in L2, one thread, cycles a plane (rdtsc): 14x14
// forward 290 -> 160, weight gradient 320 -> 230; 28x28 1130 -> 670 and 1240 -> 750. The
// forward's sums are the block kernel's bit for bit; the weight gradient adds a plane's rows
// chunk by chunk instead of block by block.

// Input row iy of a chunk: columns base .. base + 15 and the two after, zero outside the input.
struct Rows3Columns {
  __mmask16 low = 0, high = 0;
  Rows3Columns() = default;
  Rows3Columns(int64_t base, int64_t in_w)
      : low(lane_range(-base, in_w - base)),
        high(static_cast<__mmask16>(lane_range(-(base + kLanes), in_w - (base + kLanes)) & 0x3)) {}
  // taps[kx][l] = column base + l + kx; lanes outside `keep` zeroed (past the output row, where a
  // real pixel times a zero grad_out would turn an inf into a NaN).
  template <bool Keep>
  void load(const float* row, bool inside, __mmask16 keep, __m512* taps) const {
    const __m512i low_bits = _mm512_castps_si512(_mm512_maskz_loadu_ps(inside ? low : 0, row));
    const __m512i high_bits = _mm512_castps_si512(_mm512_maskz_loadu_ps(inside ? high : 0, row + kLanes));
    if (Keep) {
      taps[0] = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(keep, low_bits));
      taps[1] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(keep, high_bits, low_bits, 1));
      taps[2] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(keep, high_bits, low_bits, 2));
    } else {
      taps[0] = _mm512_castsi512_ps(low_bits);
      taps[1] = _mm512_castsi512_ps(_mm512_alignr_epi32(high_bits, low_bits, 1));
      taps[2] = _mm512_castsi512_ps(_mm512_alignr_epi32(high_bits, low_bits, 2));
    }
  }
};

// The n + 2 input rows of n output rows, k = 0 .. n + 1: row k starts output row k (k < n),
// continues output row k - 1 (1 <= k <= n) and completes output row k - 2 (k >= 2). The steps
// at either end skip the rows that do not exist.
template <class Walk>
inline __attribute__((always_inline)) void roll_rows3(Walk& walk, int64_t n) {
  if (n <= 0) return;
  walk.template step<false, false, true>(0);
  if (n == 1) {
    walk.template step<false, true, false>(1);
    walk.template step<true, false, false>(2);
    return;
  }
  walk.template step<false, true, true>(1);
#pragma GCC unroll 2
  for (int64_t k = 2; k < n; ++k) walk.template step<true, true, true>(k);
  walk.template step<true, true, false>(n);
  walk.template step<true, false, false>(n + 1);
}

// The rows one chunk of a plane reads and writes. Step k of a walk reads input row first_row + k
// (rows outside the input read zero); output row r is written at out + r * out_row_stride and
// grad_out row r read at grad + r * out_row_stride (rows of the walk's band).
struct PlaneRows3 {
  const float* column;  // input column `base` of row 0
  int64_t first_row, in_h, in_row_stride;
  Rows3Columns cols;
  float* out;
  const float* grad;
  int64_t out_row_stride;
  __mmask16 valid;  // the chunk's output columns
  int64_t ahead;    // rows to the next band's, prefetched a step at a time (0: none)

  template <bool Keep>
  inline __attribute__((always_inline)) void taps(int64_t k, __m512* t) const {
    const int64_t iy = first_row + k;
    const bool inside = row_inside(iy, in_h);
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride), _MM_HINT_T0);
    cols.load<Keep>(column + (inside ? iy : 0) * in_row_stride, inside, valid, t);
  }
  inline __attribute__((always_inline)) void store(int64_t r, __m512 v) const {
    _mm512_mask_storeu_ps(out + r * out_row_stride, valid, v);
  }
  inline __attribute__((always_inline)) __m512 grad_row(int64_t r) const {
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(grad + (r + ahead) * out_row_stride), _MM_HINT_T0);
    return _mm512_maskz_loadu_ps(valid, grad + r * out_row_stride);
  }
};

// sum + w[0] t[0] + w[1] t[1] + w[2] t[2], added in that order: one kernel row's three taps.
inline __attribute__((always_inline)) __m512 kernel_row_sum(const __m512* w, const __m512* t, __m512 sum) {
  sum = _mm512_fmadd_ps(w[0], t[0], sum);
  sum = _mm512_fmadd_ps(w[1], t[1], sum);
  return _mm512_fmadd_ps(w[2], t[2], sum);
}

// Output row r of a walk: bias, then taps 0..8 in order (the block kernels' order).
template <class Rows>
struct ForwardRows3 {
  Rows rows;
  const __m512* w;
  __m512 bias;
  __m512 older, old;  // the output rows k - 2 and k - 1 before step k

  template <bool Complete, bool Continue, bool Start>
  inline __attribute__((always_inline)) void step(int64_t k) {
    __m512 t[3];
    rows.template taps<false>(k, t);
    if (Complete) rows.store(k - 2, kernel_row_sum(w + 6, t, older));
    if (Continue) older = kernel_row_sum(w + 3, t, old);
    if (Start) old = kernel_row_sum(w, t, bias);
  }
};

// Rows of up to two vectors take the plane as one band. Wider rows (56x56 and 112x112 maps) and
// streamed outputs (staged a band at a time) go in bands of kRows3BandRows rows, two extra input
// rows a band, the next band's rows prefetched a step at a time: walked whole, a chunk of a
// plane that came from memory waited on its rows (32x128x56x56, 2 threads: weight gradient 6.2 ->
// 8.5-10.5 ms against the block kernels); in bands the layer's forward is 1.2x and its backward
// 1.03-1.18x faster than the block kernels', 112x112's 1.01-1.07x.
// (kRows3BandRows: common.h)

void forward_plane_rows3(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  __m512 w[9];
  for (int t = 0; t < 9; ++t) w[t] = _mm512_set1_ps(taps[t]);
  alignas(64) float stage[kStageFloats];
  const bool staged = stageable(g, kRows3BandRows, g.out_row_stride, g.out_w);
  const bool wide = g.out_w > 2 * kLanes;
  const int64_t band_rows = staged || wide ? kRows3BandRows : g.out_h;
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += band_rows) {
    const int64_t n = min64(band_rows, g.out_h - oy0);
    float* rows = staged ? stage : out + oy0 * g.out_row_stride;
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = x0 - g.pad_left;
      const PlaneRows3 plane{in + base, oy0 - g.pad_top, g.in_h, g.in_row_stride, Rows3Columns(base, g.in_w),
                             rows + x0, nullptr, g.out_row_stride, lane_range(0, g.out_w - x0),
                             wide ? band_rows : 0};
      ForwardRows3<PlaneRows3> walk{plane, w, _mm512_set1_ps(bias), _mm512_setzero_ps(), _mm512_setzero_ps()};
      roll_rows3(walk, n);
    }
    if (staged) stream_rows(stage, out + oy0 * g.out_row_stride, n * g.out_w);
  }
}

// A 3x3 weight gradient's partial sums, per lane: sum<ky><kx> and the bias's. Named members, not
// an array: indexed by unrolled loops, GCC stored an array to the stack on every row.
template <bool WithBias>
struct TapSums3 {
  __m512 s00, s01, s02, s10, s11, s12, s20, s21, s22, bias;

  // Kernel row KY's taps t[kx] against one grad_out row.
  template <int KY>
  inline __attribute__((always_inline)) void add(__m512 grad, const __m512* t) {
    if constexpr (KY == 0) {
      s00 = _mm512_fmadd_ps(grad, t[0], s00);
      s01 = _mm512_fmadd_ps(grad, t[1], s01);
      s02 = _mm512_fmadd_ps(grad, t[2], s02);
    } else if constexpr (KY == 1) {
      s10 = _mm512_fmadd_ps(grad, t[0], s10);
      s11 = _mm512_fmadd_ps(grad, t[1], s11);
      s12 = _mm512_fmadd_ps(grad, t[2], s12);
    } else {
      s20 = _mm512_fmadd_ps(grad, t[0], s20);
      s21 = _mm512_fmadd_ps(grad, t[1], s21);
      s22 = _mm512_fmadd_ps(grad, t[2], s22);
    }
  }
  inline __attribute__((always_inline)) void add_bias(__m512 grad) {
    if (WithBias) bias = _mm512_add_ps(bias, grad);
  }
  // The sums of `lanes` from tap_lanes ([9][16]) and bias_lanes ([16]), and back. Member by
  // member: through an array of the members' addresses GCC kept the walk in memory and stored
  // all nine sums to the stack on every step (45 spill stores in the 14x14 walk). Planes in L2,
  // one thread, cycles a plane: 14x14 weight gradient 340-390 -> 215-295, 28x28 1265 -> 1135,
  // the stride-2 walk of a 14x14 plane 281 -> 189 (28x28 and 56x56 at stride 2 unchanged).
  void load(const float* tap_lanes, const float* bias_lanes, __mmask16 lanes) {
    const auto at = [&](__m512 sum, int t) { return _mm512_mask_loadu_ps(sum, lanes, tap_lanes + t * kLanes); };
    s00 = at(s00, 0), s01 = at(s01, 1), s02 = at(s02, 2);
    s10 = at(s10, 3), s11 = at(s11, 4), s12 = at(s12, 5);
    s20 = at(s20, 6), s21 = at(s21, 7), s22 = at(s22, 8);
    if (WithBias) bias = _mm512_mask_loadu_ps(bias, lanes, bias_lanes);
  }
  void save(float* tap_lanes, float* bias_lanes, __mmask16 lanes) const {
    const auto at = [&](__m512 sum, int t) { _mm512_mask_storeu_ps(tap_lanes + t * kLanes, lanes, sum); };
    at(s00, 0), at(s01, 1), at(s02, 2), at(s10, 3), at(s11, 4), at(s12, 5), at(s20, 6), at(s21, 7), at(s22, 8);
    if (WithBias) _mm512_mask_storeu_ps(bias_lanes, lanes, bias);
  }
};

// The weight gradient over a walk: step k meets grad_out rows k (ky 0), k - 1 (ky 1) and k - 2
// (ky 2).
template <bool WithBias, class Rows>
struct WeightGradRows3 {
  Rows rows;
  TapSums3<WithBias> sums;
  __m512 grad_newest, grad_middle, grad_oldest;

  template <bool Oldest, bool Middle, bool Newest>
  inline __attribute__((always_inline)) void step(int64_t k) {
    __m512 t[3];
    rows.template taps<true>(k, t);
    grad_oldest = grad_middle;
    grad_middle = grad_newest;
    if (Newest) {
      grad_newest = rows.grad_row(k);
      sums.add_bias(grad_newest);
      sums.template add<0>(grad_newest, t);
    }
    if (Middle) sums.template add<1>(grad_middle, t);
    if (Oldest) sums.template add<2>(grad_oldest, t);
  }
};

template <bool WithBias>
void weight_grad_plane_rows3(const float* go, const float* in, float* tap_lanes, float* bias_lanes,
                             const PlaneGeometry& g) {
  WeightGradRows3<WithBias, PlaneRows3> walk{};
  walk.sums.load(tap_lanes, bias_lanes, 0xFFFF);
  const bool wide = g.out_w > 2 * kLanes;
  const int64_t band_rows = wide ? kRows3BandRows : g.out_h;
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += band_rows) {
    const int64_t n = min64(band_rows, g.out_h - oy0);
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = x0 - g.pad_left;
      walk.rows = PlaneRows3{in + base, oy0 - g.pad_top, g.in_h, g.in_row_stride, Rows3Columns(base, g.in_w),
                             nullptr, go + oy0 * g.out_row_stride + x0, g.out_row_stride,
                             lane_range(0, g.out_w - x0), wide ? band_rows : 0};
      walk.grad_newest = walk.grad_middle = walk.grad_oldest = _mm512_setzero_ps();
      roll_rows3(walk, n);
    }
  }
  walk.sums.save(tap_lanes, bias_lanes, 0xFFFF);
}

// Two planes of at most 8 columns (7x7 maps), plane a in lanes 0-7 and plane b in lanes 8-15,
// each with its left padding: lane 7 and lanes 15-16 read as zero, so one valignd makes both
// planes' taps. Each lane's sums are those of the one-plane walk above (the same bits whichever
// way a channel is paired; the weight gradient's partial sums land in lanes 8-15 for plane b).
// Against the flat planes, in L2 (one thread, cycles a plane): forward 85 -> 47, weight gradient
// 110 -> 84. From memory (32x1024x7x7, 2 threads) the layer does not move (0.92-0.98x, noise);
// at N=1 it is 1.08-1.11x faster.
struct PairedRows3 {
  const float* column_a;  // input column -pad_left of row 0
  const float* column_b;
  int64_t first_row, in_h, in_row_stride;
  __mmask16 low_a, low_b;  // input columns inside, in each half
  float* out_a;
  float* out_b;
  const float* grad_a;
  const float* grad_b;
  int64_t out_row_stride;
  __mmask16 valid;  // output columns, in both halves

  PairedRows3(const float* in_a, const float* in_b, int64_t first, float* output_a, float* output_b,
              const float* grad_out_a, const float* grad_out_b, const PlaneGeometry& g)
      : column_a(in_a - g.pad_left),
        column_b(in_b - g.pad_left - 8),
        first_row(first),
        in_h(g.in_h),
        in_row_stride(g.in_row_stride),
        low_a(lane_range(g.pad_left, g.pad_left + g.in_w)),
        low_b(static_cast<__mmask16>(lane_range(g.pad_left, g.pad_left + g.in_w) << 8)),
        out_a(output_a),
        out_b(output_b ? output_b - 8 : nullptr),
        grad_a(grad_out_a),
        grad_b(grad_out_b ? grad_out_b - 8 : nullptr),
        out_row_stride(g.out_row_stride),
        valid(static_cast<__mmask16>(lane_range(0, g.out_w) | lane_range(0, g.out_w) << 8)) {}

  template <bool Keep>
  inline __attribute__((always_inline)) void taps(int64_t k, __m512* t) const {
    const int64_t iy = first_row + k;
    const bool inside = row_inside(iy, in_h);
    const int64_t offset = (inside ? iy : 0) * in_row_stride;
    const __m512i both = _mm512_castps_si512(_mm512_mask_loadu_ps(
        _mm512_maskz_loadu_ps(inside ? low_a : 0, column_a + offset), inside ? low_b : 0, column_b + offset));
    const __m512i zero = _mm512_setzero_si512();
    const __mmask16 keep = Keep ? valid : 0xFFFF;
    t[0] = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(keep, both));
    t[1] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(keep, zero, both, 1));
    t[2] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(keep, zero, both, 2));
  }
  inline __attribute__((always_inline)) void store(int64_t r, __m512 v) const {
    _mm512_mask_storeu_ps(out_a + r * out_row_stride, valid & 0x00FF, v);
    _mm512_mask_storeu_ps(out_b + r * out_row_stride, valid & 0xFF00, v);
  }
  inline __attribute__((always_inline)) __m512 grad_row(int64_t r) const {
    return _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(valid & 0x00FF, grad_a + r * out_row_stride), valid & 0xFF00,
                                grad_b + r * out_row_stride);
  }
};

// The rolled kernels' planes: 3x3 windows at unit stride and dilation.
inline bool rolls_rows3(const PlaneGeometry& g) {
  return g.rolled_rows && g.stride == 1 && g.kernel_h == 3 && g.kernel_w == 3 && g.dilation_h == 1 &&
         g.dilation_w == 1;
}

// Planes two to a vector (PairedRows3): a row with its left padding fills at most half a vector,
// the taps right of the last output reach only padding (lane 7, or b's left padding), and the
// outputs fit in half a vector.
inline bool pairs_rows3(const PlaneGeometry& g) {
  return rolls_rows3(g) && g.pad_left >= 0 && g.in_w + g.pad_left <= 8 && g.out_w <= 8 && g.out_w < 7 + g.pad_left;
}

// Streamed outputs are not staged here: a pair's planes are small, and stores are plain.
void forward_plane_rows3_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b,
                              float bias_a, float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  __m512 w[9];
  for (int t = 0; t < 9; ++t) w[t] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(taps_a[t]), _mm512_set1_ps(taps_b[t]));
  const __m512 bias = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(bias_a), _mm512_set1_ps(bias_b));
  ForwardRows3<PairedRows3> walk{PairedRows3(in_a, in_b, -g.pad_top, out_a, out_b, nullptr, nullptr, g), w, bias,
                                 _mm512_setzero_ps(), _mm512_setzero_ps()};
  roll_rows3(walk, g.out_h);
}

template <bool WithBias>
void weight_grad_plane_rows3_pair(const float* go_a, const float* go_b, const float* in_a, const float* in_b,
                                  float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                                  const PlaneGeometry& g) {
  WeightGradRows3<WithBias, PairedRows3> walk{PairedRows3(in_a, in_b, -g.pad_top, nullptr, nullptr, go_a, go_b, g)};
  walk.sums.load(tap_lanes_a, bias_lanes_a, 0x00FF);
  walk.sums.load(tap_lanes_b, bias_lanes_b, 0xFF00);
  roll_rows3(walk, g.out_h);
  walk.sums.save(tap_lanes_a, bias_lanes_a, 0x00FF);
  walk.sums.save(tap_lanes_b, bias_lanes_b, 0xFF00);
}

// ---------------------------------------------------------------------------------------------
// 3x3 windows at stride 2 (dilation 1), rolled the same way: the 16 outputs of a chunk read input
// columns base .. base + 32 of a row, loaded as two vectors and one lane; two-source permutes
// take the even and the odd columns (taps 0 and 1) and valignd the even ones one further (tap 2).
// Output row r reads input rows 2r + ky: an even row completes one output row and starts the
// next, an odd row continues it. Bands of kStride2BandRows output rows (the 2n + 1 input rows of
// a band hold every pair a band needs; the last is read again as the next band's first), the
// next band's rows prefetched a column at a time as in the block kernels. Against
// forward_plane_fixed<2, 3, 3, 7> and weight_grad_plane_fixed, planes in L2, one thread, cycles
// a plane: 28x28 forward 430-570 -> 275, weight gradient 450-570 -> 375; 56x56 2000-2300 ->
// 1060 and 1800-2050 -> 1330. From memory (N=32, 2 threads) the gain shrinks to 0-15%: the
// 32x128x56x56 forward 4.8 -> 4.1 ms, the 112x112 and 28x28 layers within the noise.

// (kStride2BandRows: common.h)

// The prefetch of the row ahead. Rows of fewer than kWholeLinesRowFloats columns: one line a
// chunk (at its first column), the rest left to the hardware's prefetcher. Wider rows: every line
// the chunk reads (columns base, base + 16 and base + 32, clamped to the row). On 112x112 maps one
// line a chunk left three of a row's seven unfetched, and the walk waited on them: in process, N=32,
// 2 threads, reuse (Zen 5), 32x64x112x112 forward 4.3-4.6 -> 2.9-3.3 ms (the copy of its bytes
// 2.6 ms), forward+backward 23.6 -> 19.4 ms; 32x32x96x96 1.9 -> 1.4, 32x32x160x160 6.0 -> 3.3 ms.
// On 80- and 56-wide rows the extra prefetches cost 4-12%, so they keep one a chunk.
constexpr int64_t kWholeLinesRowFloats = 96;

struct Stride2Columns {
  __mmask16 low = 0, high = 0, last = 0;
  bool whole_lines = false;
  int64_t fetch[3] = {0, 0, 0};  // columns from base whose lines the row ahead fetches (whole_lines)
  Stride2Columns() = default;
  Stride2Columns(int64_t base, int64_t in_w)
      : low(lane_range(-base, in_w - base)),
        high(lane_range(-(base + kLanes), in_w - (base + kLanes))),
        last(static_cast<__mmask16>(lane_range(-(base + 2 * kLanes), in_w - (base + 2 * kLanes)) & 0x1)),
        whole_lines(in_w >= kWholeLinesRowFloats) {
    for (int i = 0; i < 3; ++i) {
      const int64_t x = base + i * kLanes;
      fetch[i] = (x < 0 ? 0 : x > in_w - 1 ? in_w - 1 : x) - base;
    }
  }
  // taps[kx][l] = column base + 2l + kx, zero outside the input; lanes outside `keep` zeroed when
  // Keep (see Rows3Columns::load).
  template <bool Keep>
  void load(const float* row, bool inside, __mmask16 keep, __m512* taps) const {
    const __m512i even = even_lanes();
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 a = _mm512_maskz_loadu_ps(inside ? low : 0, row);
    const __m512 b = _mm512_maskz_loadu_ps(inside ? high : 0, row + kLanes);
    const __m512i c = _mm512_castps_si512(_mm512_maskz_loadu_ps(inside ? last : 0, row + 2 * kLanes));
    const __mmask16 lanes = Keep ? keep : 0xFFFF;
    const __m512i even_bits = _mm512_castps_si512(_mm512_permutex2var_ps(a, even, b));
    taps[0] = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(lanes, even_bits));
    taps[1] = _mm512_maskz_permutex2var_ps(lanes, a, odd, b);
    taps[2] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(lanes, c, even_bits, 1));
  }
  // The taps of input row iy (zero outside the input) from `column` (column `base` of row 0),
  // prefetching the row `ahead` rows further.
  template <bool Keep>
  inline __attribute__((always_inline)) void row_taps(const float* column, int64_t iy, int64_t in_h,
                                                      int64_t in_row_stride, int64_t ahead, __mmask16 keep,
                                                      __m512* taps) const {
    const bool inside = row_inside(iy, in_h);
    const float* ahead_row = column + (iy + ahead) * in_row_stride;
    if (whole_lines) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead_row + fetch[0]), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead_row + fetch[1]), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead_row + fetch[2]), _MM_HINT_T0);
    } else {
      _mm_prefetch(reinterpret_cast<const char*>(ahead_row), _MM_HINT_T0);
    }
    load<Keep>(column + (inside ? iy : 0) * in_row_stride, inside, keep, taps);
  }
};

// The 2n + 1 input rows of n output rows, k = 0 .. 2n.
template <class Walk>
inline __attribute__((always_inline)) void roll_rows3_stride2(Walk& walk, int64_t n) {
  if (n <= 0) return;
  walk.template step<false, false, true>(0);
  for (int64_t r = 0; r + 1 < n; ++r) {
    walk.template step<false, true, false>(2 * r + 1);
    walk.template step<true, false, true>(2 * r + 2);
  }
  walk.template step<false, true, false>(2 * n - 1);
  walk.template step<true, false, false>(2 * n);
}

// Output rows oy0 .. oy0 + n - 1 of one chunk; step k reads input row 2 * oy0 - pad_top + k.
struct ForwardStride2 {
  const float* column;  // input column `base` of row 0
  int64_t first_row, in_h, in_row_stride, ahead;  // ahead: rows to the next band's row k
  Stride2Columns cols;
  const __m512* w;
  __m512 bias;
  float* out;
  int64_t out_row_stride;
  __mmask16 store;
  __m512 row_sum;

  template <bool Complete, bool Continue, bool Start>
  inline __attribute__((always_inline)) void step(int64_t k) {
    __m512 t[3];
    cols.row_taps<false>(column, first_row + k, in_h, in_row_stride, ahead, 0, t);
    if (Complete)
      _mm512_mask_storeu_ps(out + (k / 2 - 1) * out_row_stride, store, kernel_row_sum(w + 6, t, row_sum));
    if (Continue) row_sum = kernel_row_sum(w + 3, t, row_sum);
    if (Start) row_sum = kernel_row_sum(w, t, bias);
  }
};

void forward_plane_stride2_rows3(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  __m512 w[9];
  for (int t = 0; t < 9; ++t) w[t] = _mm512_set1_ps(taps[t]);
  alignas(64) float stage[kStageFloats];
  const bool staged = stageable(g, kStride2BandRows, g.out_row_stride, g.out_w);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += kStride2BandRows) {
    const int64_t n = min64(kStride2BandRows, g.out_h - oy0);
    float* rows = staged ? stage : out + oy0 * g.out_row_stride;
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = 2 * x0 - g.pad_left;
      ForwardStride2 walk{in + base, 2 * oy0 - g.pad_top, g.in_h, g.in_row_stride, 2 * kStride2BandRows,
                          Stride2Columns(base, g.in_w), w, _mm512_set1_ps(bias), rows + x0, g.out_row_stride,
                          lane_range(0, g.out_w - x0), _mm512_setzero_ps()};
      roll_rows3_stride2(walk, n);
    }
    if (staged) stream_rows(stage, out + oy0 * g.out_row_stride, n * g.out_w);
  }
}

// The weight gradient of one band and chunk: step k meets grad_out row k / 2 (ky 0, k even),
// (k - 1) / 2 (ky 1) and k / 2 - 1 (ky 2, k even), rows of the band.
template <bool WithBias>
struct WeightGradStride2 {
  const float* column;
  const float* grad;  // grad_out row oy0 at the chunk's column
  int64_t first_row, in_h, in_row_stride, out_row_stride, ahead;
  Stride2Columns cols;
  __mmask16 valid;
  TapSums3<WithBias> sums;
  __m512 grad_row;

  template <bool Complete, bool Continue, bool Start>
  inline __attribute__((always_inline)) void step(int64_t k) {
    __m512 t[3];
    cols.row_taps<true>(column, first_row + k, in_h, in_row_stride, ahead, valid, t);
    if (Complete) sums.template add<2>(grad_row, t);
    if (Continue) sums.template add<1>(grad_row, t);
    if (Start) {
      // On wide rows the grad_out row ahead too, a line a chunk: in process, N=32, 2 threads,
      // reuse, 32x64x112x112 weight gradient 3.9-4.5 -> 3.1-3.4 ms (56x56 the same, 28x28 3-5%
      // slower with it).
      if (cols.whole_lines)
        _mm_prefetch(reinterpret_cast<const char*>(grad + (k / 2 + ahead / 2) * out_row_stride), _MM_HINT_T0);
      grad_row = _mm512_maskz_loadu_ps(valid, grad + (k / 2) * out_row_stride);
      sums.add_bias(grad_row);
      sums.template add<0>(grad_row, t);
    }
  }
};

template <bool WithBias>
void weight_grad_plane_stride2_rows3(const float* go, const float* in, float* tap_lanes, float* bias_lanes,
                                     const PlaneGeometry& g) {
  WeightGradStride2<WithBias> walk{};
  walk.sums.load(tap_lanes, bias_lanes, 0xFFFF);
  walk.in_h = g.in_h;
  walk.in_row_stride = g.in_row_stride;
  walk.out_row_stride = g.out_row_stride;
  walk.ahead = 2 * kStride2BandRows;
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += kStride2BandRows) {
    const int64_t n = min64(kStride2BandRows, g.out_h - oy0);
    walk.first_row = 2 * oy0 - g.pad_top;
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = 2 * x0 - g.pad_left;
      walk.column = in + base;
      walk.grad = go + oy0 * g.out_row_stride + x0;
      walk.cols = Stride2Columns(base, g.in_w);
      walk.valid = lane_range(0, g.out_w - x0);
      walk.grad_row = _mm512_setzero_ps();
      roll_rows3_stride2(walk, n);
    }
  }
  walk.sums.save(tap_lanes, bias_lanes, 0xFFFF);
}

inline bool rolls_rows3_stride2(const PlaneGeometry& g) {
  return g.rolled_rows && g.stride == 2 && g.kernel_h == 3 && g.kernel_w == 3 && g.dilation_h == 1 &&
         g.dilation_w == 1;
}

// The same for 3x3 windows with padding 0 or 1 on top and left (MobileNet's strided layers;
// TensorFlow's "same"), rolled. With padding p on top, input row 2m - p takes kernel rows 0 and 2
// of grad_out rows m and m - 1, row 2m + 1 - p kernel row 1 of grad_out row m; the columns
// likewise. So lane l of 16 input columns from x0 (even) reads two grad_out columns, c + l/2 + 1
// (`high`) and c + l/2 (`low`) with c = x0/2 - 1 + pad_left: two permutes of one load, each with
// its lanes' weights (a lane reads one or two taps). A walk down grad_out rows m makes each row's
// pair once and completes two input rows a step, the previous row's pair kept. Each lane adds its
// taps in the block kernel's order (kernel rows down, taps left to right: the high column's tap
// before the low one's; a masked multiply-add where the block kernel added a zeroed lane): bit
// for bit its sums. Against grad_input_plane_stride2_fixed, planes in L2, one thread, cycles a
// plane (rdtsc): 14x14 306 -> 97, 28x28 861 -> 340, 112x112 20300 -> 7800 (the block kernel took
// 2.5-3x the stride-2 forward's time); from memory (N=32, 2 threads, in-process A/B) MobileNet
// v1's stride-2 layers' forward+backward 1.06-1.28x. The two paddings are template parameters:
// as run-time values (masks and row offsets) the walk ran 1.2-1.4x slower.
inline bool rolls_grad_input_stride2_rows3(const PlaneGeometry& g) {
  return rolls_rows3_stride2(g) && (g.pad_top == 0 || g.pad_top == 1) && (g.pad_left == 0 || g.pad_left == 1);
}

template <bool kLeftPadded, int64_t kTop>
void grad_input_plane_stride2_rows3(const float* go, const float* taps, float* gi, const PlaneGeometry& g) {
  constexpr int64_t kBandRows = 8;  // as the block kernel's: a streamed band is staged whole
  constexpr __mmask16 kOdd = 0xAAAA;
  // Each kernel row's high and low terms. Padding 1 on the left: odd lanes take tap 0 from the
  // high column and tap 2 from the low one, even lanes tap 1 from the low one; padding 0: even
  // lanes taps 0 (high) and 2 (low), odd lanes tap 1 (high).
  __m512 high_w[3], low_w[3];
  for (int ky = 0; ky < 3; ++ky) {
    const float* w = taps + 3 * ky;
    high_w[ky] = kLeftPadded ? _mm512_set1_ps(w[0]) : _mm512_mask_blend_ps(kOdd, _mm512_set1_ps(w[0]), _mm512_set1_ps(w[1]));
    low_w[ky] = kLeftPadded ? _mm512_mask_blend_ps(kOdd, _mm512_set1_ps(w[1]), _mm512_set1_ps(w[2])) : _mm512_set1_ps(w[2]);
  }
  const __m512i low_index = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i high_index = _mm512_add_epi32(low_index, _mm512_set1_epi32(1));
  const __m512 zero = _mm512_setzero_ps();
  // Kernel row ky's terms from a grad_out row's pair, after acc.
  const auto add_row = [&](int ky, __m512 high, __m512 low, __m512 acc) {
    if (kLeftPadded) return _mm512_fmadd_ps(low_w[ky], low, _mm512_mask3_fmadd_ps(high_w[ky], high, acc, kOdd));
    return _mm512_mask3_fmadd_ps(low_w[ky], low, _mm512_fmadd_ps(high_w[ky], high, acc), 0x5555);
  };
  alignas(64) float stage[kStageFloats];
  const bool staged = stageable(g, kBandRows, g.in_row_stride, g.in_w);
  for (int64_t iy0 = 0; iy0 < g.in_h; iy0 += kBandRows) {
    const int64_t iy1 = min64(g.in_h, iy0 + kBandRows);
    float* band = staged ? stage : gi + iy0 * g.in_row_stride;
    for (int64_t x0 = 0; x0 < g.in_w; x0 += kLanes) {
      const int64_t c = x0 / 2 - (kLeftPadded ? 0 : 1);
      const __mmask16 load = lane_range(-c, g.out_w - c), store = lane_range(0, g.in_w - x0);
      const float* column = go + c;
      float* out = band + x0 - iy0 * g.in_row_stride;  // input row iy at out + iy * in_row_stride
      // grad_out row r's pair, zero where the row does not exist.
      const auto pair = [&](int64_t r, bool exists, __m512* high, __m512* low) {
        *high = *low = zero;
        if (!exists) return;
        const __m512 row = _mm512_maskz_loadu_ps(load, column + r * g.out_row_stride);
        *high = _mm512_permutexvar_ps(high_index, row);
        *low = _mm512_permutexvar_ps(low_index, row);
      };
      int64_t m = (iy0 + kTop) / 2;
      bool exists_prev = m >= 1 && m - 1 < g.out_h;
      __m512 high_prev, low_prev;
      pair(m - 1, exists_prev, &high_prev, &low_prev);
      for (; 2 * m - kTop < iy1; ++m) {
        const bool exists = m < g.out_h;
        __m512 high, low;
        pair(m, exists, &high, &low);
        if (2 * m - kTop >= iy0) {  // kernel rows 0 (grad_out row m) and 2 (row m - 1)
          const __m512 acc = exists ? add_row(0, high, low, zero) : zero;
          _mm512_mask_storeu_ps(out + (2 * m - kTop) * g.in_row_stride, store,
                                exists_prev ? add_row(2, high_prev, low_prev, acc) : acc);
        }
        if (2 * m + 1 - kTop < iy1)  // kernel row 1 (row m)
          _mm512_mask_storeu_ps(out + (2 * m + 1 - kTop) * g.in_row_stride, store,
                                exists ? add_row(1, high, low, zero) : zero);
        high_prev = high, low_prev = low, exists_prev = exists;
      }
    }
    if (staged) stream_rows(stage, gi + iy0 * g.in_row_stride, (iy1 - iy0) * g.in_w);
  }
}

}  // namespace

namespace rolled3 {

bool rolls(const PlaneGeometry& g) { return rolls_rows3(g); }
bool pairs(const PlaneGeometry& g) { return pairs_rows3(g); }
bool rolls_stride2(const PlaneGeometry& g) { return rolls_rows3_stride2(g); }
bool rolls_grad_input_stride2(const PlaneGeometry& g) { return rolls_grad_input_stride2_rows3(g); }

void forward(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  forward_plane_rows3(in, taps, bias, out, g);
}

void weight_grad(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes, const PlaneGeometry& g) {
  if (bias_lanes) return weight_grad_plane_rows3<true>(grad_out, in, tap_lanes, bias_lanes, g);
  weight_grad_plane_rows3<false>(grad_out, in, tap_lanes, bias_lanes, g);
}

void forward_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                  float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  forward_plane_rows3_pair(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
}

void weight_grad_pair(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                      float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                      const PlaneGeometry& g) {
  if (bias_lanes_a)
    return weight_grad_plane_rows3_pair<true>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b,
                                              bias_lanes_a, bias_lanes_b, g);
  weight_grad_plane_rows3_pair<false>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, nullptr, nullptr,
                                      g);
}

void forward_stride2(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  forward_plane_stride2_rows3(in, taps, bias, out, g);
}

void weight_grad_stride2(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                         const PlaneGeometry& g) {
  if (bias_lanes) return weight_grad_plane_stride2_rows3<true>(grad_out, in, tap_lanes, bias_lanes, g);
  weight_grad_plane_stride2_rows3<false>(grad_out, in, tap_lanes, bias_lanes, g);
}

void grad_input_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g) {
  if (g.pad_top)
    return g.pad_left ? grad_input_plane_stride2_rows3<true, 1>(grad_out, taps, grad_in, g)
                      : grad_input_plane_stride2_rows3<false, 1>(grad_out, taps, grad_in, g);
  return g.pad_left ? grad_input_plane_stride2_rows3<true, 0>(grad_out, taps, grad_in, g)
                    : grad_input_plane_stride2_rows3<false, 0>(grad_out, taps, grad_in, g);
}

}  // namespace rolled3

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
