// Depthwise convolution on AVX-512, NCHW planes: 5x5 windows (dilation 1) as rolled rows, at
// stride 1 (forward, hence the unit-stride input gradient, and weight gradient) and stride 2
// (forward, weight gradient, input gradient). See depthwise_conv2d_avx512.cpp for the design.
#include "ops/cpu/depthwise_avx512/common.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/depthwise_avx512/plane_kernels.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

// ---------------------------------------------------------------------------------------------
// 5x5 windows at unit stride and dilation (MobileNet v3's, EfficientNet's and MnasNet's): the
// forward, and with it the unit-stride input gradient, rolled as the 3x3 rows are. A chunk loads
// each input row once, its 16 columns and the four after (two masked loads), makes the five taps
// one at a time with valignd, and adds each to the up to five output rows the row feeds, carried
// in named registers; an output row is stored when its fifth kernel row is in. Each output row
// adds bias, then taps (ky, kx) in row-major order, as forward_plane_fixed<1, 5, 5, 4> does, so
// the sums are its bit for bit. That block kernel (25 weights, 4 accumulators, 5 taps: more than
// 32 registers) ran at ~49 cycles per output vector in L2 and ~116 from memory. Planes in L2,
// one thread, cycles a plane, block -> rolled: forward 56x56 10900 -> 4860, 28x28 2660 -> 1070,
// 14x14 1080 -> 480; weight gradient 13200 -> 5700, 4000 -> 1570, 1230 -> 510. From memory
// (N=32, 2 threads, reuse, ms): 32x128x56x56 forward 16.6 -> 8.0 and forward+backward 46.8 ->
// 24.3; 32x120x28x28 3.2 -> 2.2 and 10.7 -> 7.0; 32x240x14x14 2.8 -> 1.5 and 9.3 -> 5.1.

// A band's steps run k = 0 .. n + 3 over its n >= 4 output rows; step k reads input row k and
// feeds output rows k - ky for the kernel rows ky in [Lo, Hi].
template <class Walk>
inline __attribute__((always_inline)) void roll_rows5(Walk& walk, int64_t n) {
  walk.template step<0, 0>(0);
  walk.template step<0, 1>(1);
  walk.template step<0, 2>(2);
  walk.template step<0, 3>(3);
#pragma GCC unroll 2
  for (int64_t k = 4; k < n; ++k) walk.template step<0, 4>(k);
  walk.template step<1, 4>(n);
  walk.template step<2, 4>(n + 1);
  walk.template step<3, 4>(n + 2);
  walk.template step<4, 4>(n + 3);
}

// Tap column KX (weights w[5][5]) against the partial output rows s[ky] that exist (kernel rows
// Lo..Hi).
template <int Lo, int Hi, int KX>
inline __attribute__((always_inline)) void add_column5(const __m512* w, __m512 t, __m512* s) {
  if constexpr (Lo <= 0) s[0] = _mm512_fmadd_ps(w[KX], t, s[0]);
  if constexpr (Lo <= 1 && Hi >= 1) s[1] = _mm512_fmadd_ps(w[5 + KX], t, s[1]);
  if constexpr (Lo <= 2 && Hi >= 2) s[2] = _mm512_fmadd_ps(w[10 + KX], t, s[2]);
  if constexpr (Lo <= 3 && Hi >= 3) s[3] = _mm512_fmadd_ps(w[15 + KX], t, s[3]);
  if constexpr (Hi >= 4) s[4] = _mm512_fmadd_ps(w[20 + KX], t, s[4]);
}

// Chunks (1 or 2) adjacent column chunks at once: each output row's five multiply-adds a step
// are a chain (20 cycles of latency), and five rows in flight left the FMA ports half idle; two
// chunks put ten in flight and share a load (the second chunk's low columns are the first's high).
template <int Chunks>
struct ForwardRows5 {
  const float* column;  // input column `base` of row 0
  int64_t first_row, in_h, in_row_stride;
  __mmask16 inside[Chunks + 1];  // lanes inside the input: each chunk's 16 columns, then the four after
  float* out;
  int64_t out_row_stride;
  __mmask16 valid[Chunks];  // the chunks' output columns
  int64_t ahead;            // rows to the next band's, prefetched a step at a time (0: none)
  const __m512* w;          // [5][5]
  __m512 bias;
  __m512 partial[Chunks][4];  // output rows k - 1 .. k - 4 before step k

  template <int Lo, int Hi>
  inline __attribute__((always_inline)) void step(int64_t k) {
    const int64_t iy = first_row + k;
    const bool row_in = row_inside(iy, in_h);
    for (int c = 0; ahead && c < Chunks; ++c)
      _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride + c * kLanes), _MM_HINT_T0);
    const float* row = column + (row_in ? iy : 0) * in_row_stride;
    __m512i v[Chunks + 1];
    for (int c = 0; c <= Chunks; ++c)
      v[c] = _mm512_castps_si512(_mm512_maskz_loadu_ps(row_in ? inside[c] : 0, row + c * kLanes));
    __m512 s[Chunks][5];
    for (int c = 0; c < Chunks; ++c) {
      s[c][0] = bias;
      for (int r = 1; r < 5; ++r) s[c][r] = partial[c][r - 1];
    }
    for (int c = 0; c < Chunks; ++c) add_column5<Lo, Hi, 0>(w, _mm512_castsi512_ps(v[c]), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column5<Lo, Hi, 1>(w, _mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 1)), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column5<Lo, Hi, 2>(w, _mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 2)), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column5<Lo, Hi, 3>(w, _mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 3)), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column5<Lo, Hi, 4>(w, _mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 4)), s[c]);
    for (int c = 0; c < Chunks; ++c) {
      if constexpr (Hi == 4) _mm512_mask_storeu_ps(out + (k - 4) * out_row_stride + c * kLanes, valid[c], s[c][4]);
      for (int r = 1; r < 5; ++r) partial[c][r - 1] = s[c][r - 1];
    }
  }
};

inline bool rolls_rows5(const PlaneGeometry& g) {
  return g.rolled_rows && g.stride == 1 && g.kernel_h == 5 && g.kernel_w == 5 && g.dilation_h == 1 &&
         g.dilation_w == 1 && g.out_h >= 4;
}

