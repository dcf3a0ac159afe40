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
// beyond 8 channels goes plane by plane instead. The backward reads and adds a pixel's taps as
// float pairs (NCHW) or runs of 2C floats (channels_last, 2-4 channels) where all four are inside.
// With AVX-512, the taps go 16 pixels at once, and the forward gathers: NCHW up to 8 channels,
// channels_last with 2 to 4 (one channel is the NCHW layout). With zeros or border padding those
// forwards keep the taps in registers, row by row, instead of chunk arrays (an affine row's vectors
// whose taps all lie inside skip the edge tests; small 1-2 channel NCHW images are read from a
// zero-bordered copy, with none; a vector whose taps lie in few enough input rows reads them from
// those rows by plain loads and permutes, where gathers cost more: row windows); so does the coordinate gradient when grad_input is not
// wanted (NCHW up to 8 channels, channels_last 2 to 4; its taps from row windows too), and for
// channels_last images of 2 to 4 channels over 32 KiB after grad_input alone. The backward with
// grad_input of an affine map over 1-2 channels (zeros padding) adds grad_input by pair gathers and
// scatters, 16 pixels that share no tap at a time (backward_affine_image_lattice); over 3-8 NCHW
// channels each input pixel gathers it from the output pixels whose taps reach it
// (grad_input_image_pull, where pull_policy() takes it), the coordinate gradient then in its own
// pass; otherwise, up to 8 channels, it stays on the AVX2 loops. Images of more channels run
// channel vectors, pixel by pixel; NCHW ones through a channels_last copy of each image (and of
// grad_output) that stays in L2, the results transposed back 16 x 16 in registers.
//
// The backward runs one batch element per task and sums in a fixed order: the input-gradient
// scatter needs no atomics and results are bitwise identical run to run and across thread counts,
// so torch.use_deterministic_algorithms costs nothing here. grad_theta sums each chunk (row, on the
// coordinate-only path) in fp32 and those sums in double. With fewer batch elements than threads,
// the backward uses fewer threads.
//
// This file holds the dispatch (which path serves a call), the scalar templates and the ATen entry
// points. The parts it includes, in this one translation unit: grid_sample_chunk.h (chunks, sources,
// scalar taps), grid_sample_avx2.h, grid_sample_avx512.h (taps in registers, gather forwards),
// grid_sample_avx512_backward.h (coordinate gradient, the lattice backward),
// grid_sample_avx512_pull.h (grad_input gathered by input pixels) and grid_sample_avx512_channels.h
// (feature maps of many channels).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/grid_sample_checks.h"
#include "ops/cpu/grid_sample_avx2.h"
#include "ops/cpu/grid_sample_avx512.h"
#include "ops/cpu/grid_sample_avx512_backward.h"
#include "ops/cpu/grid_sample_avx512_channels.h"
#include "ops/cpu/grid_sample_avx512_pull.h"
#include "ops/cpu/grid_sample_chunk.h"
#include "ops/cpu/grid_sample_kernel.h"
#include "ops/cpu/output_allocator.h"

