// Depthwise 2-D convolution in fp32 on AVX-512: reference op F.conv2d(groups=C), as in MobileNets
// (Howard et al., 2017). NCHW planes (3x3 and 5x5, stride 1 or 2; the forward of larger windows
// at stride 1 from a bordered copy, as in RepLKNet's 31x31 and ConvNeXt's 7x7) and channels_last
// rows (any window; weight gradient 3x3 and 5x5).
//
// Why it is written this way (NCHW):
// - The planes are read where they lie. 16 output columns are one vector; each tap is one masked
//   load of 16 input columns (stride 2: two loads shared by two taps, and a permute that keeps
//   every other column). Lanes that fall left or right of the image, or past the output row, read
//   as zero without touching memory (AVX-512 masked loads suppress faults), so there is no
//   zero-padded copy and no transpose to channel blocks: the input is read once from memory and
//   the output written once.
// - 3x3 and 5x5 windows (stride 1 or 2) take the rolled rows (see "rolled rows"
//   below): a chunk walks down the plane loading each input row once, its taps made in registers,
//   every accumulator a named register; 7x7 maps two planes to a vector. They are 1.3-3x faster
//   in L2 than the block kernels that follow, which stay for dilated windows and as their
//   reference under FASTCNN_DEPTHWISE_ROLLED=0.
// - The block kernels keep their weights in registers and share each loaded input row among the
//   R output rows it feeds (R = 7 for 3x3: 112, 56, 28, 14 and 7 are multiples of 7).
// - Row blocks wholly inside the input run without row checks; border blocks load the rows
//   outside with an empty mask. With a branch per row GCC kept the accumulators on the stack, and
//   the weight gradient ran 3x slower.
// - The weight gradient keeps one accumulator per tap, in vector form across planes (a 7x7 plane
//   is 49 pixels: reducing nine vectors per plane cost 3x the arithmetic).
// - The stride-2 input gradient is a gather: each grad_in vector permutes one load of grad_out
//   per kernel row onto the lanes of matching parity; no scatter, no atomics. For 3x3 windows with
//   padding 0 or 1, and 5x5 windows, it is rolled: a walk down grad_out makes each row's permutes
//   once and completes two grad_in rows a step.
// - Stride-2 maps whose output rows fill at most half a vector (14x14 -> 7x7) run two planes at
//   once, one in each half: one two-source permute makes both planes' taps, where a single plane
//   used 7 of 16 lanes (32x512x14x14, 2 threads: forward 1.8x, weight gradient 1.6x faster).
// - Planes of at most 64 outputs as wide as their input (7x7 maps at stride 1) are one flat array
//   of 4 vectors: each tap a masked load at a fixed flat offset, the masks computed once per call.
//   The row kernels spend 7 vectors on a 7x7 plane, 9 of 16 lanes idle (32x1024x7x7, one thread:
//   forward 2.4 -> 1.3 ms, weight gradient 2.6 -> 1.5 ms).
// - Windows of 25 taps and more at stride 1 (forward only) copy the plane into a zero-bordered
//   buffer and run blocks of 4 output rows x 4 vectors, each input load feeding every output row
//   of the block it reaches (8x128x56x56, 2 threads, against the 8-lane channel tiles: 7x7 1.5x,
//   31x31 2.1x faster; 7x7 on 14x14 maps stays on the tiles). channels_last windows of 13x13 and
//   more scatter 16 channels into such planes and gather the outputs back (31x31 1.3x faster
//   than the sliding rows below).
//
// channels_last: 16 channels are one vector, the image's own layout. A channel group of 4, 2 or 1
// vectors and 2, 4 or 8 adjacent pixels keep 8 chains of multiply-adds in flight (one pixel at a
// time ran at the FMA latency on narrow maps); the weight gradient holds 2 vectors x 9 taps of
// accumulators for a row; the strided input gradient gathers the landing taps of each pixel. The
// row walks prefetch their leading edge (see kPrefetchPixels); the backward is one pass (see
// backward_nhwc_fused_avx512 in depthwise_conv2d_kernel.cpp). The row kernels are templates on
// the element type: bf16 and fp16 rows are read with masked 16-bit loads and widened in registers
// (see Bf16), the arithmetic is the fp32 kernels'.
// Measured at N=32, 2 threads, reuse, ms, 8-wide kernels -> these: 32x32x112x112 forward 7.7 -> 5.9,
// weight gradient 9.7 -> 5.8; 8x128x56x56 7x7 forward 7.9 -> 3.9; stride-2 input gradient of
// 32x128x56x56 3.8 -> 2.5.
//
// Only plain types cross this file's boundary, and it includes no template library headers: it is
// compiled for AVX-512, and an inline function instantiated here could otherwise be picked by the
// linker for code that runs on CPUs without it.
#include "ops/cpu/depthwise_conv2d_avx512.h"

