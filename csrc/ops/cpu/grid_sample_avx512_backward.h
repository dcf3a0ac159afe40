// The CPU sampler's AVX-512 backward (fp32) of images of few channels: the coordinate gradient
// with taps in registers, and grad_input of an affine map by gathers and scatters over a lattice
// of output pixels that share no tap. Private to grid_sample_kernel.cpp, the one translation
// unit that includes it (everything here is in an anonymous namespace).
#pragma once

#include "ops/cpu/grid_sample_avx512.h"

#ifdef FASTCNN_GRID_SAMPLE_AVX2

namespace fastcnn {
namespace grid_sample {
namespace {

FASTCNN_GRID_SAMPLE_AVX512_BEGIN
namespace avx512 {

// grad_x / grad_y += gout * d(sample)/d(x, y) of 16 pixels from their four taps (the shared
// header's bilinear_coordinate_grad, lane-parallel); add_plane_coordinate_grad reads the taps of
// an NCHW plane by pair gathers (zero outside).
inline void add_coordinate_grad(__m512 nw, __m512 ne, __m512 sw, __m512 se, const Taps16& t, __m512 gout,
                                __m512* grad_x, __m512* grad_y) {
  const __m512 d_dx = _mm512_fmadd_ps(_mm512_sub_ps(ne, nw), t.dy1, _mm512_mul_ps(_mm512_sub_ps(se, sw), t.dy0));
  const __m512 d_dy = _mm512_fmadd_ps(_mm512_sub_ps(sw, nw), t.dx1, _mm512_mul_ps(_mm512_sub_ps(se, ne), t.dx0));
  *grad_x = _mm512_fmadd_ps(gout, d_dx, *grad_x);
  *grad_y = _mm512_fmadd_ps(gout, d_dy, *grad_y);
}

inline void add_plane_coordinate_grad(const float* plane, const Taps16& t, __m512i south, __mmask16 north_safe,
                                      __mmask16 south_safe, __m512 gout, __m512* grad_x, __m512* grad_y) {
  __m512 top[2], bottom[2];  // nw, ne and sw, se
  gather_run<1>(plane, t.offset, t.nw, t.ne, north_safe, top);
  gather_run<1>(plane, south, t.sw, t.se, south_safe, bottom);
  add_coordinate_grad(top[0], top[1], bottom[0], bottom[1], t, gout, grad_x, grad_y);
}

// theta's six sums over one image (ThetaSink's order: dx * base_x, dx * base_y, dx, then dy's) as
// fp32 lanes, added into `sums` in double every kFlush vectors (a fixed order; no fp32 drift over
// a large image). Shared by the coordinate gradient's rows and the lattice backward.
struct ThetaLanes {
  static constexpr int kFlush = 32;
  __m512 acc[6];
  int pending = 0;
  double* sums;
  explicit ThetaLanes(double image_sums[6]) : sums(image_sums) {
    for (auto& a : acc) a = _mm512_setzero_ps();
  }
  // dx, dy: 16 pixels' scaled coordinate gradients (zero in dead lanes); bx, by their base grid.
  void add(__m512 dx, __m512 dy, __m512 bx, __m512 by) {
    acc[0] = _mm512_fmadd_ps(dx, bx, acc[0]);
    acc[1] = _mm512_fmadd_ps(dx, by, acc[1]);
    acc[2] = _mm512_add_ps(dx, acc[2]);
    acc[3] = _mm512_fmadd_ps(dy, bx, acc[3]);
    acc[4] = _mm512_fmadd_ps(dy, by, acc[4]);
    acc[5] = _mm512_add_ps(dy, acc[5]);
    if (++pending == kFlush) flush();
  }
  void flush() {
    alignas(64) float lanes[6][16];
    for (int s = 0; s < 6; ++s) {
      _mm512_store_ps(lanes[s], acc[s]);
      acc[s] = _mm512_setzero_ps();
    }
    for (int s = 0; s < 6; ++s)
      for (int l = 0; l < 16; ++l) sums[s] += lanes[s][l];
    pending = 0;
  }
};

// The coordinate gradient alone (no grad_input: an STN whose input needs no gradient) of one
// output row, bilinear, taps in registers: pixel_grads(p, count, live, taps, &grad_x, &grad_y)
// adds the sum over channels of gout * d(sample)/d(x, y) of pixels p..p+15 (lanes past the row
// zero). Leaves either the grid gradient (grid_out: the row's [out_w, 2]) or adds to theta's sums
// (base_y: the row's base grid y). Summed across rows in ThetaLanes, not row by row in double:
// that cost as much as the rest of a 28-wide row (theta-only backward, one thread: 64x1x28x28
// 1.64x, 32x3x64x64 1.25x, 8x3x224x224 1.04x, channels_last 64x3x28x28 1.31x).
template <typename RowTaps, typename PixelGrads>
void coordinate_grad_row(int64_t out_w, const RowTaps& row_taps, const PixelGrads& pixel_grads, const float* base_x,
                         float* grid_out, float base_y, ThetaLanes* theta) {
  const __m512i even_pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd_pairs = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 by = _mm512_set1_ps(base_y);
  for (int64_t p = 0; p < out_w; p += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, out_w - p));
    const __mmask16 live = static_cast<__mmask16>((1u << count) - 1);
    const Taps16 t = row_taps(p, count, live);
    __m512 grad_x = _mm512_setzero_ps(), grad_y = grad_x;
    pixel_grads(p, count, live, t, &grad_x, &grad_y);
    // Lanes past the row are zero here (gout is) and in bx.
    const __m512 dx = _mm512_mul_ps(grad_x, t.scale_x), dy = _mm512_mul_ps(grad_y, t.scale_y);
    if (grid_out) {
      const unsigned elements = 2u * static_cast<unsigned>(count);
      const __mmask16 low = elements >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << elements) - 1);
      const __mmask16 high = elements > 16 ? static_cast<__mmask16>((1u << (elements - 16)) - 1) : 0;
      _mm512_mask_storeu_ps(grid_out + 2 * p, low, _mm512_permutex2var_ps(dx, even_pairs, dy));
      _mm512_mask_storeu_ps(grid_out + 2 * p + 16, high, _mm512_permutex2var_ps(dx, odd_pairs, dy));
    } else {
      theta->add(dx, dy, _mm512_maskz_loadu_ps(live, base_x + p), by);
    }
  }
}

