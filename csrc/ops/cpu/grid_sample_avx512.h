// The CPU sampler's AVX-512 forward (fp32): taps of 16 pixels in registers, read by gathers or
// from the few input rows they lie in (row windows, grid_sample_avx512_windows.h).
// The backward is in grid_sample_avx512_backward.h, images of many channels in
// grid_sample_avx512_channels.h. Private to grid_sample_kernel.cpp, the one translation unit
// that includes it (everything here is in an anonymous namespace).
#pragma once

#include "ops/cpu/grid_sample_avx512_windows.h"

#ifdef FASTCNN_GRID_SAMPLE_AVX2

namespace fastcnn {
namespace grid_sample {
namespace {

// AVX-512 (fp32): the taps of 16 pixels at once, and a forward that reads the taps by gathers (taps
// outside the input read zero without a load) or, where a vector's taps lie in few enough input
// rows, from those rows (grid_sample_avx512_windows.h; on a host whose gathers are slow that is
// most vectors): for NCHW images of up to 8 channels, and for channels_last images of 2 to 4. The
// history below is of hosts with fast gathers. On the Intel Xeon of 2026-11-30 PyTorch's own
// AVX-512 grid_sample is 2-3x faster than on the AVX2 machine grid_sample_avx2.h was tuned on;
// 16-lane gathers took our forward over the three STN shapes from 1.2x to 1.8x PyTorch's (NCHW,
// geomean), pair gathers to about 2.2x. Gathers across 64 planes measured 10% slower than the AVX2
// blocks of planes, so wider images keep those. Taps kept in registers instead of chunk arrays (and
// an affine map taken straight to pixels, its clamp folded into one min/max) made the forward
// 1.05-1.3x faster again (64x1x28x28 most: two vectors a row, so the arrays cost the most). Tried
// for the backward and left out: gather, add and scatter of grad_input with the lanes that share an
// element summed first (vpconflictd runs): 0.6-0.7x the speed of the AVX2 scalar loop, whose loads
// the coordinate gradient shares; and grad_input scattered lane by lane from vectors stored to the
// stack: 0.4-0.65x.
// FASTCNN_AVX512=0 turns this off (read once per call).
FASTCNN_GRID_SAMPLE_AVX512_BEGIN
namespace avx512 {

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

// Whether every live pixel has its four taps inside the image (so every run of a row's two taps
// lies in it too): then no run needs the edge tests of gather_run. Near-identity STN maps make
// 50-75% of the vectors such (the three STN benchmark shapes); the test costs two mask
// operations, the tests it spares about ten a channel (NCHW forward of the three STN shapes,
// one thread: 1.03-1.12x faster).
inline bool all_taps_inside(const Taps16& t, __mmask16 live) {
  // nw inside means x0 and y0 are, se inside x0 + 1 and y0 + 1: ne and sw follow.
  return static_cast<__mmask16>(t.nw & t.se) == live;
}

// The lanes whose run of two pixels from `pixel` lies in an image of `size` pixels:
// 0 <= pixel <= size - 2 (the `safe` lanes of gather_run).
inline __mmask16 pairs_inside(__m512i pixel, int64_t size) {
  return _mm512_cmpgt_epi32_mask(pixel, _mm512_set1_epi32(-1)) &
         _mm512_cmplt_epi32_mask(pixel, _mm512_set1_epi32(static_cast<int32_t>(size - 1)));
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
  const __m512i south = _mm512_add_epi32(t.offset, _mm512_set1_epi32(static_cast<int32_t>(in_w)));
  auto channels_loop = [&](__mmask16 north_safe, __mmask16 south_safe) {
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
  };
  if (all_taps_inside(t, live)) {
    channels_loop(0xFFFF, 0xFFFF);
  } else {
    const __mmask16 north_safe = pairs_inside(t.offset, in_hw), south_safe = pairs_inside(south, in_hw);
    channels_loop(north_safe, south_safe);
  }
}

// Output vector k of a 16-pixel channels_last block holds interleaved elements 16k..16k+15: pixel
// (16k + i) / C, channel (16k + i) % C. Built once per call. Channels are taken two at a time by
// two-source permutes (pair_index: the pixel, plus 16 for the odd channel of the pair), so a
// vector costs 1 (C = 2), 2 (C = 3) or 3 (C = 4) permutes instead of C.
template <int kChannels>
struct Interleave {
  __m512i pixel_of[kChannels];
  __m512i pair_index[kChannels];            // channels 0-1, or 2-3 (C = 4)
  __m512i high_pair_index[kChannels];
  __mmask16 channel_lanes[kChannels][kChannels];
  Interleave() {
    for (int k = 0; k < kChannels; ++k) {
      alignas(64) int32_t pixels[16], low_pair[16], high_pair[16];
      for (int c = 0; c < kChannels; ++c) channel_lanes[k][c] = 0;
      for (int i = 0; i < 16; ++i) {
        const int channel = (16 * k + i) % kChannels;
        pixels[i] = (16 * k + i) / kChannels;
        low_pair[i] = pixels[i] + (channel == 1 ? 16 : 0);
        high_pair[i] = pixels[i] + (channel == 3 ? 16 : 0);
        channel_lanes[k][channel] |= static_cast<__mmask16>(1u << i);
      }
      pixel_of[k] = _mm512_load_si512(pixels);
      pair_index[k] = _mm512_load_si512(low_pair);
      high_pair_index[k] = _mm512_load_si512(high_pair);
    }
  }
  // Output vector k from the channel vectors.
  __m512 vector(int k, const __m512* value) const {
    const __m512 low = _mm512_permutex2var_ps(value[0], pair_index[k], value[1]);
    if constexpr (kChannels == 2) return low;
    if constexpr (kChannels == 3) return _mm512_mask_permutexvar_ps(low, channel_lanes[k][2], pixel_of[k], value[2]);
    const __m512 high = _mm512_permutex2var_ps(value[2], high_pair_index[k], value[kChannels - 1]);
    return _mm512_mask_blend_ps(channel_lanes[k][2] | channel_lanes[k][kChannels - 1], low, high);
  }
};

// The taps of 16 channels_last pixels of kChannels channels, each tap row's runs by gather_run;
// all_inside: every run lies in the image (no edge tests).
template <int kChannels>
__attribute__((always_inline)) inline void gather_taps_nhwc(const float* image, const Taps16& t, int64_t in_hw,
                                                            int64_t in_w, bool all_inside, TapValues<kChannels>* v) {
  const __m512i south = _mm512_add_epi32(t.offset, _mm512_set1_epi32(static_cast<int32_t>(in_w)));
  __m512 top[2 * kChannels], bottom[2 * kChannels];
  gather_run<kChannels>(image, t.offset, t.nw, t.ne, all_inside ? 0xFFFF : pairs_inside(t.offset, in_hw), top);
  gather_run<kChannels>(image, south, t.sw, t.se, all_inside ? 0xFFFF : pairs_inside(south, in_hw), bottom);
#pragma GCC unroll 4
  for (int c = 0; c < kChannels; ++c)
    v->nw[c] = top[c], v->ne[c] = top[kChannels + c], v->sw[c] = bottom[c], v->se[c] = bottom[kChannels + c];
}

// The bilinear samples of 16 channels_last pixels (`count` of them) from their taps, interleaved
// into kChannels output vectors.
template <int kChannels>
inline void store_nhwc_small(float* out, const Taps16& t, const TapValues<kChannels>& v, int count,
                             const Interleave<kChannels>& il) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 value[kChannels];
#pragma GCC unroll 4
  for (int c = 0; c < kChannels; ++c) {
    // Two independent halves, as the scalar loop.
    const __m512 north = _mm512_fmadd_ps(v.ne[c], t.w_ne, _mm512_mul_ps(v.nw[c], t.w_nw));
    const __m512 south = _mm512_fmadd_ps(v.se[c], t.w_se, _mm512_mul_ps(v.sw[c], t.w_sw));
    value[c] = _mm512_add_ps(north, south);
  }
  const int elements = count * kChannels;
#pragma GCC unroll 4
  for (int k = 0; k < kChannels; ++k)
    _mm512_mask_storeu_ps(out + 16 * k, _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(elements - 16 * k)),
                          il.vector(k, value));
}

// The bilinear forward of 16 output pixels (`count` of them) of a channels_last image of kChannels
// channels; the channel vectors are interleaved by permutes into kChannels output vectors (three
// scatters cost more than the gathers: 32x3x64x64 forward 1.5x PyTorch with them).
template <int kChannels>
inline void sample_nhwc_small(const float* image, float* out, const Taps16& t, int count, int64_t in_hw, int64_t in_w,
                              const Interleave<kChannels>& il, bool all_inside = false) {
  // all_inside: the taps are taps16_inside's, every run lies in the image. (No all_taps_inside test
  // on taps16_pixels' taps here: measured 3% slower on 3-channel images.)
  TapValues<kChannels> v;
  gather_taps_nhwc(image, t, in_hw, in_w, all_inside, &v);
  store_nhwc_small(out, t, v, count, il);
}

// sample_nhwc_small from the taps' window (make_window of Window<kChannels, 4>).
template <int kChannels, bool kLiveTaps = false>
inline void sample_nhwc_window(const float* image, float* out, const Taps16& t, const Window<kChannels, 4>& w,
                               int count, __mmask16 live, int64_t in_w, int64_t in_h, const Interleave<kChannels>& il) {
  TapValues<kChannels> v;
  window_taps<kChannels, kLiveTaps>(image, 0, in_w * kChannels, in_h, t, w, live, &v);
  store_nhwc_small(out, t, v, count, il);
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

// The bilinear weights of 16 pixels at (ix, iy) (and the distances they are made of) into t, and
// the coordinates' floors; shared by every kind of taps below.
inline void bilinear_weights16(__m512 ix, __m512 iy, Taps16* t, __m512* fx, __m512* fy) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const int down = _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC;
  *fx = _mm512_roundscale_ps(ix, down);
  *fy = _mm512_roundscale_ps(iy, down);
  t->dx0 = _mm512_sub_ps(ix, *fx);
  t->dx1 = _mm512_sub_ps(_mm512_add_ps(*fx, one), ix);
  t->dy0 = _mm512_sub_ps(iy, *fy);
  t->dy1 = _mm512_sub_ps(_mm512_add_ps(*fy, one), iy);
  t->w_nw = _mm512_mul_ps(t->dx1, t->dy1);
  t->w_ne = _mm512_mul_ps(t->dx0, t->dy1);
  t->w_sw = _mm512_mul_ps(t->dx1, t->dy0);
  t->w_se = _mm512_mul_ps(t->dx0, t->dy0);
}

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
  __m512 fx, fy;
  bilinear_weights16(ix, iy, &t, &fx, &fy);
  const __m512i x0 = _mm512_cvttps_epi32(fx), y0 = _mm512_cvttps_epi32(fy);
  const __mmask16 x0_in = inside(x0, k.ax), x1_in = inside(_mm512_add_epi32(x0, one_i), k.ax);
  const __mmask16 y0_in = inside(y0, k.ay) & live, y1_in = inside(_mm512_add_epi32(y0, one_i), k.ay) & live;
  t.offset = _mm512_add_epi32(_mm512_mullo_epi32(y0, k.width), x0);
  t.x0 = x0, t.y0 = y0;
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

// taps16_pixels of 16 pixels whose four taps all lie inside the image (affine_span_inside),
// bilinear, zeros or border padding: the same values without clamps or in-bounds tests, every tap
// mask `live`. Lanes past it get offset 0. The offset y0 * W + x0 is computed in fp32: the caller
// checks the image has at most 2^24 pixels, where it is exact.
inline Taps16 taps16_inside(__m512 ix, __m512 iy, const TapsConstants& k, __mmask16 live) {
  Taps16 t;
  clip16(ix, k.ax, k.border, &t.scale_x);  // the scales only: border's clip leaves inside values as they are
  clip16(iy, k.ay, k.border, &t.scale_y);
  __m512 fx, fy;
  bilinear_weights16(ix, iy, &t, &fx, &fy);
  t.offset = _mm512_maskz_cvttps_epi32(live, _mm512_fmadd_ps(fy, _mm512_cvtepi32_ps(k.width), fx));
  t.x0 = _mm512_cvttps_epi32(fx), t.y0 = _mm512_cvttps_epi32(fy);
  t.nw = t.ne = t.sw = t.se = live;
  return t;
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
// images of 2 to 4. `row_taps(p, count, live)` gives the taps of pixels p..p+15. Bilinear vectors
// whose taps fit a window of up to window_rows rows read it instead (make_window's reductions: a
// grid's pixels need not be monotonic); window_rows 0 where the taps carry no x0, y0 (chunks).
template <typename RowTaps>
void forward_row_gathers(const float* image, float* out, int64_t out_w, const Geometry& g, bool channels_last,
                         const RowTaps& row_taps, int window_rows) {
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
      PlaneWindow w;
      if (bilinear && window_rows && make_window(t, live, g.in_w, window_rows, &w))
        sample_nchw_window(image, out + p, t, w, live, g.channels, in_hw, out_hw, g.in_w, g.in_h);
      else
        sample_nchw(image, out + p, t, live, g.channels, in_hw, out_hw, g.in_w, bilinear);
    });
    return;
  }
  auto nhwc = [&](auto channels) {
    constexpr int kChannels = decltype(channels)::value;
    static const Interleave<kChannels> il;
    each_vector([&](int64_t p, int count, __mmask16 live, const Taps16& t) {
      Window<kChannels, 4> w;
      if (window_rows && make_window(t, live, g.in_w, window_rows, &w))  // channels_last here is bilinear
        sample_nhwc_window<kChannels>(image, out + p * kChannels, t, w, count, live, g.in_w, g.in_h, il);
      else
        sample_nhwc_small<kChannels>(image, out + p * kChannels, t, count, in_hw, g.in_w, il);
    });
  };
  if (g.channels == 2) nhwc(std::integral_constant<int, 2>());
  else if (g.channels == 3) nhwc(std::integral_constant<int, 3>());
  else nhwc(std::integral_constant<int, 4>());
}