#if FASTCNN_AVX512_PLANES
// AVX-512BW/VL for the masked 16-bit loads and stores of bf16/fp16 rows (every AVX-512 CPU but
// the Xeon Phi has them; enabled() checks).
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include <immintrin.h>
// GCC 12 warns that _mm512_permutexvar_ps's placeholder operand (_mm512_undefined_ps) may be
// uninitialised, and _mm512_cvtepi32_epi16's and _mm512_cvtps_ph's that it is: they are unused
// (every lane is written).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace fastcnn {
namespace depthwise {
namespace avx512 {

#if FASTCNN_AVX512_PLANES
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <bool V>
struct BoolConstant {
  static constexpr bool value = V;
};

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

// Streaming stores (see ops/cpu/streaming_stores.h) for output planes with dense rows: a kernel
// writes a block of rows into a stage buffer in cache and stream_rows copies it out right away.
// Streaming each vector as the kernel made it was 1.5x faster on 112-wide rows, whose vectors are
// whole lines, but 1.3-3x slower on 56- and 28-wide rows: a vector across two lines left both
// half-written until the next column chunk, and the write-combining buffers flushed them partly
// filled. Streaming a whole plane after it was made gained nothing: a burst of 50 KB of streaming
// stores stalls the loads behind it.
constexpr int64_t kStageFloats = 8192;

// Whether a plane's output can be staged: dense rows of at most kStageFloats / rows_per_block.
inline bool stageable(const PlaneGeometry& g, int64_t rows_per_block, int64_t out_row_stride, int64_t out_w) {
  return g.stream_output && out_row_stride == out_w && out_w * rows_per_block <= kStageFloats;
}

// A channels_last output vector: streamed when the image is (every vector a whole line, see
// ImageGeometry::stream_output), else a masked store.
inline void store_channels(float* dst, __mmask16 lanes, __m512 v, bool stream) {
  if (stream)
    _mm512_stream_ps(dst, v);
  else
    _mm512_mask_storeu_ps(dst, lanes, v);
}

// The 16-bit floats the channels_last row kernels read and write natively (their bits; plain
// structs so that the two are different types): each vector is widened to fp32 in registers as it
// is loaded and rounded to nearest even as it is stored, so a row is the fp32 kernel's row on the
// widened input, rounded once.
struct Bf16 {
  uint16_t bits;
};
struct Fp16 {
  uint16_t bits;
};

inline __m512 load_channels(__mmask16 lanes, const float* src) { return _mm512_maskz_loadu_ps(lanes, src); }
inline __m512 load_channels(__mmask16 lanes, const Bf16* src) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load_channels(__mmask16 lanes, const Fp16* src) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, src));
}

// bf16's rounding of float_to_bf16 (NaN to 0x7FC0), in registers.
inline __m256i round_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