// coordinate_grad_row of an NCHW image of up to kGatherChannels channels: the taps read by pair
// gathers, the channels summed in vectors. 32x3x64x64: 1.6x the AVX2 loop, whose scalar loads
// pay off only where grad_input reads the same taps (a lane-by-lane scatter from vectors measured
// 0.4-0.6x it).
template <typename RowTaps>
void coordinate_grad_row_nchw(const float* image, const float* grad_output, int64_t out_w, const Geometry& g,
                              const RowTaps& row_taps, const float* base_x, float* grid_out, float base_y,
                              ThetaLanes* theta, int window_rows) {
  const int64_t in_hw = g.in_h * g.in_w, out_hw = g.out_h * g.out_w;
  const auto pixel_grads = [&](int64_t p, int, __mmask16 live, const Taps16& t, __m512* grad_x, __m512* grad_y) {
    PlaneWindow w;
    if (window_rows && make_window(t, live, g.in_w, window_rows, &w)) {
      // The taps from their rows, four planes at a time; add_plane_coordinate_grad's arithmetic.
      auto block = [&](auto block_channels, int64_t c0) __attribute__((always_inline)) {
        constexpr int kChannels = decltype(block_channels)::value;
        TapValues<kChannels> v;
        window_taps<kChannels>(image + c0 * in_hw, in_hw, g.in_w, g.in_h, t, w, live, &v);
#pragma GCC unroll 4
        for (int c = 0; c < kChannels; ++c) {
          const __m512 gout = _mm512_maskz_loadu_ps(live, grad_output + (c0 + c) * out_hw + p);
          add_coordinate_grad(v.nw[c], v.ne[c], v.sw[c], v.se[c], t, gout, grad_x, grad_y);
        }
      };
      for_channel_blocks(g.channels, block);
      return;
    }
    const __m512i south = _mm512_add_epi32(t.offset, _mm512_set1_epi32(static_cast<int32_t>(g.in_w)));
    auto channels_loop = [&](__mmask16 north_safe, __mmask16 south_safe) {
      for (int64_t c = 0; c < g.channels; ++c) {
        const __m512 gout = _mm512_maskz_loadu_ps(live, grad_output + c * out_hw + p);
        add_plane_coordinate_grad(image + c * in_hw, t, south, north_safe, south_safe, gout, grad_x, grad_y);
      }
    };
    if (all_taps_inside(t, live))  // as sample_nchw
      channels_loop(0xFFFF, 0xFFFF);
    else
      channels_loop(pairs_inside(t.offset, in_hw), pairs_inside(south, in_hw));
  };
  coordinate_grad_row(out_w, row_taps, pixel_grads, base_x, grid_out, base_y, theta);
}