// Calls body(coords) for output row oy of image n, where coords(p, count, live, &ix, &iy) gives
// the unclamped pixel coordinates of pixels p..p+15: from the affine map (the row's map straight
// to input pixels, one fma a coordinate instead of the map and unnormalize's 7 instructions) or
// the grid.
template <typename Source, typename Body>
inline void with_row_coords(const Source& source, const Geometry& g, const TapsConstants& k, int64_t n, int64_t oy,
                            Body&& body) {
  if constexpr (std::is_same_v<Source, AffineSource<float>>) {
    const AffineRow map = source.pixel_row(n, oy, g.in_h, g.in_w, g.align_corners);
    const __m512 ax = _mm512_set1_ps(map.ax), cx = _mm512_set1_ps(map.cx);
    const __m512 ay = _mm512_set1_ps(map.ay), cy = _mm512_set1_ps(map.cy);
    body([&](int64_t p, int, __mmask16 live, __m512* ix, __m512* iy) {
      const __m512 bx = _mm512_maskz_loadu_ps(live, map.base_x + p);
      *ix = _mm512_fmadd_ps(ax, bx, cx);
      *iy = _mm512_fmadd_ps(ay, bx, cy);
    });
  } else {
    const float* pairs = source.grid + (n * g.out_h + oy) * g.out_w * 2;
    body([&](int64_t p, int count, __mmask16, __m512* ix, __m512* iy) {
      __m512 gx, gy;
      grid_coords(pairs, p, count, &gx, &gy);
      *ix = unnormalize16(gx, k.ax, k.align_corners);
      *iy = unnormalize16(gy, k.ay, k.align_corners);
    });
  }
}