// 16-bit rows are never streamed (ImageGeometry::stream_output is for fp32 lines).
inline void store_channels(Bf16* dst, __mmask16 lanes, __m512 v, bool) {
  _mm256_mask_storeu_epi16(dst, lanes, round_to_bf16(v));
}
inline void store_channels(Fp16* dst, __mmask16 lanes, __m512 v, bool) {
  _mm256_mask_storeu_epi16(dst, lanes, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// dst[0, count) = src[0, count): streaming stores for dst's whole lines, plain masked stores for
// the partial lines at either end.
inline void stream_rows(const float* src, float* dst, int64_t count) {
  const int64_t head = min64(count, static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64 / 4));
  if (head > 0) _mm512_mask_storeu_ps(dst, lane_range(0, head), _mm512_maskz_loadu_ps(lane_range(0, head), src));
  int64_t i = head;
  for (; i + kLanes <= count; i += kLanes) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  if (i < count) _mm512_mask_storeu_ps(dst + i, lane_range(0, count - i), _mm512_maskz_loadu_ps(lane_range(0, count - i), src + i));
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
constexpr int64_t kRows3BandRows = 8;

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

  // Tap column KX against the output rows that exist (kernel rows Lo..Hi).
  template <int Lo, int Hi, int KX>
  inline __attribute__((always_inline)) void add_column(__m512 t, __m512* s) const {
    if constexpr (Lo <= 0) s[0] = _mm512_fmadd_ps(w[KX], t, s[0]);
    if constexpr (Lo <= 1 && Hi >= 1) s[1] = _mm512_fmadd_ps(w[5 + KX], t, s[1]);
    if constexpr (Lo <= 2 && Hi >= 2) s[2] = _mm512_fmadd_ps(w[10 + KX], t, s[2]);
    if constexpr (Lo <= 3 && Hi >= 3) s[3] = _mm512_fmadd_ps(w[15 + KX], t, s[3]);
    if constexpr (Hi >= 4) s[4] = _mm512_fmadd_ps(w[20 + KX], t, s[4]);
  }

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
    for (int c = 0; c < Chunks; ++c) add_column<Lo, Hi, 0>(_mm512_castsi512_ps(v[c]), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column<Lo, Hi, 1>(_mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 1)), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column<Lo, Hi, 2>(_mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 2)), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column<Lo, Hi, 3>(_mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 3)), s[c]);
    for (int c = 0; c < Chunks; ++c) add_column<Lo, Hi, 4>(_mm512_castsi512_ps(_mm512_alignr_epi32(v[c + 1], v[c], 4)), s[c]);
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

  template <int T>
  inline __attribute__((always_inline)) void add_tap(__m512 grad_row, __m512 tap) {
    sums.at<T>() = _mm512_fmadd_ps(grad_row, tap, sums.at<T>());
  }

  template <int Lo, int Hi, int KY>
  inline __attribute__((always_inline)) void add_row(int64_t k, const __m512* t) {
    if constexpr (Lo <= KY && KY <= Hi) {
      const __m512 grad_row = _mm512_maskz_loadu_ps(valid, grad + (k - KY) * out_row_stride);
      if constexpr (KY == 0) {
        if (ahead) _mm_prefetch(reinterpret_cast<const char*>(grad + (k + ahead) * out_row_stride), _MM_HINT_T0);
        if (WithBias) bias = _mm512_add_ps(bias, grad_row);
      }
      add_tap<5 * KY + 0>(grad_row, t[0]);
      add_tap<5 * KY + 1>(grad_row, t[1]);
      add_tap<5 * KY + 2>(grad_row, t[2]);
      add_tap<5 * KY + 3>(grad_row, t[3]);
      add_tap<5 * KY + 4>(grad_row, t[4]);
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

constexpr int64_t kStride2BandRows = 8;

struct Stride2Columns {
  __mmask16 low = 0, high = 0, last = 0;
  Stride2Columns() = default;
  Stride2Columns(int64_t base, int64_t in_w)
      : low(lane_range(-base, in_w - base)),
        high(lane_range(-(base + kLanes), in_w - (base + kLanes))),
        last(static_cast<__mmask16>(lane_range(-(base + 2 * kLanes), in_w - (base + 2 * kLanes)) & 0x1)) {}
  // taps[kx][l] = column base + 2l + kx, zero outside the input; lanes outside `keep` zeroed when
  // Keep (see Rows3Columns::load).
  template <bool Keep>
  void load(const float* row, bool inside, __mmask16 keep, __m512* taps) const {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
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
    _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride), _MM_HINT_T0);
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

inline int64_t floor_half(int64_t v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

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
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
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
inline bool rolls_grad_input_stride2(const PlaneGeometry& g) {
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
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
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
    const int64_t iy = first_row + k;
    const bool inside = row_inside(iy, in_h);
    _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride + kLanes), _MM_HINT_T0);
    __m512 t[5];
    cols.load(column + (inside ? iy : 0) * in_row_stride, inside, 0xFFFF, t);
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
// WeightGradRows5).
template <bool WithBias>
struct WeightGradStride2Rows5 {
  const float* column;
  int64_t first_row, in_h, in_row_stride, ahead;
  Stride2Columns5 cols;
  const float* grad;  // grad_out row 0 of the band, the chunk's first column
  int64_t out_row_stride;
  __mmask16 valid;
  TapSums5 sums;
  __m512 bias;

  template <int KY>
  inline __attribute__((always_inline)) void add_row(int64_t r, const __m512* t) {
    const __m512 grad_row = _mm512_maskz_loadu_ps(valid, grad + r * out_row_stride);
    if constexpr (KY == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(grad + (r + ahead / 2) * out_row_stride), _MM_HINT_T0);
      if (WithBias) bias = _mm512_add_ps(bias, grad_row);
    }
    sums.at<5 * KY + 0>() = _mm512_fmadd_ps(grad_row, t[0], sums.at<5 * KY + 0>());
    sums.at<5 * KY + 1>() = _mm512_fmadd_ps(grad_row, t[1], sums.at<5 * KY + 1>());
    sums.at<5 * KY + 2>() = _mm512_fmadd_ps(grad_row, t[2], sums.at<5 * KY + 2>());
    sums.at<5 * KY + 3>() = _mm512_fmadd_ps(grad_row, t[3], sums.at<5 * KY + 3>());
    sums.at<5 * KY + 4>() = _mm512_fmadd_ps(grad_row, t[4], sums.at<5 * KY + 4>());
  }

  template <bool Even, bool Start, bool Middle, bool Last>
  inline __attribute__((always_inline)) void step(int64_t k) {
    const int64_t iy = first_row + k;
    const bool inside = row_inside(iy, in_h);
    _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(column + (iy + ahead) * in_row_stride + kLanes), _MM_HINT_T0);
    __m512 t[5];
    cols.load(column + (inside ? iy : 0) * in_row_stride, inside, valid, t);
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

template <bool WithBias>
void weight_grad_plane_stride2_rows5(const float* go, const float* in, float* tap_lanes, float* bias_lanes,
                                     const PlaneGeometry& g) {
  WeightGradStride2Rows5<WithBias> walk{in, 0, g.in_h, g.in_row_stride, 2 * kStride2BandRows,
                                        Stride2Columns5(0, g.in_w), go, g.out_row_stride, 0};
  walk.sums.load(tap_lanes);
  walk.bias = WithBias ? _mm512_loadu_ps(bias_lanes) : _mm512_setzero_ps();
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += kStride2BandRows) {
    const int64_t n = min64(kStride2BandRows, g.out_h - oy0);
    for (int64_t x0 = 0; x0 < g.out_w; x0 += kLanes) {
      const int64_t base = 2 * x0 - g.pad_left;
      walk.column = in + base;
      walk.first_row = 2 * oy0 - g.pad_top;
      walk.cols = Stride2Columns5(base, g.in_w);
      walk.grad = go + oy0 * g.out_row_stride + x0;
      walk.valid = lane_range(0, g.out_w - x0);
      roll_rows5_stride2(walk, n);
    }
  }
  walk.sums.save(tap_lanes);
  if (WithBias) _mm512_storeu_ps(bias_lanes, walk.bias);
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

// ---------------------------------------------------------------------------------------------
// channels_last: 16 channels are one vector, so the image's layout is the vector layout. Channel
// tails load and store with a lane mask (no scalar tail).

// [first, last) of taps k with 0 <= o*stride - pad + k*dilation < size. (valid_taps of the
// portable kernels, written again here: an inline function shared with this AVX-512 translation
// unit could be linked into code that runs on CPUs without it.)
inline void taps_inside(int64_t o, int64_t stride, int64_t pad, int64_t dilation, int64_t size, int64_t kernel,
                        int64_t* first, int64_t* last) {
  const int64_t start = o * stride - pad;
  int64_t lo = start >= 0 ? 0 : (-start + dilation - 1) / dilation;
  int64_t hi = start > size - 1 ? 0 : (size - 1 - start) / dilation + 1;
  lo = lo < kernel ? lo : kernel;
  hi = hi < kernel ? hi : kernel;
  *first = lo;
  *last = hi > lo ? hi : lo;
}

// [first, last) of the output columns whose every tap lies inside the input row.
inline void columns_inside(const ImageGeometry& g, int64_t* first, int64_t* last) {
  // ox*stride - pad_left >= 0 and ox*stride - pad_left + (kernel_w - 1)*dilation_w < in_w
  const int64_t lo = (g.pad_left + g.stride_w - 1) / g.stride_w;
  const int64_t reach = g.in_w - 1 - (g.kernel_w - 1) * g.dilation_w + g.pad_left;
  const int64_t hi = reach < 0 ? 0 : reach / g.stride_w + 1;
  *first = min64(lo, g.out_w);
  *last = hi < *first ? *first : min64(hi, g.out_w);
}

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
    if (R > 1) {  // the interior: the window's newest columns kPrefetchPixels ahead (see there)
      const E* edge = first + (kx1 - 1) * tap_step + kPrefetchPixels * pixel_step;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int b = 0; b < B; ++b)
          _mm_prefetch(reinterpret_cast<const char*>(edge + r * pixel_step + b * kLanes), _MM_HINT_T0);
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
#pragma GCC unroll 8
    for (int ky = 0; ky < KH; ++ky)
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b)
        _mm_prefetch(reinterpret_cast<const char*>(rows[ky] + ox * g.stride_w * C + ahead_in + b * kLanes),
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

template <int kTaps>
void forward_flat(const float* in, const float* taps, float bias, float* out, const FlatPlane& f) {
  __m512 acc[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) acc[v] = _mm512_set1_ps(bias);
#pragma GCC unroll 25
  for (int t = 0; t < kTaps; ++t) {
    const __m512 w = _mm512_set1_ps(taps[t]);
    const float* src = in + f.offset[t];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc[v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(f.load_mask[v][t], src + v * kLanes), acc[v]);
  }
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(out + v * kLanes, f.store_mask[v], acc[v]);
}

template <int kTaps>
void weight_grad_flat(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                      const FlatPlane& f) {
  __m512 grad[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) grad[v] = _mm512_maskz_loadu_ps(f.store_mask[v], grad_out + v * kLanes);
  if (bias_lanes) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(grad[0], grad[1]), _mm512_add_ps(grad[2], grad[3]));
    _mm512_storeu_ps(bias_lanes, _mm512_add_ps(_mm512_loadu_ps(bias_lanes), sum));
  }
#pragma GCC unroll 25
  for (int t = 0; t < kTaps; ++t) {
    const float* src = in + f.offset[t];
    __m512 acc = _mm512_loadu_ps(tap_lanes + t * kLanes);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc = _mm512_fmadd_ps(grad[v], _mm512_maskz_loadu_ps(f.load_mask[v][t], src + v * kLanes), acc);
    _mm512_storeu_ps(tap_lanes + t * kLanes, acc);
  }
}

}  // namespace