template <int Chunks>
inline __attribute__((always_inline)) void forward_rows5_chunks(const float* in, const __m512* w, __m512 bias,
                                                                 float* rows, int64_t x0, int64_t oy0, int64_t n,
                                                                 int64_t ahead, const PlaneGeometry& g) {
  const int64_t base = x0 - g.pad_left;
  ForwardRows5<Chunks> walk;
  walk.column = in + base;
  walk.first_row = oy0 - g.pad_top;
  walk.in_h = g.in_h;
  walk.in_row_stride = g.in_row_stride;
  for (int c = 0; c <= Chunks; ++c) {
    const int64_t first = base + c * kLanes;
    walk.inside[c] = lane_range(-first, g.in_w - first);
  }
  walk.inside[Chunks] &= 0xF;
  walk.out = rows + x0;
  walk.out_row_stride = g.out_row_stride;
  for (int c = 0; c < Chunks; ++c) walk.valid[c] = lane_range(0, g.out_w - x0 - c * kLanes);
  walk.ahead = ahead;
  walk.w = w;
  walk.bias = bias;
  for (int c = 0; c < Chunks; ++c)
    for (int r = 0; r < 4; ++r) walk.partial[c][r] = _mm512_setzero_ps();
  roll_rows5(walk, n);
}

// Bands as the 3x3 walk's (kRows3BandRows rows for rows wider than two vectors or staged
// outputs), four extra input rows a band; a band is never left shorter than four rows (the walk's
// steps assume it): a short remainder joins the band before it.
void forward_plane_rows5(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  __m512 w[25];
  for (int t = 0; t < 25; ++t) w[t] = _mm512_set1_ps(taps[t]);
  const __m512 b = _mm512_set1_ps(bias);
  alignas(64) float stage[kStageFloats];
  constexpr int64_t kLongestBand = kRows3BandRows + 3;
  const bool staged = stageable(g, kLongestBand, g.out_row_stride, g.out_w);
  const bool wide = g.out_w > 2 * kLanes;
  const int64_t band_rows = staged || wide ? kRows3BandRows : g.out_h;
  for (int64_t oy0 = 0; oy0 < g.out_h;) {
    int64_t n = min64(band_rows, g.out_h - oy0);
    if (g.out_h - oy0 - n < 4) n = g.out_h - oy0;
    float* rows = staged ? stage : out + oy0 * g.out_row_stride;
    const int64_t ahead = wide ? n : 0;
    int64_t x0 = 0;
    for (; x0 + kLanes < g.out_w; x0 += 2 * kLanes) forward_rows5_chunks<2>(in, w, b, rows, x0, oy0, n, ahead, g);
    if (x0 < g.out_w) forward_rows5_chunks<1>(in, w, b, rows, x0, oy0, n, ahead, g);
    if (staged) stream_rows(stage, out + oy0 * g.out_row_stride, n * g.out_w);
    oy0 += n;
  }
}