// Calls body(row_taps) for output row oy of image n, where row_taps(p, count, live) computes the
// taps of pixels p..p+15 in registers, straight from the affine map or the grid (zeros and border
// padding): no chunk arrays stored and read back.
template <typename Source, typename Body>
inline void with_row_taps(const Source& source, const Geometry& g, const TapsConstants& k, int64_t n, int64_t oy,
                          Body&& body) {
  with_row_coords(source, g, k, n, oy, [&](const auto& coords) {
    body([&](int64_t p, int count, __mmask16 live) {
      __m512 ix, iy;
      coords(p, count, live, &ix, &iy);
      return taps16_pixels(ix, iy, k, live);
    });
  });
}

// Whether all four taps of every pixel p .. p + count - 1 of an affine row lie inside the image:
// 0 <= x < W - 1 and 0 <= y < H - 1 (x0 + 1 and y0 + 1 inside too). The map is monotonic along
// the row (base_x increases, and fma rounds monotonically), so its two end pixels bound the rest;
// std::fma here is the vector path's fmadd lane for lane. A NaN fails every comparison.
inline bool affine_span_inside(const AffineRow& map, int64_t p, int count, float x_limit, float y_limit) {
  const float b0 = map.base_x[p], b1 = map.base_x[p + count - 1];
  const float x0 = std::fma(map.ax, b0, map.cx), x1 = std::fma(map.ax, b1, map.cx);
  const float y0 = std::fma(map.ay, b0, map.cy), y1 = std::fma(map.ay, b1, map.cy);
  return x0 >= 0.0f && x1 >= 0.0f && x0 < x_limit && x1 < x_limit && y0 >= 0.0f && y1 >= 0.0f && y0 < y_limit &&
         y1 < y_limit;
}