// Channel c of 16 channels_last pixels of kChannels channels (kChannels vectors, elements
// 16k..16k+15: pixel (16k + i) / C, channel (16k + i) % C), by permutes: lane i of channel c is
// element C i + c. Built once per call; Interleave's inverse.
template <int kChannels>
struct Deinterleave {
  __m512i lane_of[kChannels];                      // (C i + c) % 16
  __mmask16 from_vector[kChannels][kChannels];     // [c][k]: lanes i with (C i + c) / 16 == k
  Deinterleave() {
    for (int c = 0; c < kChannels; ++c) {
      alignas(64) int32_t lanes[16];
      for (int k = 0; k < kChannels; ++k) from_vector[c][k] = 0;
      for (int i = 0; i < 16; ++i) {
        const int element = kChannels * i + c;
        lanes[i] = element % 16;
        from_vector[c][element / 16] |= static_cast<__mmask16>(1u << i);
      }
      lane_of[c] = _mm512_load_si512(lanes);
    }
  }
};

// coordinate_grad_row of a channels_last image of kChannels (2-4) channels: each pixel's north
// taps (nw's channels, then ne's) read as runs by pair gathers, as the forward's
// sample_nhwc_small; grad_output's 16 pixels deinterleaved into channel vectors by permutes.
// Theta-only backward, one thread: 32x3x64x64 1.9x, 8x3x224x224 2.2x, 64x3x28x28 1.5x the AVX2
// runs loop (about the NCHW path's speed).
template <int kChannels, typename RowTaps>
void coordinate_grad_row_nhwc(const float* image, const float* grad_output, int64_t out_w, const Geometry& g,
                              const RowTaps& row_taps, const Deinterleave<kChannels>& di, const float* base_x,
                              float* grid_out, float base_y, ThetaLanes* theta, int window_rows) {
  const int64_t in_hw = g.in_h * g.in_w;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const auto pixel_grads = [&](int64_t p, int count, __mmask16 live, const Taps16& t, __m512* grad_x,
                               __m512* grad_y) {
    TapValues<kChannels> v;
    Window<kChannels, 4> w;
    if (window_rows && make_window(t, live, g.in_w, window_rows, &w)) {
      window_taps<kChannels>(image, 0, g.in_w * kChannels, g.in_h, t, w, live, &v);
    } else {
      gather_taps_nhwc(image, t, in_hw, g.in_w, all_taps_inside(t, live), &v);
    }
    __m512 interleaved[kChannels];
    const int elements = count * kChannels;
#pragma GCC unroll 4
    for (int k = 0; k < kChannels; ++k)
      interleaved[k] = _mm512_maskz_loadu_ps(_mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(elements - 16 * k)),
                                             grad_output + (p * kChannels) + 16 * k);
#pragma GCC unroll 4
    for (int c = 0; c < kChannels; ++c) {
      __m512 gout = _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int k = 0; k < kChannels; ++k)
        gout = _mm512_mask_permutexvar_ps(gout, di.from_vector[c][k], di.lane_of[c], interleaved[k]);
      add_coordinate_grad(v.nw[c], v.ne[c], v.sw[c], v.se[c], t, gout, grad_x, grad_y);
    }
  };
  coordinate_grad_row(out_w, row_taps, pixel_grads, base_x, grid_out, base_y, theta);
}