// The 5x5 weight gradient over a walk: step k meets grad_out rows k - ky for ky in [Lo, Hi], each
// against the input row's five taps (zero past the chunk's outputs: a real pixel there times a
// zero grad_out lane would turn an inf into a NaN). The 25 sums and the five taps stay in
// registers, and each grad_out row is loaded again (from L1) for every input row it meets: held
// as well, five rows did not fit in the 32 registers and GCC spilled the sums (1.45x slower in
// L2). The sums are added chunk by chunk, not block by block as in
// weight_grad_plane_fixed<1, 5, 5, 2> (the same values to rounding).
// A 5x5 weight gradient's 25 partial sums, per lane, as named members (an array member, indexed
// by constants, was kept on the stack: 142 spill stores in the walk).
struct TapSums5 {
  __m512 s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18, s19, s20, s21, s22, s23, s24;
  template <int T>
  inline __attribute__((always_inline)) __m512& at() {
    if constexpr (T == 0) return s0;
    if constexpr (T == 1) return s1;
    if constexpr (T == 2) return s2;
    if constexpr (T == 3) return s3;
    if constexpr (T == 4) return s4;
    if constexpr (T == 5) return s5;
    if constexpr (T == 6) return s6;
    if constexpr (T == 7) return s7;
    if constexpr (T == 8) return s8;
    if constexpr (T == 9) return s9;
    if constexpr (T == 10) return s10;
    if constexpr (T == 11) return s11;
    if constexpr (T == 12) return s12;
    if constexpr (T == 13) return s13;
    if constexpr (T == 14) return s14;
    if constexpr (T == 15) return s15;
    if constexpr (T == 16) return s16;
    if constexpr (T == 17) return s17;
    if constexpr (T == 18) return s18;
    if constexpr (T == 19) return s19;
    if constexpr (T == 20) return s20;
    if constexpr (T == 21) return s21;
    if constexpr (T == 22) return s22;
    if constexpr (T == 23) return s23;
    if constexpr (T == 24) return s24;
  }
  void load(const float* tap_lanes) {
    s0 = _mm512_loadu_ps(tap_lanes + 0 * kLanes);
    s1 = _mm512_loadu_ps(tap_lanes + 1 * kLanes);
    s2 = _mm512_loadu_ps(tap_lanes + 2 * kLanes);
    s3 = _mm512_loadu_ps(tap_lanes + 3 * kLanes);
    s4 = _mm512_loadu_ps(tap_lanes + 4 * kLanes);
    s5 = _mm512_loadu_ps(tap_lanes + 5 * kLanes);
    s6 = _mm512_loadu_ps(tap_lanes + 6 * kLanes);
    s7 = _mm512_loadu_ps(tap_lanes + 7 * kLanes);
    s8 = _mm512_loadu_ps(tap_lanes + 8 * kLanes);
    s9 = _mm512_loadu_ps(tap_lanes + 9 * kLanes);
    s10 = _mm512_loadu_ps(tap_lanes + 10 * kLanes);
    s11 = _mm512_loadu_ps(tap_lanes + 11 * kLanes);
    s12 = _mm512_loadu_ps(tap_lanes + 12 * kLanes);
    s13 = _mm512_loadu_ps(tap_lanes + 13 * kLanes);
    s14 = _mm512_loadu_ps(tap_lanes + 14 * kLanes);
    s15 = _mm512_loadu_ps(tap_lanes + 15 * kLanes);
    s16 = _mm512_loadu_ps(tap_lanes + 16 * kLanes);
    s17 = _mm512_loadu_ps(tap_lanes + 17 * kLanes);
    s18 = _mm512_loadu_ps(tap_lanes + 18 * kLanes);
    s19 = _mm512_loadu_ps(tap_lanes + 19 * kLanes);
    s20 = _mm512_loadu_ps(tap_lanes + 20 * kLanes);
    s21 = _mm512_loadu_ps(tap_lanes + 21 * kLanes);
    s22 = _mm512_loadu_ps(tap_lanes + 22 * kLanes);
    s23 = _mm512_loadu_ps(tap_lanes + 23 * kLanes);
    s24 = _mm512_loadu_ps(tap_lanes + 24 * kLanes);
  }
  // Kernel row KY's five taps t[kx] against one grad_out row.
  template <int KY>
  inline __attribute__((always_inline)) void add(__m512 grad_row, const __m512* t) {
    at<5 * KY + 0>() = _mm512_fmadd_ps(grad_row, t[0], at<5 * KY + 0>());
    at<5 * KY + 1>() = _mm512_fmadd_ps(grad_row, t[1], at<5 * KY + 1>());
    at<5 * KY + 2>() = _mm512_fmadd_ps(grad_row, t[2], at<5 * KY + 2>());
    at<5 * KY + 3>() = _mm512_fmadd_ps(grad_row, t[3], at<5 * KY + 3>());
    at<5 * KY + 4>() = _mm512_fmadd_ps(grad_row, t[4], at<5 * KY + 4>());
  }
  // Two planes' sums (the paired walks): plane a's in lanes 0-7 of tap_lanes_a, plane b's in
  // lanes 8-15 of tap_lanes_b.
  template <int T = 0>
  inline __attribute__((always_inline)) void load_pair(const float* tap_lanes_a, const float* tap_lanes_b) {
    at<T>() = _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(0x00FF, tap_lanes_a + T * kLanes), 0xFF00,
                                   tap_lanes_b + T * kLanes);
    if constexpr (T < 24) load_pair<T + 1>(tap_lanes_a, tap_lanes_b);
  }
  template <int T = 0>
  inline __attribute__((always_inline)) void save_pair(float* tap_lanes_a, float* tap_lanes_b) {
    _mm512_mask_storeu_ps(tap_lanes_a + T * kLanes, 0x00FF, at<T>());
    _mm512_mask_storeu_ps(tap_lanes_b + T * kLanes, 0xFF00, at<T>());
    if constexpr (T < 24) save_pair<T + 1>(tap_lanes_a, tap_lanes_b);
  }
  void save(float* tap_lanes) const {
    _mm512_storeu_ps(tap_lanes + 0 * kLanes, s0);
    _mm512_storeu_ps(tap_lanes + 1 * kLanes, s1);
    _mm512_storeu_ps(tap_lanes + 2 * kLanes, s2);
    _mm512_storeu_ps(tap_lanes + 3 * kLanes, s3);
    _mm512_storeu_ps(tap_lanes + 4 * kLanes, s4);
    _mm512_storeu_ps(tap_lanes + 5 * kLanes, s5);
    _mm512_storeu_ps(tap_lanes + 6 * kLanes, s6);
    _mm512_storeu_ps(tap_lanes + 7 * kLanes, s7);
    _mm512_storeu_ps(tap_lanes + 8 * kLanes, s8);
    _mm512_storeu_ps(tap_lanes + 9 * kLanes, s9);
    _mm512_storeu_ps(tap_lanes + 10 * kLanes, s10);
    _mm512_storeu_ps(tap_lanes + 11 * kLanes, s11);
    _mm512_storeu_ps(tap_lanes + 12 * kLanes, s12);
    _mm512_storeu_ps(tap_lanes + 13 * kLanes, s13);
    _mm512_storeu_ps(tap_lanes + 14 * kLanes, s14);
    _mm512_storeu_ps(tap_lanes + 15 * kLanes, s15);
    _mm512_storeu_ps(tap_lanes + 16 * kLanes, s16);
    _mm512_storeu_ps(tap_lanes + 17 * kLanes, s17);
    _mm512_storeu_ps(tap_lanes + 18 * kLanes, s18);
    _mm512_storeu_ps(tap_lanes + 19 * kLanes, s19);
    _mm512_storeu_ps(tap_lanes + 20 * kLanes, s20);
    _mm512_storeu_ps(tap_lanes + 21 * kLanes, s21);
    _mm512_storeu_ps(tap_lanes + 22 * kLanes, s22);
    _mm512_storeu_ps(tap_lanes + 23 * kLanes, s23);
    _mm512_storeu_ps(tap_lanes + 24 * kLanes, s24);
  }
};

template <bool WithBias>
struct WeightGradRows5 {
  const float* column;  // input column `base` of row 0
  int64_t first_row, in_h, in_row_stride;
  __mmask16 low, high;
  const float* grad;  // grad_out rows of the band, the chunk's first column
  int64_t out_row_stride;
  __mmask16 valid;
  int64_t ahead;
  TapSums5 sums;
  __m512 bias;

  template <int Lo, int Hi, int KY>
  inline __attribute__((always_inline)) void add_row(int64_t k, const __m512* t) {
    if constexpr (Lo <= KY && KY <= Hi) {
      const __m512 grad_row = _mm512_maskz_loadu_ps(valid, grad + (k - KY) * out_row_stride);
      if constexpr (KY == 0) {
        if (ahead) _mm_prefetch(reinterpret_cast<const char*>(grad + (k + ahead) * out_row_stride), _MM_HINT_T0);
        if (WithBias) bias = _mm512_add_ps(bias, grad_row);
      }
      sums.add<KY>(grad_row, t);
    }
  }

