// The CPU sampler's AVX-512 taps of 16 pixels (Taps16), and reading them from the few input rows
// they lie in (row windows) instead of by gathers. Private to grid_sample_kernel.cpp, the one
// translation unit that includes it (everything here is in an anonymous namespace).
#pragma once

#include <chrono>

#include "ops/cpu/grid_sample_chunk.h"

#ifdef FASTCNN_GRID_SAMPLE_AVX2

// Code between these is compiled for AVX-512 (the CPU is checked at run time). GCC 12 warns that
// the placeholder operand of _mm512_min_ps, _max_ps, _cvttps_epi32 and _extracti64x4_epi64 may be
// (or is) uninitialised: it is unused (every lane is written).
#define FASTCNN_GRID_SAMPLE_AVX512_BEGIN                                                   \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")") _Pragma("GCC diagnostic push") \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                         \
          _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define FASTCNN_GRID_SAMPLE_AVX512_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")

namespace fastcnn {
namespace grid_sample {
namespace {

FASTCNN_GRID_SAMPLE_AVX512_BEGIN
namespace avx512 {

// The taps of 16 output pixels in registers (see Chunk for the fields).
struct Taps16 {
  __m512i offset;
  __m512 w_nw, w_ne, w_sw, w_se;
  __mmask16 nw, ne, sw, se;  // tap inside; nearest: nw only
  __m512 dx0, dx1, dy0, dy1, scale_x, scale_y;
  __m512i x0, y0;  // the nw tap's column and row (bilinear; in the copy for taps16_padded)
};

// Row windows: along an output row the taps of 16 pixels lie in a few input rows (an affine map
// moves them by a constant step), within 32 columns unless the map shrinks the image more than
// about 2x. Each such row is read as two vectors of 16 columns (an NCHW plane; four vectors of
// 64 interleaved floats for channels_last images of 2-4 channels) and both taps of every pixel on
// it are picked by permutes, instead of four pair gathers a channel. On the Intel Xeon of
// 2026-12-01 a pair gather took 29-38 cycles (8 or 16 lanes alike; earlier sessions' host of the
// same model, 3.6-7: most likely the host's microcode mitigating gather data sampling) and a
// window row about 6, so rows win up to far more than the 2-10 of an STN's maps (rotations within
// 30 degrees): the NCHW forward of the three STN shapes went from 2.4-2.8x PyTorch's speed to
// 3.3-5.3x (in process, 2 threads). WindowRows decides up to how many rows per machine. The values
// and their arithmetic are the gathers' (bitwise the same result).
constexpr int kMaxWindowRows = 16;

// Up to how many rows a vector's taps are read from its window rather than gathered: 0 (gathers
// only) to kMaxWindowRows. Gathers cost 3.6-7 cycles on one Intel Xeon host and 29-38 on another
// of the same model, so the limit is measured once per process: the cycles of a pair gather
// (gather_cycles), times the four a channel takes, over the ~6 cycles of a window row. (Timing
// the window code itself against the gathers was bimodal across processes: window rows 2-4x
// slower in a third of them, cause not found.) FASTCNN_GRID_SAMPLE_WINDOW_ROWS sets it instead
// (read once per call).
struct WindowRows {
  static int limit() {
    const char* text = std::getenv("FASTCNN_GRID_SAMPLE_WINDOW_ROWS");
    if (text && *text) return std::max(0, std::min(kMaxWindowRows, std::atoi(text)));
    static const int measured = measure();
    return measured;
  }