// The coordinate gradient of image n (NCHW) by coordinate_grad_row_nchw. grid_grad: the image's
// [out_h, out_w, 2] grid gradient, or null for theta's six sums, added to theta_sums (base_x,
// base_y: the affine base grid).
template <typename Source>
void coordinate_grad_image_nchw(const float* image, const float* grad_output, const Source& source,
                                const Geometry& g, int64_t n, const float* base_x, const float* base_y,
                                float* grid_grad, double theta_sums[6], int window_rows) {
  const TapsConstants k(g);
  ThetaLanes theta(theta_sums);
  const auto row_y = [&](int64_t oy) { return grid_grad ? 0.0f : base_y[oy]; };
  if (PaddedImage::pays(g, false)) {
    // As the forward: a zero-bordered copy, taps without edge tests (64x1x28x28 theta-only
    // backward 1.20x, forward + it 1.13-1.18x, one thread). The rows see the copy's geometry (its
    // planes and rows); the taps are clipped with the image's (k).
    static thread_local PaddedImage padded_image;
    const float* copy = padded_image.fill(image, g, false);
    Geometry bordered = g;
    bordered.in_h += 2 * kBorder;
    bordered.in_w += 2 * kBorder;
    const __m512 padded_w = _mm512_set1_ps(float(bordered.in_w));
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      with_row_coords(source, g, k, n, oy, [&](const auto& row_coords) {
        const auto row_taps = [&](int64_t p, int count, __mmask16 live) {
          __m512 ix, iy;
          row_coords(p, count, live, &ix, &iy);
          return taps16_padded(ix, iy, k, live, padded_w);
        };
        coordinate_grad_row_nchw(copy, grad_output + oy * g.out_w, g.out_w, bordered, row_taps, base_x,
                                 grid_grad ? grid_grad + oy * g.out_w * 2 : nullptr, row_y(oy), &theta, window_rows);
      });
    }
    if (!grid_grad) theta.flush();
    return;
  }
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    with_row_taps(source, g, k, n, oy, [&](const auto& row_taps) {
      coordinate_grad_row_nchw(image, grad_output + oy * g.out_w, g.out_w, g, row_taps, base_x,
                               grid_grad ? grid_grad + oy * g.out_w * 2 : nullptr, row_y(oy), &theta, window_rows);
    });
  }
  if (!grid_grad) theta.flush();
}

// The coordinate gradient of image n, channels_last of 2 to 4 channels, by
// coordinate_grad_row_nhwc (arguments as coordinate_grad_image_nchw).
template <typename Source>
void coordinate_grad_image_nhwc(const float* image, const float* grad_output, const Source& source,
                                const Geometry& g, int64_t n, const float* base_x, const float* base_y,
                                float* grid_grad, double theta_sums[6], int window_rows) {
  const TapsConstants k(g);
  ThetaLanes theta(theta_sums);
  const auto row_y = [&](int64_t oy) { return grid_grad ? 0.0f : base_y[oy]; };
  auto rows = [&](auto channels) {
    constexpr int kChannels = decltype(channels)::value;
    static const Deinterleave<kChannels> di;
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      with_row_taps(source, g, k, n, oy, [&](const auto& row_taps) {
        coordinate_grad_row_nhwc<kChannels>(image, grad_output + oy * g.out_w * kChannels, g.out_w, g, row_taps, di,
                                            base_x, grid_grad ? grid_grad + oy * g.out_w * 2 : nullptr,
                                            row_y(oy), &theta, window_rows);
      });
    }
  };
  if (g.channels == 2) rows(std::integral_constant<int, 2>());
  else if (g.channels == 3) rows(std::integral_constant<int, 3>());
  else rows(std::integral_constant<int, 4>());
  if (!grid_grad) theta.flush();
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
  // Input pixels per output column (a, c) and per output row (b, d).
  const PixelMap map = source.pixel_map(n, g);
  const double a = map.ax, b = map.bx, c = map.ay, d = map.by;
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

// Lanes l with from + l < size.
inline __mmask16 lane_range_mask(int64_t from, int64_t size) {
  const int64_t count = std::min<int64_t>(16, std::max<int64_t>(0, size - from));
  return static_cast<__mmask16>((1u << count) - 1u);
}