  template <int Lo, int Hi>
  inline __attribute__((always_inline)) void step(int64_t k) {
    const int64_t iy = first_row + k;
    const bool inside = row_inside(iy, in_h);
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride), _MM_HINT_T0);
    const float* row = column + (inside ? iy : 0) * in_row_stride;
    const __m512i lo = _mm512_castps_si512(_mm512_maskz_loadu_ps(inside ? low : 0, row));
    const __m512i hi = _mm512_castps_si512(_mm512_maskz_loadu_ps(inside ? high : 0, row + kLanes));
    const __m512 t[5] = {_mm512_castsi512_ps(_mm512_maskz_mov_epi32(valid, lo)),
                         _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(valid, hi, lo, 1)),
                         _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(valid, hi, lo, 2)),
                         _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(valid, hi, lo, 3)),
                         _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(valid, hi, lo, 4))};
    add_row<Lo, Hi, 0>(k, t);
    add_row<Lo, Hi, 1>(k, t);
    add_row<Lo, Hi, 2>(k, t);
    add_row<Lo, Hi, 3>(k, t);
    add_row<Lo, Hi, 4>(k, t);
  }
};

template <bool WithBias>
void weight_grad_plane_rows5(const float* go, const float* in, float* tap_lanes, float* bias_lanes,
                             const PlaneGeometry& g) {
  WeightGradRows5<WithBias> walk{};
  walk.sums.load(tap_lanes);
  walk.bias = WithBias ? _mm512_loadu_ps(bias_lanes) : _mm512_setzero_ps();
  const bool wide = g.out_w > 2 * kLanes;
  const int64_t band_rows = wide ? kRows3BandRows : g.out_h;
  for (int64_t oy0 = 0; oy0 < g.out_h;) {
    int64_t n = min64(band_rows, g.out_h - oy0);
    if (g.out_h - oy0 - n < 4) n = g.out_h - oy0;
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = x0 - g.pad_left;
      walk.column = in + base;
      walk.first_row = oy0 - g.pad_top;
      walk.in_h = g.in_h;
      walk.in_row_stride = g.in_row_stride;
      walk.low = lane_range(-base, g.in_w - base);
      walk.high = static_cast<__mmask16>(lane_range(-(base + kLanes), g.in_w - (base + kLanes)) & 0xF);
      walk.grad = go + oy0 * g.out_row_stride + x0;
      walk.out_row_stride = g.out_row_stride;
      walk.valid = lane_range(0, g.out_w - x0);
      walk.ahead = wide ? n : 0;
      roll_rows5(walk, n);
    }
    oy0 += n;
  }
  walk.sums.save(tap_lanes);
  if (WithBias) _mm512_storeu_ps(bias_lanes, walk.bias);
}

// Two planes of at most 8 columns (7x7 maps; MobileNet v3's and EfficientNet's last 5x5 layers)
// at unit stride, forward (and so the unit-stride input gradient): plane a in lanes 0-7 and plane
// b in lanes 8-15, each row loaded from its column 0. Tap kx of lane l is column l + kx - pad_left
// of the lane's own plane: one permute of the loaded rows, the lanes whose column leaves the
// plane's 8 lanes zeroed (columns past the row load as zero). Each lane's sums are
// forward_plane_rows5's, bit for bit. Against the flat planes (100 masked loads and multiply-adds
// a plane), in process (2 threads, 21 interleaved rounds): 960x7x7 forward 1.09-1.41x at N=32,
// 1.17-1.22x at N=8 and 1.12-1.21x at N=1, the input gradient alone 1.07-1.25x; the backward
// with the weight gradient 0.94-1.04x (noise). The weight gradient walked the same way was no
// faster than the flat planes' (0.95-1.01x: each pair loads and stores its 25 sums), and stays
// there.
struct PairedColumns5 {
  const float* column_a;  // column 0 of row 0
  const float* column_b;  // plane b's column 0 of row 0, 8 lanes left
  int64_t first_row, in_h, in_row_stride;
  __mmask16 inside_a, inside_b;  // input columns, in each half
  __m512i index[5];              // tap kx's source lane, in the lane's own half
  __mmask16 keep[5];             // lanes whose tap kx lies in their own plane

  PairedColumns5(const float* in_a, const float* in_b, const PlaneGeometry& g)
      : column_a(in_a),
        column_b(in_b - 8),
        first_row(-g.pad_top),
        in_h(g.in_h),
        in_row_stride(g.in_row_stride),
        inside_a(lane_range(0, g.in_w)),
        inside_b(static_cast<__mmask16>(lane_range(0, g.in_w) << 8)) {
    // In registers: a scalar loop over the lanes here cost more than the walk of a 7x7 pair.
    const __m512i lane = lane_indices();
    const __m512i half = _mm512_and_si512(lane, _mm512_set1_epi32(8));
    const __m512i local = _mm512_and_si512(lane, _mm512_set1_epi32(7));
    for (int kx = 0; kx < 5; ++kx) {
      const __m512i column = _mm512_add_epi32(local, _mm512_set1_epi32(static_cast<int32_t>(kx - g.pad_left)));
      // 0 <= column < 8, as one unsigned compare
      const __mmask16 own = _mm512_cmplt_epu32_mask(column, _mm512_set1_epi32(8));
      keep[kx] = own;
      index[kx] = _mm512_mask_add_epi32(half, own, half, column);
    }
  }

  // Input row k of the walk, both planes.
  inline __attribute__((always_inline)) __m512 row(int64_t k) const {
    const int64_t iy = first_row + k;
    const bool inside = row_inside(iy, in_h);
    const int64_t offset = (inside ? iy : 0) * in_row_stride;
    return _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(inside ? inside_a : 0, column_a + offset), inside ? inside_b : 0,
                                column_b + offset);
  }
  template <int KX>
  inline __attribute__((always_inline)) __m512 tap(__m512 both) const {
    return _mm512_maskz_permutexvar_ps(keep[KX], index[KX], both);
  }
};

struct PairedForwardRows5 {
  PairedColumns5 cols;
  float* out_a;
  float* out_b;  // 8 lanes left
  int64_t out_row_stride;
  __mmask16 store_a, store_b;
  const __m512* w;  // [5][5], plane a's taps in lanes 0-7 and b's in 8-15
  __m512 bias;
  __m512 partial[4];  // output rows k - 1 .. k - 4 before step k

