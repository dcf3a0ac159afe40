// grad_input of an affine grid sample (Jaderberg et al., 2015; the transpose of F.grid_sample's
// bilinear taps) gathered by each input pixel, instead of scattered by each output pixel.
// Private to grid_sample_kernel.cpp, the one translation unit that includes it.
//
// With zeros padding, input pixel (ix, iy) receives go(o) * K(sx(o) - ix) * K(sy(o) - iy) from every
// output pixel o, K(t) = max(0, 1 - |t|) the tent, (sx, sy) the affine source of o in input pixels:
// the output pixels whose source lies within one pixel of it, a parallelogram (the map's inverse
// image of a 2 x 2 square) of about 4 / |det| pixels. Sixteen input pixels, one a column along the
// map's image of an output row (sheared: PullPlan), take the output rows their parallelograms
// cross; in each output row a lane's candidates are an interval of consecutive columns, at most
// `candidates` long, and all lanes' intervals lie within 32 columns, read as two vectors and
// picked by permutes, a row of grad_output per channel. Nothing is scattered: no gathers or
// scatters (29-38 cycles each on the Intel Xeon of 2026-12-01), no zeroing of grad_input first, no
// read-modify-write of it, and each element sums in a fixed order (deterministic, independent of
// threads). The weights are the tent's, from the map in pixel units:
// they differ from the scatter's (which takes the fraction of the rounded source coordinate) by
// rounding only. An output pixel adds where its weight is positive: a non-finite grad_output that
// the scatter would multiply by a zero weight (a source exactly on a pixel column) is skipped here.
#pragma once

#include <algorithm>
#include <cmath>

#include "ops/cpu/grid_sample_avx512_backward.h"

#ifdef FASTCNN_GRID_SAMPLE_AVX2

