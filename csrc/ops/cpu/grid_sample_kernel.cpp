// Spatial Transformer sampler on CPU (Jaderberg et al., 2015). Reference ops: F.grid_sample and
// F.affine_grid + F.grid_sample (2-D; bilinear and nearest; zeros, border and reflection padding).
//
// Output pixels are processed a row chunk at a time: the chunk's source coordinates (from the
// grid, or from theta without any grid), tap offsets, weights and in-bounds masks are computed
// once into small arrays, then reused for every channel. NCHW walks channel planes with the same
// offsets; channels_last reads the four taps' channel vectors contiguously.
//
// With AVX2 (fp32), the taps of 8 pixels are computed at once (for an affine map straight from
// theta), and the sampling loops go pixel by pixel with scalar loads, channels innermost; NCHW
// beyond 8 channels goes plane by plane instead. The backward reads and adds a pixel's taps as float
// pairs (NCHW) or runs of 2C floats (channels_last, 2-4 channels) where all four are inside.
// With AVX-512, the taps go 16 pixels at once, and the forward gathers: NCHW up to 8 channels,
// channels_last with 2 to 4 (one channel is the NCHW layout). With zeros or border padding those
// forwards keep the taps in registers, row by row, instead of chunk arrays; so does the coordinate
// gradient when grad_input is not wanted. The backward with grad_input of an affine map over 1-2
// channels (zeros padding) adds grad_input by pair gathers and scatters, 16 pixels that share no tap
// at a time (backward_affine_image_lattice); otherwise, up to 8 channels, it stays on the AVX2
// loops. Images of more channels run channel vectors, pixel by pixel; NCHW ones through a
// channels_last copy of each image (and of grad_output) that stays in L2, the results transposed
// back 16 x 16 in registers.
//
// The backward runs one batch element per task and sums in a fixed order: the input-gradient
// scatter needs no atomics and results are bitwise identical run to run and across thread counts,
// so torch.use_deterministic_algorithms costs nothing here. grad_theta sums each chunk (row, on the
// coordinate-only path) in fp32 and those sums in double. With fewer batch elements than threads, the backward uses fewer threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTCNN_GRID_SAMPLE_AVX2 1
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/grid_sample_checks.h"
#include "ops/cpu/output_allocator.h"

namespace fastcnn {
namespace grid_sample {
namespace {

// Output pixels whose taps are computed together; their arrays (about 3 KiB in fp32) stay in L1
// while every channel is sampled with them.
constexpr int kChunk = 64;  // a multiple of 16: the AVX-512 taps fill whole vectors
constexpr uint8_t kAllTaps = 0xF;

template <typename acc_t>
struct alignas(32) Chunk {
  // The fp32 AVX2 path: 32-bit offsets, and the tap mask widened to 32 bits (one vector store).
  int32_t offset32[kChunk];
  int32_t bits[kChunk];
  int64_t offset[kChunk];  // flat input pixel of the north-west tap (nearest: of the sample)
  acc_t w_nw[kChunk], w_ne[kChunk], w_sw[kChunk], w_se[kChunk];
  acc_t dx0[kChunk], dx1[kChunk], dy0[kChunk], dy1[kChunk];
  acc_t scale_x[kChunk], scale_y[kChunk];  // d(pixel coordinate)/d(grid coordinate)
  acc_t gx[kChunk], gy[kChunk];            // normalised coordinates in; coordinate gradients out
  uint8_t mask[kChunk];                    // bit k set when tap k (nw, ne, sw, se) is inside
};

// Adds gout * d(sample)/d(x, y) of pixel p, from its tap values (zero outside), to ch.gx / ch.gy:
// the shared header's bilinear_coordinate_grad, the arithmetic the CUDA kernel uses.
template <typename acc_t>
inline void add_coordinate_grad(Chunk<acc_t>& ch, int p, acc_t gout, acc_t v_nw, acc_t v_ne, acc_t v_sw, acc_t v_se) {
  BilinearTaps<acc_t> taps;
  taps.dx0 = ch.dx0[p];
  taps.dx1 = ch.dx1[p];
  taps.dy0 = ch.dy0[p];
  taps.dy1 = ch.dy1[p];
  acc_t d_dx, d_dy;
  bilinear_coordinate_grad(taps, v_nw, v_ne, v_sw, v_se, &d_dx, &d_dy);
  ch.gx[p] += gout * d_dx;
  ch.gy[p] += gout * d_dy;
}

// Source of the normalised sampling coordinates of one output row chunk.
template <typename scalar_t, typename acc_t>
struct GridSource {
  const scalar_t* grid;  // [N, Ho, Wo, 2], contiguous
  int64_t out_h, out_w;
  void load(int64_t n, int64_t oy, int64_t ox0, int len, acc_t* gx, acc_t* gy) const {
    const scalar_t* g = grid + ((n * out_h + oy) * out_w + ox0) * 2;
    for (int p = 0; p < len; ++p) {
      gx[p] = static_cast<acc_t>(g[2 * p]);
      gy[p] = static_cast<acc_t>(g[2 * p + 1]);
    }
  }
};

// One output row of an affine map: x = ax * base_x + cx, y = ay * base_x + cy.
struct AffineRow {
  float ax, cx, ay, cy;
  const float* base_x;  // at the chunk's first pixel; readable 8 past the row's end
};

template <typename acc_t>
struct AffineSource {
  const acc_t* theta;   // [N, 6] in acc_t
  const acc_t* base_x;  // [Wo]: F.affine_grid's base grid
  const acc_t* base_y;  // [Ho]
  void load(int64_t n, int64_t oy, int64_t ox0, int len, acc_t* gx, acc_t* gy) const {
    const acc_t* t = theta + n * 6;
    const acc_t by = base_y[oy];
    const acc_t cx = t[1] * by + t[2], cy = t[4] * by + t[5];
    for (int p = 0; p < len; ++p) {
      const acc_t bx = base_x[ox0 + p];
      gx[p] = t[0] * bx + cx;
      gy[p] = t[3] * bx + cy;
    }
  }
  AffineRow row(int64_t n, int64_t oy, int64_t ox0) const {
    const acc_t* t = theta + n * 6;
    const acc_t by = base_y[oy];
    return {float(t[0]), float(t[1] * by + t[2]), float(t[3]), float(t[4] * by + t[5]), nullptr};
  }
  // The same map taken on to input pixels (unnormalize folded in, in double): x = ax * base_x + cx
  // is then one fma a coordinate; the coordinates differ from row()'s by an ulp or so.
  AffineRow pixel_row(int64_t n, int64_t oy, int64_t in_h, int64_t in_w, bool align_corners) const {
    const acc_t* t = theta + n * 6;
    const double by = base_y[oy];
    const double sx = align_corners ? (in_w - 1) / 2.0 : in_w / 2.0, shift_x = (in_w - 1) / 2.0;
    const double sy = align_corners ? (in_h - 1) / 2.0 : in_h / 2.0, shift_y = (in_h - 1) / 2.0;
    return {float(t[0] * sx), float((t[1] * by + t[2]) * sx + shift_x), float(t[3] * sy),
            float((t[4] * by + t[5]) * sy + shift_y), base_x};
  }
};

template <typename acc_t>
void compute_taps(Chunk<acc_t>& ch, int len, const Geometry& g) {
  for (int p = 0; p < len; ++p) {
    acc_t sx, sy;
    const acc_t ix = source_index(ch.gx[p], g.in_w, g.padding, g.align_corners, &sx);
    const acc_t iy = source_index(ch.gy[p], g.in_h, g.padding, g.align_corners, &sy);
    ch.scale_x[p] = sx;
    ch.scale_y[p] = sy;
    if (g.interpolation == Interpolation::Nearest) {
      const int64_t x = nearest_index(ix), y = nearest_index(iy);
      ch.offset[p] = y * g.in_w + x;
      ch.mask[p] = in_bounds(x, y, g.in_w, g.in_h) ? 1 : 0;
      continue;
    }
    const BilinearTaps<acc_t> t = bilinear_taps(ix, iy);
    ch.offset[p] = t.y0 * g.in_w + t.x0;
    ch.dx0[p] = t.dx0;
    ch.dx1[p] = t.dx1;
    ch.dy0[p] = t.dy0;
    ch.dy1[p] = t.dy1;
    ch.w_nw[p] = t.nw();
    ch.w_ne[p] = t.ne();
    ch.w_sw[p] = t.sw();
    ch.w_se[p] = t.se();
    const bool x0_in = t.x0 >= 0 && t.x0 < g.in_w, x1_in = t.x0 + 1 >= 0 && t.x0 + 1 < g.in_w;
    const bool y0_in = t.y0 >= 0 && t.y0 < g.in_h, y1_in = t.y0 + 1 >= 0 && t.y0 + 1 < g.in_h;
    ch.mask[p] = (x0_in && y0_in ? 1 : 0) | (x1_in && y0_in ? 2 : 0) | (x0_in && y1_in ? 4 : 0) |
                 (x1_in && y1_in ? 8 : 0);
  }
}

// sums[k] = the `count` fp32 lanes of row k of lanes[4][count], added in double in lane order
// (grad_theta's partial sums: a fixed order, and no fp32 drift over many pixels).
inline void add_lanes_in_double(const float* lanes, int count, double sums[4]) {
  for (int k = 0; k < 4; ++k) {
    double total = 0;
    for (int l = 0; l < count; ++l) total += lanes[k * count + l];
    sums[k] = total;
  }
}

// Copies the scalar taps' masks and offsets into the 32-bit arrays the AVX2 path reads (used after
// compute_taps for reflection padding, which that path leaves to scalar code).
template <typename acc_t>
void fill_lanes(Chunk<acc_t>& ch, int len) {
  for (int p = 0; p < kChunk; ++p) {
    const uint8_t m = p < len ? ch.mask[p] : 0;
    ch.offset32[p] = m ? static_cast<int32_t>(ch.offset[p]) : 0;
    ch.bits[p] = m;
  }
}

#ifdef FASTCNN_GRID_SAMPLE_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma")
// fp32 kernels with AVX2: the taps of 8 pixels at once, and the pixel loops that read taps only
// where the 4-bit mask says they are inside (so a tap outside the input reads exactly zero, never
// 0 * NaN). Used when the CPU has AVX2 and FMA; the templates above are the fallback and the
// fp64/fp16/bf16 path. Same arithmetic as grid_sample_coords.h, lane-parallel.
namespace avx2 {

inline __m256i tail_mask(int remaining) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(remaining), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Per-axis constants of the taps loop, broadcast once per call rather than per 8 pixels.
struct Axis {
  __m256 size, size_m1, scale, clamp_high;
  __m256i size_i;
  Axis(int64_t n, bool align_corners)
      : size(_mm256_set1_ps(float(n))),
        size_m1(_mm256_set1_ps(float(n - 1))),
        scale(_mm256_set1_ps(align_corners ? float(n - 1) / 2.0f : float(n) / 2.0f)),
        clamp_high(_mm256_set1_ps(float(n))),
        size_i(_mm256_set1_epi32(static_cast<int32_t>(n))) {}
};

// unnormalize + (border) clip + safe_coordinate for 8 lanes; *scale as in source_index.
inline __m256 source_index8(__m256 coord, const Axis& axis, bool border, bool align_corners, __m256* scale) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  __m256 x;
  if (align_corners) {
    x = _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(coord, one), half), axis.size_m1);
  } else {
    x = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(_mm256_add_ps(coord, one), axis.size), one), half);
  }
  *scale = axis.scale;
  if (border) {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_cmp_ps(x, axis.size_m1, _CMP_LT_OQ));
    *scale = _mm256_and_ps(*scale, inside);
    // Operand order keeps NaN (max/min return the second operand when either is NaN).
    x = _mm256_min_ps(axis.size_m1, _mm256_max_ps(zero, x));
  }
  const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-2147483648.0f), _CMP_GT_OQ),
                                  _mm256_cmp_ps(x, _mm256_set1_ps(2147483520.0f), _CMP_LT_OQ));
  return _mm256_blendv_ps(_mm256_set1_ps(-100.0f), x, ok);
}

// Integer pixel of a floored/rounded coordinate, clamped to [-2, size] first so the cast and the
// offset arithmetic stay small; every clamped value is still outside for the taps it must miss.
inline __m256i to_index(__m256 f, const Axis& axis) {
  return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(f, _mm256_set1_ps(-2.0f)), axis.clamp_high));
}

inline __m256i inside(__m256i i, const Axis& axis) {
  return _mm256_and_si256(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(axis.size_i, i));
}

// compute_taps for fp32 with zeros or border padding; fills the scalar offset/mask arrays too when
// scalar consumers (the wide channels_last loops) will read them, and the coordinate-gradient
// terms only for a backward: stores, not arithmetic, bound this loop.
// With `affine`, the normalised coordinates come from the row's map in registers instead of
// ch.gx / ch.gy.
void taps(Chunk<float>& ch, int len, const Geometry& g, bool scalar_arrays, bool grad_terms, const AffineRow* affine) {
  const bool border = g.padding == Padding::Border;
  const bool nearest = g.interpolation == Interpolation::Nearest;
  const __m256i width = _mm256_set1_epi32(static_cast<int32_t>(g.in_w));
  const Axis ax(g.in_w, g.align_corners), ay(g.in_h, g.align_corners);
  for (int p = 0; p < len; p += 8) {
    const __m256i live = tail_mask(len - p);
    __m256 sx, sy;
    __m256 gx, gy;
    if (affine) {
      const __m256 bx = _mm256_loadu_ps(affine->base_x + p);
      // mul then add, not fma: the same rounding as AffineSource::load and the scalar path.
      gx = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(affine->ax), bx), _mm256_set1_ps(affine->cx));
      gy = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(affine->ay), bx), _mm256_set1_ps(affine->cy));
    } else {
      // Lanes past the chunk as zero: stale (or uninitialised) values there can be denormal,
      // and arithmetic on them costs microcode assists (see theta_chunk_sums).
      gx = _mm256_maskload_ps(ch.gx + p, live);
      gy = _mm256_maskload_ps(ch.gy + p, live);
    }
    const __m256 ix = source_index8(gx, ax, border, g.align_corners, &sx);
    const __m256 iy = source_index8(gy, ay, border, g.align_corners, &sy);
    if (grad_terms) {
      _mm256_store_ps(ch.scale_x + p, sx);
      _mm256_store_ps(ch.scale_y + p, sy);
    }
    if (nearest) {
      const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      const __m256i x = to_index(_mm256_round_ps(ix, round), ax), y = to_index(_mm256_round_ps(iy, round), ay);
      const __m256i in = _mm256_and_si256(_mm256_and_si256(inside(x, ax), inside(y, ay)), live);
      _mm256_store_si256(reinterpret_cast<__m256i*>(ch.offset32 + p), _mm256_add_epi32(_mm256_mullo_epi32(y, width), x));
      _mm256_store_si256(reinterpret_cast<__m256i*>(ch.bits + p), _mm256_and_si256(in, _mm256_set1_epi32(1)));
      continue;
    }
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256 fx = _mm256_floor_ps(ix), fy = _mm256_floor_ps(iy);
    const __m256 dx0 = _mm256_sub_ps(ix, fx), dx1 = _mm256_sub_ps(_mm256_add_ps(fx, one), ix);
    const __m256 dy0 = _mm256_sub_ps(iy, fy), dy1 = _mm256_sub_ps(_mm256_add_ps(fy, one), iy);
    if (grad_terms) {
      _mm256_store_ps(ch.dx0 + p, dx0);
      _mm256_store_ps(ch.dx1 + p, dx1);
      _mm256_store_ps(ch.dy0 + p, dy0);
      _mm256_store_ps(ch.dy1 + p, dy1);
    }
    _mm256_store_ps(ch.w_nw + p, _mm256_mul_ps(dx1, dy1));
    _mm256_store_ps(ch.w_ne + p, _mm256_mul_ps(dx0, dy1));
    _mm256_store_ps(ch.w_sw + p, _mm256_mul_ps(dx1, dy0));
    _mm256_store_ps(ch.w_se + p, _mm256_mul_ps(dx0, dy0));
    const __m256i x0 = to_index(fx, ax), y0 = to_index(fy, ay);
    const __m256i ones = _mm256_set1_epi32(1);
    const __m256i x0_in = inside(x0, ax), x1_in = inside(_mm256_add_epi32(x0, ones), ax);
    const __m256i y0_in = _mm256_and_si256(inside(y0, ay), live);
    const __m256i y1_in = _mm256_and_si256(inside(_mm256_add_epi32(y0, ones), ay), live);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ch.offset32 + p), _mm256_add_epi32(_mm256_mullo_epi32(y0, width), x0));
    const __m256i bit = _mm256_set1_epi32(1);
    __m256i bits = _mm256_and_si256(_mm256_and_si256(x0_in, y0_in), bit);
    bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_and_si256(x1_in, y0_in), _mm256_slli_epi32(bit, 1)));
    bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_and_si256(x0_in, y1_in), _mm256_slli_epi32(bit, 2)));
    bits = _mm256_or_si256(bits, _mm256_and_si256(_mm256_and_si256(x1_in, y1_in), _mm256_slli_epi32(bit, 3)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(ch.bits + p), bits);
  }
  for (int p = 0; scalar_arrays && p < len; ++p) {
    ch.offset[p] = ch.offset32[p];
    ch.mask[p] = static_cast<uint8_t>(ch.bits[p]);
  }
}


