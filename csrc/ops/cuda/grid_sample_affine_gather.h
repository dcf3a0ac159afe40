// Deterministic grad_input of the affine Spatial Transformer sampler (Jaderberg et al. 2015;
// reference op: the input gradient of F.grid_sample(input, F.affine_grid(theta, size)), zeros
// padding) as a gather over input pixels, without sorting.
//
// Why: the sorted formulation (record every (output pixel, tap) entry, radix sort by input pixel,
// mark runs, gather) takes about eight launches and several passes over 4 entries per output pixel;
// on an H200 it made the deterministic forward+backward 1.3-1.85x PyTorch against 2.8-3.9x for the
// atomic one. An affine map can be inverted instead: output pixel (ox, oy) samples pixel
// coordinates x = ax*ox + bx*oy + cx, y = ay*ox + by*oy + cy, so the output pixels whose bilinear
// taps reach input pixel (ix, iy) -- those with x in [ix - 1, ix + 1) and y in [iy - 1, iy + 1) --
// lie, row by row, in an interval of ox that two divisions give. One thread per input pixel walks
// those intervals (widened by a margin that covers the forward's rounding), recomputes each
// candidate's taps exactly as the forward does (grid_sample_coords.h), and adds weight *
// grad_output for the taps that land on its pixel. Candidates go in ascending output pixel order,
// the order in which the sorted formulation sums each run: the two give bitwise the same result.
//
// Zeros padding only (border and reflection fold far-away samples onto the edge pixels, which
// breaks the interval argument); bilinear and nearest. A near-singular map (the output collapses
// onto a line or a point) walks every output row; its intervals stay exact.
//
// The thread body is plain C++ (C10_HOST_DEVICE) so that the CPU tests run it for every thread of
// the launch (tests/cuda_emulation/), as the depthwise kernels in this folder.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/grid_sample_coords.h"