namespace fastcnn {
namespace grid_sample {
namespace {

FASTCNN_GRID_SAMPLE_AVX512_BEGIN
namespace avx512 {

// Channels (NCHW planes) per pass over an image: each keeps its two window vectors and its
// accumulator in registers; wider images go four at a time.
constexpr int kPullChannels = 4;

// A vector's sixteen input pixels span 17 columns (with the taps' reach, 15 + 2): its candidates in
// one output row lie within 17 / |ax| columns (unsheared also within 2 / |ay|), which the
// 32-column window must hold. Past kMaxPullCost candidate vectors (output rows times candidates a
// row, times the sheared vectors' share past the image) per input vector the scatters are
// cheaper (maps that shrink the image, rotations near 90 degrees).
constexpr double kMaxPullSpan = 30.0;
constexpr int kMaxPullCost = 64;

constexpr int kMaxPullCandidates = 8;
// Sheared vectors up to this slope (45 degrees of rotation); steeper maps go unsheared.
constexpr double kMaxPullShear = 1.0;

struct PullPlan {
  PixelMap map;
  int candidates = 0;  // per lane and output row; 0: the pull does not take this map
  double inv_det, inv_ax, inv_ay, reach_x, reach_y;  // reach: half the width of a tap's interval
  // Lane l of a vector is input pixel (ix0 + l, iy + shift[l]): the lanes follow the map's image
  // of an output row (shift ~ l * ay / ax), so their parallelograms cross the fewest output rows
  // (a 30-degree rotation: about 5 instead of 11). Every pixel belongs to one vector: iy runs
  // from -shift_max to in_h - shift_min.
  int shift_min = 0, shift_max = 0;
  alignas(64) float shift[16];    // shift[l]
  alignas(64) float y_shift[16];  // shift[l] / ay: how far lane l's y-interval moves
  double y_shift_min = 0, y_shift_max = 0;
  double oy_shift_min = 0, oy_shift_max = 0;  // lane l's preimage row minus lane 0's, over l
  double oy_reach = 0;  // a pixel's parallelogram's half-extent in output rows
  uint16_t shift_lanes[16];  // shift_lanes[s - shift_min]: the lanes with that shift
};

inline PullPlan pull_plan(const AffineSource<float>& source, const Geometry& g, int64_t n) {
  PullPlan plan;
  const PixelMap m = source.pixel_map(n, g);
  const double det = m.ax * m.by - m.bx * m.ay;
  const bool finite = std::isfinite(m.ax) && std::isfinite(m.bx) && std::isfinite(m.cx) && std::isfinite(m.ay) &&
                      std::isfinite(m.by) && std::isfinite(m.cy);
  // fp32 coordinates up to 2^15 pixels keep their rounding far below the tolerance of the weights.
  if (!finite || std::fabs(m.ax) < 1e-3 || !(std::fabs(det) > 1e-6) || g.in_w >= (1 << 15) ||
      g.in_h >= (1 << 15) || g.out_w >= (1 << 15) || g.out_h >= (1 << 15) || std::fabs(m.cx) > 1e5 ||
      std::fabs(m.cy) > 1e5)
    return plan;
  const double slope = m.ay / m.ax;
  const bool sheared = m.ay != 0.0 && std::fabs(slope) <= kMaxPullShear;
  plan.inv_det = 1.0 / det;
  plan.inv_ax = 1.0 / m.ax;
  plan.inv_ay = m.ay != 0.0 ? 1.0 / m.ay : 0.0;
  plan.reach_x = 1.0 / std::fabs(m.ax);
  plan.reach_y = m.ay != 0.0 ? 1.0 / std::fabs(m.ay) : 0.0;
  int shifts[16];
  double oy_min = 0, oy_max = 0, y_min = 0, y_max = 0;
  for (int l = 0; l < 16; ++l) {
    shifts[l] = sheared ? static_cast<int>(std::nearbyint(l * slope)) : 0;
    plan.shift[l] = float(shifts[l]);
    plan.y_shift[l] = float(shifts[l] * plan.inv_ay);
    plan.shift_min = std::min(plan.shift_min, shifts[l]);
    plan.shift_max = std::max(plan.shift_max, shifts[l]);
    const double oy = (-m.ay * l + m.ax * shifts[l]) * plan.inv_det;
    oy_min = std::min(oy_min, oy), oy_max = std::max(oy_max, oy);
    y_min = std::min(y_min, shifts[l] * plan.inv_ay), y_max = std::max(y_max, shifts[l] * plan.inv_ay);
  }
  std::fill(plan.shift_lanes, plan.shift_lanes + 16, uint16_t(0));
  for (int l = 0; l < 16; ++l) plan.shift_lanes[shifts[l] - plan.shift_min] |= uint16_t(1u << l);
  plan.oy_shift_min = oy_min, plan.oy_shift_max = oy_max;
  plan.y_shift_min = y_min, plan.y_shift_max = y_max;
  plan.oy_reach = (std::fabs(m.ay) + std::fabs(m.ax)) * std::fabs(plan.inv_det);
  const double width = m.ay != 0.0 ? std::min(2.0 / std::fabs(m.ax), 2.0 / std::fabs(m.ay)) : 2.0 / std::fabs(m.ax);
  // A row's candidates over all lanes lie within the x-intervals (17 / |ax| wide) and, unsheared,
  // within the one y-interval (2 / |ay|).
  const double span = sheared || m.ay == 0.0 ? 17.0 / std::fabs(m.ax)
                                             : std::min(17.0 / std::fabs(m.ax), 2.0 / std::fabs(m.ay));
  // Output rows a vector's parallelograms cross, and the vectors per row of input pixels.
  const double rows = 2.0 * plan.oy_reach + (oy_max - oy_min) + 1.0;
  const double vectors = double(g.in_h + plan.shift_max - plan.shift_min) / double(g.in_h);
  const int candidates = static_cast<int>(std::ceil(width));
  if (span > kMaxPullSpan || candidates > kMaxPullCandidates || candidates * rows * vectors > kMaxPullCost)
    return plan;
  plan.map = m;
  plan.candidates = candidates;
  return plan;
}

// The per-row numbers of a vector (pull_vector), eight output rows at a time in double: the
// scalar chain per row (bounds, floor, conversions) was latency-bound, 60-100 cycles a row.
struct PullRows {
  alignas(64) int32_t window[8];  // the window's first column (0 for a row without candidates)
  alignas(64) float x_lower[8];   // lane 0's lower bound from x, from the window's first column
  alignas(64) float y_lower[8];   // lane 0's lower bound from y, likewise
  alignas(64) float dx[8];        // lane 0's dx at the window's first column
  alignas(64) float dy[8];        // lane 0's dy there