// Strides of one image in elements: channel stride and pixel stride (NCHW: H*W and 1;
// channels_last: 1 and C). The pixel loops below serve NCHW at any C and channels_last at small C.
struct Strides {
  int64_t in_c, in_p, out_c, out_p;
};

// One row chunk, every channel. Pixel by pixel with scalar loads: the four taps of a pixel sit in
// two cache lines of each plane, and scalar loads beat masked vgatherdps on this CPU (gathers
// measured 10-20% slower on 3x64x64 and 3x224x224); the pixel's weights stay in registers
// across its channels.
// kChannels > 0 fixes the channel count at compile time (1 and 3: grayscale and RGB inputs, where
// a runtime channel loop per pixel costs more than the pixel's arithmetic).
template <int kChannels>
void forward_pixels(const float* input, float* output, const Chunk<float>& ch, int len, int64_t channels_arg,
                    const Strides& st, int64_t in_w, bool bilinear) {
  const int64_t channels = kChannels > 0 ? kChannels : channels_arg;
  const int64_t right = st.in_p, down = in_w * st.in_p;
  for (int p = 0; p < len; ++p) {
    const float* src = input + ch.offset32[p] * st.in_p;
    float* out = output + p * st.out_p;
    if (!bilinear) {
      if (ch.bits[p]) {
        for (int64_t c = 0; c < channels; ++c) out[c * st.out_c] = src[c * st.in_c];
      } else {
        for (int64_t c = 0; c < channels; ++c) out[c * st.out_c] = 0.0f;
      }
      continue;
    }
    const float w_nw = ch.w_nw[p], w_ne = ch.w_ne[p], w_sw = ch.w_sw[p], w_se = ch.w_se[p];
    if (ch.bits[p] == kAllTaps) {
      for (int64_t c = 0; c < channels; ++c) {
        const float* s = src + c * st.in_c;
        // Two independent halves: a shorter dependency chain than four chained FMAs.
        out[c * st.out_c] = (s[0] * w_nw + s[right] * w_ne) + (s[down] * w_sw + s[down + right] * w_se);
      }
      continue;
    }
    const int32_t m = ch.bits[p];
    const bool nw = m & 1, ne = m & 2, sw = m & 4, se = m & 8;
    for (int64_t c = 0; c < channels; ++c) {
      const float* s = src + c * st.in_c;
      float v = 0.0f;
      if (nw) v += s[0] * w_nw;
      if (ne) v += s[right] * w_ne;
      if (sw) v += s[down] * w_sw;
      if (se) v += s[down + right] * w_se;
      out[c * st.out_c] = v;
    }
  }
}

// One row chunk of the backward, every channel, in a fixed order: pixel by pixel, and for each
// pixel its channels (scatter into grad_input, and the coordinate gradient summed over
// channels into ch.gx / ch.gy, before the scale).
// What to compute is fixed at compile time: runtime flags tested in the channel loop cost a
// tenth of the backward (measured on 8x3x224x224).
constexpr int kPairStride = 4;

inline __m128 load_pair(const float* p) { return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p))); }
inline void store_pair(float* p, __m128 v) { _mm_store_sd(reinterpret_cast<double*>(p), _mm_castps_pd(v)); }

// Pixel p's coordinate gradient (summed over channels) into ch.gx / ch.gy, added to what earlier
// channel blocks left there when kAccumulate.
template <bool kAccumulate>
inline void put_coordinate_grad(Chunk<float>& ch, int p, float gx, float gy) {
  if (kAccumulate) {
    ch.gx[p] += gx;
    ch.gy[p] += gy;
  } else {
    ch.gx[p] = gx;
    ch.gy[p] = gy;
  }
}

// backward_pixels for one NCHW pixel whose four taps are inside, on float pairs (see there).
// source / target: the north-west tap in channel 0 of the input and of grad_input.
template <int kChannels, bool kAccumulate, bool kInput, bool kCoords>
inline void backward_pixel_pairs(const float* source, const float* go, float* target, Chunk<float>& ch, int p,
                                 int64_t channels_arg, int64_t in_hw, int64_t out_hw, int64_t in_w) {
  const int64_t channels = kChannels > 0 ? kChannels : channels_arg;
  const __m128 w_north = _mm_unpacklo_ps(_mm_set_ss(ch.w_nw[p]), _mm_set_ss(ch.w_ne[p]));
  const __m128 w_south = _mm_unpacklo_ps(_mm_set_ss(ch.w_sw[p]), _mm_set_ss(ch.w_se[p]));
  const __m128 dy1 = _mm_set1_ps(ch.dy1[p]), dy0 = _mm_set1_ps(ch.dy0[p]);
  // Summed over channels: gout * (south - north) and gout * (north * dy1 + south * dy0), pairs.
  __m128 sum_d = _mm_setzero_ps(), sum_q = _mm_setzero_ps();
  for (int64_t c = 0; c < channels; ++c) {
    const __m128 g = _mm_set1_ps(go[c * out_hw]);
    if (kCoords) {
      const float* s = source + c * in_hw;
      const __m128 north = load_pair(s), south = load_pair(s + in_w);
      sum_d = _mm_fmadd_ps(g, _mm_sub_ps(south, north), sum_d);
      sum_q = _mm_fmadd_ps(g, _mm_fmadd_ps(north, dy1, _mm_mul_ps(south, dy0)), sum_q);
    }
    if (kInput) {
      float* d = target + c * in_hw;
      store_pair(d, _mm_add_ps(load_pair(d), _mm_mul_ps(w_north, g)));
      store_pair(d + in_w, _mm_add_ps(load_pair(d + in_w), _mm_mul_ps(w_south, g)));
    }
  }
  float gx = 0.0f, gy = 0.0f;
  if (kCoords) {
    alignas(16) float d[4], q[4];
    _mm_store_ps(d, sum_d);
    _mm_store_ps(q, sum_q);
    // bilinear_coordinate_grad: d/dx = (ne - nw) dy1 + (se - sw) dy0, d/dy = (sw - nw) dx1 + (se - ne) dx0.
    gx = q[1] - q[0];
    gy = d[0] * ch.dx1[p] + d[1] * ch.dx0[p];
  }
  put_coordinate_grad<kAccumulate>(ch, p, gx, gy);
}

// The same for a channels_last pixel of kChannels (2-4) channels: its north taps are one run of
// 2 * kChannels floats (nw's channels, then ne's), as are its south ones; read and added with
// masked 8-lane loads and stores. down: the input's row stride in floats.
template <int kChannels, bool kAccumulate, bool kInput, bool kCoords>
inline void backward_pixel_runs(const float* source, const float* go, float* target, Chunk<float>& ch, int p,
                                int64_t down) {
  constexpr int kRun = 2 * kChannels;
  constexpr int kHigh = ((1 << kRun) - 1) & ~((1 << kChannels) - 1);  // the ne / se lanes
  const __m256i run = tail_mask(kRun);
  const __m256i duplicate = _mm256_setr_epi32(0 % kChannels, 1 % kChannels, 2 % kChannels, 3 % kChannels,
                                              4 % kChannels, 5 % kChannels, 6 % kChannels, 7 % kChannels);
  // gout of each channel, for both taps of the run (lanes past the run are masked off below).
  const __m256 g = _mm256_permutevar8x32_ps(_mm256_maskload_ps(go, tail_mask(kChannels)), duplicate);
  if (kInput) {
    const __m256 w_north = _mm256_blend_ps(_mm256_set1_ps(ch.w_nw[p]), _mm256_set1_ps(ch.w_ne[p]), kHigh);
    const __m256 w_south = _mm256_blend_ps(_mm256_set1_ps(ch.w_sw[p]), _mm256_set1_ps(ch.w_se[p]), kHigh);
    _mm256_maskstore_ps(target, run, _mm256_fmadd_ps(w_north, g, _mm256_maskload_ps(target, run)));
    _mm256_maskstore_ps(target + down, run, _mm256_fmadd_ps(w_south, g, _mm256_maskload_ps(target + down, run)));
  }
  float gx = 0.0f, gy = 0.0f;
  if (kCoords) {
    const __m256 north = _mm256_maskload_ps(source, run), south = _mm256_maskload_ps(source + down, run);
    // Lane sums of gout * (south - north) and gout * (north * dy1 + south * dy0); the lanes past
    // the run hold zeros (masked loads).
    alignas(32) float d[8], q[8];
    _mm256_store_ps(d, _mm256_mul_ps(g, _mm256_sub_ps(south, north)));
    _mm256_store_ps(q, _mm256_mul_ps(g, _mm256_fmadd_ps(north, _mm256_set1_ps(ch.dy1[p]),
                                                        _mm256_mul_ps(south, _mm256_set1_ps(ch.dy0[p])))));
    float d_west = 0.0f, d_east = 0.0f, q_west = 0.0f, q_east = 0.0f;
    for (int c = 0; c < kChannels; ++c) {
      d_west += d[c];
      d_east += d[kChannels + c];
      q_west += q[c];
      q_east += q[kChannels + c];
    }
    // bilinear_coordinate_grad summed over channels (see backward_pixel_pairs).
    gx = q_east - q_west;
    gy = d_west * ch.dx1[p] + d_east * ch.dx0[p];
  }
  put_coordinate_grad<kAccumulate>(ch, p, gx, gy);
}

template <int kChannels, bool kAccumulate, bool kInput, bool kCoords>
void backward_pixels(const float* input, const float* grad_output, float* grad_input, Chunk<float>& ch, int len,
                     int64_t channels_arg, const Strides& st, int64_t in_w, bool bilinear) {
  constexpr bool want_input = kInput, want_coords = kCoords;
  const int64_t channels = kChannels > 0 ? kChannels : channels_arg;
  const int64_t in_hw = st.in_c, out_hw = st.out_c, right = st.in_p, down = in_w * st.in_p;
  // NCHW with every tap inside: each row's two taps (nw, ne and sw, se) are adjacent, so they are
  // read, and their grad_input added, as float pairs (64-bit loads and stores): half the memory
  // operations. Neighbouring pixels' pairs overlap ([o, o + 1], then [o + 1, o + 2]), and a load
  // that overlaps a store still in flight waits for it: the pixels go every kStride-th, kStride
  // passes, so overlapping pairs are far apart in time. 32x3x64x64, 2 threads: grad_input alone
  // 1.6x faster, with grad_theta 1.3x; every pixel in turn instead of every 4th: 1.2-1.8x slower.
  // channels_last images of 2-4 channels read and add the same way a run of 2C floats
  // (backward_pixel_runs).
  const bool pairs = st.in_p == 1;
  constexpr bool kRunChannels = kChannels >= 2 && kChannels <= 4;
  const bool runs = kRunChannels && st.in_p == kChannels;
  const int stride = pairs || runs ? kPairStride : 1;
  for (int phase = 0; phase < stride; ++phase)
  for (int p = phase; p < len; p += stride) {
    const int64_t o = ch.offset32[p] * st.in_p;
    const float* go = grad_output + p * st.out_p;
    if (pairs && bilinear && ch.bits[p] == kAllTaps) {
      backward_pixel_pairs<kChannels, kAccumulate, kInput, kCoords>(input + o, go, want_input ? grad_input + o : nullptr,
                                                                    ch, p, channels, in_hw, out_hw, in_w);
      continue;
    }
    if constexpr (kRunChannels) {
      if (runs && bilinear && ch.bits[p] == kAllTaps) {
        backward_pixel_runs<kChannels, kAccumulate, kInput, kCoords>(input + o, go, want_input ? grad_input + o : nullptr,
                                                                     ch, p, in_w * kChannels);
        continue;
      }
    }
    if (!bilinear) {
      if (want_input && ch.bits[p]) {
        for (int64_t c = 0; c < channels; ++c) grad_input[o + c * in_hw] += go[c * out_hw];
      }
      if (!kAccumulate) ch.gx[p] = ch.gy[p] = 0.0f;
      continue;
    }
    const float w_nw = ch.w_nw[p], w_ne = ch.w_ne[p], w_sw = ch.w_sw[p], w_se = ch.w_se[p];
    const float dx0 = ch.dx0[p], dx1 = ch.dx1[p], dy0 = ch.dy0[p], dy1 = ch.dy1[p];
    float gx = 0.0f, gy = 0.0f;
    if (ch.bits[p] == kAllTaps) {
      for (int64_t c = 0; c < channels; ++c) {
        const float g = go[c * out_hw];
        if (want_coords) {
          const float* s = input + o + c * in_hw;
          const float nw = s[0], ne = s[right], sw = s[down], se = s[down + right];
          gx += g * ((ne - nw) * dy1 + (se - sw) * dy0);
          gy += g * ((sw - nw) * dx1 + (se - ne) * dx0);
        }
        if (want_input) {
          float* d = grad_input + o + c * in_hw;
          d[0] += w_nw * g;
          d[right] += w_ne * g;
          d[down] += w_sw * g;
          d[down + right] += w_se * g;
        }
      }
    } else if (ch.bits[p] != 0) {
      const int32_t m = ch.bits[p];
      const bool in_nw = m & 1, in_ne = m & 2, in_sw = m & 4, in_se = m & 8;
      for (int64_t c = 0; c < channels; ++c) {
        const float g = go[c * out_hw];
        const float* s = input + o + c * in_hw;
        if (want_coords) {
          const float nw = in_nw ? s[0] : 0.0f, ne = in_ne ? s[right] : 0.0f;
          const float sw = in_sw ? s[down] : 0.0f, se = in_se ? s[down + right] : 0.0f;
          gx += g * ((ne - nw) * dy1 + (se - sw) * dy0);
          gy += g * ((sw - nw) * dx1 + (se - ne) * dx0);
        }
        if (want_input) {
          float* d = grad_input + o + c * in_hw;
          if (in_nw) d[0] += w_nw * g;
          if (in_ne) d[right] += w_ne * g;
          if (in_sw) d[down] += w_sw * g;
          if (in_se) d[down + right] += w_se * g;
        }
      }
    }
    put_coordinate_grad<kAccumulate>(ch, p, gx, gy);
  }
}