// Image n's grad_input (gin, zeroed) and, with `coords`, theta's six sums (ThetaSink's order:
// dx * base_x, dx * base_y, dx, then dy's) added to sums. False, nothing done, when the map's
// lattice stride is out of range. Flattened: GCC called taps16_pixels out of line here, its
// Taps16 returned through memory (backward 1.06-1.11x faster inlined, 64x1x28x28 to 8x1x224x224,
// one thread; the same attribute on the forward's row loop made it 0.77-0.97x).
__attribute__((flatten)) bool backward_affine_image_lattice(const float* image, const float* grad_output,
                                                            float* gin, const AffineSource<float>& source,
                                                            const Geometry& g, int64_t n, bool coords,
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
  const __m512i even_pairs = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i odd_pairs = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i low16 = _mm512_set1_epi32(0xFFFF), out_w = _mm512_set1_epi32(static_cast<int32_t>(g.out_w));
  const __m512i in_w = _mm512_set1_epi32(static_cast<int32_t>(g.in_w));
  ThetaLanes theta(sums);
  const int64_t vectors = static_cast<int64_t>(order.size()) / 16;
  // The per-column and per-row constants of the lanes' pixels: gathered from their tables, or for
  // maps of at most 32 x 32 outputs (28 x 28 digits) permuted from the tables held in registers
  // (a two-source permute instead of a 16-lane gather; 64x1x28x28 forward+backward, one thread,
  // 1.09x).
  const bool small_tables = g.out_w <= 32 && g.out_h <= 32;
  const auto table_half = [&](const float* table, int64_t size, int64_t from) {
    return small_tables ? _mm512_maskz_loadu_ps(lane_range_mask(from, size), table + from) : zero;
  };
  const __m512 bx_lo = table_half(source.base_x, g.out_w, 0), bx_hi = table_half(source.base_x, g.out_w, 16);
  const __m512 by_lo = table_half(source.base_y, g.out_h, 0), by_hi = table_half(source.base_y, g.out_h, 16);
  const __m512 cx_lo = table_half(scratch.cx.data(), g.out_h, 0), cx_hi = table_half(scratch.cx.data(), g.out_h, 16);
  const __m512 cy_lo = table_half(scratch.cy.data(), g.out_h, 0), cy_hi = table_half(scratch.cy.data(), g.out_h, 16);
  auto vectors_loop = [&](auto small) {
    for (int64_t v = 0; v < vectors; ++v) {
      const __m512i pixel = _mm512_loadu_si512(order.data() + 16 * v);
      const __mmask16 live = _mm512_cmpge_epi32_mask(pixel, _mm512_setzero_si512());
      const __m512i oy = _mm512_srai_epi32(pixel, 16), ox = _mm512_and_si512(pixel, low16);
      // Dead lanes read zero either way.
      const auto lookup = [&](__m512i index, const float* table, __m512 lo, __m512 hi) {
        if constexpr (decltype(small)::value) return _mm512_maskz_permutex2var_ps(live, lo, index, hi);
        else return _mm512_mask_i32gather_ps(zero, live, index, table, 4);
      };
      const __m512 bx = lookup(ox, source.base_x, bx_lo, bx_hi);
      const __m512 cx = lookup(oy, scratch.cx.data(), cx_lo, cx_hi);
      const __m512 cy = lookup(oy, scratch.cy.data(), cy_lo, cy_hi);
      // As with_row_taps: the same coordinates as the forward's.
      const Taps16 t = taps16_pixels(_mm512_fmadd_ps(ax, bx, cx), _mm512_fmadd_ps(ay, bx, cy), k, live);
      const __m512i out_index = _mm512_add_epi32(_mm512_mullo_epi32(oy, out_w), ox);
      const __m512i south = _mm512_add_epi32(t.offset, in_w);
      const __m512 north_lo = _mm512_permutex2var_ps(t.w_nw, even_pairs, t.w_ne);
      const __m512 north_hi = _mm512_permutex2var_ps(t.w_nw, odd_pairs, t.w_ne);
      const __m512 south_lo = _mm512_permutex2var_ps(t.w_sw, even_pairs, t.w_se);
      const __m512 south_hi = _mm512_permutex2var_ps(t.w_sw, odd_pairs, t.w_se);
      const __mmask16 north_safe = pairs_inside(t.offset, in_hw), south_safe = pairs_inside(south, in_hw);
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
        const __m512 by = lookup(oy, source.base_y, by_lo, by_hi);
        theta.add(_mm512_mul_ps(grad_x, t.scale_x), _mm512_mul_ps(grad_y, t.scale_y), bx, by);
      }
    }
  };
  if (small_tables)
    vectors_loop(std::true_type());
  else
    vectors_loop(std::false_type());
  if (coords) theta.flush();
  return true;
}

}  // namespace avx512
FASTCNN_GRID_SAMPLE_AVX512_END

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn
#endif  // FASTCNN_GRID_SAMPLE_AVX2