  template <int Lo, int Hi>
  inline __attribute__((always_inline)) void step(int64_t k) {
    const __m512 both = cols.row(k);
    __m512 s[5];
    s[0] = bias;
    for (int r = 1; r < 5; ++r) s[r] = partial[r - 1];
    add_column5<Lo, Hi, 0>(w, cols.tap<0>(both), s);
    add_column5<Lo, Hi, 1>(w, cols.tap<1>(both), s);
    add_column5<Lo, Hi, 2>(w, cols.tap<2>(both), s);
    add_column5<Lo, Hi, 3>(w, cols.tap<3>(both), s);
    add_column5<Lo, Hi, 4>(w, cols.tap<4>(both), s);
    if constexpr (Hi == 4) {
      _mm512_mask_storeu_ps(out_a + (k - 4) * out_row_stride, store_a, s[4]);
      _mm512_mask_storeu_ps(out_b + (k - 4) * out_row_stride, store_b, s[4]);
    }
    for (int r = 1; r < 5; ++r) partial[r - 1] = s[r - 1];
  }
};

inline bool pairs_rows5(const PlaneGeometry& g) {
  return rolls_rows5(g) && g.pad_left >= 0 && g.pad_left <= 4 && g.in_w <= 8 && g.out_w <= 8;
}

// Streamed outputs are not staged here: a pair's planes are small, and stores are plain.
void forward_plane_rows5_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b,
                              float bias_a, float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  __m512 w[25];
  for (int t = 0; t < 25; ++t) w[t] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(taps_a[t]), _mm512_set1_ps(taps_b[t]));
  const __mmask16 outputs = lane_range(0, g.out_w);
  PairedForwardRows5 walk{PairedColumns5(in_a, in_b, g),
                          out_a,
                          out_b - 8,
                          g.out_row_stride,
                          outputs,
                          static_cast<__mmask16>(outputs << 8),
                          w,
                          _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(bias_a), _mm512_set1_ps(bias_b)),
                          {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}};
  roll_rows5(walk, g.out_h);
}

// ---------------------------------------------------------------------------------------------
// 5x5 windows at stride 2 (dilation 1; MobileNet v3's and EfficientNet's downsampling layers),
// rolled as well. A chunk's 16 outputs read input columns base .. base + 35 of a row: three
// masked loads, two-source permutes take the even and odd columns (taps 0 and 1), valignd against
// the even and odd columns of the last four (taps 2, 4 and 3). Input row 2m feeds output rows m,
// m - 1 and m - 2 (kernel rows 0, 2 and 4; row m - 2 then completes), row 2m + 1 rows m and
// m - 1 (kernel rows 1 and 3), so two output rows are carried. Each output row adds bias, then
// taps (ky, kx) in row-major order, as forward_plane_fixed<2, 5, 5, 2> does: the same sums bit
// for bit. That block kernel (7 input rows of 2 output rows, each tap a permute) ran at ~95 cycles
// per output vector in L2. Planes in L2, one thread, cycles a plane, block -> rolled: forward
// 14x14 940 -> 360, 28x28 1860 -> 680, 56x56 6670 -> 2310; weight gradient 670 -> 370, 1160 ->
// 650, 4240 -> 2120; input gradient (below) 440 -> 230, 1440 -> 730, 4960 -> 2580. From memory
// (N=32, 2 threads, reuse, ms): 32x72x56x56 forward 4.2 -> 2.2, forward+backward 12.2 -> 7.7;
// 32x672x14x14 4.5 -> 2.3 and 12.6 -> 7.4 (MobileNet v3's stride-2 5x5 layers).

struct Stride2Columns5 {
  __mmask16 low, high, last;  // columns inside the input: base + 0..15, + 16..31, + 32..35
  Stride2Columns5(int64_t base, int64_t in_w)
      : low(lane_range(-base, in_w - base)),
        high(lane_range(-(base + kLanes), in_w - (base + kLanes))),
        last(static_cast<__mmask16>(lane_range(-(base + 2 * kLanes), in_w - (base + 2 * kLanes)) & 0xF)) {}
  // taps[kx][l] = column base + 2l + kx, zero outside the input and outside `keep`.
  inline __attribute__((always_inline)) void load(const float* row, bool inside, __mmask16 keep,
                                                  __m512* taps) const {
    const __m512i even = even_lanes();
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512 a = _mm512_maskz_loadu_ps(inside ? low : 0, row);
    const __m512 b = _mm512_maskz_loadu_ps(inside ? high : 0, row + kLanes);
    const __m512 c = _mm512_maskz_loadu_ps(inside ? last : 0, row + 2 * kLanes);
    const __m512i even_bits = _mm512_castps_si512(_mm512_permutex2var_ps(a, even, b));
    const __m512i odd_bits = _mm512_castps_si512(_mm512_permutex2var_ps(a, odd, b));
    const __m512i even_tail = _mm512_castps_si512(_mm512_permutexvar_ps(even, c));  // lanes 0, 1: base + 32, 34
    const __m512i odd_tail = _mm512_castps_si512(_mm512_permutexvar_ps(odd, c));    // lane 0: base + 33
    taps[0] = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(keep, even_bits));
    taps[1] = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(keep, odd_bits));
    taps[2] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(keep, even_tail, even_bits, 1));
    taps[3] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(keep, odd_tail, odd_bits, 1));
    taps[4] = _mm512_castsi512_ps(_mm512_maskz_alignr_epi32(keep, even_tail, even_bits, 2));
  }
  // The taps of input row iy (zero outside the input) from `column` (column `base` of row 0),
  // prefetching the row `ahead` rows further (both lines a chunk reads whole).
  inline __attribute__((always_inline)) void row_taps(const float* column, int64_t iy, int64_t in_h,
                                                      int64_t in_row_stride, int64_t ahead, __mmask16 keep,
                                                      __m512* taps) const {
    const bool inside = row_inside(iy, in_h);
    const float* next = column + (iy + ahead) * in_row_stride;
    _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(next + kLanes), _MM_HINT_T0);
    load(column + (inside ? iy : 0) * in_row_stride, inside, keep, taps);
  }
};