// Beyond this many NCHW channels, blocks of kChannelBlock planes: a pixel's taps in 64 planes hit
// 64 different pages, and the TLB misses cost more than re-reading the chunk's weights once per
// block (8x64x56x56, one thread: pixel-outer 2x slower than plane by plane, which blocks of 4
// beat by another 1.4x forward and 2.2x backward; blocks of 2 or 8 were slower than 4).
constexpr int64_t kPlaneByPlaneChannels = 8;
constexpr int kChannelBlock = 4;

void forward_row(const float* input, float* output, const Chunk<float>& ch, int len, int64_t channels,
                 const Strides& st, int64_t in_w, bool bilinear) {
  if (st.in_p == 1 && channels > kPlaneByPlaneChannels) {
    int64_t c = 0;
    for (; c + kChannelBlock <= channels; c += kChannelBlock)
      forward_pixels<kChannelBlock>(input + c * st.in_c, output + c * st.out_c, ch, len, kChannelBlock, st, in_w,
                                    bilinear);
    for (; c < channels; ++c)
      forward_pixels<1>(input + c * st.in_c, output + c * st.out_c, ch, len, 1, st, in_w, bilinear);
    return;
  }
  if (channels == 1) return forward_pixels<1>(input, output, ch, len, channels, st, in_w, bilinear);
  if (channels == 3) return forward_pixels<3>(input, output, ch, len, channels, st, in_w, bilinear);
  forward_pixels<0>(input, output, ch, len, channels, st, in_w, bilinear);
}

template <int kChannels, bool kAccumulate>
void backward_pixels_for(const float* input, const float* grad_output, float* grad_input, Chunk<float>& ch, int len,
                         int64_t channels, const Strides& st, int64_t in_w, bool bilinear, bool want_input,
                         bool want_coords) {
  if (want_input && want_coords) {
    backward_pixels<kChannels, kAccumulate, true, true>(input, grad_output, grad_input, ch, len, channels, st, in_w,
                                                        bilinear);
  } else if (want_input) {
    backward_pixels<kChannels, kAccumulate, true, false>(input, grad_output, grad_input, ch, len, channels, st, in_w,
                                                         bilinear);
  } else {
    backward_pixels<kChannels, kAccumulate, false, true>(input, grad_output, grad_input, ch, len, channels, st, in_w,
                                                         bilinear);
  }
}

void backward_row(const float* input, const float* grad_output, float* grad_input, Chunk<float>& ch, int len,
                  int64_t channels, const Strides& st, int64_t in_w, bool bilinear, bool want_input, bool want_coords) {
  if (st.in_p == 1 && channels > kPlaneByPlaneChannels) {
    std::fill(ch.gx, ch.gx + len, 0.0f);
    std::fill(ch.gy, ch.gy + len, 0.0f);
    int64_t c = 0;
    for (; c + kChannelBlock <= channels; c += kChannelBlock) {
      backward_pixels_for<kChannelBlock, true>(input + c * st.in_c, grad_output + c * st.out_c,
                                               want_input ? grad_input + c * st.in_c : nullptr, ch, len,
                                               kChannelBlock, st, in_w, bilinear, want_input, want_coords);
    }
    for (; c < channels; ++c) {
      backward_pixels_for<1, true>(input + c * st.in_c, grad_output + c * st.out_c,
                                   want_input ? grad_input + c * st.in_c : nullptr, ch, len, 1, st, in_w, bilinear,
                                   want_input, want_coords);
    }
    return;
  }
  if (channels == 1)
    return backward_pixels_for<1, false>(input, grad_output, grad_input, ch, len, channels, st, in_w, bilinear,
                                         want_input, want_coords);
  if (channels == 3)
    return backward_pixels_for<3, false>(input, grad_output, grad_input, ch, len, channels, st, in_w, bilinear,
                                         want_input, want_coords);
  // channels_last pairs of channels and RGBA-like images: the runs of backward_pixel_runs.
  if (channels == 2 && st.in_p == 2)
    return backward_pixels_for<2, false>(input, grad_output, grad_input, ch, len, channels, st, in_w, bilinear,
                                         want_input, want_coords);
  if (channels == 4 && st.in_p == 4)
    return backward_pixels_for<4, false>(input, grad_output, grad_input, ch, len, channels, st, in_w, bilinear,
                                         want_input, want_coords);
  backward_pixels_for<0, false>(input, grad_output, grad_input, ch, len, channels, st, in_w, bilinear, want_input,
                                want_coords);
}

// Sums over a chunk for grad_theta: dx, dx * base_x, dy, dy * base_x (dx, dy: the coordinate
// gradients times their scales), in fp32 lanes in a fixed order, returned in double. Four
// chained double adds per pixel cost more than the rest of the pixel's theta work.
void theta_chunk_sums(const Chunk<float>& ch, int len, const float* base_x, double sums[4]) {
  __m256 sx = _mm256_setzero_ps(), sxx = sx, sy = sx, syx = sx;
  for (int p = 0; p < len; p += 8) {
    // Lanes past the chunk load as zero. The arrays hold stale values there (uninitialised stack
    // the first time); multiplied before masking, a denormal one cost a microcode assist, about a
    // hundred cycles a row: 40% of the 64x1x28x28 backward (one thread, 0.59 -> 0.36 ms).
    const __m256i live = tail_mask(len - p);
    const __m256 dx = _mm256_mul_ps(_mm256_maskload_ps(ch.gx + p, live), _mm256_maskload_ps(ch.scale_x + p, live));
    const __m256 dy = _mm256_mul_ps(_mm256_maskload_ps(ch.gy + p, live), _mm256_maskload_ps(ch.scale_y + p, live));
    const __m256 bx = _mm256_maskload_ps(base_x + p, live);
    sx = _mm256_add_ps(sx, dx);
    sxx = _mm256_fmadd_ps(dx, bx, sxx);
    sy = _mm256_add_ps(sy, dy);
    syx = _mm256_fmadd_ps(dy, bx, syx);
  }
  alignas(32) float lanes[4][8];
  _mm256_store_ps(lanes[0], sx);
  _mm256_store_ps(lanes[1], sxx);
  _mm256_store_ps(lanes[2], sy);
  _mm256_store_ps(lanes[3], syx);
  add_lanes_in_double(lanes[0], 8, sums);
}

}  // namespace avx2
#pragma GCC pop_options

// AVX-512 (fp32): the taps of 16 pixels at once, and a forward that reads the taps by gathers
// (taps outside the input read zero without a load): for NCHW images of up to 8 channels, and for
// channels_last images of 2 to 4. On the Intel Xeon of 2026-11-30 PyTorch's own AVX-512
// grid_sample is 2-3x faster than on the AVX2 machine the loops above were tuned on; 16-lane
// gathers took our forward over the three STN shapes from 1.2x to 1.8x PyTorch's (NCHW, geomean),
// pair gathers to about 2.2x. Gathers across 64 planes measured 10% slower than the AVX2 blocks
// of planes, so wider images keep those. Taps kept in registers instead of chunk arrays (and an
// affine map taken straight to pixels, its clamp folded into one min/max) made the forward
// 1.05-1.3x faster again (64x1x28x28 most: two vectors a row, so the arrays cost the most).
// Tried for the backward and left out: gather, add and scatter of grad_input with the lanes that
// share an element summed first (vpconflictd runs): 0.6-0.7x the speed of the AVX2 scalar loop,
// whose loads the coordinate gradient shares; and grad_input scattered lane by lane from vectors
// stored to the stack: 0.4-0.65x.
// FASTCNN_AVX512=0 turns this off (read once per call).
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12 warns that the placeholder operand of _mm512_min_ps, _max_ps, _cvttps_epi32 and
// _extracti64x4_epi64 may be (or is) uninitialised: it is unused (every lane is written).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace avx512 {

// The taps of 16 output pixels in registers (see Chunk for the fields).
struct Taps16 {
  __m512i offset;
  __m512 w_nw, w_ne, w_sw, w_se;
  __mmask16 nw, ne, sw, se;  // tap inside; nearest: nw only
  __m512 dx0, dx1, dy0, dy1, scale_x, scale_y;
};

// The north (or south) taps of 16 pixels, x0 and x0 + 1, in an image of kChannels interleaved
// channels (1: an NCHW plane): one run of 2 * kChannels floats per pixel, read as kChannels float
// pairs by 8-lane 64-bit gathers. That is half the elements of 16-lane gathers, at about 0.6 of
// their time on the Intel Xeon (3.6 vs 5.6-6.9 cycles a gather; the NCHW forward of the three STN
// shapes 7-15% faster). v[j] is element j of the run (nw/sw channel j, then ne/se channel
// j - kChannels), zeroed where its tap lies outside. A run is read where either tap is inside and
// it lies in the image (`safe`); a tap inside whose run straddles the image's edge (x0 = -1 on
// the first row, x0 = W - 1 on the last) comes from a 16-lane gather instead.
template <int kChannels>
inline void gather_run(const float* image, __m512i pixel, __mmask16 left_inside, __mmask16 right_inside,
                       __mmask16 safe, __m512* v) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i first = kChannels == 1 ? pixel : _mm512_mullo_epi32(pixel, _mm512_set1_epi32(kChannels));
  const __mmask16 either = left_inside | right_inside, paired = either & safe;
#pragma GCC unroll 4
  for (int k = 0; k < kChannels; ++k) {
    const __m512i index = _mm512_add_epi32(first, _mm512_set1_epi32(2 * k));
    const __m512 low = _mm512_castpd_ps(_mm512_mask_i32gather_pd(
        _mm512_setzero_pd(), static_cast<__mmask8>(paired), _mm512_castsi512_si256(index), image, 4));
    const __m512 high = _mm512_castpd_ps(_mm512_mask_i32gather_pd(
        _mm512_setzero_pd(), static_cast<__mmask8>(paired >> 8), _mm512_extracti64x4_epi64(index, 1), image, 4));
    v[2 * k] = _mm512_maskz_permutex2var_ps(2 * k < kChannels ? left_inside : right_inside, low, even, high);
    v[2 * k + 1] = _mm512_maskz_permutex2var_ps(2 * k + 1 < kChannels ? left_inside : right_inside, low, odd, high);
  }
  const __mmask16 straddling = either & ~safe;
  if (straddling) {
#pragma GCC unroll 8
    for (int j = 0; j < 2 * kChannels; ++j)
      v[j] = _mm512_mask_i32gather_ps(v[j], (j < kChannels ? left_inside : right_inside) & straddling,
                                      _mm512_add_epi32(first, _mm512_set1_epi32(j)), image, 4);
  }
}

// The forward of 16 NCHW output pixels (`live` of them), every channel, from their taps.
inline void sample_nchw(const float* input, float* out, const Taps16& t, __mmask16 live, int64_t channels,
                        int64_t in_hw, int64_t out_hw, int64_t in_w, bool bilinear) {
  const __m512 zero = _mm512_setzero_ps();
  if (!bilinear) {
    for (int64_t c = 0; c < channels; ++c)
      _mm512_mask_storeu_ps(out + c * out_hw, live, _mm512_mask_i32gather_ps(zero, t.nw, t.offset, input + c * in_hw, 4));
    return;
  }
  // A pair from element e is inside the plane when 0 <= e <= in_hw - 2.
  const __m512i pair_low = _mm512_set1_epi32(-1), pair_high = _mm512_set1_epi32(static_cast<int32_t>(in_hw - 1));
  const __m512i south = _mm512_add_epi32(t.offset, _mm512_set1_epi32(static_cast<int32_t>(in_w)));
  const __mmask16 north_safe = _mm512_cmpgt_epi32_mask(t.offset, pair_low) & _mm512_cmplt_epi32_mask(t.offset, pair_high);
  const __mmask16 south_safe = _mm512_cmpgt_epi32_mask(south, pair_low) & _mm512_cmplt_epi32_mask(south, pair_high);
  for (int64_t c = 0; c < channels; ++c) {
    const float* plane = input + c * in_hw;
    __m512 top[2], bottom[2];  // nw, ne and sw, se
    gather_run<1>(plane, t.offset, t.nw, t.ne, north_safe, top);
    gather_run<1>(plane, south, t.sw, t.se, south_safe, bottom);
    // Two independent halves, as the scalar loop; a tap outside reads 0 and its weight is finite.
    const __m512 north = _mm512_fmadd_ps(top[1], t.w_ne, _mm512_mul_ps(top[0], t.w_nw));
    const __m512 south_sum = _mm512_fmadd_ps(bottom[1], t.w_se, _mm512_mul_ps(bottom[0], t.w_sw));
    _mm512_mask_storeu_ps(out + c * out_hw, live, _mm512_add_ps(north, south_sum));
  }
}

// Output vector k of a 16-pixel channels_last block holds interleaved elements 16k..16k+15: pixel
// (16k + i) / C, channel (16k + i) % C. Built once per call.
template <int kChannels>
struct Interleave {
  __m512i pixel_of[kChannels];
  __mmask16 channel_lanes[kChannels][kChannels];
  Interleave() {
    for (int k = 0; k < kChannels; ++k) {
      alignas(64) int32_t pixels[16];
      for (int c = 0; c < kChannels; ++c) channel_lanes[k][c] = 0;
      for (int i = 0; i < 16; ++i) {
        pixels[i] = (16 * k + i) / kChannels;
        channel_lanes[k][(16 * k + i) % kChannels] |= static_cast<__mmask16>(1u << i);
      }
      pixel_of[k] = _mm512_load_si512(pixels);
    }
  }
};

// The bilinear forward of 16 output pixels (`count` of them) of a channels_last image of kChannels
// channels; the channel vectors are interleaved by permutes into kChannels output vectors (three
// scatters cost more than the gathers: 32x3x64x64 forward 1.5x PyTorch with them).
template <int kChannels>
inline void sample_nhwc_small(const float* image, float* out, const Taps16& t, int count, int64_t in_hw, int64_t in_w,
                              const Interleave<kChannels>& il) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i pair_low = _mm512_set1_epi32(-1), pair_high = _mm512_set1_epi32(static_cast<int32_t>(in_hw - 1));
  const __m512i south = _mm512_add_epi32(t.offset, _mm512_set1_epi32(static_cast<int32_t>(in_w)));
  const __mmask16 north_safe = _mm512_cmpgt_epi32_mask(t.offset, pair_low) & _mm512_cmplt_epi32_mask(t.offset, pair_high);
  const __mmask16 south_safe = _mm512_cmpgt_epi32_mask(south, pair_low) & _mm512_cmplt_epi32_mask(south, pair_high);
  __m512 top[2 * kChannels], bottom[2 * kChannels];
  gather_run<kChannels>(image, t.offset, t.nw, t.ne, north_safe, top);
  gather_run<kChannels>(image, south, t.sw, t.se, south_safe, bottom);
  __m512 value[kChannels];
#pragma GCC unroll 4
  for (int c = 0; c < kChannels; ++c) {
    // Two independent halves, as the scalar loop.
    const __m512 north = _mm512_fmadd_ps(top[kChannels + c], t.w_ne, _mm512_mul_ps(top[c], t.w_nw));
    const __m512 south_sum = _mm512_fmadd_ps(bottom[kChannels + c], t.w_se, _mm512_mul_ps(bottom[c], t.w_sw));
    value[c] = _mm512_add_ps(north, south_sum);
  }
  const int elements = count * kChannels;