namespace fastcnn {
namespace grid_sample {
namespace affine_gather {

constexpr int kThreads = 256;
constexpr int kChannelBlock = 4;  // channels summed per walk over the candidates

struct Geom {
  int64_t N, C, Hi, Wi, Ho, Wo;
  bool nearest, align_corners, channels_last;
};

inline bool supports(bool affine, Padding padding) {
  return affine && padding == Padding::Zeros;
}

inline int64_t launch_blocks(const Geom& g) {
  const int64_t total = g.N * g.Hi * g.Wi;
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// Pixel coordinates of output pixel (ox, oy) in exact arithmetic, from theta (acc_t as the kernels
// read it): x = ax*ox + bx*oy + cx, y = ay*ox + by*oy + cy; and `margin`, pixels by which the
// forward's rounded coordinates may differ from these (plus one).
struct Map {
  double ax, bx, cx, ay, by, cy, margin;
  double inv_ax, inv_ay;  // 1 / ax, 1 / ay (inf for 0: solve() tests a itself): no division per row
};

// F.affine_grid's base coordinate of index i as u0 + u1 * i (affine_base_coord in exact arithmetic).
C10_HOST_DEVICE inline void base_line(int64_t size, bool align_corners, double* u0, double* u1) {
  if (size <= 1) {
    *u0 = 0.0;
    *u1 = 0.0;
  } else if (align_corners) {
    *u0 = -1.0;
    *u1 = 2.0 / double(size - 1);
  } else {
    *u0 = -double(size - 1) / double(size);
    *u1 = 2.0 / double(size);
  }
}

template <typename acc_t>
C10_HOST_DEVICE inline Map make_map(const acc_t th[6], const Geom& g) {
  double ux0, ux1, uy0, uy1;
  base_line(g.Wo, g.align_corners, &ux0, &ux1);
  base_line(g.Ho, g.align_corners, &uy0, &uy1);
  // unnormalize: pixel = s * grid + o.
  const double sx = g.align_corners ? double(g.Wi - 1) / 2.0 : double(g.Wi) / 2.0;
  const double sy = g.align_corners ? double(g.Hi - 1) / 2.0 : double(g.Hi) / 2.0;
  const double ox = double(g.Wi - 1) / 2.0, oy = double(g.Hi - 1) / 2.0;
  const double t0 = th[0], t1 = th[1], t2 = th[2], t3 = th[3], t4 = th[4], t5 = th[5];
  Map m;
  m.ax = sx * t0 * ux1;
  m.bx = sx * t1 * uy1;
  m.cx = sx * (t0 * ux0 + t1 * uy0 + t2) + ox;
  m.ay = sy * t3 * ux1;
  m.by = sy * t4 * uy1;
  m.cy = sy * (t3 * ux0 + t4 * uy0 + t5) + oy;
  // The forward rounds the base coordinate, three products and sums, and the unnormalize: a few
  // units in the last place of the largest term, in grid units, times the scale to pixels.
  const double eps = sizeof(acc_t) >= 8 ? 2.3e-16 : 1.2e-7;
  const double terms_x = ::fabs(t0) + ::fabs(t1) + ::fabs(t2) + 1.0;
  const double terms_y = ::fabs(t3) + ::fabs(t4) + ::fabs(t5) + 1.0;
  m.margin = 1.0 + 16.0 * eps * (terms_x * (sx + 1.0) + terms_y * (sy + 1.0));
  m.inv_ax = 1.0 / m.ax;
  m.inv_ay = 1.0 / m.ay;
  return m;
}

// [first, last) of the integers in [lo, hi] within [0, n); empty for NaN bounds.
C10_HOST_DEVICE inline void integer_range(double lo, double hi, int64_t n, int64_t* first, int64_t* last) {
  if (!(lo <= hi) || !(hi >= 0.0) || !(lo <= double(n - 1))) {
    *first = *last = 0;
    return;
  }
  *first = lo <= 0.0 ? 0 : static_cast<int64_t>(::ceil(lo));
  *last = hi >= double(n - 1) ? n : static_cast<int64_t>(::floor(hi)) + 1;
  if (*last < *first) *last = *first;
}

// The t with lo <= a*t + b <= hi as [t_lo, t_hi] (either order of the bounds handled; inv_a = 1/a,
// and the bounds are widened by the caller's margin, which covers the reciprocal's rounding);
// a == 0: all t or none. NaN in, empty out.
C10_HOST_DEVICE inline void solve(double a, double inv_a, double b, double lo, double hi, double* t_lo, double* t_hi) {
  if (a != 0.0) {
    const double u = (lo - b) * inv_a, v = (hi - b) * inv_a;
    *t_lo = u < v ? u : v;
    *t_hi = u < v ? v : u;
  } else if (lo <= b && b <= hi) {
    *t_lo = -INFINITY;
    *t_hi = INFINITY;
  } else {
    *t_lo = NAN;
    *t_hi = NAN;
  }
}

// Output rows that can reach input pixel (ix, iy): the rows of the inverse image of the widened
// square [ix - 1 - margin, ix + 1 + margin] x [iy - ...]; every row when the map is near-singular.
C10_HOST_DEVICE inline void candidate_rows(const Map& m, double x_lo, double x_hi, double y_lo, double y_hi, int64_t Ho,
                                           int64_t* first, int64_t* last) {
  const double det = m.ax * m.by - m.bx * m.ay;
  const double scale = (::fabs(m.ax) + ::fabs(m.bx)) * (::fabs(m.ay) + ::fabs(m.by));
  if (!(::fabs(det) > 1e-9 * scale)) {
    *first = 0;
    *last = Ho;
    return;
  }
  // oy = (ax * (y - cy) - ay * (x - cx)) / det over the square's corners.
  double lo = INFINITY, hi = -INFINITY;
  const double xs[2] = {x_lo, x_hi}, ys[2] = {y_lo, y_hi};
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const double oy = (m.ax * (ys[j] - m.cy) - m.ay * (xs[i] - m.cx)) / det;
      lo = oy < lo ? oy : lo;
      hi = oy > hi ? oy : hi;
    }
  }
  integer_range(::floor(lo) - 1.0, ::ceil(hi) + 1.0, Ho, first, last);
}

// The forward's source pixel coordinates of output pixel (ox, oy) of an image with theta `th`,
// operation for operation (source_of in grid_sample_kernel.cu), zeros padding.
template <typename acc_t>
C10_HOST_DEVICE inline void source_pixel(const acc_t th[6], int64_t ox, int64_t oy, const Geom& g, acc_t* x, acc_t* y) {
  const acc_t bx = affine_base_coord<acc_t>(ox, g.Wo, g.align_corners);
  const acc_t by = affine_base_coord<acc_t>(oy, g.Ho, g.align_corners);
  const acc_t gx = th[0] * bx + th[1] * by + th[2];
  const acc_t gy = th[3] * bx + th[4] * by + th[5];
  acc_t unused;
  *x = source_index(gx, g.Wi, Padding::Zeros, g.align_corners, &unused);
  *y = source_index(gy, g.Hi, Padding::Zeros, g.align_corners, &unused);
}

// grad_input of input pixels first, first + step, ... (pixel q = (n, iy, ix) of the N*Hi*Wi).
template <typename scalar_t>
C10_HOST_DEVICE inline void grad_input_thread(const scalar_t* __restrict__ go, const scalar_t* __restrict__ theta,
                                              scalar_t* __restrict__ grad_in, const Geom& g, int64_t first,
                                              int64_t step) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t in_plane = g.Hi * g.Wi, out_plane = g.Ho * g.Wo, total = g.N * in_plane;
  const double reach = g.nearest ? 0.5 : 1.0;  // bilinear: x0 in {ix - 1, ix}; nearest: round(x) == ix
  for (int64_t q = first; q < total; q += step) {
    const int64_t n = q / in_plane, sp = q - n * in_plane, iy = sp / g.Wi, ix = sp - iy * g.Wi;
    acc_t th[6];
    for (int k = 0; k < 6; ++k) th[k] = static_cast<acc_t>(theta[n * 6 + k]);
    const Map m = make_map(th, g);
    const double x_lo = double(ix) - reach - m.margin, x_hi = double(ix) + reach + m.margin;
    const double y_lo = double(iy) - reach - m.margin, y_hi = double(iy) + reach + m.margin;
    int64_t oy_first, oy_last;
    candidate_rows(m, x_lo, x_hi, y_lo, y_hi, g.Ho, &oy_first, &oy_last);

    for (int64_t c0 = 0; c0 < g.C; c0 += kChannelBlock) {
      const int cb = static_cast<int>(g.C - c0 < kChannelBlock ? g.C - c0 : kChannelBlock);
      acc_t acc[kChannelBlock];
      for (int j = 0; j < kChannelBlock; ++j) acc[j] = acc_t(0);
      for (int64_t oy = oy_first; oy < oy_last; ++oy) {
        double a_lo, a_hi, b_lo, b_hi;
        solve(m.ax, m.inv_ax, m.bx * double(oy) + m.cx, x_lo, x_hi, &a_lo, &a_hi);
        solve(m.ay, m.inv_ay, m.by * double(oy) + m.cy, y_lo, y_hi, &b_lo, &b_hi);
        int64_t ox_first, ox_last;
        integer_range(::floor(a_lo > b_lo ? a_lo : b_lo), ::ceil(a_hi < b_hi ? a_hi : b_hi), g.Wo, &ox_first,
                      &ox_last);
        for (int64_t ox = ox_first; ox < ox_last; ++ox) {
          acc_t x, y;
          source_pixel(th, ox, oy, g, &x, &y);
          acc_t w;
          if (g.nearest) {
            if (nearest_index(x) != ix || nearest_index(y) != iy) continue;
            w = acc_t(1);
          } else {
            const BilinearTaps<acc_t> t = bilinear_taps(x, y);
            const bool west = t.x0 == ix, east = t.x0 + 1 == ix, north = t.y0 == iy, south = t.y0 + 1 == iy;
            if (!(west || east) || !(north || south)) continue;
            w = (west ? t.dx1 : t.dx0) * (north ? t.dy1 : t.dy0);
          }
          const int64_t p = oy * g.Wo + ox;
          for (int j = 0; j < cb; ++j) {
            const int64_t c = c0 + j;
            const int64_t index = g.channels_last ? (n * out_plane + p) * g.C + c : (n * g.C + c) * out_plane + p;
            acc[j] += w * static_cast<acc_t>(go[index]);
          }
        }
      }
      for (int j = 0; j < cb; ++j) {
        const int64_t c = c0 + j;
        const int64_t index = g.channels_last ? q * g.C + c : (n * g.C + c) * in_plane + sp;
        grad_in[index] = static_cast<scalar_t>(acc[j]);
      }
    }
  }
}

}  // namespace affine_gather
}  // namespace grid_sample
}  // namespace fastcnn