// The 2n + 3 input rows of n >= 1 output rows, k = 0 .. 2n + 2. Step<Even, Start, Middle, Last>
// reads input row k; for an even row 2m, Start: output row m exists (kernel row 0), Middle: row
// m - 1 (kernel row 2), Last: row m - 2 (kernel row 4); for an odd row 2m + 1, Start: row m
// (kernel row 1), Middle: row m - 1 (kernel row 3).
template <class Walk>
inline __attribute__((always_inline)) void roll_rows5_stride2(Walk& walk, int64_t n) {
  walk.template step<true, true, false, false>(0);
  walk.template step<false, true, false, false>(1);
  if (n == 1) {
    walk.template step<true, false, true, false>(2);
    walk.template step<false, false, true, false>(3);
    walk.template step<true, false, false, true>(4);
    return;
  }
  walk.template step<true, true, true, false>(2);
  walk.template step<false, true, true, false>(3);
  for (int64_t m = 2; m < n; ++m) {
    walk.template step<true, true, true, true>(2 * m);
    walk.template step<false, true, true, false>(2 * m + 1);
  }
  walk.template step<true, false, true, true>(2 * n);
  walk.template step<false, false, true, false>(2 * n + 1);
  walk.template step<true, false, false, true>(2 * n + 2);
}

// Five taps against kernel row KY, added to sum in kx order.
template <int KY>
inline __attribute__((always_inline)) __m512 kernel_row_sum5(const __m512* w, const __m512* t, __m512 sum) {
  sum = _mm512_fmadd_ps(w[5 * KY + 0], t[0], sum);
  sum = _mm512_fmadd_ps(w[5 * KY + 1], t[1], sum);
  sum = _mm512_fmadd_ps(w[5 * KY + 2], t[2], sum);
  sum = _mm512_fmadd_ps(w[5 * KY + 3], t[3], sum);
  return _mm512_fmadd_ps(w[5 * KY + 4], t[4], sum);
}

struct ForwardStride2Rows5 {
  const float* column;  // input column `base` of row 0
  int64_t first_row, in_h, in_row_stride, ahead;  // ahead: rows to the next band's row k
  Stride2Columns5 cols;
  const __m512* w;
  __m512 bias;
  float* out;  // output row 0 of the band, the chunk's first column
  int64_t out_row_stride;
  __mmask16 store;
  __m512 current, previous;  // output rows m and m - 1 (m = k / 2), partial

  template <bool Even, bool Start, bool Middle, bool Last>
  inline __attribute__((always_inline)) void step(int64_t k) {
    __m512 t[5];
    cols.row_taps(column, first_row + k, in_h, in_row_stride, ahead, 0xFFFF, t);
    if constexpr (Even) {
      if constexpr (Last) _mm512_mask_storeu_ps(out + (k / 2 - 2) * out_row_stride, store, kernel_row_sum5<4>(w, t, previous));
      if constexpr (Middle) previous = kernel_row_sum5<2>(w, t, current);
      if constexpr (Start) current = kernel_row_sum5<0>(w, t, bias);
    } else {
      if constexpr (Middle) previous = kernel_row_sum5<3>(w, t, previous);
      if constexpr (Start) current = kernel_row_sum5<1>(w, t, current);
    }
  }
};

inline bool rolls_rows5_stride2(const PlaneGeometry& g) {
  return g.rolled_rows && g.stride == 2 && g.kernel_h == 5 && g.kernel_w == 5 && g.dilation_h == 1 &&
         g.dilation_w == 1;
}

// Bands of kStride2BandRows output rows (2n + 3 input rows, the last three read again by the
// next band), the next band's rows prefetched a step at a time.
void forward_plane_stride2_rows5(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  __m512 w[25];
  for (int t = 0; t < 25; ++t) w[t] = _mm512_set1_ps(taps[t]);
  alignas(64) float stage[kStageFloats];
  const bool staged = stageable(g, kStride2BandRows, g.out_row_stride, g.out_w);
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += kStride2BandRows) {
    const int64_t n = min64(kStride2BandRows, g.out_h - oy0);
    float* rows = staged ? stage : out + oy0 * g.out_row_stride;
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = 2 * x0 - g.pad_left;
      ForwardStride2Rows5 walk{in + base, 2 * oy0 - g.pad_top, g.in_h, g.in_row_stride, 2 * kStride2BandRows,
                               Stride2Columns5(base, g.in_w), w, _mm512_set1_ps(bias), rows + x0, g.out_row_stride,
                               lane_range(0, g.out_w - x0), _mm512_setzero_ps(), _mm512_setzero_ps()};
      roll_rows5_stride2(walk, n);
    }
    if (staged) stream_rows(stage, out + oy0 * g.out_row_stride, n * g.out_w);
  }
}

// The weight gradient the same way: an even input row 2m meets grad_out rows m, m - 1 and m - 2
// (kernel rows 0, 2, 4), an odd one rows m and m - 1 (kernel rows 1, 3); the 25 sums and the five
// taps in registers, each grad_out row loaded again for every input row it meets (see
// WeightGradRows5). Rows gives walk step k's taps, zero past the outputs, and grad_out row r of
// the band: one plane's chunk (Stride2PlaneRows5) or two planes of at most 8 outputs a row
// (PairedStride2Rows5).
template <bool WithBias, class Rows>
struct WeightGradStride2Rows5 {
  Rows rows;
  TapSums5 sums;
  __m512 bias;

  template <int KY>
  inline __attribute__((always_inline)) void add_row(int64_t r, const __m512* t) {
    const __m512 grad_row = rows.template grad_row<KY == 0>(r);
    if constexpr (KY == 0) {
      if (WithBias) bias = _mm512_add_ps(bias, grad_row);
    }
    sums.add<KY>(grad_row, t);
  }

  template <bool Even, bool Start, bool Middle, bool Last>
  inline __attribute__((always_inline)) void step(int64_t k) {
    __m512 t[5];
    rows.taps(k, t);
    const int64_t m = k / 2;
    if constexpr (Even) {
      if constexpr (Start) add_row<0>(m, t);
      if constexpr (Middle) add_row<2>(m - 1, t);
      if constexpr (Last) add_row<4>(m - 2, t);
    } else {
      if constexpr (Start) add_row<1>(m, t);
      if constexpr (Middle) add_row<3>(m - 1, t);
    }
  }
};

struct Stride2PlaneRows5 {
  const float* column;  // input column `base` of row 0
  int64_t first_row, in_h, in_row_stride, ahead;
  Stride2Columns5 cols;
  const float* grad;  // grad_out row 0 of the band, the chunk's first column
  int64_t out_row_stride;
  __mmask16 valid;