#pragma GCC unroll 4
  for (int k = 0; k < kChannels; ++k) {
    __m512 interleaved = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int c = 0; c < kChannels; ++c)
      interleaved = _mm512_mask_permutexvar_ps(interleaved, il.channel_lanes[k][c], il.pixel_of[k], value[c]);
    _mm512_mask_storeu_ps(out + 16 * k, _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(elements - 16 * k)),
                          interleaved);
  }
}

// Per-axis constants of taps() (see avx2::Axis).
struct Axis {
  __m512 size, size_m1, scale, clamp_high;
  __m512i size_i;
  Axis(int64_t n, bool align_corners)
      : size(_mm512_set1_ps(float(n))),
        size_m1(_mm512_set1_ps(float(n - 1))),
        scale(_mm512_set1_ps(align_corners ? float(n - 1) / 2.0f : float(n) / 2.0f)),
        clamp_high(_mm512_set1_ps(float(n))),
        size_i(_mm512_set1_epi32(static_cast<int32_t>(n))) {}
};

// F.grid_sample's unnormalize of 16 normalised coordinates (as avx2::source_index8).
inline __m512 unnormalize16(__m512 coord, const Axis& axis, bool align_corners) {
  const __m512 one = _mm512_set1_ps(1.0f), half = _mm512_set1_ps(0.5f);
  if (align_corners) return _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(coord, one), half), axis.size_m1);
  return _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(_mm512_add_ps(coord, one), axis.size), one), half);
}

// Border padding's clip (and its zero scale outside), then a clamp to [-2, size]. A NaN becomes -2
// (max returns its second operand when either is NaN), an infinite or huge value the nearest
// bound. The clamp keeps every tap that is inside, and its weight; a pixel it moves has all its
// taps outside, where the weights are finite and unused. So floor and cast need no other guard
// (the scalar path's safe_coordinate, in two instructions).
inline __m512 clip16(__m512 x, const Axis& axis, bool border, __m512* scale) {
  *scale = axis.scale;
  if (border) {
    const __m512 zero = _mm512_setzero_ps();
    const __mmask16 inside = _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x, axis.size_m1, _CMP_LT_OQ);
    *scale = _mm512_maskz_mov_ps(inside, *scale);
    // Operand order keeps NaN (max/min return the second operand when either is NaN).
    x = _mm512_min_ps(axis.size_m1, _mm512_max_ps(zero, x));
  }
  return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-2.0f)), axis.clamp_high);
}

// A clamped index is in [-2, size]: negative ones compare as huge unsigned values.
inline __mmask16 inside(__m512i i, const Axis& axis) { return _mm512_cmplt_epu32_mask(i, axis.size_i); }

// Per-call constants of the taps.
struct TapsConstants {
  Axis ax, ay;
  __m512i width;
  bool border, nearest, align_corners;
  explicit TapsConstants(const Geometry& g)
      : ax(g.in_w, g.align_corners),
        ay(g.in_h, g.align_corners),
        width(_mm512_set1_epi32(static_cast<int32_t>(g.in_w))),
        border(g.padding == Padding::Border),
        nearest(g.interpolation == Interpolation::Nearest),
        align_corners(g.align_corners) {}
};

// avx2::taps on 16 lanes, in registers: the taps of 16 pixels from their normalised coordinates,
// zeros or border padding. Nearest sets offset and nw only. Where the caller stores no chunk arrays,
// the compiler drops the gradient terms.
inline Taps16 taps16_pixels(__m512 ix_raw, __m512 iy_raw, const TapsConstants& k, __mmask16 live) {
  Taps16 t;
  const __m512 ix = clip16(ix_raw, k.ax, k.border, &t.scale_x);
  const __m512 iy = clip16(iy_raw, k.ay, k.border, &t.scale_y);
  const __m512i one_i = _mm512_set1_epi32(1);
  if (k.nearest) {
    const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512i x = _mm512_cvttps_epi32(_mm512_roundscale_ps(ix, round));
    const __m512i y = _mm512_cvttps_epi32(_mm512_roundscale_ps(iy, round));
    t.offset = _mm512_add_epi32(_mm512_mullo_epi32(y, k.width), x);
    t.nw = inside(x, k.ax) & inside(y, k.ay) & live;
    t.ne = t.sw = t.se = 0;
    return t;
  }
  const __m512 one = _mm512_set1_ps(1.0f);
  const int down = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  const __m512 fx = _mm512_roundscale_ps(ix, down), fy = _mm512_roundscale_ps(iy, down);
  t.dx0 = _mm512_sub_ps(ix, fx);
  t.dx1 = _mm512_sub_ps(_mm512_add_ps(fx, one), ix);
  t.dy0 = _mm512_sub_ps(iy, fy);
  t.dy1 = _mm512_sub_ps(_mm512_add_ps(fy, one), iy);
  t.w_nw = _mm512_mul_ps(t.dx1, t.dy1);
  t.w_ne = _mm512_mul_ps(t.dx0, t.dy1);
  t.w_sw = _mm512_mul_ps(t.dx1, t.dy0);
  t.w_se = _mm512_mul_ps(t.dx0, t.dy0);
  const __m512i x0 = _mm512_cvttps_epi32(fx), y0 = _mm512_cvttps_epi32(fy);
  const __mmask16 x0_in = inside(x0, k.ax), x1_in = inside(_mm512_add_epi32(x0, one_i), k.ax);
  const __mmask16 y0_in = inside(y0, k.ay) & live, y1_in = inside(_mm512_add_epi32(y0, one_i), k.ay) & live;
  t.offset = _mm512_add_epi32(_mm512_mullo_epi32(y0, k.width), x0);
  t.nw = x0_in & y0_in;
  t.ne = x1_in & y0_in;
  t.sw = x0_in & y1_in;
  t.se = x1_in & y1_in;
  return t;
}

// The same from normalised coordinates.
inline Taps16 taps16(__m512 gx, __m512 gy, const TapsConstants& k, __mmask16 live) {
  return taps16_pixels(unnormalize16(gx, k.ax, k.align_corners), unnormalize16(gy, k.ay, k.align_corners), k, live);
}

// The normalised coordinates of 16 pixels of an affine row, from its map (mul then add, not fma:
// the same rounding as AffineSource::load and the scalar path).
inline void affine_coords(const AffineRow& row, int64_t p, __mmask16 live, __m512* gx, __m512* gy) {
  const __m512 bx = _mm512_maskz_loadu_ps(live, row.base_x + p);
  *gx = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(row.ax), bx), _mm512_set1_ps(row.cx));
  *gy = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(row.ay), bx), _mm512_set1_ps(row.cy));
}

// The same from a grid row of (x, y) pairs; lanes past `count` read zero.
inline void grid_coords(const float* pairs, int64_t p, int count, __m512* gx, __m512* gy) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const unsigned elements = 2u * static_cast<unsigned>(count);
  const __mmask16 low = elements >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << elements) - 1);
  const __mmask16 high = elements > 16 ? static_cast<__mmask16>((1u << (elements - 16)) - 1) : 0;
  const __m512 a = _mm512_maskz_loadu_ps(low, pairs + 2 * p), b = _mm512_maskz_loadu_ps(high, pairs + 2 * p + 16);
  *gx = _mm512_permutex2var_ps(a, even, b);
  *gy = _mm512_permutex2var_ps(a, odd, b);
}

// Fills a chunk's arrays (the AVX2 layout, see avx2::taps) with taps16.
void taps(Chunk<float>& ch, int len, const Geometry& g, bool scalar_arrays, bool grad_terms, const AffineRow* affine) {
  const TapsConstants k(g);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one_i = _mm512_set1_epi32(1);
  for (int p = 0; p < len; p += 16) {  // kChunk is a multiple of 16: the arrays hold every lane
    const __mmask16 live = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(len - p));
    __m512 gx, gy;
    if (affine) {
      affine_coords(*affine, p, live, &gx, &gy);
    } else {
      gx = _mm512_maskz_loadu_ps(live, ch.gx + p);  // zero past the chunk (see avx2::taps)
      gy = _mm512_maskz_loadu_ps(live, ch.gy + p);
    }
    const Taps16 t = taps16(gx, gy, k, live);
    if (grad_terms) {
      _mm512_storeu_ps(ch.scale_x + p, t.scale_x);
      _mm512_storeu_ps(ch.scale_y + p, t.scale_y);
    }
    _mm512_storeu_si512(ch.offset32 + p, t.offset);
    if (k.nearest) {
      _mm512_storeu_si512(ch.bits + p, _mm512_maskz_mov_epi32(t.nw, one_i));
      continue;
    }
    if (grad_terms) {
      _mm512_storeu_ps(ch.dx0 + p, t.dx0);
      _mm512_storeu_ps(ch.dx1 + p, t.dx1);
      _mm512_storeu_ps(ch.dy0 + p, t.dy0);
      _mm512_storeu_ps(ch.dy1 + p, t.dy1);
    }
    _mm512_storeu_ps(ch.w_nw + p, t.w_nw);
    _mm512_storeu_ps(ch.w_ne + p, t.w_ne);
    _mm512_storeu_ps(ch.w_sw + p, t.w_sw);
    _mm512_storeu_ps(ch.w_se + p, t.w_se);
    __m512i bits = _mm512_maskz_mov_epi32(t.nw, one_i);
    bits = _mm512_or_si512(bits, _mm512_maskz_mov_epi32(t.ne, _mm512_set1_epi32(2)));
    bits = _mm512_or_si512(bits, _mm512_maskz_mov_epi32(t.sw, _mm512_set1_epi32(4)));
    bits = _mm512_or_si512(bits, _mm512_maskz_mov_epi32(t.se, _mm512_set1_epi32(8)));
    _mm512_storeu_si512(ch.bits + p, bits);
  }
  for (int p = 0; scalar_arrays && p < len; ++p) {
    ch.offset[p] = ch.offset32[p];
    ch.mask[p] = static_cast<uint8_t>(ch.bits[p]);
  }
}

// The taps of pixels p..p+15 of a chunk back from its arrays (reflection padding: scalar taps).
inline Taps16 load_taps16(const Chunk<float>& ch, int p, __mmask16 live) {
  Taps16 t;
  t.offset = _mm512_maskz_loadu_epi32(live, ch.offset32 + p);
  const __m512i bits = _mm512_maskz_loadu_epi32(live, ch.bits + p);
  t.nw = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(1));
  t.ne = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(2));
  t.sw = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(4));
  t.se = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(8));
  t.w_nw = _mm512_maskz_loadu_ps(live, ch.w_nw + p);
  t.w_ne = _mm512_maskz_loadu_ps(live, ch.w_ne + p);
  t.w_sw = _mm512_maskz_loadu_ps(live, ch.w_sw + p);
  t.w_se = _mm512_maskz_loadu_ps(live, ch.w_se + p);
  return t;
}

// The gather forwards of one row: NCHW images of up to kGatherChannels channels, channels_last
// images of 2 to 4. `row_taps(p, count, live)` gives the taps of pixels p..p+15.
template <typename RowTaps>
void forward_row_gathers(const float* image, float* out, int64_t out_w, const Geometry& g, bool channels_last,
                         const RowTaps& row_taps) {
  const int64_t in_hw = g.in_h * g.in_w, out_hw = g.out_h * g.out_w;
  const bool bilinear = g.interpolation == Interpolation::Bilinear;
  auto each_vector = [&](auto&& sample) {
    for (int64_t p = 0; p < out_w; p += 16) {
      const int count = static_cast<int>(std::min<int64_t>(16, out_w - p));
      const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
      sample(p, count, live, row_taps(p, count, live));
    }
  };
  if (!channels_last) {
    each_vector([&](int64_t p, int, __mmask16 live, const Taps16& t) {
      sample_nchw(image, out + p, t, live, g.channels, in_hw, out_hw, g.in_w, bilinear);
    });
    return;
  }
  auto nhwc = [&](auto channels) {
    constexpr int kChannels = decltype(channels)::value;
    static const Interleave<kChannels> il;
    each_vector([&](int64_t p, int count, __mmask16, const Taps16& t) {
      sample_nhwc_small<kChannels>(image, out + p * kChannels, t, count, in_hw, g.in_w, il);
    });
  };
  if (g.channels == 2) nhwc(std::integral_constant<int, 2>());
  else if (g.channels == 3) nhwc(std::integral_constant<int, 3>());
  else nhwc(std::integral_constant<int, 4>());
}

// Calls body(row_taps) for output row oy of image n, where row_taps(p, count, live) computes the
// taps of pixels p..p+15 in registers, straight from the affine map or the grid (zeros and border
// padding): no chunk arrays stored and read back.
template <typename Source, typename Body>
inline void with_row_taps(const Source& source, const Geometry& g, const TapsConstants& k, int64_t n, int64_t oy,
                          Body&& body) {
  if constexpr (std::is_same_v<Source, AffineSource<float>>) {
    // The row's map straight to input pixels: one fma a coordinate instead of the map and
    // unnormalize (7 instructions).
    const AffineRow map = source.pixel_row(n, oy, g.in_h, g.in_w, g.align_corners);
    const __m512 ax = _mm512_set1_ps(map.ax), cx = _mm512_set1_ps(map.cx);
    const __m512 ay = _mm512_set1_ps(map.ay), cy = _mm512_set1_ps(map.cy);
    body([&](int64_t p, int, __mmask16 live) {
      const __m512 bx = _mm512_maskz_loadu_ps(live, map.base_x + p);
      return taps16_pixels(_mm512_fmadd_ps(ax, bx, cx), _mm512_fmadd_ps(ay, bx, cy), k, live);
    });
  } else {
    const float* pairs = source.grid + (n * g.out_h + oy) * g.out_w * 2;
    body([&](int64_t p, int count, __mmask16 live) {
      __m512 gx, gy;
      grid_coords(pairs, p, count, &gx, &gy);
      return taps16(gx, gy, k, live);
    });
  }
}

// Output rows [begin, end) (row = n * out_h + oy), taps in registers.
template <typename Source>
void forward_rows_direct(const float* input, float* output, const Source& source, const Geometry& g,
                         bool channels_last, int64_t begin, int64_t end) {
  const TapsConstants k(g);
  const int64_t image_size = g.channels * g.in_h * g.in_w;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / g.out_h, oy = row % g.out_h;
    const float* image = input + n * image_size;
    float* out = output + (channels_last ? row * g.out_w * g.channels : n * g.channels * g.out_h * g.out_w + oy * g.out_w);
    with_row_taps(source, g, k, n, oy, [&](const auto& row_taps) {
      forward_row_gathers(image, out, g.out_w, g, channels_last, row_taps);
    });
  }
}

// grad_x / grad_y += gout * d(sample)/d(x, y) of 16 pixels over one NCHW plane (the shared
// header's bilinear_coordinate_grad, lane-parallel), the taps read by pair gathers (zero outside).
inline void add_plane_coordinate_grad(const float* plane, const Taps16& t, __m512i south, __mmask16 north_safe,
                                      __mmask16 south_safe, __m512 gout, __m512* grad_x, __m512* grad_y) {
  __m512 top[2], bottom[2];  // nw, ne and sw, se
  gather_run<1>(plane, t.offset, t.nw, t.ne, north_safe, top);
  gather_run<1>(plane, south, t.sw, t.se, south_safe, bottom);
  const __m512 d_dx = _mm512_fmadd_ps(_mm512_sub_ps(top[1], top[0]), t.dy1,
                                      _mm512_mul_ps(_mm512_sub_ps(bottom[1], bottom[0]), t.dy0));
  const __m512 d_dy = _mm512_fmadd_ps(_mm512_sub_ps(bottom[0], top[0]), t.dx1,
                                      _mm512_mul_ps(_mm512_sub_ps(bottom[1], top[1]), t.dx0));
  *grad_x = _mm512_fmadd_ps(gout, d_dx, *grad_x);
  *grad_y = _mm512_fmadd_ps(gout, d_dy, *grad_y);
}