// sample_nchw of 16 pixels whose taps all lie inside the image (taps16_inside): every run read by
// a full pair gather, no masks.
inline void sample_nchw_inside(const float* input, float* out, const Taps16& t, __mmask16 live, int64_t channels,
                               int64_t in_hw, int64_t out_hw, int64_t in_w) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i south = _mm512_add_epi32(t.offset, _mm512_set1_epi32(static_cast<int32_t>(in_w)));
  const __m256i north_low = _mm512_castsi512_si256(t.offset), north_high = _mm512_extracti64x4_epi64(t.offset, 1);
  const __m256i south_low = _mm512_castsi512_si256(south), south_high = _mm512_extracti64x4_epi64(south, 1);
  for (int64_t c = 0; c < channels; ++c) {
    const float* plane = input + c * in_hw;
    const __m512 n_low = _mm512_castpd_ps(_mm512_i32gather_pd(north_low, plane, 4));
    const __m512 n_high = _mm512_castpd_ps(_mm512_i32gather_pd(north_high, plane, 4));
    const __m512 s_low = _mm512_castpd_ps(_mm512_i32gather_pd(south_low, plane, 4));
    const __m512 s_high = _mm512_castpd_ps(_mm512_i32gather_pd(south_high, plane, 4));
    const __m512 top = _mm512_fmadd_ps(_mm512_permutex2var_ps(n_low, odd, n_high), t.w_ne,
                                       _mm512_mul_ps(_mm512_permutex2var_ps(n_low, even, n_high), t.w_nw));
    const __m512 bottom = _mm512_fmadd_ps(_mm512_permutex2var_ps(s_low, odd, s_high), t.w_se,
                                          _mm512_mul_ps(_mm512_permutex2var_ps(s_low, even, s_high), t.w_sw));
    _mm512_mask_storeu_ps(out + c * out_hw, live, _mm512_add_ps(top, bottom));
  }
}