bool flat_plane(const PlaneGeometry& g, FlatPlane* f) {
  const int64_t k = g.kernel_h;
  if (!(g.stride == 1 && g.dilation_h == 1 && g.dilation_w == 1 && (k == 3 || k == 5) && g.kernel_w == k &&
        g.out_w == g.in_w && g.in_row_stride == g.in_w && g.out_row_stride == g.out_w &&
        g.out_h * g.out_w <= 4 * kLanes && g.out_h * g.out_w > 0))
    return false;
  f->taps = static_cast<int32_t>(k * k);
  for (int64_t ky = 0; ky < k; ++ky)
    for (int64_t kx = 0; kx < k; ++kx)
      f->offset[ky * k + kx] = static_cast<int32_t>((ky - g.pad_top) * g.in_w + kx - g.pad_left);
  for (int v = 0; v < 4; ++v) {
    f->store_mask[v] = 0;
    for (int t = 0; t < 25; ++t) f->load_mask[v][t] = 0;
    for (int l = 0; l < kLanes; ++l) {
      const int64_t q = v * kLanes + l;
      if (q >= g.out_h * g.out_w) continue;
      const uint16_t bit = static_cast<uint16_t>(1u << l);
      f->store_mask[v] |= bit;
      const int64_t oy = q / g.out_w, ox = q % g.out_w;
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx)
          if (row_inside(oy + ky - g.pad_top, g.in_h) && row_inside(ox + kx - g.pad_left, g.in_w))
            f->load_mask[v][ky * k + kx] |= bit;
    }
  }
  return true;
}