// The coordinate gradient alone (no grad_input: an STN whose input needs no gradient) of one
// output row of an NCHW image of up to kGatherChannels channels, bilinear, taps in registers: the
// taps read by pair gathers, the channels summed in vectors. Leaves either the grid gradient
// (grid_out: the row's [out_w, 2]) or theta's four sums over the row (see ThetaSink), in fp32
// lanes added in double. 32x3x64x64: 1.6x the AVX2 loop, whose scalar loads pay off only where
// grad_input reads the same taps (a lane-by-lane scatter from vectors measured 0.4-0.6x it).
template <typename RowTaps>
void coordinate_grad_row_nchw(const float* image, const float* grad_output, int64_t out_w, const Geometry& g,
                              const RowTaps& row_taps, const float* base_x, float* grid_out, double row_sums[4]) {
  const int64_t in_hw = g.in_h * g.in_w, out_hw = g.out_h * g.out_w;
  const __m512i pair_low = _mm512_set1_epi32(-1), pair_high = _mm512_set1_epi32(static_cast<int32_t>(in_hw - 1));
  const __m512i even_pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd_pairs = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  __m512 sum_x = _mm512_setzero_ps(), sum_xb = sum_x, sum_y = sum_x, sum_yb = sum_x;
  for (int64_t p = 0; p < out_w; p += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, out_w - p));
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    const Taps16 t = row_taps(p, count, live);
    const __m512i south = _mm512_add_epi32(t.offset, _mm512_set1_epi32(static_cast<int32_t>(g.in_w)));
    const __mmask16 north_safe = _mm512_cmpgt_epi32_mask(t.offset, pair_low) & _mm512_cmplt_epi32_mask(t.offset, pair_high);
    const __mmask16 south_safe = _mm512_cmpgt_epi32_mask(south, pair_low) & _mm512_cmplt_epi32_mask(south, pair_high);
    __m512 grad_x = _mm512_setzero_ps(), grad_y = grad_x;
    for (int64_t c = 0; c < g.channels; ++c) {
      const __m512 gout = _mm512_maskz_loadu_ps(live, grad_output + c * out_hw + p);
      add_plane_coordinate_grad(image + c * in_hw, t, south, north_safe, south_safe, gout, &grad_x, &grad_y);
    }
    // Lanes past the row are zero here (gout is) and in bx.
    const __m512 dx = _mm512_mul_ps(grad_x, t.scale_x), dy = _mm512_mul_ps(grad_y, t.scale_y);
    if (grid_out) {
      const unsigned elements = 2u * static_cast<unsigned>(count);
      const __mmask16 low = elements >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << elements) - 1);
      const __mmask16 high = elements > 16 ? static_cast<__mmask16>((1u << (elements - 16)) - 1) : 0;
      _mm512_mask_storeu_ps(grid_out + 2 * p, low, _mm512_permutex2var_ps(dx, even_pairs, dy));
      _mm512_mask_storeu_ps(grid_out + 2 * p + 16, high, _mm512_permutex2var_ps(dx, odd_pairs, dy));
    } else {
      const __m512 bx = _mm512_maskz_loadu_ps(live, base_x + p);
      sum_x = _mm512_add_ps(sum_x, dx);
      sum_xb = _mm512_fmadd_ps(dx, bx, sum_xb);
      sum_y = _mm512_add_ps(sum_y, dy);
      sum_yb = _mm512_fmadd_ps(dy, bx, sum_yb);
    }
  }
  if (grid_out) return;
  alignas(64) float lanes[4][16];
  _mm512_store_ps(lanes[0], sum_x);
  _mm512_store_ps(lanes[1], sum_xb);
  _mm512_store_ps(lanes[2], sum_y);
  _mm512_store_ps(lanes[3], sum_yb);
  add_lanes_in_double(lanes[0], 16, row_sums);
}

// The coordinate gradient of image n (NCHW) by coordinate_grad_row_nchw. grid_grad: the image's
// [out_h, out_w, 2] grid gradient, or null for theta's row sums (row_sums: [out_h][4], base_x:
// the affine base grid).
template <typename Source>
void coordinate_grad_image_nchw(const float* image, const float* grad_output, const Source& source,
                                const Geometry& g, int64_t n, const float* base_x, float* grid_grad, double* row_sums) {
  const TapsConstants k(g);
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    with_row_taps(source, g, k, n, oy, [&](const auto& row_taps) {
      coordinate_grad_row_nchw(image, grad_output + oy * g.out_w, g.out_w, g, row_taps, base_x,
                               grid_grad ? grid_grad + oy * g.out_w * 2 : nullptr,
                               row_sums ? row_sums + 4 * oy : nullptr);
    });
  }
}

// grad_input (and theta's gradient) of an affine map over an NCHW image of few channels (see
// kLatticeChannels), bilinear, zeros padding, 16 output pixels at a time: each pixel's two grad_input pairs
// (nw, ne and sw, se) are gathered, added to and scattered back as 64-bit elements. A scatter keeps
// one of two additions to the same element, so no two pixels of a vector may share a tap: a vector
// takes output pixels (i, j) of one class i = i0, j = j0 (mod k), class after class. Two of them
// are k or more output pixels apart, so at least sigma * k input pixels apart (sigma: the map's
// smaller singular value, input pixels per output pixel), which with k >= 2.9 / sigma is 2.05 or
// more along x or y (the larger of |dx|, |dy| is at least the distance / sqrt(2)): their 2 x 2 taps
// are disjoint, with 0.05 to spare for the fp32 rounding of the coordinates. Against the AVX2 loop
// (taps 8 at a time, then pixel by pixel with scalar pairs), backward with both gradients, 1 and
// 2 threads: 64x1x28x28 1.17-1.18x, 32x1x64x64 1.14-1.16x, 8x1x224x224 1.09x, 32x2x64x64 1.34x;
// grad_input alone 0.98-1.31x. Maps that shrink the input more than that (k > 6) stay there.
constexpr int kMaxLatticeStride = 6;

// A thread's tables: each stride's pixel order for one output size, kept from call to call (a
// 224 x 224 order is 50k entries, each stride's built once per thread instead of once per call),
// and one image's row constants.
struct LatticeScratch {
  int64_t out_h = 0, out_w = 0;                       // the size the orders are for
  std::vector<int32_t> order[kMaxLatticeStride + 1];  // (i << 16 | j), classes padded with -1 to 16
  std::vector<float> cx, cy;                          // the affine map's row constants (AffineRow)
};

// Tiles of kLatticeTile x kLatticeTile output pixels, every class of one tile before the next, so
// that the input and grad_input a tile reaches stay in L1 while its k * k classes visit them
// (8x1x224x224 and 32x2x64x64: 1.02-1.03x the whole map class by class).
constexpr int64_t kLatticeTile = 32;

inline const std::vector<int32_t>& lattice_order(LatticeScratch& scratch, int k, int64_t out_h, int64_t out_w) {
  if (scratch.out_h != out_h || scratch.out_w != out_w) {
    for (auto& order : scratch.order) order.clear();
    scratch.out_h = out_h, scratch.out_w = out_w;
  }
  std::vector<int32_t>& order = scratch.order[k];
  if (!order.empty()) return order;
  const int64_t tiles = ((out_h + kLatticeTile - 1) / kLatticeTile) * ((out_w + kLatticeTile - 1) / kLatticeTile);
  order.reserve(out_h * out_w + 15 * k * k * tiles);
  for (int64_t ti = 0; ti < out_h; ti += kLatticeTile) {
    for (int64_t tj = 0; tj < out_w; tj += kLatticeTile) {
      const int64_t i_end = std::min(out_h, ti + kLatticeTile), j_end = std::min(out_w, tj + kLatticeTile);
      for (int i0 = 0; i0 < k; ++i0) {
        for (int j0 = 0; j0 < k; ++j0) {
          for (int64_t i = ti + i0; i < i_end; i += k)
            for (int64_t j = tj + j0; j < j_end; j += k) order.push_back(static_cast<int32_t>(i << 16 | j));
          while (order.size() % 16) order.push_back(-1);
        }
      }
    }
  }
  return order;
}

// The lattice stride for image n's map, 0 when none up to kMaxLatticeStride keeps the taps apart.
inline int lattice_stride(const AffineSource<float>& source, const Geometry& g, int64_t n) {
  if (g.out_h < 2 || g.out_w < 2) return 0;
  const float* t = source.theta + n * 6;
  const double sx = g.align_corners ? (g.in_w - 1) / 2.0 : g.in_w / 2.0;
  const double sy = g.align_corners ? (g.in_h - 1) / 2.0 : g.in_h / 2.0;
  const double step_x = (double(source.base_x[g.out_w - 1]) - source.base_x[0]) / double(g.out_w - 1);
  const double step_y = (double(source.base_y[g.out_h - 1]) - source.base_y[0]) / double(g.out_h - 1);
  // Input pixels per output column (a, c) and per output row (b, d).
  const double a = t[0] * sx * step_x, b = t[1] * sx * step_y, c = t[3] * sy * step_x, d = t[4] * sy * step_y;
  const double squares = a * a + b * b + c * c + d * d, det = std::fabs(a * d - b * c);
  // sigma_min = det / sigma_max, with sigma_max +- sigma_min = sqrt(squares +- 2 det).
  const double sigma = 2 * det / (std::sqrt(squares + 2 * det) + std::sqrt(std::max(0.0, squares - 2 * det)));
  if (!(sigma * kMaxLatticeStride >= 2.9)) return 0;  // also NaN and infinite theta
  return std::max(1, static_cast<int>(std::ceil(2.9 / sigma)));
}

// Whether the fp32 coordinates of the map (x = ax * base_x + cx[row], y likewise) are within 0.01
// pixel of the exact ones wherever a tap is inside: |ax|, |ay| <= 1e4 (base_x's steps are within
// 2.4e-7 of uniform), |cx|, |cy| <= 1e5 (each rounded to 6e-3) and inside pixels < 2^15 (the fma's
// rounding). Maps beyond that are no STN's; they keep the scalar loop.
inline bool lattice_coordinates_exact(float ax, float ay, const std::vector<float>& cx, const std::vector<float>& cy,
                                      const Geometry& g) {
  if (!(std::fabs(ax) <= 1e4f && std::fabs(ay) <= 1e4f) || g.in_h >= (1 << 15) || g.in_w >= (1 << 15)) return false;
  for (size_t i = 0; i < cx.size(); ++i)
    if (!(std::fabs(cx[i]) <= 1e5f && std::fabs(cy[i]) <= 1e5f)) return false;
  return true;
}

// grad_input += the weights times gout at taps (offset, offset + 1) of a row, where inside:
// pairs where both are, single elements where one is. No two lanes share an element.
inline void add_tap_pair(float* plane, __m512i offset, __mmask16 left_in, __mmask16 right_in, __m512 gout,
                         __m512 w_left, __m512 w_right, __m512 w_lo, __m512 w_hi) {
  const __m512i dup_lo = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i dup_hi = _mm512_setr_epi32(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
  const __mmask16 both = left_in & right_in;
  if (both) {
    const __m256i lo = _mm512_castsi512_si256(offset), hi = _mm512_extracti64x4_epi64(offset, 1);
    const __mmask8 both_lo = static_cast<__mmask8>(both), both_hi = static_cast<__mmask8>(both >> 8);
    const __m512 old_lo = _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), both_lo, lo, plane, 4));
    const __m512 old_hi = _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), both_hi, hi, plane, 4));
    const __m512 new_lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(dup_lo, gout), w_lo, old_lo);
    const __m512 new_hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(dup_hi, gout), w_hi, old_hi);
    _mm512_mask_i32scatter_pd(plane, both_lo, lo, _mm512_castps_pd(new_lo), 4);
    _mm512_mask_i32scatter_pd(plane, both_hi, hi, _mm512_castps_pd(new_hi), 4);
  }
  const __mmask16 left_only = left_in & ~right_in, right_only = right_in & ~left_in;
  if (left_only) {
    const __m512 old = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), left_only, offset, plane, 4);
    _mm512_mask_i32scatter_ps(plane, left_only, offset, _mm512_fmadd_ps(gout, w_left, old), 4);
  }
  if (right_only) {
    const __m512i next = _mm512_add_epi32(offset, _mm512_set1_epi32(1));
    const __m512 old = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), right_only, next, plane, 4);
    _mm512_mask_i32scatter_ps(plane, right_only, next, _mm512_fmadd_ps(gout, w_right, old), 4);
  }
}

// Image n's grad_input (gin, zeroed) and, with `coords`, theta's six sums (ThetaSink's order:
// dx * base_x, dx * base_y, dx, then dy's) added to sums. False, nothing done, when the map's
// lattice stride is out of range.
bool backward_affine_image_lattice(const float* image, const float* grad_output, float* gin,
                                   const AffineSource<float>& source, const Geometry& g, int64_t n, bool coords,
                                   LatticeScratch& scratch, double sums[6]) {
  const int stride = lattice_stride(source, g, n);
  if (stride == 0) return false;
  scratch.cx.resize(g.out_h);
  scratch.cy.resize(g.out_h);
  AffineRow map{};
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    map = source.pixel_row(n, oy, g.in_h, g.in_w, g.align_corners);
    scratch.cx[oy] = map.cx;
    scratch.cy[oy] = map.cy;
  }
  if (!lattice_coordinates_exact(map.ax, map.ay, scratch.cx, scratch.cy, g)) return false;
  const std::vector<int32_t>& order = lattice_order(scratch, stride, g.out_h, g.out_w);
  const TapsConstants k(g);
  const int64_t in_hw = g.in_h * g.in_w, out_hw = g.out_h * g.out_w;
  const __m512 ax = _mm512_set1_ps(map.ax), ay = _mm512_set1_ps(map.ay), zero = _mm512_setzero_ps();
  const __m512i pair_low = _mm512_set1_epi32(-1), pair_high = _mm512_set1_epi32(static_cast<int32_t>(in_hw - 1));
  const __m512i even_pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd_pairs = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF), out_w = _mm512_set1_epi32(static_cast<int32_t>(g.out_w));
  const __m512i in_w = _mm512_set1_epi32(static_cast<int32_t>(g.in_w));
  // Six fp32 lane sums, added into sums in double every kFlush vectors (a fixed order).
  constexpr int64_t kFlush = 32;
  __m512 acc[6];
  auto flush = [&] {
    alignas(64) float lanes[6][16];
    for (int s = 0; s < 6; ++s) {
      _mm512_store_ps(lanes[s], acc[s]);
      acc[s] = zero;
    }
    for (int s = 0; s < 6; ++s)
      for (int l = 0; l < 16; ++l) sums[s] += lanes[s][l];
  };
  for (int s = 0; s < 6; ++s) acc[s] = zero;
  const int64_t vectors = static_cast<int64_t>(order.size()) / 16;
  for (int64_t v = 0; v < vectors; ++v) {
    const __m512i pixel = _mm512_loadu_si512(order.data() + 16 * v);
    const __mmask16 live = _mm512_cmpge_epi32_mask(pixel, _mm512_setzero_si512());
    const __m512i oy = _mm512_srai_epi32(pixel, 16), ox = _mm512_and_si512(pixel, low16);
    const __m512 bx = _mm512_mask_i32gather_ps(zero, live, ox, source.base_x, 4);
    const __m512 cx = _mm512_mask_i32gather_ps(zero, live, oy, scratch.cx.data(), 4);
    const __m512 cy = _mm512_mask_i32gather_ps(zero, live, oy, scratch.cy.data(), 4);
    // As with_row_taps: the same coordinates as the forward's.
    const Taps16 t = taps16_pixels(_mm512_fmadd_ps(ax, bx, cx), _mm512_fmadd_ps(ay, bx, cy), k, live);
    const __m512i out_index = _mm512_add_epi32(_mm512_mullo_epi32(oy, out_w), ox);
    const __m512i south = _mm512_add_epi32(t.offset, in_w);
    const __m512 north_lo = _mm512_permutex2var_ps(t.w_nw, even_pairs, t.w_ne);
    const __m512 north_hi = _mm512_permutex2var_ps(t.w_nw, odd_pairs, t.w_ne);
    const __m512 south_lo = _mm512_permutex2var_ps(t.w_sw, even_pairs, t.w_se);
    const __m512 south_hi = _mm512_permutex2var_ps(t.w_sw, odd_pairs, t.w_se);
    const __mmask16 north_safe = _mm512_cmpgt_epi32_mask(t.offset, pair_low) & _mm512_cmplt_epi32_mask(t.offset, pair_high);
    const __mmask16 south_safe = _mm512_cmpgt_epi32_mask(south, pair_low) & _mm512_cmplt_epi32_mask(south, pair_high);
    __m512 grad_x = zero, grad_y = zero;
    for (int64_t c = 0; c < g.channels; ++c) {
      const __m512 gout = _mm512_mask_i32gather_ps(zero, live, out_index, grad_output + c * out_hw, 4);
      if (coords)
        add_plane_coordinate_grad(image + c * in_hw, t, south, north_safe, south_safe, gout, &grad_x, &grad_y);
      float* gin_plane = gin + c * in_hw;
      add_tap_pair(gin_plane, t.offset, t.nw, t.ne, gout, t.w_nw, t.w_ne, north_lo, north_hi);
      add_tap_pair(gin_plane, south, t.sw, t.se, gout, t.w_sw, t.w_se, south_lo, south_hi);
    }
    if (coords) {
      // Dead lanes: gout, bx and by are zero there.
      const __m512 by = _mm512_mask_i32gather_ps(zero, live, oy, source.base_y, 4);
      const __m512 dx = _mm512_mul_ps(grad_x, t.scale_x), dy = _mm512_mul_ps(grad_y, t.scale_y);
      acc[0] = _mm512_fmadd_ps(dx, bx, acc[0]);
      acc[1] = _mm512_fmadd_ps(dx, by, acc[1]);
      acc[2] = _mm512_add_ps(dx, acc[2]);
      acc[3] = _mm512_fmadd_ps(dy, bx, acc[3]);
      acc[4] = _mm512_fmadd_ps(dy, by, acc[4]);
      acc[5] = _mm512_add_ps(dy, acc[5]);
      if ((v + 1) % kFlush == 0) flush();
    }
  }
  if (coords) flush();
  return true;
}