// One output row of an affine map, bilinear, zeros or border padding, NCHW (kChannels 0) or
// channels_last of kChannels = 2 to 4: vectors whose taps all lie inside (affine_span_inside) take
// taps16_inside and skip the samplers' edge tests, the rest taps16_pixels. Such vectors are 48% of
// the STN benchmark maps' on 28-wide rows, 71-76% on 64- and 224-wide ones; the shortcut made the
// forward of the three STN shapes 1.13-1.20x faster in NCHW and the RGB ones 1.09-1.10x in
// channels_last (one thread). Tried in the coordinate-gradient backward too: no gain (0.97-1.02x).
template <int kChannels>
inline void forward_row_affine(const float* image, float* out, const AffineRow& map, const Geometry& g,
                               const TapsConstants& k, int window_rows) {
  const int64_t in_hw = g.in_h * g.in_w, out_hw = g.out_h * g.out_w;
  const float x_limit = float(g.in_w - 1), y_limit = float(g.in_h - 1);
  const __m512 ax = _mm512_set1_ps(map.ax), cx = _mm512_set1_ps(map.cx);
  const __m512 ay = _mm512_set1_ps(map.ay), cy = _mm512_set1_ps(map.cy);
  const bool finite = map.finite();
  for (int64_t p = 0; p < g.out_w; p += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, g.out_w - p));
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    const __m512 bx = _mm512_maskz_loadu_ps(live, map.base_x + p);
    const __m512 ix = _mm512_fmadd_ps(ax, bx, cx), iy = _mm512_fmadd_ps(ay, bx, cy);
    const bool inside = affine_span_inside(map, p, count, x_limit, y_limit);
    const Taps16 t = inside ? taps16_inside(ix, iy, k, live) : taps16_pixels(ix, iy, k, live);
    // The window's extremes: the end lanes where the map is finite (monotonic), else reductions.
    const auto fits = [&](auto* w) {
      return window_rows && (inside || finite ? make_window_from_ends(t, count, g.in_w, window_rows, w)
                                              : make_window(t, live, g.in_w, window_rows, w));
    };
    if constexpr (kChannels == 0) {
      PlaneWindow w;
      if (fits(&w)) {
        if (inside) sample_nchw_window<true>(image, out + p, t, w, live, g.channels, in_hw, out_hw, g.in_w, g.in_h);
        else sample_nchw_window(image, out + p, t, w, live, g.channels, in_hw, out_hw, g.in_w, g.in_h);
      } else if (inside) {
        sample_nchw_inside(image, out + p, t, live, g.channels, in_hw, out_hw, g.in_w);
      } else {
        sample_nchw(image, out + p, t, live, g.channels, in_hw, out_hw, g.in_w, true);
      }
    } else {
      static const Interleave<kChannels> il;
      Window<kChannels, 4> w;
      if (!fits(&w))
        sample_nhwc_small<kChannels>(image, out + p * kChannels, t, count, in_hw, g.in_w, il, inside);
      else if (inside)
        sample_nhwc_window<kChannels, true>(image, out + p * kChannels, t, w, count, live, g.in_w, g.in_h, il);
      else
        sample_nhwc_window<kChannels>(image, out + p * kChannels, t, w, count, live, g.in_w, g.in_h, il);
    }
  }
}