void forward_plane_flat(const float* in, const float* taps, float bias, float* out, const FlatPlane& f) {
  if (f.taps == 9) return forward_flat<9>(in, taps, bias, out, f);
  forward_flat<25>(in, taps, bias, out, f);
}

void weight_grad_plane_flat(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                            const FlatPlane& f) {
  if (f.taps == 9) return weight_grad_flat<9>(grad_out, in, tap_lanes, bias_lanes, f);
  weight_grad_flat<25>(grad_out, in, tap_lanes, bias_lanes, f);
}

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

}  // namespace

int64_t bordered_plane_floats(const PlaneGeometry& g) {
  return (g.out_h + (g.kernel_h - 1) * g.dilation_h) * bordered_row_stride(g);
}

namespace {

void bordered_compute(const float* bordered, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  const int64_t row_stride = bordered_row_stride(g);
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

namespace {

// The columns of two planes' stride-2 rows (see pairs_planes in the header): 16 input columns
// from -pad_left of each plane hold every tap of its output row, and tap(kx) puts plane a's
// column 2l + kx - pad_left in lane l < 8 and plane b's 2(l - 8) + kx - pad_left in lane l >= 8
// (elements 2l + kx of the first source and 16 + 2(l - 8) + kx of the second); zero outside the
// input and past the output row. (Member functions, as Columns: GCC unrolls them.)
template <int KW>
struct PairedColumns {
  __mmask16 in_row, half, valid;
  int64_t base;
  __m512i index[KW];

  explicit PairedColumns(const PlaneGeometry& g)
      : in_row(lane_range(g.pad_left, g.in_w + g.pad_left)), half(lane_range(0, g.out_w)), base(-g.pad_left) {
    valid = static_cast<__mmask16>(half | (half << 8));
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    for (int kx = 0; kx < KW; ++kx) index[kx] = _mm512_add_epi32(even, _mm512_set1_epi32(kx));
  }

  // Input row iy of both planes, zeros where it lies outside the input.
  void load_row(const float* in_a, const float* in_b, int64_t iy, const PlaneGeometry& g, __m512* a, __m512* b) const {
    const bool inside = row_inside(iy, g.in_h);
    const int64_t offset = (inside ? iy : 0) * g.in_row_stride + base;
    *a = _mm512_maskz_loadu_ps(inside ? in_row : 0, in_a + offset);
    *b = _mm512_maskz_loadu_ps(inside ? in_row : 0, in_b + offset);
  }

  __m512 tap(int kx, __m512 a, __m512 b) const { return _mm512_maskz_permutex2var_ps(valid, a, index[kx], b); }
};

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

bool pairs_weight_grad_planes(const PlaneGeometry& g) { return pairs_planes(g) && g.kernel_h == 3; }

void weight_grad_plane_pair(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                            float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                            const PlaneGeometry& g) {
  if (g.stride == 1)
    return bias_lanes_a ? weight_grad_plane_rows3_pair<true>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a,
                                                             tap_lanes_b, bias_lanes_a, bias_lanes_b, g)
                        : weight_grad_plane_rows3_pair<false>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a,
                                                              tap_lanes_b, nullptr, nullptr, g);
  if (bias_lanes_a)
    return weight_grad_pair_stride2<true>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, bias_lanes_a,
                                          bias_lanes_b, g);
  weight_grad_pair_stride2<false>(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, nullptr, nullptr, g);
}