// The same for one chunk whose taps are in its arrays.
void forward_chunk_gathers(const float* image, float* out, const Chunk<float>& ch, int len, const Geometry& g,
                           bool channels_last) {
  forward_row_gathers(image, out, len, g, channels_last,
                      [&](int64_t p, int, __mmask16 live) { return load_taps16(ch, static_cast<int>(p), live); });
}

// Feature maps (more than kGatherChannels channels): a channels_last pixel's four taps are runs of
// C floats, read as channel vectors. An NCHW image is first transposed into a channels_last copy
// that stays in L2 (64x56x56: 800 KB), and every 16 pixels x 16 channels of output are transposed
// back in registers and stored as 16 plane rows. Sampling the NCHW planes directly reads two
// floats of each of 64 planes a pixel (64 pages), and stayed at PyTorch's speed (32x64x56x56:
// 1.1x).

// The live lanes of the channel vector from c0 of C channels.
inline __mmask16 channel_lanes(int64_t C, int64_t c0) {
  return c0 + 16 <= C ? 0xFFFF : static_cast<__mmask16>((1u << (C - c0)) - 1);
}

// r[i] = column i of the 16 x 16 matrix whose rows were r[0..15].
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // Each 128-bit block now holds a 4 x 4 block transposed; two block shuffles move the blocks.
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// Pixel p's bilinear (or nearest) sample of the 16 channels from nw (its north-west tap, channel
// c0, in a channels_last image of C channels; `lanes` of them live). A tap outside loads nothing
// and reads zero (never 0 * NaN).
inline __m512 sample_channels(const float* nw, int64_t C, int64_t down, const Chunk<float>& ch, int p, __mmask16 lanes,
                              bool bilinear) {
  const int bits = ch.bits[p];
  const __m512 v_nw = _mm512_maskz_loadu_ps((bits & 1) ? lanes : 0, nw);
  if (!bilinear) return v_nw;
  const __m512 v_ne = _mm512_maskz_loadu_ps((bits & 2) ? lanes : 0, nw + C);
  const __m512 v_sw = _mm512_maskz_loadu_ps((bits & 4) ? lanes : 0, nw + down);
  const __m512 v_se = _mm512_maskz_loadu_ps((bits & 8) ? lanes : 0, nw + down + C);
  // Two independent halves, as the scalar loop.
  return _mm512_add_ps(_mm512_fmadd_ps(v_ne, _mm512_set1_ps(ch.w_ne[p]), _mm512_mul_ps(v_nw, _mm512_set1_ps(ch.w_nw[p]))),
                       _mm512_fmadd_ps(v_se, _mm512_set1_ps(ch.w_se[p]), _mm512_mul_ps(v_sw, _mm512_set1_ps(ch.w_sw[p]))));
}

// One chunk of output pixels of a channels_last image of C channels (more than a vector's worth):
// a pixel's four taps are runs of C floats, read and blended as channel vectors.
void forward_chunk_channels(const float* image, float* out, const Chunk<float>& ch, int len, int64_t C, int64_t in_w,
                            bool bilinear) {
  for (int p = 0; p < len; ++p) {
    const float* nw = image + static_cast<int64_t>(ch.offset32[p]) * C;
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __mmask16 lanes = channel_lanes(C, c0);
      _mm512_mask_storeu_ps(out + static_cast<int64_t>(p) * C + c0, lanes,
                            sample_channels(nw + c0, C, in_w * C, ch, p, lanes, bilinear));
    }
  }
}

// dst[j * rows + i] = src[i * cols + j]: an NCHW image [C][HW] into channels_last [HW][C], and back.
void transpose(const float* src, float* dst, int64_t rows, int64_t cols) {
  __m512 r[16];
  for (int64_t i0 = 0; i0 < rows; i0 += 16) {
    const int height = static_cast<int>(std::min<int64_t>(16, rows - i0));
    const __mmask16 row_lanes = static_cast<__mmask16>((1u << height) - 1);
    for (int64_t j0 = 0; j0 < cols; j0 += 16) {
      const int width = static_cast<int>(std::min<int64_t>(16, cols - j0));
      const __mmask16 column_lanes = static_cast<__mmask16>((1u << width) - 1);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < height ? _mm512_maskz_loadu_ps(column_lanes, src + (i0 + i) * cols + j0) : _mm512_setzero_ps();
      transpose16(r);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j)
        if (j < width) _mm512_mask_storeu_ps(dst + (j0 + j) * rows + i0, row_lanes, r[j]);
    }
  }
}

// The backward of one output pixel of a channels_last image of C channels (more than a vector's
// worth: channel vectors, the last one masked): grad_input's taps inside += weight * grad_out, and
// the coordinate gradient summed over the channels in vector lanes, then across the lanes (a
// fixed order). Taps outside read zero and take nothing.
void backward_pixel_channels(const float* image, const float* go, float* gin, Chunk<float>& ch, int p, int64_t C,
                             int64_t in_w, bool bilinear, bool want_input, bool want_coords) {
  const int bits = ch.bits[p];
  if (bits == 0) return;
  const int64_t o = ch.offset32[p];
  const int64_t offsets[4] = {o * C, (o + 1) * C, (o + in_w) * C, (o + in_w + 1) * C};
  if (!bilinear) {  // nearest: the sample's pixel takes grad_out; no coordinate gradient
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const __mmask16 lanes = channel_lanes(C, c0);
      float* dst = gin + offsets[0] + c0;
      _mm512_mask_storeu_ps(dst, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, dst), _mm512_maskz_loadu_ps(lanes, go + c0)));
    }
    return;
  }
  const __m512 weights[4] = {_mm512_set1_ps(ch.w_nw[p]), _mm512_set1_ps(ch.w_ne[p]), _mm512_set1_ps(ch.w_sw[p]),
                             _mm512_set1_ps(ch.w_se[p])};
  __m512 x1 = _mm512_setzero_ps(), x0 = x1, y1 = x1, y0 = x1;
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 lanes = channel_lanes(C, c0);
    const __m512 g = _mm512_maskz_loadu_ps(lanes, go + c0);
    __m512 v[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const __mmask16 inside = (bits >> k & 1) ? lanes : 0;
      if (want_coords) v[k] = _mm512_maskz_loadu_ps(inside, image + offsets[k] + c0);
      if (want_input) {
        float* dst = gin + offsets[k] + c0;
        _mm512_mask_storeu_ps(dst, inside, _mm512_fmadd_ps(weights[k], g, _mm512_maskz_loadu_ps(inside, dst)));
      }
    }
    if (want_coords) {  // bilinear_coordinate_grad's four sums (see backward_pixel_nhwc)
      x1 = _mm512_fmadd_ps(g, _mm512_sub_ps(v[1], v[0]), x1);
      x0 = _mm512_fmadd_ps(g, _mm512_sub_ps(v[3], v[2]), x0);
      y1 = _mm512_fmadd_ps(g, _mm512_sub_ps(v[2], v[0]), y1);
      y0 = _mm512_fmadd_ps(g, _mm512_sub_ps(v[3], v[1]), y0);
    }
  }
  if (!want_coords) return;
  ch.gx[p] += _mm512_reduce_add_ps(x1) * ch.dy1[p] + _mm512_reduce_add_ps(x0) * ch.dy0[p];
  ch.gy[p] += _mm512_reduce_add_ps(y1) * ch.dx1[p] + _mm512_reduce_add_ps(y0) * ch.dx0[p];
}

// One chunk of output pixels, `channels` channels, from their channels_last copy `image` (that
// many channels to a pixel), into the NCHW planes from `out`; the chunk's taps are in its arrays.
void forward_chunk_transposed(const float* image, int64_t channels, float* out, const Chunk<float>& ch, int len,
                              int64_t out_hw, int64_t in_w, bool bilinear) {
  const int64_t C = channels, down = in_w * C;
  __m512 r[16];
  for (int p0 = 0; p0 < len; p0 += 16) {
    const int count = std::min(16, len - p0);
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const int live_channels = static_cast<int>(std::min<int64_t>(16, C - c0));
      const __mmask16 lanes = static_cast<__mmask16>((1u << live_channels) - 1);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        r[i] = i < count ? sample_channels(image + static_cast<int64_t>(ch.offset32[p0 + i]) * C + c0, C, down, ch,
                                           p0 + i, lanes, bilinear)
                         : _mm512_setzero_ps();
      transpose16(r);
      const __mmask16 pixels = static_cast<__mmask16>((1u << count) - 1);
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i)
        if (i < live_channels) _mm512_mask_storeu_ps(out + (c0 + i) * out_hw + p0, pixels, r[i]);
    }
  }
}

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options

constexpr int64_t kGatherChannels = 8;
// Up to this many channels the backward with grad_input of an affine map runs
// avx512::backward_affine_image_lattice (the scatters pay for themselves where the taps' arithmetic,
// shared by the channels, is a large part: 3 channels measured 0.8-1.07x the AVX2 loop).
constexpr int64_t kLatticeChannels = 2;

bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f");
  if (!has) return false;
  const char* flag = std::getenv("FASTCNN_AVX512");
  return !(flag && flag[0] == '0');
}

using avx2_strides = avx2::Strides;
avx2_strides layout_strides(bool channels_last, int64_t C, int64_t in_hw, int64_t out_hw) {
  return channels_last ? avx2_strides{1, C, 1, C} : avx2_strides{in_hw, 1, out_hw, 1};
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
struct avx2_strides {};
avx2_strides layout_strides(bool, int64_t, int64_t, int64_t) { return {}; }
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

// Which vector code computes a chunk's taps: none (the templates), AVX2 (8 lanes) or AVX-512 (16).
enum class Taps { Scalar, Avx2, Avx512 };

// The vector paths keep flat tap offsets (y * W + x, with x, y clamped to [-2, size]) in int32.
// Decided once per call (cpu_has_avx512 reads FASTCNN_AVX512).
Taps vector_taps_for(const Geometry& g) {
  if (!(cpu_has_avx2() && (g.in_h + 4) * (g.in_w + 4) < (int64_t(1) << 31))) return Taps::Scalar;
  return cpu_has_avx512() ? Taps::Avx512 : Taps::Avx2;
}

// The taps of a chunk: lane arrays filled too when the AVX2 consumers will read them.
template <typename acc_t>
void chunk_taps(Chunk<acc_t>& ch, int len, const Geometry& g, Taps vector_path, bool scalar_arrays, bool grad_terms,
                const AffineRow* affine = nullptr) {
#ifdef FASTCNN_GRID_SAMPLE_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    if (vector_path != Taps::Scalar) {
      if (g.padding == Padding::Reflection) {
        compute_taps(ch, len, g);
        fill_lanes(ch, len);
      } else if (vector_path == Taps::Avx512) {
        avx512::taps(ch, len, g, scalar_arrays, grad_terms, affine);
      } else {
        avx2::taps(ch, len, g, scalar_arrays, grad_terms, affine);
      }
      return;
    }
  }
#endif
  compute_taps(ch, len, g);
}

// The taps of output pixels [ox0, ox0 + len) of row oy of image n, coordinates from `source`. The
// AVX2 taps compute an affine map's coordinates in registers (reflection goes scalar).
template <typename acc_t, typename Source>
void source_taps(Chunk<acc_t>& ch, int64_t n, int64_t oy, int64_t ox0, int len, const Source& source,
                 const Geometry& g, Taps vector_taps, bool scalar_arrays, bool grad_terms) {
  if constexpr (std::is_same_v<Source, AffineSource<float>>) {
    if (vector_taps != Taps::Scalar && g.padding != Padding::Reflection) {
      AffineRow row = source.row(n, oy, ox0);
      row.base_x = source.base_x + ox0;
      chunk_taps(ch, len, g, vector_taps, scalar_arrays, grad_terms, &row);
      return;
    }
  }
  source.load(n, oy, ox0, len, ch.gx, ch.gy);
  chunk_taps(ch, len, g, vector_taps, scalar_arrays, grad_terms);
}