// Small NCHW images of one or two channels are sampled from a copy with a zero border of two
// pixels (kBorder): clip16 keeps every coordinate in [-2, W] x [-2, H], so all four taps of every
// pixel, inside or not, lie in the copy, and outside ones read its zeros. No vector needs an edge
// test (on 28-wide rows half the vectors of the STN benchmark's maps touch an edge), for the cost
// of copying the image, which is small where the image is in L1 or L2 and has few channels.
// Forward, one thread, against the edge-tested path: 64x1x28x28 1.15-1.20x, 64x2x28x28 1.17x,
// 64x1x64x64 1.13x; not kept for 3-4 channels (64x3x28x28 0.95x, 64x3x32x32 0.92x), images past
// 32 KiB (64x2x64x64 0.89-0.96x; 8x1x224x224 0.82-1.06x, within noise) or channels_last.
constexpr int64_t kBorder = 2;
constexpr int64_t kPaddedImageBytes = int64_t(32) << 10;
constexpr int64_t kPaddedChannels = 2;

// A thread's zero-bordered copy of one image: NCHW as C planes of (H + 4) x (W + 4), channels_last
// as (H + 4) x (W + 4) pixels of C channels. The border is zeroed when the geometry changes and
// never written after; fill() copies an image's rows into the interior.
class PaddedImage {
 public:
  static bool pays(const Geometry& g, bool channels_last) {
    return !channels_last && g.channels <= kPaddedChannels &&
           (g.in_h + 2 * kBorder) * (g.in_w + 2 * kBorder) * g.channels * int64_t(sizeof(float)) <= kPaddedImageBytes;
  }
  const float* fill(const float* image, const Geometry& g, bool channels_last) {
    const int64_t planes = channels_last ? 1 : g.channels, pixel = channels_last ? g.channels : 1;
    const int64_t row = (g.in_w + 2 * kBorder) * pixel, plane = (g.in_h + 2 * kBorder) * row;
    if (h_ != g.in_h || w_ != g.in_w || c_ != g.channels || channels_last_ != channels_last) {
      data_.assign(planes * plane, 0.0f);
      h_ = g.in_h, w_ = g.in_w, c_ = g.channels, channels_last_ = channels_last;
    }
    const int64_t in_row = g.in_w * pixel;
    for (int64_t c = 0; c < planes; ++c)
      for (int64_t y = 0; y < g.in_h; ++y)
        std::memcpy(data_.data() + c * plane + (y + kBorder) * row + kBorder * pixel,
                    image + (c * g.in_h + y) * in_row, in_row * sizeof(float));
    return data_.data();
  }