  // Cycles a pair gather of 8 lanes takes when many are in flight: gathers timed against a chain
  // of dependent 64-bit multiplies (3 cycles each on every x86 core of the last decade), best of
  // interleaved tries, all in registers. About 0.1 ms.
  static double gather_cycles() {
    constexpr int kGathers = 256, kMultiplies = 2048;
    alignas(64) static float image[4096];
    const __m512i lanes = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    __m512 sink = _mm512_setzero_ps();
    uint64_t chain = 3;
    double gather_ns = 1e30, cycle_ns = 1e30;
    auto elapsed = [](auto start) {
      return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    };
    for (int trial = 0; trial < 9; ++trial) {
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < kGathers; i += 2) {
        __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32((i * 536) & 4032));  // 16 pairs, rows apart
        const __m512d low = _mm512_i32gather_pd(_mm512_castsi512_si256(index), image, 4);
        const __m512d high = _mm512_i32gather_pd(_mm512_extracti64x4_epi64(index, 1), image, 4);
        sink = _mm512_add_ps(sink, _mm512_castpd_ps(_mm512_add_pd(low, high)));
        __asm__ volatile("" : "+v"(sink), "+v"(index));  // not hoisted nor folded
      }
      gather_ns = std::min(gather_ns, elapsed(start) / kGathers);
      start = std::chrono::steady_clock::now();
      for (int i = 0; i < kMultiplies; ++i) __asm__ volatile("imul %0, %0" : "+r"(chain));
      cycle_ns = std::min(cycle_ns, elapsed(start) / (3.0 * kMultiplies));
    }
    return gather_ns / cycle_ns;
  }