// Offset of output pixel (n, oy, ox0), channel 0, in an NCHW or channels_last [N, C, Ho, Wo] tensor.
inline int64_t output_offset(const Geometry& g, bool channels_last, int64_t n, int64_t oy, int64_t ox0) {
  return channels_last ? ((n * g.out_h + oy) * g.out_w + ox0) * g.channels
                       : n * g.channels * g.out_h * g.out_w + oy * g.out_w + ox0;
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename acc_t>
inline acc_t sample_one(const scalar_t* plane, const Chunk<acc_t>& ch, int p, int64_t in_w, bool bilinear) {
  const int64_t o = ch.offset[p];
  const uint8_t m = ch.mask[p];
  if (!bilinear) return m ? static_cast<acc_t>(plane[o]) : acc_t(0);
  if (m == kAllTaps) {
    return static_cast<acc_t>(plane[o]) * ch.w_nw[p] + static_cast<acc_t>(plane[o + 1]) * ch.w_ne[p] +
           static_cast<acc_t>(plane[o + in_w]) * ch.w_sw[p] + static_cast<acc_t>(plane[o + in_w + 1]) * ch.w_se[p];
  }
  acc_t v = 0;
  if (m & 1) v += static_cast<acc_t>(plane[o]) * ch.w_nw[p];
  if (m & 2) v += static_cast<acc_t>(plane[o + 1]) * ch.w_ne[p];
  if (m & 4) v += static_cast<acc_t>(plane[o + in_w]) * ch.w_sw[p];
  if (m & 8) v += static_cast<acc_t>(plane[o + in_w + 1]) * ch.w_se[p];
  return v;
}

template <typename scalar_t, typename acc_t, typename Source>
void forward_kernel(const scalar_t* input, scalar_t* output, const Source& source, const Geometry& g,
                    bool channels_last_arg) {
  // One channel: channels_last is the NCHW layout, and the NCHW loops (gathers) serve it.
  const bool channels_last = channels_last_arg && g.channels > 1;
  const int64_t rows = g.batch * g.out_h;
  const int64_t C = g.channels, in_hw = g.in_h * g.in_w, out_hw = g.out_h * g.out_w;
  const bool bilinear = g.interpolation == Interpolation::Bilinear;
  // About 32k output elements a task, but never fewer tasks than threads: one task of 1170 rows
  // and one of 622 (64x1x28x28) left a thread idle for a third of the call.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(
      1, std::min<int64_t>(32768 / std::max<int64_t>(1, g.out_w * C), (rows + threads - 1) / threads));
  // The pixel loops take NCHW at any C and channels_last up to 8 channels; wider channels_last
  // rows are better served by the channel-vector loops below.
  const Taps vector_taps = vector_taps_for(g);
  const bool vector_pixels = std::is_same_v<scalar_t, float> && vector_taps != Taps::Scalar && (!channels_last || C <= 8);
  const avx2_strides st = layout_strides(channels_last, C, in_hw, out_hw);
  // Gathers for the few-channel NCHW images (grayscale, RGB); wider ones keep the blocks of
  // planes above (gathers across 64 planes measured 10% slower than them).
  const bool gathers = vector_pixels && !channels_last && C <= kGatherChannels && vector_taps == Taps::Avx512;
  // channels_last RGB-like images: pair gathers too, for bilinear sampling (the element index
  // pixel * C must fit in int32).
  const bool small_nhwc_gathers = vector_pixels && channels_last && C >= 2 && C <= 4 && bilinear &&
                                  vector_taps == Taps::Avx512 && (g.in_h + 4) * (g.in_w + 4) * C < (int64_t(1) << 31);
  // channels_last images of more channels: channel vectors (the int32 tap offsets times C too).
  const bool wide_nhwc = std::is_same_v<scalar_t, float> && channels_last && C > kGatherChannels &&
                         vector_taps == Taps::Avx512 && (g.in_h + 4) * (g.in_w + 4) * C < (int64_t(1) << 31);
  // Those two with zeros or border padding compute their taps in registers, row by row.
  const bool direct = (gathers || small_nhwc_gathers) && g.padding != Padding::Reflection;
#ifdef FASTCNN_GRID_SAMPLE_AVX2
  // NCHW feature maps, through a channels_last copy of each image (see
  // avx512::forward_chunk_transposed). A task is one image, or with fewer images than threads a
  // share of its channels (whole vectors of 16); the element index pixel * C must fit in int32.
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (!channels_last && C > kGatherChannels && vector_taps == Taps::Avx512 &&
        (g.in_h + 4) * (g.in_w + 4) * C < (int64_t(1) << 31)) {
      const int64_t vectors = (C + 15) / 16;
      const int64_t groups = std::min(vectors, (threads + g.batch - 1) / std::max<int64_t>(1, g.batch));
      at::parallel_for(0, g.batch * groups, 1, [&](int64_t begin, int64_t end) {
        Chunk<float> ch;
        std::vector<float> image;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / groups, group = task % groups;
          const int64_t c0 = std::min(C, 16 * (group * vectors / groups));
          const int64_t channels = std::min(C, 16 * ((group + 1) * vectors / groups)) - c0;
          image.resize(channels * in_hw);
          avx512::transpose(input + (n * C + c0) * in_hw, image.data(), channels, in_hw);
          for (int64_t oy = 0; oy < g.out_h; ++oy)
            for (int64_t ox0 = 0; ox0 < g.out_w; ox0 += kChunk) {
              const int len = static_cast<int>(std::min<int64_t>(kChunk, g.out_w - ox0));
              source_taps(ch, n, oy, ox0, len, source, g, vector_taps, false, false);
              avx512::forward_chunk_transposed(image.data(), channels,
                                               output + output_offset(g, false, n, oy, ox0) + c0 * out_hw, ch, len,
                                               out_hw, g.in_w, bilinear);
            }
        }
      });
      return;
    }
  }
#endif
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#ifdef FASTCNN_GRID_SAMPLE_AVX2
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (direct) {
        avx512::forward_rows_direct(input, output, source, g, channels_last, begin, end);
        return;
      }
    }
#endif
    Chunk<acc_t> ch;
    std::vector<acc_t> acc(channels_last ? C : 0);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / g.out_h, oy = row % g.out_h;
      for (int64_t ox0 = 0; ox0 < g.out_w; ox0 += kChunk) {
        const int len = static_cast<int>(std::min<int64_t>(kChunk, g.out_w - ox0));
        source_taps(ch, n, oy, ox0, len, source, g, vector_taps, !vector_pixels, false);
#ifdef FASTCNN_GRID_SAMPLE_AVX2
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (wide_nhwc) {
            avx512::forward_chunk_channels(input + n * C * in_hw, output + output_offset(g, true, n, oy, ox0), ch, len, C,
                                           g.in_w, bilinear);
            continue;
          }
          if (gathers || small_nhwc_gathers) {
            avx512::forward_chunk_gathers(input + n * C * in_hw, output + output_offset(g, channels_last, n, oy, ox0),
                                          ch, len, g, channels_last);
            continue;
          }
          if (vector_pixels) {
            avx2::forward_row(input + n * C * in_hw, output + output_offset(g, channels_last, n, oy, ox0), ch, len, C,
                              st, g.in_w, bilinear);
            continue;
          }
        }
#endif
        if (!channels_last) {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* plane = input + (n * C + c) * in_hw;
            scalar_t* out = output + (n * C + c) * out_hw + oy * g.out_w + ox0;
            for (int p = 0; p < len; ++p) out[p] = static_cast<scalar_t>(sample_one(plane, ch, p, g.in_w, bilinear));
          }
          continue;
        }
        const scalar_t* image = input + n * in_hw * C;
        for (int p = 0; p < len; ++p) {
          scalar_t* out = output + ((n * g.out_h + oy) * g.out_w + ox0 + p) * C;
          const int64_t o = ch.offset[p];
          const uint8_t m = ch.mask[p];
          if (!bilinear) {
            if (m) {
              const scalar_t* src = image + o * C;
              for (int64_t c = 0; c < C; ++c) out[c] = src[c];
            } else {
              for (int64_t c = 0; c < C; ++c) out[c] = scalar_t(0);
            }
            continue;
          }
          const scalar_t* nw = image + o * C;
          const scalar_t* ne = nw + C;
          const scalar_t* sw = nw + g.in_w * C;
          const scalar_t* se = sw + C;
          const acc_t a = ch.w_nw[p], b = ch.w_ne[p], s = ch.w_sw[p], e = ch.w_se[p];
          if (m == kAllTaps) {
            for (int64_t c = 0; c < C; ++c) {
              out[c] = static_cast<scalar_t>(static_cast<acc_t>(nw[c]) * a + static_cast<acc_t>(ne[c]) * b +
                                             static_cast<acc_t>(sw[c]) * s + static_cast<acc_t>(se[c]) * e);
            }
            continue;
          }
          std::fill(acc.begin(), acc.end(), acc_t(0));
          const scalar_t* taps[4] = {nw, ne, sw, se};
          const acc_t weights[4] = {a, b, s, e};
          for (int k = 0; k < 4; ++k) {
            if (!(m >> k & 1)) continue;
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<acc_t>(taps[k][c]) * weights[k];
          }
          for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(acc[c]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: one batch element per task; the scatter into grad_input and the coordinate-gradient
// sums run in a fixed order.

// Adds the gradients of one channel plane (NCHW) for a chunk; accumulates d/dx, d/dy in ch.gx/gy.
template <typename scalar_t, typename acc_t>
inline void backward_plane_chunk(const scalar_t* plane, const scalar_t* go, acc_t* gin, Chunk<acc_t>& ch, int len,
                                 int64_t in_w, bool bilinear, bool want_input, bool want_coords) {
  for (int p = 0; p < len; ++p) {
    const acc_t gout = static_cast<acc_t>(go[p]);
    const int64_t o = ch.offset[p];
    const uint8_t m = ch.mask[p];
    if (!bilinear) {
      if (want_input && m) gin[o] += gout;
      continue;
    }
    if (m == kAllTaps) {
      if (want_input) {
        gin[o] += ch.w_nw[p] * gout;
        gin[o + 1] += ch.w_ne[p] * gout;
        gin[o + in_w] += ch.w_sw[p] * gout;
        gin[o + in_w + 1] += ch.w_se[p] * gout;
      }
      if (want_coords) {
        add_coordinate_grad(ch, p, gout, static_cast<acc_t>(plane[o]), static_cast<acc_t>(plane[o + 1]),
                            static_cast<acc_t>(plane[o + in_w]), static_cast<acc_t>(plane[o + in_w + 1]));
      }
      continue;
    }
    if (m == 0) continue;
    const int64_t offs[4] = {o, o + 1, o + in_w, o + in_w + 1};
    const acc_t weights[4] = {ch.w_nw[p], ch.w_ne[p], ch.w_sw[p], ch.w_se[p]};
    acc_t v[4];
    for (int k = 0; k < 4; ++k) {
      const bool inside = m >> k & 1;
      v[k] = inside ? static_cast<acc_t>(plane[offs[k]]) : acc_t(0);
      if (want_input && inside) gin[offs[k]] += weights[k] * gout;
    }
    if (want_coords) add_coordinate_grad(ch, p, gout, v[0], v[1], v[2], v[3]);
  }
}

// The same for one channels_last pixel: C contiguous channels per tap.
template <typename scalar_t, typename acc_t>
inline void backward_pixel_nhwc(const scalar_t* image, const scalar_t* go, acc_t* gin, Chunk<acc_t>& ch, int p,
                                int64_t C, int64_t in_w, bool bilinear, bool want_input, bool want_coords) {
  const int64_t o = ch.offset[p];
  const uint8_t m = ch.mask[p];
  if (!bilinear) {
    if (want_input && m) {
      acc_t* dst = gin + o * C;
      for (int64_t c = 0; c < C; ++c) dst[c] += static_cast<acc_t>(go[c]);
    }
    return;
  }
  if (m == 0) return;
  const int64_t offs[4] = {o * C, (o + 1) * C, (o + in_w) * C, (o + in_w + 1) * C};
  const acc_t weights[4] = {ch.w_nw[p], ch.w_ne[p], ch.w_sw[p], ch.w_se[p]};
  if (want_input) {
    for (int k = 0; k < 4; ++k) {
      if (!(m >> k & 1)) continue;
      acc_t* dst = gin + offs[k];
      const acc_t w = weights[k];
      for (int64_t c = 0; c < C; ++c) dst[c] += w * static_cast<acc_t>(go[c]);
    }
  }
  if (!want_coords) return;
  if (m == kAllTaps) {
    const scalar_t *nw = image + offs[0], *ne = image + offs[1], *sw = image + offs[2], *se = image + offs[3];
    acc_t sum_x0 = 0, sum_x1 = 0, sum_y0 = 0, sum_y1 = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t gout = static_cast<acc_t>(go[c]);
      const acc_t a = static_cast<acc_t>(nw[c]), b = static_cast<acc_t>(ne[c]);
      const acc_t s = static_cast<acc_t>(sw[c]), e = static_cast<acc_t>(se[c]);
      sum_x1 += gout * (b - a);
      sum_x0 += gout * (e - s);
      sum_y1 += gout * (s - a);
      sum_y0 += gout * (e - b);
    }
    ch.gx[p] += sum_x1 * ch.dy1[p] + sum_x0 * ch.dy0[p];
    ch.gy[p] += sum_y1 * ch.dx1[p] + sum_y0 * ch.dx0[p];
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t v[4];
    for (int k = 0; k < 4; ++k) v[k] = (m >> k & 1) ? static_cast<acc_t>(image[offs[k] + c]) : acc_t(0);
    add_coordinate_grad(ch, p, static_cast<acc_t>(go[c]), v[0], v[1], v[2], v[3]);
  }
}

// Where the coordinate gradient of each output pixel goes: the grid gradient, or theta's.
template <typename scalar_t, typename acc_t>
struct GridSink {
  scalar_t* grad_grid;  // [N, Ho, Wo, 2], or null
  int64_t out_h, out_w;
  void begin(int64_t) {}
  void add(int64_t n, int64_t oy, int64_t ox0, int len, const Chunk<acc_t>& ch) {
    scalar_t* dst = grad_grid + ((n * out_h + oy) * out_w + ox0) * 2;
    for (int p = 0; p < len; ++p) {
      dst[2 * p] = static_cast<scalar_t>(ch.gx[p] * ch.scale_x[p]);
      dst[2 * p + 1] = static_cast<scalar_t>(ch.gy[p] * ch.scale_y[p]);
    }
  }
  void end(int64_t) {}
};

template <typename scalar_t, typename acc_t>
struct ThetaSink {
  scalar_t* grad_theta;  // [N, 2, 3]
  const acc_t* base_x;
  const acc_t* base_y;
  double sums[6];
  void begin(int64_t) { std::fill(sums, sums + 6, 0.0); }
  void add(int64_t, int64_t oy, int64_t ox0, int len, const Chunk<acc_t>& ch) {
    // Chunk sums added in double: a fixed order, and no fp32 drift over 50k pixels.
    double sx = 0, sxx = 0, sy = 0, syx = 0;
#ifdef FASTCNN_GRID_SAMPLE_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      if (cpu_has_avx2()) {
        double chunk[4];
        avx2::theta_chunk_sums(ch, len, base_x + ox0, chunk);
        sx = chunk[0], sxx = chunk[1], sy = chunk[2], syx = chunk[3];
        len = 0;
      }
    }
#endif
    for (int p = 0; p < len; ++p) {
      const double bx = base_x[ox0 + p];
      const double dx = static_cast<double>(ch.gx[p] * ch.scale_x[p]);
      const double dy = static_cast<double>(ch.gy[p] * ch.scale_y[p]);
      sx += dx;
      sxx += dx * bx;
      sy += dy;
      syx += dy * bx;
    }
    const double row[4] = {sx, sxx, sy, syx};
    add_row(oy, row);
  }
  // row: the sums over one output row of dx, dx * base_x, dy, dy * base_x.
  void add_row(int64_t oy, const double row[4]) {
    const double sx = row[0], sxx = row[1], sy = row[2], syx = row[3];
    const double by = base_y[oy];
    sums[0] += sxx;
    sums[1] += sx * by;
    sums[2] += sx;
    sums[3] += syx;
    sums[4] += sy * by;
    sums[5] += sy;
  }
  // sums of one image in the order of `sums`, from avx512::backward_affine_image_lattice.
  void add_image(const double image_sums[6]) {
    for (int k = 0; k < 6; ++k) sums[k] += image_sums[k];
  }
  void end(int64_t n) {
    for (int k = 0; k < 6; ++k) grad_theta[n * 6 + k] = static_cast<scalar_t>(sums[k]);
  }
};

template <typename scalar_t, typename acc_t, typename Source, typename Sink>
void backward_kernel(const scalar_t* grad_output, const scalar_t* input, acc_t* grad_input, const Source& source,
                     const Sink& sink_proto, const Geometry& g, bool channels_last_arg, bool want_input,
                     bool want_coords) {
  const bool channels_last = channels_last_arg && g.channels > 1;  // as in forward_kernel
  const int64_t C = g.channels, in_hw = g.in_h * g.in_w, out_hw = g.out_h * g.out_w;
  const bool bilinear = g.interpolation == Interpolation::Bilinear;
  // Nearest sampling has a zero coordinate gradient; the sink still writes the zeros.
  const bool coords = want_coords && bilinear;
  const Taps vector_taps = vector_taps_for(g);
  const bool vector_pixels = std::is_same_v<scalar_t, float> && vector_taps != Taps::Scalar && (!channels_last || C <= 8);
  const avx2_strides st = layout_strides(channels_last, C, in_hw, out_hw);
  // The coordinate gradient alone of NCHW images of up to kGatherChannels channels, bilinear with
  // zeros or border padding: avx512::coordinate_grad_image_nchw.
  const bool coords_only = vector_pixels && vector_taps == Taps::Avx512 && !channels_last && C <= kGatherChannels &&
                           coords && !want_input && g.padding != Padding::Reflection;
  // Images of more than kGatherChannels channels, on AVX-512: channel vectors, pixel by pixel
  // (backward_pixel_channels); NCHW ones through channels_last copies of the image and grad_output,
  // and grad_input transposed back (as the forward, see avx512::forward_chunk_transposed).
  const bool wide_channels = vector_taps == Taps::Avx512 && std::is_same_v<scalar_t, float> && C > kGatherChannels &&
                             (want_input || coords) && (g.in_h + 4) * (g.in_w + 4) * C < (int64_t(1) << 31);
  const bool transposed = wide_channels && !channels_last;
  // grad_input of an affine map by conflict-free pair gathers and scatters, where the map allows
  // (avx512::backward_affine_image_lattice, image by image).
  constexpr bool affine_fp32 = std::is_same_v<Source, AffineSource<float>> && std::is_same_v<scalar_t, float>;
  [[maybe_unused]] const bool lattice = affine_fp32 && vector_taps == Taps::Avx512 && !channels_last &&
                                        C <= kLatticeChannels && bilinear && g.padding == Padding::Zeros &&
                                        want_input && g.out_h < (1 << 15) && g.out_w < (1 << 15);
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    Chunk<acc_t> ch;
#ifdef FASTCNN_GRID_SAMPLE_AVX2
    static thread_local avx512::LatticeScratch lattice_scratch;
#endif
    Sink sink = sink_proto;
    std::vector<double> row_sums;
    std::vector<float> image_copy(transposed ? C * in_hw : 0), go_copy(transposed ? C * out_hw : 0),
        gin_copy(transposed && want_input ? C * in_hw : 0);
    for (int64_t n = begin; n < end; ++n) {
      acc_t* gin = want_input ? grad_input + n * C * in_hw : nullptr;
      // First touch by the owning thread (the transposed path writes every element at the end).
      if (want_input && !transposed) std::memset(gin, 0, sizeof(acc_t) * C * in_hw);
      if (want_coords) sink.begin(n);
#ifdef FASTCNN_GRID_SAMPLE_AVX2
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (wide_channels) {
          const float* image = input + n * C * in_hw;
          const float* go_image = grad_output + n * C * out_hw;
          float* gin_image = gin;
          if (transposed) {
            avx512::transpose(image, image_copy.data(), C, in_hw);
            avx512::transpose(go_image, go_copy.data(), C, out_hw);
            image = image_copy.data();
            go_image = go_copy.data();
            if (want_input) {
              std::fill(gin_copy.begin(), gin_copy.end(), 0.0f);
              gin_image = gin_copy.data();
            }
          }
          for (int64_t oy = 0; oy < g.out_h; ++oy) {
            for (int64_t ox0 = 0; ox0 < g.out_w; ox0 += kChunk) {
              const int len = static_cast<int>(std::min<int64_t>(kChunk, g.out_w - ox0));
              source_taps(ch, n, oy, ox0, len, source, g, vector_taps, false, true);
              std::fill(ch.gx, ch.gx + len, 0.0f);
              std::fill(ch.gy, ch.gy + len, 0.0f);
              for (int p = 0; p < len; ++p)
                avx512::backward_pixel_channels(image, go_image + (oy * g.out_w + ox0 + p) * C, gin_image, ch, p, C,
                                                g.in_w, bilinear, want_input, coords);
              if (want_coords) sink.add(n, oy, ox0, len, ch);
            }
          }
          if (transposed && want_input) avx512::transpose(gin_image, gin, in_hw, C);
          if (want_coords) sink.end(n);
          continue;
        }
        if constexpr (affine_fp32) {
          double image_sums[6] = {};
          if (lattice && avx512::backward_affine_image_lattice(input + n * C * in_hw, grad_output + n * C * out_hw,
                                                               gin, source, g, n, coords, lattice_scratch,
                                                               image_sums)) {
            if (want_coords) {
              sink.add_image(image_sums);
              sink.end(n);
            }
            continue;
          }
        }
        if (coords_only) {
          float* grid_grad = nullptr;
          const float* base_x = nullptr;
          if constexpr (std::is_same_v<Sink, ThetaSink<float, float>>) {
            row_sums.assign(4 * g.out_h, 0.0);
            base_x = sink.base_x;
          } else {
            grid_grad = sink.grad_grid + n * out_hw * 2;
          }
          avx512::coordinate_grad_image_nchw(input + n * C * in_hw, grad_output + n * C * out_hw, source, g, n, base_x,
                                             grid_grad, row_sums.data());
          if constexpr (std::is_same_v<Sink, ThetaSink<float, float>>) {
            for (int64_t oy = 0; oy < g.out_h; ++oy) sink.add_row(oy, row_sums.data() + 4 * oy);
          }
          if (want_coords) sink.end(n);
          continue;
        }
      }
#endif
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        for (int64_t ox0 = 0; ox0 < g.out_w; ox0 += kChunk) {
          const int len = static_cast<int>(std::min<int64_t>(kChunk, g.out_w - ox0));
          source_taps(ch, n, oy, ox0, len, source, g, vector_taps, !vector_pixels, true);
#ifdef FASTCNN_GRID_SAMPLE_AVX2
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (vector_pixels) {
              avx2::backward_row(input + n * C * in_hw, grad_output + output_offset(g, channels_last, n, oy, ox0), gin,
                                 ch, len, C, st, g.in_w,
                                    bilinear, want_input, coords);
              if (want_coords) sink.add(n, oy, ox0, len, ch);
              continue;
            }
          }
#endif
          std::fill(ch.gx, ch.gx + len, acc_t(0));
          std::fill(ch.gy, ch.gy + len, acc_t(0));
          if (want_input || coords) {
            if (!channels_last) {
              for (int64_t c = 0; c < C; ++c) {
                backward_plane_chunk(input + (n * C + c) * in_hw,
                                     grad_output + (n * C + c) * out_hw + oy * g.out_w + ox0,
                                     want_input ? gin + c * in_hw : nullptr, ch, len, g.in_w, bilinear, want_input,
                                     coords);
              }
            } else {
              const scalar_t* image = input + n * in_hw * C;
              for (int p = 0; p < len; ++p) {
                backward_pixel_nhwc(image, grad_output + ((n * g.out_h + oy) * g.out_w + ox0 + p) * C, gin, ch, p,
                                    C, g.in_w, bilinear, want_input, coords);
              }
            }
          }
          if (want_coords) sink.add(n, oy, ox0, len, ch);
        }
      }
      if (want_coords) sink.end(n);
    }
#ifdef FASTCNN_GRID_SAMPLE_AVX2
    // Orders of outputs above 1M pixels (4 MB each) are not kept.
    if (lattice && out_hw > (int64_t(1) << 20)) lattice_scratch = avx512::LatticeScratch();
#endif
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points

bool is_channels_last(const at::Tensor& input) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

at::MemoryFormat format_of(const at::Tensor& input) {
  return is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

template <typename acc_t>
std::vector<acc_t> affine_base(int64_t size, bool align_corners) {
  std::vector<acc_t> base(size + 8);  // the AVX2 taps read a whole vector past the last pixel
  for (int64_t i = 0; i < size; ++i) base[i] = affine_base_coord<acc_t>(i, size, align_corners);
  return base;
}

void check_cpu(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.device().is_cpu(), op, ": the CPU kernel got a tensor on ", input.device());
}

template <typename Launch>
at::Tensor forward_common(const at::Tensor& input, const Geometry& g, Launch&& launch) {
  const auto format = format_of(input);
  auto output = cpu::empty_output({g.batch, g.channels, g.out_h, g.out_w}, input.options(), format);
  if (output.numel() == 0) return output;
  const auto in = input.contiguous(format);
  launch(in, output, format == at::MemoryFormat::ChannelsLast);
  return output;
}

at::Tensor grid_sample_cpu(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                           int64_t padding_mode, bool align_corners) {
  check_cpu("grid_sample", input);
  const Geometry g = check_grid_sample(input, grid, interpolation, padding_mode, align_corners);
  return forward_common(input, g, [&](const at::Tensor& in, at::Tensor& out, bool channels_last) {
    const auto grid_c = grid.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "grid_sample_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      GridSource<scalar_t, acc_t> source{grid_c.const_data_ptr<scalar_t>(), g.out_h, g.out_w};
      forward_kernel<scalar_t, acc_t>(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), source, g,
                                      channels_last);
    });
  });
}

at::Tensor affine_grid_sample_cpu(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef out_size,
                                  int64_t interpolation, int64_t padding_mode, bool align_corners) {
  check_cpu("affine_grid_sample", input);
  TORCH_CHECK(out_size.size() == 2, "affine_grid_sample: out_size must be [H_out, W_out], got ", out_size);
  const Geometry g =
      check_affine_grid_sample(input, theta, out_size[0], out_size[1], interpolation, padding_mode, align_corners);
  return forward_common(input, g, [&](const at::Tensor& in, at::Tensor& out, bool channels_last) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "affine_grid_sample_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto theta_acc = theta.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
      const auto base_x = affine_base<acc_t>(g.out_w, align_corners);
      const auto base_y = affine_base<acc_t>(g.out_h, align_corners);
      AffineSource<acc_t> source{theta_acc.const_data_ptr<acc_t>(), base_x.data(), base_y.data()};
      forward_kernel<scalar_t, acc_t>(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), source, g,
                                      channels_last);
    });
  });
}

// Runs the backward kernel with a grad_input buffer in acc_t (the output itself for fp32/fp64, a
// scratch cast once at the end for fp16/bf16).
template <typename scalar_t, typename Source, typename Sink>
at::Tensor run_backward(const at::Tensor& grad_output, const at::Tensor& input, const Source& source, const Sink& sink,
                        const Geometry& g, bool want_input, bool want_coords) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto format = format_of(input);
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const auto in = input.contiguous(format);
  const auto go = grad_output.contiguous(format);
  at::Tensor grad_input, buffer;
  if (want_input) {
    grad_input = cpu::empty_output(input.sizes(), input.options(), format);
    buffer = std::is_same_v<scalar_t, acc_t> ? grad_input
                                             : cpu::empty_output(input.sizes(), input.options().dtype(at::kFloat), format);
  }
  backward_kernel<scalar_t, acc_t>(go.const_data_ptr<scalar_t>(), in.const_data_ptr<scalar_t>(),
                                   want_input ? buffer.mutable_data_ptr<acc_t>() : nullptr, source, sink, g,
                                   channels_last, want_input, want_coords);
  if (want_input && !std::is_same_v<scalar_t, acc_t>) grad_input.copy_(buffer);
  return grad_input;
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                            const at::Tensor& grid, int64_t interpolation,
                                                            int64_t padding_mode, bool align_corners,
                                                            std::array<bool, 2> output_mask) {
  check_cpu("grid_sample", input);
  const Geometry g = check_grid_sample(input, grid, interpolation, padding_mode, align_corners);
  check_grad_output("grid_sample", grad_output, input, g);
  at::Tensor grad_input = input.new_empty({0});
  at::Tensor grad_grid = output_mask[1] ? at::empty(grid.sizes(), grid.options()) : input.new_empty({0});
  if (input.numel() == 0 || g.out_h * g.out_w == 0) {
    if (output_mask[0]) grad_input = at::zeros_like(input, input.suggest_memory_format());
    if (output_mask[1]) grad_grid.zero_();
    return {grad_input, grad_grid};
  }
  const auto grid_c = grid.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "grid_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GridSource<scalar_t, acc_t> source{grid_c.const_data_ptr<scalar_t>(), g.out_h, g.out_w};
    GridSink<scalar_t, acc_t> sink{output_mask[1] ? grad_grid.mutable_data_ptr<scalar_t>() : nullptr, g.out_h,
                                   g.out_w};
    auto gi = run_backward<scalar_t>(grad_output, input, source, sink, g, output_mask[0], output_mask[1]);
    if (output_mask[0]) grad_input = gi;
  });
  return {grad_input, grad_grid};
}

std::tuple<at::Tensor, at::Tensor> affine_grid_sample_backward_cpu(const at::Tensor& grad_output,
                                                                   const at::Tensor& input, const at::Tensor& theta,
                                                                   int64_t interpolation, int64_t padding_mode,
                                                                   bool align_corners,
                                                                   std::array<bool, 2> output_mask) {


  check_cpu("affine_grid_sample", input);
  TORCH_CHECK(grad_output.dim() == 4, "affine_grid_sample backward: expected a 4-D grad_output, got ",
              grad_output.sizes());
  const Geometry g = check_affine_grid_sample(input, theta, grad_output.size(2), grad_output.size(3), interpolation,
                                              padding_mode, align_corners);
  check_grad_output("affine_grid_sample", grad_output, input, g);
  at::Tensor grad_input = input.new_empty({0});
  at::Tensor grad_theta = output_mask[1] ? at::empty(theta.sizes(), theta.options()) : input.new_empty({0});
  if (input.numel() == 0) {
    if (output_mask[0]) grad_input = at::zeros_like(input, input.suggest_memory_format());
    if (output_mask[1]) grad_theta.zero_();
    return {grad_input, grad_theta};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto theta_acc = theta.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const auto base_x = affine_base<acc_t>(g.out_w, align_corners);
    const auto base_y = affine_base<acc_t>(g.out_h, align_corners);
    AffineSource<acc_t> source{theta_acc.const_data_ptr<acc_t>(), base_x.data(), base_y.data()};
    ThetaSink<scalar_t, acc_t> sink{output_mask[1] ? grad_theta.mutable_data_ptr<scalar_t>() : nullptr, base_x.data(),
                                    base_y.data(), {}};
    auto gi = run_backward<scalar_t>(grad_output, input, source, sink, g, output_mask[0], output_mask[1]);
    if (output_mask[0]) grad_input = gi;
  });
  return {grad_input, grad_theta};
}

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("grid_sample", TORCH_FN(fastcnn::grid_sample::grid_sample_cpu));
  m.impl("_grid_sample_backward", TORCH_FN(fastcnn::grid_sample::grid_sample_backward_cpu));
  m.impl("affine_grid_sample", TORCH_FN(fastcnn::grid_sample::affine_grid_sample_cpu));
  m.impl("_affine_grid_sample_backward", TORCH_FN(fastcnn::grid_sample::affine_grid_sample_backward_cpu));
}