 private:
  std::vector<float> data_;
  int64_t h_ = -1, w_ = -1, c_ = -1;
  bool channels_last_ = false;
};

// taps16_pixels for a PaddedImage, bilinear, zeros or border padding: the same weights, every tap
// mask `live`, offsets into the copy (rows of padded_w pixels). Lanes past `live` get offset 0.
inline Taps16 taps16_padded(__m512 ix_raw, __m512 iy_raw, const TapsConstants& k, __mmask16 live, __m512 padded_w) {
  Taps16 t;
  const __m512 ix = clip16(ix_raw, k.ax, k.border, &t.scale_x);
  const __m512 iy = clip16(iy_raw, k.ay, k.border, &t.scale_y);
  const __m512 border = _mm512_set1_ps(float(kBorder));
  __m512 fx, fy;
  bilinear_weights16(ix, iy, &t, &fx, &fy);
  // (y0 + 2) * padded_w + x0 + 2: small integers, exact in fp32.
  t.offset = _mm512_maskz_cvttps_epi32(
      live, _mm512_fmadd_ps(_mm512_add_ps(fy, border), padded_w, _mm512_add_ps(fx, border)));
  t.x0 = _mm512_cvttps_epi32(_mm512_add_ps(fx, border)), t.y0 = _mm512_cvttps_epi32(_mm512_add_ps(fy, border));
  t.nw = t.ne = t.sw = t.se = live;
  return t;
}

// One output row from a PaddedImage, NCHW (kChannels 0) or channels_last of kChannels = 2 to 4;
// coords(p, live, &ix, &iy) gives the unclamped pixel coordinates of pixels p..p+15.
template <int kChannels, typename Coords>
void forward_row_padded(const float* padded, float* out, const Geometry& g, const TapsConstants& k,
                        const Coords& coords, int window_rows, bool monotonic) {
  const int64_t padded_w = g.in_w + 2 * kBorder, padded_hw = (g.in_h + 2 * kBorder) * padded_w;
  const int64_t out_hw = g.out_h * g.out_w;
  const __m512 padded_w_f = _mm512_set1_ps(float(padded_w));
  for (int64_t p = 0; p < g.out_w; p += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, g.out_w - p));
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    __m512 ix, iy;
    coords(p, count, live, &ix, &iy);
    const Taps16 t = taps16_padded(ix, iy, k, live, padded_w_f);
    if constexpr (kChannels == 0) {
      PlaneWindow w;
      if (window_rows && (monotonic ? make_window_from_ends(t, count, padded_w, window_rows, &w)
                                    : make_window(t, live, padded_w, window_rows, &w)))
        sample_nchw_window<true>(padded, out + p, t, w, live, g.channels, padded_hw, out_hw, padded_w,
                                 g.in_h + 2 * kBorder);
      else
        sample_nchw_inside(padded, out + p, t, live, g.channels, padded_hw, out_hw, padded_w);
    } else {
      static const Interleave<kChannels> il;
      sample_nhwc_small<kChannels>(padded, out + p * kChannels, t, count, padded_hw, padded_w, il, true);
    }
  }
}


