// The CPU sampler's chunks of output pixels: the taps (offsets, weights, in-bounds masks) of up
// to kChunk pixels of a row, the sources of their coordinates (a grid, or an affine map), and
// the scalar computation of the taps, which the fp64/fp16/bf16 kernels and reflection padding
// use. Private to grid_sample_kernel.cpp, the one translation unit that includes it (everything
// here is in an anonymous namespace).
#pragma once

// The vector paths need GCC's target pragmas (clang ignores them): other compilers and CPUs build
// the scalar templates only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define FASTCNN_GRID_SAMPLE_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/grid_sample_checks.h"

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
  bool finite() const { return std::isfinite(ax) && std::isfinite(cx) && std::isfinite(ay) && std::isfinite(cy); }
};

// The source of output pixel (ox, oy) in input pixels: sx = ax * ox + bx * oy + cx, sy likewise.
struct PixelMap {
  double ax, bx, cx, ay, by, cy;
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
  // is then one fma a coordinate; the coordinates differ from row()'s by an ulp or so. Always
  // inlined: once two AVX-512 row loops called it, GCC called it out of line (compiled for the
  // baseline ISA), and the 64x1x28x28 forward took 4x as long (cause not pinned down: spills
  // around the call, or SSE code under dirty upper vector state).
  __attribute__((always_inline)) AffineRow pixel_row(int64_t n, int64_t oy, int64_t in_h, int64_t in_w,
                                                     bool align_corners) const {
    const acc_t* t = theta + n * 6;
    const double by = base_y[oy];
    const double sx = align_corners ? (in_w - 1) / 2.0 : in_w / 2.0, shift_x = (in_w - 1) / 2.0;
    const double sy = align_corners ? (in_h - 1) / 2.0 : in_h / 2.0, shift_y = (in_h - 1) / 2.0;
    return {float(t[0] * sx), float((t[1] * by + t[2]) * sx + shift_x), float(t[3] * sy),
            float((t[4] * by + t[5]) * sy + shift_y), base_x};
  }
  // Image n's whole map in input pixels, in double (F.affine_grid's base grid is linear in the
  // pixel index: first + step * i).
  PixelMap pixel_map(int64_t n, const Geometry& g) const {
    const acc_t* t = theta + n * 6;
    const auto base = [&](int64_t size, double* step, double* first) {
      if (g.align_corners) {
        *step = size > 1 ? 2.0 / double(size - 1) : 0.0;
        *first = size > 1 ? -1.0 : 0.0;
      } else {
        *step = 2.0 / double(size);
        *first = 1.0 / double(size) - 1.0;
      }
    };
    double step_x, first_x, step_y, first_y;
    base(g.out_w, &step_x, &first_x);
    base(g.out_h, &step_y, &first_y);
    const double scale_x = g.align_corners ? (g.in_w - 1) / 2.0 : g.in_w / 2.0, shift_x = (g.in_w - 1) / 2.0;
    const double scale_y = g.align_corners ? (g.in_h - 1) / 2.0 : g.in_h / 2.0, shift_y = (g.in_h - 1) / 2.0;
    PixelMap m;
    m.ax = t[0] * scale_x * step_x;
    m.bx = t[1] * scale_x * step_y;
    m.cx = (t[0] * first_x + t[1] * first_y + double(t[2])) * scale_x + shift_x;
    m.ay = t[3] * scale_y * step_x;
    m.by = t[4] * scale_y * step_y;
    m.cy = (t[3] * first_x + t[4] * first_y + double(t[5])) * scale_y + shift_y;
    return m;
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

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn
