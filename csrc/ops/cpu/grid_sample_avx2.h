// The CPU sampler's AVX2 paths (fp32): taps 8 pixels at a time, and the pixel loops of the
// forward and backward. Private to grid_sample_kernel.cpp, the one translation unit that
// includes it (everything here is in an anonymous namespace).
#pragma once

#include "ops/cpu/grid_sample_chunk.h"

#ifdef FASTCNN_GRID_SAMPLE_AVX2

namespace fastcnn {
namespace grid_sample {
namespace {

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// fp32 kernels with AVX2: the taps of 8 pixels at once, and the pixel loops that read taps only
// where the 4-bit mask says they are inside (so a tap outside the input reads exactly zero, never
// 0 * NaN). Used when the CPU has AVX2 and FMA; the scalar templates (grid_sample_chunk.h and
// grid_sample_kernel.cpp) are the fallback and the fp64/fp16/bf16 path. Same arithmetic as grid_sample_coords.h, lane-parallel.
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
      // and arithmetic on them costs microcode assists (see theta_chunk_lanes).
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

// Adds a chunk of one output row to grad_theta's six fp32 lane sums (ThetaSink's order: dx * base_x,
// dx * base_y, dx, then dy's; dx, dy: the coordinate gradients times their scales), kept across
// chunks and rows and added in double by the sink every few hundred pixels (a fixed order).
// Against reducing each chunk's lanes in double (7% of the 32x3x64x64 backward's samples), one
// thread: 64x3x28x28 1.06-1.15x, 32x3x64x64 and 8x3x224x224 1.00-1.03x.
void theta_chunk_lanes(const Chunk<float>& ch, int len, const float* base_x, float base_y, float lanes[6][8]) {
  __m256 sxx = _mm256_load_ps(lanes[0]), sxy = _mm256_load_ps(lanes[1]), sx = _mm256_load_ps(lanes[2]);
  __m256 syx = _mm256_load_ps(lanes[3]), syy = _mm256_load_ps(lanes[4]), sy = _mm256_load_ps(lanes[5]);
  const __m256 by = _mm256_set1_ps(base_y);
  for (int p = 0; p < len; p += 8) {
    // Lanes past the chunk load as zero. The arrays hold stale values there (uninitialised stack
    // the first time); multiplied before masking, a denormal one cost a microcode assist, about a
    // hundred cycles a row: 40% of the 64x1x28x28 backward (one thread, 0.59 -> 0.36 ms).
    const __m256i live = tail_mask(len - p);
    const __m256 dx = _mm256_mul_ps(_mm256_maskload_ps(ch.gx + p, live), _mm256_maskload_ps(ch.scale_x + p, live));
    const __m256 dy = _mm256_mul_ps(_mm256_maskload_ps(ch.gy + p, live), _mm256_maskload_ps(ch.scale_y + p, live));
    const __m256 bx = _mm256_maskload_ps(base_x + p, live);
    sxx = _mm256_fmadd_ps(dx, bx, sxx);
    sxy = _mm256_fmadd_ps(dx, by, sxy);
    sx = _mm256_add_ps(sx, dx);
    syx = _mm256_fmadd_ps(dy, bx, syx);
    syy = _mm256_fmadd_ps(dy, by, syy);
    sy = _mm256_add_ps(sy, dy);
  }
  _mm256_store_ps(lanes[0], sxx);
  _mm256_store_ps(lanes[1], sxy);
  _mm256_store_ps(lanes[2], sx);
  _mm256_store_ps(lanes[3], syx);
  _mm256_store_ps(lanes[4], syy);
  _mm256_store_ps(lanes[5], sy);
}

}  // namespace avx2
#pragma GCC pop_options

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn
#endif  // FASTCNN_GRID_SAMPLE_AVX2