namespace fastcnn {
namespace grid_sample {
namespace {

// Up to this many channels the AVX-512 forward gathers (NCHW; wider images run channel vectors).
constexpr int64_t kGatherChannels = 8;
// Up to this many channels the backward with grad_input of an affine map runs
// avx512::backward_affine_image_lattice (the scatters pay for themselves where the taps' arithmetic,
// shared by the channels, is a large part: 3 channels measured 0.8-1.07x the AVX2 loop).
constexpr int64_t kLatticeChannels = 2;

// Whether this CPU's AVX-512 gathers are slow: Intel's microcode mitigation of Gather Data
// Sampling (Downfall, CVE-2022-40982) makes each gather cost 29-38 cycles (the Intel Xeon of
// 2026-12-01), where the AMD Zen 5 of 2026-12-02, "Not affected", gathers several times faster.
// The kernel's own report, read once; deterministic for a machine (a timing would not be).
bool gathers_mitigated() {
  static const bool mitigated = [] {
    std::FILE* file = std::fopen("/sys/devices/system/cpu/vulnerabilities/gather_data_sampling", "r");
    if (file == nullptr) return false;
    char text[32] = {};
    const size_t read = std::fread(text, 1, sizeof(text) - 1, file);
    std::fclose(file);
    return read > 0 && std::strncmp(text, "Mitigation", 10) == 0;
  }();
  return mitigated;
}

// Where grad_input of an affine map is pulled by input pixels (avx512::grad_input_image_pull)
// rather than scattered. FASTCNN_GRID_SAMPLE_PULL=0: nowhere; =1: wherever the pull takes the map
// (read per call). By default: grad_input alone of 3-8 NCHW channels on every CPU (1.17-1.47x the
// pair loop, Zen 5 and Xeon); with the coordinate gradient too, or on NCHW feature maps of more
// channels, only on CPUs whose gathers are mitigated (the pull and a coordinate pass against the
// pair loop doing both: forward+backward 1.11-1.24x on the Xeon, 0.85-0.96x on the Zen 5;
// 32x64x56x56 grad_input 1.4-1.5x and 0.77x).
enum class PullPolicy { Never, Always, Auto };
PullPolicy pull_policy() {
  const char* flag = std::getenv("FASTCNN_GRID_SAMPLE_PULL");
  if (flag && flag[0] == '0') return PullPolicy::Never;
  if (flag && flag[0] == '1') return PullPolicy::Always;
  return PullPolicy::Auto;
}

#ifdef FASTCNN_GRID_SAMPLE_AVX2
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
  // rows are better served by the channel-vector loops (grid_sample_avx512_channels.h).
  const Taps vector_taps = vector_taps_for(g);
  const bool vector_pixels = std::is_same_v<scalar_t, float> && vector_taps != Taps::Scalar && (!channels_last || C <= 8);
  [[maybe_unused]] const avx2_strides st = layout_strides(channels_last, C, in_hw, out_hw);
  // Gathers for the few-channel NCHW images (grayscale, RGB); wider ones keep the AVX2 blocks of
  // planes (avx2::forward_row; gathers across 64 planes measured 10% slower than them).
  const bool gathers = vector_pixels && !channels_last && C <= kGatherChannels && vector_taps == Taps::Avx512;
  // channels_last RGB-like images: pair gathers too, for bilinear sampling (the element index
  // pixel * C must fit in int32).
  const bool small_nhwc_gathers = vector_pixels && channels_last && C >= 2 && C <= 4 && bilinear &&
                                  vector_taps == Taps::Avx512 && (g.in_h + 4) * (g.in_w + 4) * C < (int64_t(1) << 31);
  // channels_last images of more channels: channel vectors (the int32 tap offsets times C too).
  [[maybe_unused]] const bool wide_nhwc = std::is_same_v<scalar_t, float> && channels_last && C > kGatherChannels &&
                         vector_taps == Taps::Avx512 && (g.in_h + 4) * (g.in_w + 4) * C < (int64_t(1) << 31);
  // Those two with zeros or border padding compute their taps in registers, row by row.
  [[maybe_unused]] const bool direct = (gathers || small_nhwc_gathers) && g.padding != Padding::Reflection;
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
  // fp32 lane sums of the AVX2 chunks (avx2::theta_chunk_lanes), added into sums every
  // kFlushPixels pixels and at the image's end.
  static constexpr int kFlushPixels = 512;
  alignas(32) float lanes[6][8];
  int pending = 0;
  void begin(int64_t) {
    std::fill(sums, sums + 6, 0.0);
    std::fill(lanes[0], lanes[0] + 6 * 8, 0.0f);
    pending = 0;
  }
  void flush_lanes() {
    for (int s = 0; s < 6; ++s)
      for (int l = 0; l < 8; ++l) sums[s] += lanes[s][l], lanes[s][l] = 0.0f;
    pending = 0;
  }
  void add(int64_t, int64_t oy, int64_t ox0, int len, const Chunk<acc_t>& ch) {
#ifdef FASTCNN_GRID_SAMPLE_AVX2
    if constexpr (std::is_same_v<acc_t, float>) {
      if (cpu_has_avx2()) {
        avx2::theta_chunk_lanes(ch, len, base_x + ox0, base_y[oy], lanes);
        if ((pending += len) >= kFlushPixels) flush_lanes();
        return;
      }
    }
#endif
    // Chunk sums added in double: a fixed order, and no fp32 drift over 50k pixels.
    double sx = 0, sxx = 0, sy = 0, syx = 0;
    for (int p = 0; p < len; ++p) {
      const double bx = base_x[ox0 + p];
      const double dx = static_cast<double>(ch.gx[p] * ch.scale_x[p]);
      const double dy = static_cast<double>(ch.gy[p] * ch.scale_y[p]);
      sx += dx;
      sxx += dx * bx;
      sy += dy;
      syx += dy * bx;
    }
    const double by = base_y[oy];
    sums[0] += sxx;
    sums[1] += sx * by;
    sums[2] += sx;
    sums[3] += syx;
    sums[4] += sy * by;
    sums[5] += sy;
  }
  // sums of one image in the order of `sums` (avx512::ThetaLanes).
  void add_image(const double image_sums[6]) {
    for (int k = 0; k < 6; ++k) sums[k] += image_sums[k];
  }
  void end(int64_t n) {
    flush_lanes();
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
  [[maybe_unused]] const avx2_strides st = layout_strides(channels_last, C, in_hw, out_hw);
  // The coordinate gradient alone of NCHW images of up to kGatherChannels channels, bilinear with
  // zeros or border padding: avx512::coordinate_grad_image_nchw.
  [[maybe_unused]] const bool coords_only = vector_pixels && vector_taps == Taps::Avx512 && !channels_last && C <= kGatherChannels &&
                           coords && !want_input && g.padding != Padding::Reflection;
  // The same for channels_last images of 2 to 4 channels (avx512::coordinate_grad_image_nhwc;
  // 32x3x64x64 theta-only backward 1.9x, 8x3x224x224 2.2x, 64x3x28x28 1.6x the AVX2 runs loop).
  // Next to grad_input too, for images of more than 32 KiB: the runs loop adds grad_input alone,
  // then this pass takes the coordinate gradient (backward of 8x3x224x224 1.18x, 8x2x224x224
  // 1.04x, 32x4x64x64 1.13x, 32x3x64x64 1.06x the runs loop doing both); smaller images stay in
  // L1, where the one loop sharing its loads wins (64x3x28x28: the two passes 0.91x, 32x3x48x48
  // 0.96x). In NCHW the pair loop doing both is as fast as two passes.
  [[maybe_unused]] const bool coords_nhwc =
      vector_pixels && vector_taps == Taps::Avx512 && channels_last && C >= 2 && C <= 4 && coords &&
      g.padding != Padding::Reflection && (!want_input || C * in_hw * int64_t(sizeof(float)) > 32 * 1024);
  // Images of more than kGatherChannels channels, on AVX-512: channel vectors, pixel by pixel
  // (backward_pixel_channels); NCHW ones through channels_last copies of the image and grad_output,
  // and grad_input transposed back (as the forward, see avx512::forward_chunk_transposed).
  const bool wide_channels = vector_taps == Taps::Avx512 && std::is_same_v<scalar_t, float> && C > kGatherChannels &&
                             (want_input || coords) && (g.in_h + 4) * (g.in_w + 4) * C < (int64_t(1) << 31);
  const bool transposed = wide_channels && !channels_last;
  // grad_input of an affine map by conflict-free pair gathers and scatters, where the map allows
  // (avx512::backward_affine_image_lattice, image by image).
  constexpr bool affine_fp32 = std::is_same_v<Source, AffineSource<float>> && std::is_same_v<scalar_t, float>;
  // grad_input of an affine map gathered by each input pixel (avx512::grad_input_image_pull), where
  // the image's map allows; the coordinate gradient then by coordinate_grad_image_nchw. Past the
  // lattice's channels: against the AVX2 pair loop, 2 threads, in process
  // (bench/ab_grid_sample_env.py), on the Xeon: 32x3x64x64 grad_input 1.36x, with grad_theta
  // 1.24x; 8x3x224x224 1.47x and 1.36x. (Against the lattice, 64x1x28x28: 0.9-1.0x.) Feature maps
  // (NCHW, more than kGatherChannels) too when grad_input is all that is wanted, four planes at a
  // time: 32x64x56x56 1.5x the wide-channel pass (2 threads, in process). With the coordinate
  // gradient, that pass alone costs about what it costs doing both (pull and it: 0.97x). Which of
  // these a CPU with unmitigated gathers takes: pull_policy().
  const PullPolicy policy = pull_policy();
  const bool gathers_cheap = policy == PullPolicy::Auto && !gathers_mitigated();  // by default only
  [[maybe_unused]] const bool pull =
      affine_fp32 && vector_taps == Taps::Avx512 && !channels_last && C > kLatticeChannels &&
      (C <= kGatherChannels || (transposed && !coords)) && bilinear && g.padding == Padding::Zeros && want_input &&
      policy != PullPolicy::Never && !(gathers_cheap && (coords || C > kGatherChannels));
  [[maybe_unused]] const bool lattice = affine_fp32 && vector_taps == Taps::Avx512 && !channels_last &&
                                        C <= kLatticeChannels && bilinear && g.padding == Padding::Zeros &&
                                        want_input && g.out_h < (1 << 15) && g.out_w < (1 << 15);
#ifdef FASTCNN_GRID_SAMPLE_AVX2
  const int window_rows = vector_taps == Taps::Avx512 ? avx512::WindowRows::limit() : 0;
#endif
  at::parallel_for(0, g.batch, 1, [&](int64_t begin, int64_t end) {
    Chunk<acc_t> ch;
#ifdef FASTCNN_GRID_SAMPLE_AVX2
    static thread_local avx512::LatticeScratch lattice_scratch;
#endif
    Sink sink = sink_proto;
    std::vector<float> image_copy(transposed ? C * in_hw : 0), go_copy(transposed ? C * out_hw : 0),
        gin_copy(transposed && want_input ? C * in_hw : 0);
    // Image n's rows, chunk by chunk, by the AVX2 or scalar pixel loops; the coordinate gradient
    // with row_coords, handed to the sink with to_sink.
    auto chunk_rows = [&](int64_t n, acc_t* gin, bool row_coords, bool to_sink) {
      for (int64_t oy = 0; oy < g.out_h; ++oy) {
        for (int64_t ox0 = 0; ox0 < g.out_w; ox0 += kChunk) {
          const int len = static_cast<int>(std::min<int64_t>(kChunk, g.out_w - ox0));
          source_taps(ch, n, oy, ox0, len, source, g, vector_taps, !vector_pixels, true);
#ifdef FASTCNN_GRID_SAMPLE_AVX2
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (vector_pixels) {
              avx2::backward_row(input + n * C * in_hw, grad_output + output_offset(g, channels_last, n, oy, ox0), gin,
                                 ch, len, C, st, g.in_w, bilinear, want_input, row_coords);
              if (to_sink) sink.add(n, oy, ox0, len, ch);
              continue;
            }
          }
#endif
          std::fill(ch.gx, ch.gx + len, acc_t(0));
          std::fill(ch.gy, ch.gy + len, acc_t(0));
          if (want_input || row_coords) {
            if (!channels_last) {
              for (int64_t c = 0; c < C; ++c) {
                backward_plane_chunk(input + (n * C + c) * in_hw,
                                     grad_output + (n * C + c) * out_hw + oy * g.out_w + ox0,
                                     want_input ? gin + c * in_hw : nullptr, ch, len, g.in_w, bilinear, want_input,
                                     row_coords);
              }
            } else {
              const scalar_t* image = input + n * in_hw * C;
              for (int p = 0; p < len; ++p) {
                backward_pixel_nhwc(image, grad_output + ((n * g.out_h + oy) * g.out_w + ox0 + p) * C, gin, ch, p,
                                    C, g.in_w, bilinear, want_input, row_coords);
              }
            }
          }
          if (to_sink) sink.add(n, oy, ox0, len, ch);
        }
      }
    };
    // Image n's coordinate gradient by coordinate_grad_image_(nchw|nhwc), to the sink.
    [[maybe_unused]] auto coordinate_pass = [&](int64_t n, bool nchw) {
#ifdef FASTCNN_GRID_SAMPLE_AVX2
      if constexpr (std::is_same_v<scalar_t, float>) {
        float* grid_grad = nullptr;
        const float *base_x = nullptr, *base_y = nullptr;
        double theta_sums[6] = {};
        if constexpr (std::is_same_v<Sink, ThetaSink<float, float>>) {
          base_x = sink.base_x;
          base_y = sink.base_y;
        } else {
          grid_grad = sink.grad_grid + n * out_hw * 2;
        }
        if (nchw)
          avx512::coordinate_grad_image_nchw(input + n * C * in_hw, grad_output + n * C * out_hw, source, g, n, base_x,
                                             base_y, grid_grad, theta_sums, window_rows);
        else
          avx512::coordinate_grad_image_nhwc(input + n * C * in_hw, grad_output + n * C * out_hw, source, g, n, base_x,
                                             base_y, grid_grad, theta_sums, window_rows);
        if constexpr (std::is_same_v<Sink, ThetaSink<float, float>>) sink.add_image(theta_sums);
      }
#endif
    };
    for (int64_t n = begin; n < end; ++n) {
      acc_t* gin = want_input ? grad_input + n * C * in_hw : nullptr;
      if (want_coords) sink.begin(n);
#ifdef FASTCNN_GRID_SAMPLE_AVX2
      if constexpr (affine_fp32) {
        const avx512::PullPlan plan = pull ? avx512::pull_plan(source, g, n) : avx512::PullPlan();
        if (plan.candidates > 0) {
          avx512::grad_input_image_pull(grad_output + n * C * out_hw, gin, plan, g);
          if (coords) coordinate_pass(n, true);
          if (want_coords) sink.end(n);
          continue;
        }
      }
#endif
      // First touch by the owning thread (the transposed path writes every element at the end).
      if (want_input && !transposed) std::memset(gin, 0, sizeof(acc_t) * C * in_hw);
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
        if (coords_only || coords_nhwc) {
          if (want_input) chunk_rows(n, gin, false, false);
          coordinate_pass(n, coords_only);
          if (want_coords) sink.end(n);
          continue;
        }
      }
#endif
      chunk_rows(n, gin, coords, want_coords);
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

int window_rows_limit() {
#ifdef FASTCNN_GRID_SAMPLE_AVX2
  if (cpu_has_avx512()) return avx512::WindowRows::limit();
#endif
  return 0;
}

}  // namespace grid_sample
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, CPU, m) {
  m.impl("grid_sample", TORCH_FN(fastcnn::grid_sample::grid_sample_cpu));
  m.impl("_grid_sample_backward", TORCH_FN(fastcnn::grid_sample::grid_sample_backward_cpu));
  m.impl("affine_grid_sample", TORCH_FN(fastcnn::grid_sample::affine_grid_sample_cpu));
  m.impl("_affine_grid_sample_backward", TORCH_FN(fastcnn::grid_sample::affine_grid_sample_backward_cpu));
}