  // Rows oy0 .. oy0 + 7 of the vector from input pixel (ix0, iy) on.
  void fill(const PullPlan& plan, const Geometry& g, int64_t oy0, int64_t ix0, int64_t iy) {
    const PixelMap& m = plan.map;
    const __m512d oy = _mm512_add_pd(_mm512_set1_pd(double(oy0)), _mm512_setr_pd(0, 1, 2, 3, 4, 5, 6, 7));
    // dx of lane l at column ox: ax * ox + rx - l; dy: ay * ox + ry.
    const __m512d rx = _mm512_fmadd_pd(_mm512_set1_pd(m.bx), oy, _mm512_set1_pd(m.cx - double(ix0)));
    const __m512d ry = _mm512_fmadd_pd(_mm512_set1_pd(m.by), oy, _mm512_set1_pd(m.cy - double(iy)));
    __m512d y_low, y_high;
    if (m.ay != 0.0) {
      const __m512d centre = _mm512_mul_pd(ry, _mm512_set1_pd(-plan.inv_ay));
      y_low = _mm512_sub_pd(centre, _mm512_set1_pd(plan.reach_y));
      y_high = _mm512_add_pd(centre, _mm512_set1_pd(plan.reach_y));
    } else {
      // Every column or none: |ry| < 1.
      const __mmask8 near = _mm512_cmp_pd_mask(_mm512_abs_pd(ry), _mm512_set1_pd(1.0), _CMP_LT_OQ);
      y_low = _mm512_mask_blend_pd(near, _mm512_set1_pd(1e30), _mm512_set1_pd(-1e30));
      y_high = _mm512_mask_blend_pd(near, _mm512_set1_pd(-1e30), _mm512_set1_pd(1e30));
    }
    const __m512d x_first = _mm512_fnmsub_pd(rx, _mm512_set1_pd(plan.inv_ax), _mm512_set1_pd(plan.reach_x));
    const __m512d x_last = _mm512_add_pd(x_first, _mm512_set1_pd(15.0 * plan.inv_ax));
    const __m512d row_lower =
        _mm512_max_pd(_mm512_add_pd(y_low, _mm512_set1_pd(plan.y_shift_min)), _mm512_min_pd(x_first, x_last));
    const __m512d row_upper =
        _mm512_min_pd(_mm512_add_pd(y_high, _mm512_set1_pd(plan.y_shift_max)),
                      _mm512_add_pd(_mm512_max_pd(x_first, x_last), _mm512_set1_pd(2.0 * plan.reach_x)));
    __mmask8 live = _mm512_cmp_pd_mask(row_upper, row_lower, _CMP_GT_OQ);
    live = _mm512_mask_cmp_pd_mask(live, row_upper, _mm512_setzero_pd(), _CMP_GT_OQ);
    live = _mm512_mask_cmp_pd_mask(live, row_lower, _mm512_set1_pd(double(g.out_w)), _CMP_LT_OQ);
    const __m512d first = _mm512_maskz_add_pd(
        live, _mm512_roundscale_pd(row_lower, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), _mm512_set1_pd(1.0));
    _mm256_store_si256(reinterpret_cast<__m256i*>(window), _mm512_cvttpd_epi32(first));
    _mm256_store_ps(x_lower, _mm512_cvtpd_ps(_mm512_sub_pd(x_first, first)));
    // A row without candidates: y's bound past every column.
    const __m512d y_from_first = _mm512_mask_blend_pd(live, _mm512_set1_pd(1e30), _mm512_sub_pd(y_low, first));
    _mm256_store_ps(y_lower, _mm512_cvtpd_ps(y_from_first));
    _mm256_store_ps(dx, _mm512_cvtpd_ps(_mm512_fmadd_pd(_mm512_set1_pd(m.ax), first, rx)));
    _mm256_store_ps(dy, _mm512_cvtpd_ps(_mm512_fmadd_pd(_mm512_set1_pd(m.ay), first, ry)));
  }
};

// Sixteen input pixels from (ix0, iy) on (lane l at (ix0 + l, iy + shift[l])), kChannels planes
// of grad_output: their grad_input sums (kCandidates per lane and output row: the plan's).
template <int kChannels, int kCandidates>
inline void pull_vector(const float* grad_output, float* gin, const PullPlan& plan, const Geometry& g, int64_t iy,
                        int64_t ix0) {
  const PixelMap& m = plan.map;
  const int64_t out_hw = g.out_h * g.out_w, in_hw = g.in_h * g.in_w;
  // Lane 0's preimage row, (-ay * (x - cx) + ax * (y - cy)) / det; the lanes' parallelograms
  // reach oy_reach rows past theirs.
  const double oy_lane0 = (-m.ay * (double(ix0) - m.cx) + m.ax * (double(iy) - m.cy)) * plan.inv_det;
  // Rows strictly inside; a row on the boundary has weights of zero.
  const int64_t row_begin = std::max<int64_t>(
      0, static_cast<int64_t>(std::floor(oy_lane0 + plan.oy_shift_min - plan.oy_reach)) + 1);
  const int64_t row_end = std::min<int64_t>(
      g.out_h, static_cast<int64_t>(std::ceil(oy_lane0 + plan.oy_shift_max + plan.oy_reach)));
  const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 ax = _mm512_set1_ps(float(m.ax)), ay = _mm512_set1_ps(float(m.ay));
  // Lane l's candidates in a row lie past x_lower + l / ax (x) and past y_lower + y_shift[l] (y).
  const __m512 lower_lanes = _mm512_mul_ps(lane, _mm512_set1_ps(float(plan.inv_ax)));
  const __m512 y_shift = _mm512_load_ps(plan.y_shift), shift = _mm512_load_ps(plan.shift);
  __m512 acc[kChannels];
  for (int c = 0; c < kChannels; ++c) acc[c] = _mm512_setzero_ps();
  PullRows rows;
  for (int64_t oy0 = row_begin; oy0 < row_end; oy0 += 8) {
    rows.fill(plan, g, oy0, ix0, iy);
    const int count = static_cast<int>(std::min<int64_t>(8, row_end - oy0));
    for (int r = 0; r < count; ++r) {
      const int64_t window = rows.window[r];
      // Each lane's first candidate as a column of the window (a row without any: past 32).
      const __m512 lower = _mm512_max_ps(_mm512_add_ps(lower_lanes, _mm512_set1_ps(rows.x_lower[r])),
                                         _mm512_add_ps(y_shift, _mm512_set1_ps(rows.y_lower[r])));
      // Not left of the window: a first rounded below it has weight zero there.
      const __m512 first = _mm512_max_ps(
          _mm512_add_ps(_mm512_roundscale_ps(lower, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), one), zero);
      __m512i index = _mm512_cvttps_epi32(first);
      __m512 dx = _mm512_fmadd_ps(ax, first, _mm512_sub_ps(_mm512_set1_ps(rows.dx[r]), lane));
      __m512 dy = _mm512_fmadd_ps(ay, first, _mm512_sub_ps(_mm512_set1_ps(rows.dy[r]), shift));
      // The window's columns inside the output row (without branches: which ones varies row by
      // row near the edges, and mispredicted branches took a third of the time).
      const uint32_t in_begin = static_cast<uint32_t>(std::clamp<int64_t>(-window, 0, 32));
      const uint32_t in_end = static_cast<uint32_t>(std::clamp<int64_t>(g.out_w - window, 0, 32));
      const uint64_t inside = ((uint64_t(1) << in_end) - 1) & ~((uint64_t(1) << in_begin) - 1);
      const __mmask16 low_in = static_cast<__mmask16>(inside), high_in = static_cast<__mmask16>(inside >> 16);
      __m512 low[kChannels], high[kChannels];
      for (int c = 0; c < kChannels; ++c) {
        const float* row = grad_output + c * out_hw + (oy0 + r) * g.out_w + window;
        low[c] = _mm512_maskz_loadu_ps(low_in, row);
        high[c] = _mm512_maskz_loadu_ps(high_in, row + 16);
      }
      for (int k = 0; k < kCandidates; ++k) {
        const __m512 abs_dx = _mm512_abs_ps(dx), abs_dy = _mm512_abs_ps(dy);
        // Every candidate of positive weight lies in the window (span <= kMaxPullSpan); those past
        // it (a row without any: a huge first column) have weight zero, their index wraps.
        __mmask16 live = _mm512_cmp_ps_mask(abs_dx, one, _CMP_LT_OQ);
        live = _mm512_mask_cmp_ps_mask(live, abs_dy, one, _CMP_LT_OQ);
        const __m512 weight = _mm512_mul_ps(_mm512_sub_ps(one, abs_dx), _mm512_sub_ps(one, abs_dy));
        for (int c = 0; c < kChannels; ++c)
          acc[c] = _mm512_mask3_fmadd_ps(weight, _mm512_permutex2var_ps(low[c], index, high[c]), acc[c], live);
        dx = _mm512_add_ps(dx, ax);
        dy = _mm512_add_ps(dy, ay);
        index = _mm512_add_epi32(index, _mm512_set1_epi32(1));
      }
    }
  }
  const __mmask16 inside = lane_range_mask(ix0, g.in_w);
  const int64_t shift_begin = std::max<int64_t>(plan.shift_min, -iy);
  const int64_t shift_end = std::min<int64_t>(plan.shift_max, g.in_h - 1 - iy);
  for (int64_t s = shift_begin; s <= shift_end; ++s) {
    const __mmask16 lanes = inside & plan.shift_lanes[s - plan.shift_min];
    float* row = gin + (iy + s) * g.in_w + ix0;
    for (int c = 0; c < kChannels; ++c) _mm512_mask_storeu_ps(row + c * in_hw, lanes, acc[c]);
  }
}

template <int kChannels, int kCandidates>
void pull_planes(const float* grad_output, float* gin, const PullPlan& plan, const Geometry& g) {
  for (int64_t iy = -plan.shift_max; iy < g.in_h - plan.shift_min; ++iy)
    for (int64_t ix0 = 0; ix0 < g.in_w; ix0 += 16)
      pull_vector<kChannels, kCandidates>(grad_output, gin, plan, g, iy, ix0);
}

template <int kChannels>
void pull_planes(const float* grad_output, float* gin, const PullPlan& plan, const Geometry& g) {
  switch (plan.candidates) {
    case 1: return pull_planes<kChannels, 1>(grad_output, gin, plan, g);
    case 2: return pull_planes<kChannels, 2>(grad_output, gin, plan, g);
    case 3: return pull_planes<kChannels, 3>(grad_output, gin, plan, g);
    case 4: return pull_planes<kChannels, 4>(grad_output, gin, plan, g);
    case 5: return pull_planes<kChannels, 5>(grad_output, gin, plan, g);
    case 6: return pull_planes<kChannels, 6>(grad_output, gin, plan, g);
    case 7: return pull_planes<kChannels, 7>(grad_output, gin, plan, g);
    default: return pull_planes<kChannels, kMaxPullCandidates>(grad_output, gin, plan, g);
  }
}

// An image's grad_input by its plan (every element written; gin need not be zeroed), channels in
// groups of up to kPullChannels.
inline void grad_input_image_pull(const float* grad_output, float* gin, const PullPlan& plan, const Geometry& g) {
  const int64_t out_hw = g.out_h * g.out_w, in_hw = g.in_h * g.in_w;
  for (int64_t c0 = 0; c0 < g.channels; c0 += kPullChannels) {
    const float* go = grad_output + c0 * out_hw;
    float* gi = gin + c0 * in_hw;
    switch (std::min<int64_t>(kPullChannels, g.channels - c0)) {
      case 1: pull_planes<1>(go, gi, plan, g); break;
      case 2: pull_planes<2>(go, gi, plan, g); break;
      case 3: pull_planes<3>(go, gi, plan, g); break;
      default: pull_planes<4>(go, gi, plan, g); break;
    }
  }
}

}  // namespace avx512
FASTCNN_GRID_SAMPLE_AVX512_END

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn
#endif  // FASTCNN_GRID_SAMPLE_AVX2
