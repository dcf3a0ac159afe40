// What the AVX-512 depthwise kernels (the .cpp files of this folder) share: the target options,
// lane masks, the stage buffer for streamed rows, the 16-bit element types of the channels_last
// rows, and the band sizes of the rolled walks. Included only by this folder's translation units,
// first. Everything is in an anonymous namespace: each unit gets its own copy, compiled for
// AVX-512, so the linker can never hand one of these inline functions to code that runs on a CPU
// without it (see depthwise_conv2d_avx512.cpp).
#pragma once

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

namespace fastcnn {
namespace depthwise {
namespace avx512 {
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

// [first, last) of taps k with 0 <= o*stride - pad + k*dilation < size. (valid_taps of the
// portable kernels, written again here: an inline function shared with the AVX-512 translation
// units could be linked into code that runs on CPUs without it.)
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

// Output rows a band of the rolled walks holds: unit stride (see forward_plane_rows3 in
// planes_rolled3.cpp) and stride 2 (see the stride-2 walks there).
constexpr int64_t kRows3BandRows = 8;
constexpr int64_t kStride2BandRows = 8;

inline int64_t floor_half(int64_t v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

// Lane l holds l (permute indices of one vector).
inline __m512i lane_indices() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
// Lane l holds 2l: a two-source permute by it takes the even elements of its 32.
inline __m512i even_lanes() {
  return _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
}

// The columns of two planes' stride-2 rows (see pairs_planes): 16 input columns from -pad_left
// of each plane hold every tap of its output row that lies in the row, and tap(kx) puts plane a's
// column 2l + kx - pad_left in lane l < 8 and plane b's 2(l - 8) + kx - pad_left in lane l >= 8
// (elements 2l + kx of the first source and 16 + 2(l - 8) + kx of the second); zero outside the
// input and past the output row. 5x5 windows on 14x14 maps (-> 7x7) reach one element past a
// plane's 16 (right of its row: masked to zero); paired, their forward ran 1.57x faster in L2
// (232 against 365 cycles a plane) and 1.13-1.41x in process (32, 8 and 1 x672x14x14).
// (Member functions, as Columns: GCC unrolls them.) Used by the paired stride-2 walks of
// planes_block.cpp (3x3, and the 5x5 forward) and planes_rolled5.cpp (the 5x5 weight gradient).
template <int KW>
struct PairedColumns {
  __mmask16 in_row, half, valid[KW];
  int64_t base;
  __m512i index[KW];

  explicit PairedColumns(const PlaneGeometry& g)
      : in_row(lane_range(g.pad_left, g.in_w + g.pad_left)), half(lane_range(0, g.out_w)), base(-g.pad_left) {
    const __m512i even = even_lanes();
    for (int kx = 0; kx < KW; ++kx) {
      index[kx] = _mm512_add_epi32(even, _mm512_set1_epi32(kx));
      // A tap past a plane's 16 loaded columns lies right of its row (see pairs_planes): zero.
      const __mmask16 inside = static_cast<__mmask16>(half & lane_range(0, (16 - kx + 1) / 2));
      valid[kx] = static_cast<__mmask16>(inside | (inside << 8));
    }
  }

  // Input row iy of both planes, zeros where it lies outside the input.
  void load_row(const float* in_a, const float* in_b, int64_t iy, const PlaneGeometry& g, __m512* a, __m512* b) const {
    const bool inside = row_inside(iy, g.in_h);
    const int64_t offset = (inside ? iy : 0) * g.in_row_stride + base;
    *a = _mm512_maskz_loadu_ps(inside ? in_row : 0, in_a + offset);
    *b = _mm512_maskz_loadu_ps(inside ? in_row : 0, in_b + offset);
  }

  __m512 tap(int kx, __m512 a, __m512 b) const { return _mm512_maskz_permutex2var_ps(valid[kx], a, index[kx], b); }
};

}  // namespace
}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