  inline __attribute__((always_inline)) void taps(int64_t k, __m512* t) const {
    cols.row_taps(column, first_row + k, in_h, in_row_stride, ahead, valid, t);
  }
  // Prefetch: the row ahead, once per grad_out row (with kernel row 0).
  template <bool Prefetch>
  inline __attribute__((always_inline)) __m512 grad_row(int64_t r) const {
    if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(grad + (r + ahead / 2) * out_row_stride), _MM_HINT_T0);
    return _mm512_maskz_loadu_ps(valid, grad + r * out_row_stride);
  }
};

template <bool WithBias>
void weight_grad_plane_stride2_rows5(const float* go, const float* in, float* tap_lanes, float* bias_lanes,
                                     const PlaneGeometry& g) {
  WeightGradStride2Rows5<WithBias, Stride2PlaneRows5> walk{
      {in, 0, g.in_h, g.in_row_stride, 2 * kStride2BandRows, Stride2Columns5(0, g.in_w), go, g.out_row_stride, 0}};
  walk.sums.load(tap_lanes);
  walk.bias = WithBias ? _mm512_loadu_ps(bias_lanes) : _mm512_setzero_ps();
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += kStride2BandRows) {
    const int64_t n = min64(kStride2BandRows, g.out_h - oy0);
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = 2 * x0 - g.pad_left;
      walk.rows.column = in + base;
      walk.rows.first_row = 2 * oy0 - g.pad_top;
      walk.rows.cols = Stride2Columns5(base, g.in_w);
      walk.rows.grad = go + oy0 * g.out_row_stride + x0;
      walk.rows.valid = lane_range(0, g.out_w - x0);
      roll_rows5_stride2(walk, n);
    }
  }
  walk.sums.save(tap_lanes);
  if (WithBias) _mm512_storeu_ps(bias_lanes, walk.bias);
}

// Two planes whose output rows fill at most half a vector (14x14 -> 7x7: MobileNet v3's and
// EfficientNet's 672-channel layer), as the paired forward (PairedColumns): plane a in lanes 0-7,
// plane b in lanes 8-15, each lane's sums those of the one-plane walk above, bit for bit (plane
// b's land in lanes 8-15 of its tap_lanes). In process (2 threads, 21 interleaved rounds),
// 672x14x14: weight gradient 1.25-1.27x at N=8 and 1.16x at N=1, 0.99-1.06x at N=32 (from
// memory); forward+backward 1.10-1.13x, 1.05x and 1.01-1.05x.
struct PairedStride2Rows5 {
  const float* in_a;
  const float* in_b;
  const PlaneGeometry* g;
  int64_t first_row;
  PairedColumns<5> cols;
  const float* grad_a;  // grad_out row 0 of the band
  const float* grad_b;  // the same, 8 lanes left
  __mmask16 half;       // the output columns, in lanes 0-7

  inline __attribute__((always_inline)) void taps(int64_t k, __m512* t) const {
    __m512 a, b;
    cols.load_row(in_a, in_b, first_row + k, *g, &a, &b);
    for (int kx = 0; kx < 5; ++kx) t[kx] = cols.tap(kx, a, b);
  }
  template <bool Prefetch>
  inline __attribute__((always_inline)) __m512 grad_row(int64_t r) const {
    const int64_t offset = r * g->out_row_stride;
    return _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(half, grad_a + offset), static_cast<__mmask16>(half << 8),
                                grad_b + offset);
  }
};

template <bool WithBias>
void weight_grad_plane_stride2_rows5_pair(const float* go_a, const float* go_b, const float* in_a, const float* in_b,
                                          float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a,
                                          float* bias_lanes_b, const PlaneGeometry& g) {
  const PairedColumns<5> cols(g);
  WeightGradStride2Rows5<WithBias, PairedStride2Rows5> walk{{in_a, in_b, &g, 0, cols, go_a, go_b - 8, cols.half}};
  walk.sums.load_pair(tap_lanes_a, tap_lanes_b);
  walk.bias = WithBias ? _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(0x00FF, bias_lanes_a), 0xFF00, bias_lanes_b)
                       : _mm512_setzero_ps();
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += kStride2BandRows) {  // the one-plane walk's bands
    walk.rows.first_row = 2 * oy0 - g.pad_top;
    walk.rows.grad_a = go_a + oy0 * g.out_row_stride;
    walk.rows.grad_b = go_b - 8 + oy0 * g.out_row_stride;
    roll_rows5_stride2(walk, min64(kStride2BandRows, g.out_h - oy0));
  }
  walk.sums.save_pair(tap_lanes_a, tap_lanes_b);
  if (WithBias) {
    _mm512_mask_storeu_ps(bias_lanes_a, 0x00FF, walk.bias);
    _mm512_mask_storeu_ps(bias_lanes_b, 0xFF00, walk.bias);
  }
}

// The same for 5x5 windows (any padding), rolled. With padding T on top, input row 2m - T takes
// kernel rows 0, 2 and 4 of grad_out rows m, m - 1 and m - 2, row 2m + 1 - T kernel rows 1 and 3
// of rows m and m - 1; the columns likewise, so lane l of 16 input columns from x0 reads grad_out
// columns x0/2 + l/2 + h - d, d = 0, 1, 2 (h = ceil(pad_left / 2)): three permutes of one load,
// each with its lanes' weights (with pad_left even, even lanes take taps 0, 2, 4 and odd lanes
// taps 1, 3; odd pad_left the other way round). A walk down grad_out makes each row's three once
// and keeps the last two rows', completing two input rows a step; each lane adds its taps in the
// block kernel's order, so the sums are bit for bit grad_input_plane_stride2_fixed<5, 5>'s.
struct GradInputStride2Rows5 {
  __m512 near, mid, far;  // grad_out columns x0/2 + l/2 + h, h - 1, h - 2
};

// `even` in the even lanes, `odd` in the odd ones.
inline __m512 even_odd_lanes(float even, float odd) {
  return _mm512_mask_blend_ps(0xAAAA, _mm512_set1_ps(even), _mm512_set1_ps(odd));
}