  // A channel of 16 pixels takes four pair gathers, or about 6 cycles a window row (the slope of
  // the one-channel NCHW forward from 2 to 10 rows on the Intel Xeon, an image in L1: 1.9-2.5 ns
  // a row at 2.8 GHz).
  static int measure() {
    constexpr double kRowCycles = 6.0;
    return static_cast<int>(std::max(0.0, std::min<double>(kMaxWindowRows, 4 * gather_cycles() / kRowCycles)));
  }
};

// A window: rows y_begin .. y_begin + rows - 1 of an image whose pixels hold kStride floats (1: an
// NCHW plane; C: a channels_last image), kVectors * 16 floats of each from pixel x_begin on.
template <int kStride, int kVectors>
struct Window {
  static constexpr int kFloats = 16 * kVectors;
  int64_t x_begin;  // may lie left of the image
  int64_t y_begin;  // the smallest y0; may lie above the image
  int rows;         // the largest y0 plus one, minus y_begin, plus one
  __mmask16 columns[kVectors];  // the window's floats inside the row
  // Float of x0's (side 0) and x0 + 1's (side 1) channel c in the window, and (four vectors)
  // whether it lies in the upper two.
  __m512i index[2][kStride];
  __mmask16 upper[2][kStride];
};
using PlaneWindow = Window<1, 2>;

// The window of taps whose nw corners span columns [x_min, x_max] and rows [y_min, y_max] (x0 the
// lanes' columns); false when they do not fit one (too wide, or more than max_rows rows).
template <int kStride, int kVectors>
__attribute__((always_inline)) inline bool make_window(__m512i x0, int64_t x_min, int64_t x_max, int64_t y_min,
                                                       int64_t y_max, int64_t in_w, int max_rows,
                                                       Window<kStride, kVectors>* w) {
  constexpr int kFloats = Window<kStride, kVectors>::kFloats;
  if ((x_max + 2 - x_min) * kStride > kFloats || y_max + 2 - y_min > max_rows) return false;
  w->x_begin = x_min, w->y_begin = y_min, w->rows = static_cast<int>(y_max + 2 - y_min);
  __m512i first = _mm512_sub_epi32(x0, _mm512_set1_epi32(static_cast<int32_t>(x_min)));
  if constexpr (kStride > 1) first = _mm512_mullo_epi32(first, _mm512_set1_epi32(kStride));
#pragma GCC unroll 4
  for (int c = 0; c < kStride; ++c) {
    for (int side = 0; side < 2; ++side) {
      w->index[side][c] = _mm512_add_epi32(first, _mm512_set1_epi32(side * kStride + c));
      if constexpr (kVectors == 4)
        w->upper[side][c] = _mm512_cmpge_epi32_mask(w->index[side][c], _mm512_set1_epi32(32));
    }
  }
  const int64_t begin = std::max<int64_t>(0, -x_min * kStride);
  const int64_t end = std::min<int64_t>(kFloats, (in_w - x_min) * kStride);
  const uint64_t inside = end > begin ? ((end >= 64 ? ~uint64_t(0) : (uint64_t(1) << end) - 1) &
                                         ~((uint64_t(1) << begin) - 1))
                                      : 0;
#pragma GCC unroll 4
  for (int v = 0; v < kVectors; ++v) w->columns[v] = static_cast<__mmask16>(inside >> (16 * v));
  return true;
}

// make_window from the live lanes' own extremes (any map), by reductions.
template <int kStride, int kVectors>
__attribute__((always_inline)) inline bool make_window(const Taps16& t, __mmask16 live, int64_t in_w, int max_rows,
                                                       Window<kStride, kVectors>* w) {
  return make_window(t.x0, _mm512_mask_reduce_min_epi32(live, t.x0), _mm512_mask_reduce_max_epi32(live, t.x0),
                     _mm512_mask_reduce_min_epi32(live, t.y0), _mm512_mask_reduce_max_epi32(live, t.y0), in_w,
                     max_rows, w);
}

// make_window for pixels along a row of a finite affine map: their clamped x0 and y0 are monotonic
// (fma of finite values rounds monotonically; an overflow becomes a bound), so the first and the
// last of the `count` live lanes are the extremes. (Not so for a map with an infinite or NaN entry:
// border padding sends a NaN lane to -2, below its neighbours' 0.)
template <int kStride, int kVectors>
__attribute__((always_inline)) inline bool make_window_from_ends(const Taps16& t, int count, int64_t in_w,
                                                                 int max_rows, Window<kStride, kVectors>* w) {
  const __m512i last = _mm512_set1_epi32(count - 1);
  auto ends = [&](__m512i v, int64_t* low, int64_t* high) {
    const int32_t a = _mm_cvtsi128_si32(_mm512_castsi512_si128(v));
    const int32_t b = _mm_cvtsi128_si32(_mm512_castsi512_si128(_mm512_permutexvar_epi32(last, v)));
    *low = std::min(a, b), *high = std::max(a, b);
  };
  int64_t x_min, x_max, y_min, y_max;
  ends(t.x0, &x_min, &x_max);
  ends(t.y0, &y_min, &y_max);
  return make_window(t.x0, x_min, x_max, y_min, y_max, in_w, max_rows, w);
}

// The four taps of 16 pixels in kChannels channels (zero where a tap is outside).
template <int kChannels>
struct TapValues {
  __m512 nw[kChannels], ne[kChannels], sw[kChannels], se[kChannels];
};

// The taps of channels 0 .. kChannels - 1 from the rows of their window: NCHW planes plane_floats
// apart (kStride 1), or a channels_last image (kStride = the image's channels). The window's rows
// outside the image are skipped (the taps on them are outside, their masks clear); its floats
// outside a row read zero. Row by row, a row's lane masks computed once for every channel.
// kLiveTaps: every tap mask is `live` (taps16_inside, taps16_padded), so none needs testing.
template <int kChannels, bool kLiveTaps = false, int kStride, int kVectors>
__attribute__((always_inline)) inline void window_taps(const float* image, int64_t plane_floats, int64_t row_floats,
                                                       int64_t in_h, const Taps16& t,
                                                       const Window<kStride, kVectors>& w, __mmask16 live,
                                                       TapValues<kChannels>* v) {
  static_assert(kStride == 1 || kStride == kChannels, "a channels_last window holds all channels");
  const int j_begin = static_cast<int>(std::max<int64_t>(0, -w.y_begin));
  const int j_end = static_cast<int>(std::min<int64_t>(w.rows, in_h - w.y_begin));
  auto on_row = [&](int j) {
    return _mm512_mask_cmpeq_epi32_mask(live, t.y0, _mm512_set1_epi32(static_cast<int32_t>(w.y_begin + j)));
  };
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int c = 0; c < kChannels; ++c) v->nw[c] = v->ne[c] = v->sw[c] = v->se[c] = zero;
  // Row j of the window is the north row of the lanes whose y0 is y_begin + j and the south row of
  // those one above (no y0 lies above y_begin).
  __mmask16 above = j_begin > 0 ? on_row(j_begin - 1) : 0;
  const float* row = image + (w.y_begin + j_begin) * row_floats + w.x_begin * kStride;
  auto pick = [&](const __m512* floats, int side, int c) {
    const int i = kStride == 1 ? 0 : c;
    const __m512 low = _mm512_permutex2var_ps(floats[0], w.index[side][i], floats[1]);
    if constexpr (kVectors == 2) return low;
    else return _mm512_mask_blend_ps(w.upper[side][i], low,
                                     _mm512_permutex2var_ps(floats[2], w.index[side][i], floats[3]));
  };
  for (int j = j_begin; j < j_end; ++j, row += row_floats) {
    const __mmask16 on = on_row(j);
    const __mmask16 nw = kLiveTaps ? on : on & t.nw, ne = kLiveTaps ? on : on & t.ne;
    const __mmask16 sw = kLiveTaps ? above : above & t.sw, se = kLiveTaps ? above : above & t.se;
    above = on;
    __m512 floats[kVectors];
    if constexpr (kStride > 1) {
#pragma GCC unroll 4
      for (int k = 0; k < kVectors; ++k) floats[k] = _mm512_maskz_loadu_ps(w.columns[k], row + 16 * k);
    }
#pragma GCC unroll 4
    for (int c = 0; c < kChannels; ++c) {
      if constexpr (kStride == 1) {
#pragma GCC unroll 4
        for (int k = 0; k < kVectors; ++k)
          floats[k] = _mm512_maskz_loadu_ps(w.columns[k], row + c * plane_floats + 16 * k);
      }
      const __m512 left = pick(floats, 0, c), right = pick(floats, 1, c);
      v->nw[c] = _mm512_mask_mov_ps(v->nw[c], nw, left);
      v->ne[c] = _mm512_mask_mov_ps(v->ne[c], ne, right);
      v->sw[c] = _mm512_mask_mov_ps(v->sw[c], sw, left);
      v->se[c] = _mm512_mask_mov_ps(v->se[c], se, right);
    }
  }
}

// Calls block(std::integral_constant<int, k>(), c0) for channels c0 .. c0 + k - 1, k = 4 and then
// the remaining 1 to 3: the planes one window_taps call reads.
template <typename Block>
__attribute__((always_inline)) inline void for_channel_blocks(int64_t channels, Block&& block) {
  int64_t c = 0;
  for (; c + 4 <= channels; c += 4) block(std::integral_constant<int, 4>(), c);
  switch (channels - c) {
    case 3: block(std::integral_constant<int, 3>(), c); break;
    case 2: block(std::integral_constant<int, 2>(), c); break;
    case 1: block(std::integral_constant<int, 1>(), c); break;
    default: break;
  }
}

// sample_nchw of 16 pixels from their window, four planes at a time: the gathers' arithmetic.
template <bool kLiveTaps = false>
__attribute__((always_inline)) inline void sample_nchw_window(const float* input, float* out, const Taps16& t,
                                                              const PlaneWindow& w, __mmask16 live,
                                                              int64_t channels, int64_t in_hw, int64_t out_hw,
                                                              int64_t in_w, int64_t in_h) {
  auto block = [&](auto block_channels, int64_t c0) __attribute__((always_inline)) {
    constexpr int kChannels = decltype(block_channels)::value;
    TapValues<kChannels> v;
    window_taps<kChannels, kLiveTaps>(input + c0 * in_hw, in_hw, in_w, in_h, t, w, live, &v);
#pragma GCC unroll 4
    for (int c = 0; c < kChannels; ++c) {
      const __m512 north = _mm512_fmadd_ps(v.ne[c], t.w_ne, _mm512_mul_ps(v.nw[c], t.w_nw));
      const __m512 south = _mm512_fmadd_ps(v.se[c], t.w_se, _mm512_mul_ps(v.sw[c], t.w_sw));
      _mm512_mask_storeu_ps(out + (c0 + c) * out_hw, live, _mm512_add_ps(north, south));
    }
  };
  for_channel_blocks(channels, block);
}

}  // namespace avx512
FASTCNN_GRID_SAMPLE_AVX512_END

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn
#endif  // FASTCNN_GRID_SAMPLE_AVX2