// Output rows [begin, end) (row = n * out_h + oy), taps in registers.
template <typename Source>
void forward_rows_direct(const float* input, float* output, const Source& source, const Geometry& g,
                         bool channels_last, int64_t begin, int64_t end) {
  const TapsConstants k(g);
  const int64_t image_size = g.channels * g.in_h * g.in_w;
  // forward_row_affine: its offsets are computed in fp32.
  const bool affine = std::is_same_v<Source, AffineSource<float>> && g.interpolation == Interpolation::Bilinear &&
                      g.in_h * g.in_w <= (int64_t(1) << 24);
  const bool padded = g.interpolation == Interpolation::Bilinear && PaddedImage::pays(g, channels_last);
  static thread_local PaddedImage padded_image;
  const int window_rows = WindowRows::limit();
  int64_t padded_n = -1;
  const float* copy = nullptr;
  // (n, oy) of each row, stepped rather than divided out (rows of 28 pixels are two vectors).
  for (int64_t row = begin, n = begin / g.out_h, oy = begin % g.out_h; row < end;
       ++row, n += (oy + 1 == g.out_h), oy = (oy + 1 == g.out_h) ? 0 : oy + 1) {
    const float* image = input + n * image_size;
    float* out = output + (channels_last ? row * g.out_w * g.channels : n * g.channels * g.out_h * g.out_w + oy * g.out_w);
    if (padded) {
      if (n != padded_n) copy = padded_image.fill(image, g, channels_last), padded_n = n;
      bool monotonic = false;  // the rows of a finite affine map
      if constexpr (std::is_same_v<Source, AffineSource<float>>)
        monotonic = source.pixel_row(n, oy, g.in_h, g.in_w, g.align_corners).finite();
      auto run = [&](const auto& coords) {
        if (!channels_last) forward_row_padded<0>(copy, out, g, k, coords, window_rows, monotonic);
        else if (g.channels == 2) forward_row_padded<2>(copy, out, g, k, coords, window_rows, monotonic);
        else if (g.channels == 3) forward_row_padded<3>(copy, out, g, k, coords, window_rows, monotonic);
        else forward_row_padded<4>(copy, out, g, k, coords, window_rows, monotonic);
      };
      with_row_coords(source, g, k, n, oy, run);
      continue;
    }
    if constexpr (std::is_same_v<Source, AffineSource<float>>) {
      if (affine) {
        const AffineRow map = source.pixel_row(n, oy, g.in_h, g.in_w, g.align_corners);
        if (!channels_last) forward_row_affine<0>(image, out, map, g, k, window_rows);
        else if (g.channels == 2) forward_row_affine<2>(image, out, map, g, k, window_rows);
        else if (g.channels == 3) forward_row_affine<3>(image, out, map, g, k, window_rows);
        else forward_row_affine<4>(image, out, map, g, k, window_rows);
        continue;
      }
    }
    with_row_taps(source, g, k, n, oy, [&](const auto& row_taps) {
      forward_row_gathers(image, out, g.out_w, g, channels_last, row_taps, window_rows);
    });
  }
}


// The same for one chunk whose taps are in its arrays.
void forward_chunk_gathers(const float* image, float* out, const Chunk<float>& ch, int len, const Geometry& g,
                           bool channels_last) {
  forward_row_gathers(image, out, len, g, channels_last,
                      [&](int64_t p, int, __mmask16 live) { return load_taps16(ch, static_cast<int>(p), live); }, 0);
}
}  // namespace avx512
FASTCNN_GRID_SAMPLE_AVX512_END

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn
#endif  // FASTCNN_GRID_SAMPLE_AVX2