void grad_input_plane_stride2_rows5(const float* go, const float* taps, float* gi, const PlaneGeometry& g) {
  constexpr int64_t kBandRows = 8;  // as the block kernel's: a streamed band is staged whole
  constexpr __mmask16 kEven = 0x5555, kOdd = 0xAAAA;
  const bool odd_left = g.pad_left % 2 != 0;
  const int64_t h = (g.pad_left + 1) / 2;
  // Per kernel row: the weights of the near, middle and far copies, lane by lane, and the lanes
  // the far (even pad_left) or near (odd) copy feeds.
  __m512 near_w[5], mid_w[5], far_w[5];
  for (int ky = 0; ky < 5; ++ky) {
    const float* w = taps + 5 * ky;
    near_w[ky] = odd_left ? even_odd_lanes(0.f, w[0]) : even_odd_lanes(w[0], w[1]);
    mid_w[ky] = odd_left ? even_odd_lanes(w[1], w[2]) : even_odd_lanes(w[2], w[3]);
    far_w[ky] = odd_left ? even_odd_lanes(w[3], w[4]) : even_odd_lanes(w[4], 0.f);
  }
  const __mmask16 near_lanes = odd_left ? kOdd : 0xFFFF, far_lanes = odd_left ? 0xFFFF : kEven;
  const __m512i far_index = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i mid_index = _mm512_add_epi32(far_index, _mm512_set1_epi32(1));
  const __m512i near_index = _mm512_add_epi32(far_index, _mm512_set1_epi32(2));
  const __m512 zero = _mm512_setzero_ps();
  // Kernel row ky's terms from a grad_out row's three copies, after acc: near, middle, far (the
  // block kernel's tap order in every lane).
  const auto add_row = [&](int ky, const GradInputStride2Rows5& r, __m512 acc) {
    acc = _mm512_mask3_fmadd_ps(near_w[ky], r.near, acc, near_lanes);
    acc = _mm512_fmadd_ps(mid_w[ky], r.mid, acc);
    return _mm512_mask3_fmadd_ps(far_w[ky], r.far, acc, far_lanes);
  };
  alignas(64) float stage[kStageFloats];
  const bool staged = stageable(g, kBandRows, g.in_row_stride, g.in_w);
  const int64_t T = g.pad_top;
  for (int64_t iy0 = 0; iy0 < g.in_h; iy0 += kBandRows) {
    const int64_t iy1 = min64(g.in_h, iy0 + kBandRows);
    float* band = staged ? stage : gi + iy0 * g.in_row_stride;
    for (int64_t x0 = 0; x0 < g.in_w; x0 += kLanes) {
      const int64_t c = x0 / 2 + h - 2;  // the lowest grad_out column any lane reads
      const __mmask16 load = lane_range(-c, g.out_w - c), store = lane_range(0, g.in_w - x0);
      const float* column = go + c;
      float* out = band + x0 - iy0 * g.in_row_stride;  // input row iy at out + iy * in_row_stride
      const auto copies = [&](int64_t r, bool exists) {
        GradInputStride2Rows5 q{zero, zero, zero};
        if (!exists) return q;
        const __m512 row = _mm512_maskz_loadu_ps(load, column + r * g.out_row_stride);
        q.near = _mm512_permutexvar_ps(near_index, row);
        q.mid = _mm512_permutexvar_ps(mid_index, row);
        q.far = _mm512_permutexvar_ps(far_index, row);
        return q;
      };
      const auto exists = [&](int64_t r) { return r >= 0 && r < g.out_h; };
      int64_t m = floor_half(iy0 + T);
      bool exists1 = exists(m - 1), exists2 = exists(m - 2);
      GradInputStride2Rows5 prev1 = copies(m - 1, exists1), prev2 = copies(m - 2, exists2);
      for (; 2 * m - T < iy1; ++m) {
        const bool exists0 = exists(m);
        const GradInputStride2Rows5 cur = copies(m, exists0);
        if (2 * m - T >= iy0) {  // kernel rows 0, 2, 4 of grad_out rows m, m - 1, m - 2
          __m512 acc = exists0 ? add_row(0, cur, zero) : zero;
          acc = exists1 ? add_row(2, prev1, acc) : acc;
          acc = exists2 ? add_row(4, prev2, acc) : acc;
          _mm512_mask_storeu_ps(out + (2 * m - T) * g.in_row_stride, store, acc);
        }
        if (2 * m + 1 - T < iy1 && 2 * m + 1 - T >= iy0) {  // kernel rows 1, 3 of rows m, m - 1
          __m512 acc = exists0 ? add_row(1, cur, zero) : zero;
          acc = exists1 ? add_row(3, prev1, acc) : acc;
          _mm512_mask_storeu_ps(out + (2 * m + 1 - T) * g.in_row_stride, store, acc);
        }
        prev2 = prev1, exists2 = exists1;
        prev1 = cur, exists1 = exists0;
      }
    }
    if (staged) stream_rows(stage, gi + iy0 * g.in_row_stride, (iy1 - iy0) * g.in_w);
  }
}

}  // namespace

namespace rolled5 {

bool rolls(const PlaneGeometry& g) { return rolls_rows5(g); }
bool rolls_stride2(const PlaneGeometry& g) { return rolls_rows5_stride2(g); }
bool pairs(const PlaneGeometry& g) { return pairs_rows5(g); }

void forward(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  forward_plane_rows5(in, taps, bias, out, g);
}

void weight_grad(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes, const PlaneGeometry& g) {
  if (bias_lanes) return weight_grad_plane_rows5<true>(grad_out, in, tap_lanes, bias_lanes, g);
  weight_grad_plane_rows5<false>(grad_out, in, tap_lanes, bias_lanes, g);
}

void forward_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                  float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  forward_plane_rows5_pair(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
}

void forward_stride2(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  forward_plane_stride2_rows5(in, taps, bias, out, g);
}

void weight_grad_stride2(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                         const PlaneGeometry& g) {
  if (bias_lanes) return weight_grad_plane_stride2_rows5<true>(grad_out, in, tap_lanes, bias_lanes, g);
  weight_grad_plane_stride2_rows5<false>(grad_out, in, tap_lanes, bias_lanes, g);
}

void weight_grad_pair_stride2(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                              float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                              const PlaneGeometry& g) {
  if (bias_lanes_a)
    return weight_grad_plane_stride2_rows5_pair<true>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b,
                                                      bias_lanes_a, bias_lanes_b, g);
  weight_grad_plane_stride2_rows5_pair<false>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, nullptr,
                                              nullptr, g);
}

void grad_input_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g) {
  grad_input_plane_stride2_rows5(grad_out, taps, grad_in, g);
}

}  // namespace rolled5

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