bool pairs_planes(const PlaneGeometry& g) {
  if (g.stride == 1) return pairs_rows3(g);
  return g.stride == 2 && g.dilation_w == 1 && (g.kernel_h == 3 || g.kernel_h == 5) && g.kernel_w == g.kernel_h &&
         g.out_w <= 8 && 2 * (g.out_w - 1) + g.kernel_w <= kLanes;
}

void forward_plane_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                        float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  if (g.stride == 1) return forward_plane_rows3_pair(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
  if (g.kernel_h == 3) return forward_pair_stride2<3, 3>(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
  forward_pair_stride2<5, 5>(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
}

void forward_plane(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  if (g.stride == 2) {
    if (rolls_rows3_stride2(g)) return forward_plane_stride2_rows3(in, taps, bias, out, g);
    if (rolls_rows5_stride2(g)) return forward_plane_stride2_rows5(in, taps, bias, out, g);
    if (g.kernel_h == 3) return forward_plane_fixed<2, 3, 3, 7>(in, taps, bias, out, g);
    return forward_plane_fixed<2, 5, 5, 2>(in, taps, bias, out, g);
  }
  if (rolls_rows3(g)) return forward_plane_rows3(in, taps, bias, out, g);
  if (rolls_rows5(g)) return forward_plane_rows5(in, taps, bias, out, g);
  if (g.kernel_h == 3) return forward_plane_fixed<1, 3, 3, 7>(in, taps, bias, out, g);
  forward_plane_fixed<1, 5, 5, 4>(in, taps, bias, out, g);
}

void grad_input_plane_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g) {
  if (rolls_grad_input_stride2(g)) {
    if (g.pad_top) {
      return g.pad_left ? grad_input_plane_stride2_rows3<true, 1>(grad_out, taps, grad_in, g)
                        : grad_input_plane_stride2_rows3<false, 1>(grad_out, taps, grad_in, g);
    }
    return g.pad_left ? grad_input_plane_stride2_rows3<true, 0>(grad_out, taps, grad_in, g)
                      : grad_input_plane_stride2_rows3<false, 0>(grad_out, taps, grad_in, g);
  }
  if (rolls_rows5_stride2(g)) return grad_input_plane_stride2_rows5(grad_out, taps, grad_in, g);
  if (g.kernel_h == 3) return grad_input_plane_stride2_fixed<3, 3>(grad_out, taps, grad_in, g);
  grad_input_plane_stride2_fixed<5, 5>(grad_out, taps, grad_in, g);
}

void weight_grad_plane(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                       const PlaneGeometry& g) {
#define FASTCNN_WEIGHT_GRAD(S, K, R)                                                               \
  return bias_lanes ? weight_grad_plane_fixed<S, K, K, R, true>(grad_out, in, tap_lanes, bias_lanes, g) \
                    : weight_grad_plane_fixed<S, K, K, R, false>(grad_out, in, tap_lanes, bias_lanes, g)
  if (g.stride == 2) {
    if (rolls_rows3_stride2(g))
      return bias_lanes ? weight_grad_plane_stride2_rows3<true>(grad_out, in, tap_lanes, bias_lanes, g)
                        : weight_grad_plane_stride2_rows3<false>(grad_out, in, tap_lanes, bias_lanes, g);
    if (rolls_rows5_stride2(g))
      return bias_lanes ? weight_grad_plane_stride2_rows5<true>(grad_out, in, tap_lanes, bias_lanes, g)
                        : weight_grad_plane_stride2_rows5<false>(grad_out, in, tap_lanes, bias_lanes, g);
    if (g.kernel_h == 3) FASTCNN_WEIGHT_GRAD(2, 3, 7);
    FASTCNN_WEIGHT_GRAD(2, 5, 2);
  }
  if (rolls_rows3(g))
    return bias_lanes ? weight_grad_plane_rows3<true>(grad_out, in, tap_lanes, bias_lanes, g)
                      : weight_grad_plane_rows3<false>(grad_out, in, tap_lanes, bias_lanes, g);
  if (rolls_rows5(g))
    return bias_lanes ? weight_grad_plane_rows5<true>(grad_out, in, tap_lanes, bias_lanes, g)
                      : weight_grad_plane_rows5<false>(grad_out, in, tap_lanes, bias_lanes, g);
  if (g.kernel_h == 3) FASTCNN_WEIGHT_GRAD(1, 3, 7);
  FASTCNN_WEIGHT_GRAD(1, 5, 2);
#undef FASTCNN_WEIGHT_GRAD
}

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

#else  // never called: enabled() is false

void bf16_to_float(const uint16_t*, float*, int64_t) {}
void float_to_bf16(const float*, uint16_t*, int64_t) {}
void half_to_float(const uint16_t*, float*, int64_t) {}
void float_to_half(const float*, uint16_t*, int64_t) {}

void forward_row_nhwc(const float*, const float*, const float*, float*, int64_t, const ImageGeometry&) {}
void forward_row_nhwc_bf16(const uint16_t*, const float*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}
void forward_row_nhwc_fp16(const uint16_t*, const float*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}
void weight_grad_row_nhwc(const float*, const float*, float*, float*, int64_t, const ImageGeometry&) {}
void weight_grad_row_nhwc_bf16(const uint16_t*, const uint16_t*, float*, float*, int64_t, const ImageGeometry&) {}
void weight_grad_row_nhwc_fp16(const uint16_t*, const uint16_t*, float*, float*, int64_t, const ImageGeometry&) {}
void grad_input_row_nhwc(const float*, const float*, float*, int64_t, const ImageGeometry&) {}
void grad_input_row_nhwc_bf16(const uint16_t*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}
void grad_input_row_nhwc_fp16(const uint16_t*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}

void forward_plane(const float*, const float*, float, float*, const PlaneGeometry&) {}
bool pairs_planes(const PlaneGeometry&) { return false; }
bool pairs_weight_grad_planes(const PlaneGeometry&) { return false; }
void weight_grad_plane_pair(const float*, const float*, const float*, const float*, float*, float*, float*, float*,
                            const PlaneGeometry&) {}
void forward_plane_pair(const float*, const float*, const float*, const float*, float, float, float*, float*,
                        const PlaneGeometry&) {}
int64_t bordered_plane_floats(const PlaneGeometry&) { return 0; }
int64_t nhwc_bordered_floats(const ImageGeometry&) { return 0; }
void forward_channels_nhwc_bordered(const float*, const float*, const float*, float*, int64_t, const ImageGeometry&,
                                    float*) {}
void forward_plane_bordered(const float*, const float*, float, float*, const PlaneGeometry&, float*) {}
bool flat_plane(const PlaneGeometry&, FlatPlane*) { return false; }
void forward_plane_flat(const float*, const float*, float, float*, const FlatPlane&) {}
void weight_grad_plane_flat(const float*, const float*, float*, float*, const FlatPlane&) {}
void weight_grad_plane(const float*, const float*, float*, float*, const PlaneGeometry&) {}
void grad_input_plane_stride2(const float*, const float*, float*, const PlaneGeometry&) {}

#endif  // FASTCNN_AVX512_PLANES

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn
