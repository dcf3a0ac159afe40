// Depthwise convolution on AVX-512 (reference op F.conv2d(groups=C)), channels_last images with
// 5- and 7-wide windows at unit stride: ConvNeXt's 7x7 (Liu et al., 2022), MobileNet v3's 5x5
// (Howard et al., 2019); and on rows of 7 outputs 3-wide windows and stride 2 (MobileNets' last
// layers, Howard et al., 2017). 64 channels of an image at a time, the window's input rows copied
// into a ring of zero-bordered rows of 16-channel pixels. See supports_nhwc_ring in
// depthwise_conv2d_avx512.h.
//
// Why a ring: read in place, a run of output pixels walks the image C floats a pixel and the
// window's rows W * C floats apart, so with C a multiple of 64 every pixel of the window falls in
// the same few L1 sets (C = 128: 8 sets of 12 lines for the 98 lines a 7x7 run of 8 reads) and
// every load came from L2 (2.0-2.4 cycles a multiply-add on one core; the FMA rate is about 0.6).
// In the ring a row's pixels are adjacent lines, the border columns are zeros that are never
// written, and each input line is copied once for the K output rows that read it. bf16 and fp16
// images are widened as they are copied (the ring is fp32) and each output rounded once.
#include "ops/cpu/depthwise_avx512/common.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/avx512_transpose.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

// Columns of a ring row: every tap of every output pixel.
int64_t ring_row_pixels(const ImageGeometry& g) { return (g.out_w - 1) * g.stride_w + g.kernel_w; }

// One ring: the window's rows of one channel vector (kernel_h rows of ring_row_pixels 16-channel
// pixels) and its weights ([kernel_h * kernel_w][16]).
struct Slice {
  const float* ring;
  const float* weights;
  __m512 bias;
  __mmask16 lanes;
};

// P output pixels of S channel vectors from ring column x0 (the run's first pixel times SW): P * S
// accumulators, the KW weights of a kernel row per vector, and each input pixel loaded once for
// every tap that reads it (column j feeds pixel (j - kx) / SW). Runs of 14 pixels (ConvNeXt's maps
// are 56, 28, 14 and 7 wide) of one vector, 22 registers for 7x7; rows of 7 to 13 pixels runs of 7
// of two vectors (one vector's 7 chains ran near the FMA latency). Narrow rows skip the run's
// columns [0, j0) and [j1, ...), zeros outside the input (a quarter of a 7x7 map's multiply-adds).
template <int KW, int P, int S, int SW, typename E>
inline void ring_run(const Slice* slices, const int64_t* row_offsets, int64_t ky0, int64_t ky1, int64_t x0, int64_t j0,
                     int64_t j1, E* out, int64_t C, bool stream) {
  constexpr int kColumns = (P - 1) * SW + KW;
  __m512 acc[S][P];
#pragma GCC unroll 16
  for (int s = 0; s < S; ++s)
    for (int p = 0; p < P; ++p) acc[s][p] = slices[s].bias;
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const float* row[S];
    __m512 w[S][KW];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      row[s] = slices[s].ring + row_offsets[ky] + x0 * kLanes;
      for (int kx = 0; kx < KW; ++kx) w[s][kx] = _mm512_loadu_ps(slices[s].weights + (ky * KW + kx) * kLanes);
    }
#pragma GCC unroll 32
    for (int j = 0; j < kColumns; ++j) {
      if (P < 14 && (j < j0 || j >= j1)) continue;
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) {
        __m512 column = _mm512_load_ps(row[s] + j * kLanes);
        // Kept in a register: for 3-wide windows GCC folded the load into each multiply-add that
        // reads it, and this Xeon issues about one 64-byte load a cycle against two multiply-adds
        // (128x28x28 3x3 in L2, one thread: 25 -> 15 cycles an output vector).
        __asm__("" : "+v"(column));
#pragma GCC unroll 8
        for (int kx = 0; kx < KW; ++kx) {
          const int p = (j - kx) / SW;
          if (j >= kx && (j - kx) % SW == 0 && p < P) acc[s][p] = _mm512_fmadd_ps(w[s][kx], column, acc[s][p]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p)
    for (int s = 0; s < S; ++s) store_channels(out + p * C + s * kLanes, slices[s].lanes, acc[s][p], stream);
}

// Brings the ring up to output row oy: copies the input rows it lacks into their slots (row r in
// slot r % kernel_h; G channel vectors from c0, vector s masked by lanes[s], each vector's ring
// ring_floats apart), and prefetches the stride_h rows the next output row copies (the copy's
// strided loads otherwise wait on L2 or memory one after another). Ring column c holds input
// column c - pad_left; those outside the input are never written and stay zero.
template <int G, typename E>
void advance_ring(const E* in, int64_t c0, const __mmask16* lanes, const ImageGeometry& g, float* ring, int64_t oy,
                  int64_t* next_row) {
  const int64_t C = g.channels, KH = g.kernel_h, row_floats = ring_row_pixels(g) * kLanes;
  const int64_t ring_floats = KH * row_floats;
  const int64_t first_column = g.pad_left > 0 ? g.pad_left : 0;
  const int64_t end_column = min64(ring_row_pixels(g), g.in_w + g.pad_left);
  for (; *next_row < min64(g.in_h, oy * g.stride_h - g.pad_top + KH); ++*next_row) {
    float* dst = ring + *next_row % KH * row_floats;
    const E* src = in + (*next_row * g.in_w + first_column - g.pad_left) * C + c0;
    for (int64_t c = first_column; c < end_column; ++c, src += C)
      for (int s = 0; s < G; ++s)
        _mm512_store_ps(dst + s * ring_floats + c * kLanes, load_channels(lanes[s], src + s * kLanes));
  }
  for (int64_t row = *next_row; row < min64(g.in_h, *next_row + g.stride_h); ++row) {
    const E* src = in + (row * g.in_w + first_column - g.pad_left) * C + c0;
    for (int64_t c = first_column; c < end_column; ++c, src += C)
      for (int s = 0; s < G; ++s) _mm_prefetch(reinterpret_cast<const char*>(src + s * kLanes), _MM_HINT_T0);
  }
}

// G channel vectors from c0 (four: a pixel's 64 channels are lines the L2 fetches in pairs, and
// the stores fill 256 contiguous bytes a pixel), each with its own ring and weights; each run
// position makes its pixels for every vector in turn.
template <int KW, int P, int SW, int G, typename E>
void ring_rows(const E* in, const float* bias, E* out, int64_t c0, const ImageGeometry& g, float* ring,
               const float* weights) {
  const int64_t C = g.channels, KH = g.kernel_h, row_floats = ring_row_pixels(g) * kLanes;
  const int64_t ring_floats = KH * row_floats, weight_floats = KH * KW * kLanes;
  Slice slices[G];
  __mmask16 lanes[G];
  for (int s = 0; s < G; ++s) {
    lanes[s] = lane_range(0, C - c0 - s * kLanes);
    slices[s] = {ring + s * ring_floats, weights + s * weight_floats,
                 bias ? _mm512_maskz_loadu_ps(lanes[s], bias + c0 + s * kLanes) : _mm512_setzero_ps(), lanes[s]};
  }
  // Ring column c holds input column c - pad_left (see advance_ring).
  const int64_t first_column = g.pad_left > 0 ? g.pad_left : 0;
  const int64_t end_column = min64(ring_row_pixels(g), g.in_w + g.pad_left);
  int64_t next_row = 0;  // the next input row to copy into slot next_row % KH
  int64_t row_offsets[64];
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    const int64_t iy0 = oy * g.stride_h - g.pad_top;
    advance_ring<G>(in, c0, lanes, g, ring, oy, &next_row);
    // Kernel rows inside the input: [ky0, ky1).
    const int64_t ky0 = iy0 < 0 ? -iy0 : 0, ky1 = min64(KH, g.in_h - iy0);
    for (int64_t ky = ky0; ky < ky1; ++ky) row_offsets[ky] = (iy0 + ky) % KH * row_floats;
    E* out_row = out + oy * g.out_w * C + c0;
    for (int64_t ox = 0; ox < g.out_w; ox += P) {
      // The row's last run ends at its last pixel (some pixels made twice, the same values).
      const int64_t x = min64(ox, g.out_w - P), x0 = x * SW;
      const int64_t j0 = first_column - x0, j1 = end_column - x0;
      constexpr int S = P < 14 ? 2 : 1;
      int s = 0;
      for (; s + S <= G; s += S)
        ring_run<KW, P, S, SW>(slices + s, row_offsets, ky0, ky1, x0, j0, j1, out_row + x * C + s * kLanes, C,
                               g.stream_output);
      if (s < G)
        ring_run<KW, P, 1, SW>(slices + s, row_offsets, ky0, ky1, x0, j0, j1, out_row + x * C + s * kLanes, C,
                               g.stream_output);
    }
  }
}

template <int KW, int P, int SW, typename E>
void ring_channels(const E* in, const float* bias, E* out, int64_t c0, const ImageGeometry& g, float* ring,
                   const float* weights) {
  switch (min64(kNhwcRingChannels, g.channels - c0 + kLanes - 1) / kLanes) {
    case 1: return ring_rows<KW, P, SW, 1>(in, bias, out, c0, g, ring, weights);
    case 2: return ring_rows<KW, P, SW, 2>(in, bias, out, c0, g, ring, weights);
    case 3: return ring_rows<KW, P, SW, 3>(in, bias, out, c0, g, ring, weights);
    default: return ring_rows<KW, P, SW, 4>(in, bias, out, c0, g, ring, weights);
  }
}

template <int KW, int SW, typename E>
void ring_widths(const E* in, const float* bias, E* out, int64_t c0, const ImageGeometry& g, float* ring,
                 const float* weights) {
  if (g.out_w >= 14) return ring_channels<KW, 14, SW>(in, bias, out, c0, g, ring, weights);
  ring_channels<KW, 7, SW>(in, bias, out, c0, g, ring, weights);
}

inline float* aligned_to_line(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

}  // namespace

void transpose_floats(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
                      int64_t dst_stride) {
  __m512 r[16];
  for (int64_t i0 = 0; i0 < rows; i0 += kLanes) {
    const int64_t tile_rows = min64(kLanes, rows - i0);
    const __mmask16 row_lanes = lane_range(0, tile_rows);
    for (int64_t j0 = 0; j0 < cols; j0 += kLanes) {
      const int64_t tile_cols = min64(kLanes, cols - j0);
      const __mmask16 col_lanes = lane_range(0, tile_cols);
      for (int64_t i = 0; i < kLanes; ++i)
        r[i] = i < tile_rows ? _mm512_maskz_loadu_ps(col_lanes, src + (i0 + i) * src_stride + j0) : _mm512_setzero_ps();
      cpu::transpose16(r);
      for (int64_t j = 0; j < tile_cols; ++j) _mm512_mask_storeu_ps(dst + (j0 + j) * dst_stride + i0, row_lanes, r[j]);
    }
  }
}

bool supports_nhwc_ring(const ImageGeometry& g) {
  if (!(g.dilation_h == 1 && g.dilation_w == 1 && g.kernel_h <= 64 && g.out_w >= 7)) return false;
  const bool unit_stride = g.stride_h == 1 && g.stride_w == 1;
  const bool stride_two = g.stride_h <= 2 && g.stride_w == 2;
  // 5- and 7-wide windows at unit stride on every map; 3-wide windows, and stride 2, only on
  // rows of 7 outputs (MobileNets' last maps), where the rows' short runs of one or two pixels
  // left the multiply-adds waiting on loads. On wider maps of many images the rows read each
  // input row in one pass where the ring reads a 64-channel slice of it at a time, a line in every
  // four (or eight) of each pixel that the prefetchers do not follow (2 threads, in process:
  // 32x512x14x14 3x3 rows 1.16 ms, ring 1.93; 32x256x28x28 stride 2 1.51 and 1.74).
  if (unit_stride && (g.kernel_w == 5 || g.kernel_w == 7)) return true;
  return g.out_w <= 7 && (unit_stride || stride_two) && (g.kernel_w == 3 || g.kernel_w == 5 || g.kernel_w == 7);
}

int64_t nhwc_ring_floats(const ImageGeometry& g) {
  return kNhwcRingChannels / kLanes * g.kernel_h * ring_row_pixels(g) * kLanes + kLanes;
}

int64_t nhwc_ring_weight_floats(const ImageGeometry& g) { return kNhwcRingChannels * g.kernel_h * g.kernel_w; }

void nhwc_ring_weights(const float* weight, int64_t c0, const ImageGeometry& g, float* weights) {
  // Per vector of 16 channels, [tap][channel]: each channel's taps are read in order, the block's
  // 16 x taps floats staying in L1 (a whole-tensor transpose to [tap][C] cost more than the
  // convolution of 1x1024x7x7: its writes C floats apart fell in one L1 set).
  const int64_t taps = g.kernel_h * g.kernel_w;
  for (int64_t s = 0; s < kNhwcRingChannels / kLanes; ++s, weights += taps * kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const int64_t c = c0 + s * kLanes + l;
      for (int64_t t = 0; t < taps; ++t) weights[t * kLanes + l] = c < g.channels ? weight[c * taps + t] : 0.f;
    }
}

namespace {

template <typename E>
void ring_image(const E* in, const float* weights, const float* bias, E* out, int64_t c0, const ImageGeometry& g,
                float* scratch) {
  float* ring = aligned_to_line(scratch);
  if (g.stride_w == 2) {
    if (g.kernel_w == 7) return ring_widths<7, 2>(in, bias, out, c0, g, ring, weights);
    if (g.kernel_w == 5) return ring_widths<5, 2>(in, bias, out, c0, g, ring, weights);
    return ring_widths<3, 2>(in, bias, out, c0, g, ring, weights);
  }
  if (g.kernel_w == 7) return ring_widths<7, 1>(in, bias, out, c0, g, ring, weights);
  if (g.kernel_w == 5) return ring_widths<5, 1>(in, bias, out, c0, g, ring, weights);
  ring_widths<3, 1>(in, bias, out, c0, g, ring, weights);
}

}  // namespace

void forward_channels_nhwc_ring(const float* in, const float* weights, const float* bias, float* out, int64_t c0,
                                const ImageGeometry& g, float* scratch) {
  ring_image(in, weights, bias, out, c0, g, scratch);
}

void forward_channels_nhwc_ring_bf16(const uint16_t* in, const float* weights, const float* bias, uint16_t* out,
                                     int64_t c0, const ImageGeometry& g, float* scratch) {
  ring_image(reinterpret_cast<const Bf16*>(in), weights, bias, reinterpret_cast<Bf16*>(out), c0, g, scratch);
}

void forward_channels_nhwc_ring_fp16(const uint16_t* in, const float* weights, const float* bias, uint16_t* out,
                                     int64_t c0, const ImageGeometry& g, float* scratch) {
  ring_image(reinterpret_cast<const Fp16*>(in), weights, bias, reinterpret_cast<Fp16*>(out), c0, g, scratch);
}

// ---------------------------------------------------------------------------------------------
// Weight gradient: the same ring of input rows; for each run of P output pixels of one channel
// vector, grad_output's P vectors stay in registers while each kernel row's KW sums take every
// column of the ring row once (column j feeds tap kx through pixel j - kx): P + KW - 1 loads for
// P * KW multiply-adds, where the rows' weight gradient loads a window pixel for each.

namespace {

template <int KW, int P, typename E>
inline void ring_weight_run(const float* const* rows, int64_t ky0, int64_t ky1, const E* go, int64_t C,
                            __mmask16 lanes, float* sums, float* bias_sums) {
  __m512 grad[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) grad[p] = load_channels(lanes, go + p * C);
  if (bias_sums) {
    __m512 total = _mm512_loadu_ps(bias_sums);
#pragma GCC unroll 16
    for (int p = 0; p < P; ++p) total = _mm512_add_ps(total, grad[p]);
    _mm512_storeu_ps(bias_sums, total);
  }
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    __m512 acc[KW];
    float* tap_sums = sums + ky * KW * kLanes;
#pragma GCC unroll 8
    for (int kx = 0; kx < KW; ++kx) acc[kx] = _mm512_loadu_ps(tap_sums + kx * kLanes);
#pragma GCC unroll 32
    for (int j = 0; j < P + KW - 1; ++j) {
      __m512 column = _mm512_load_ps(rows[ky] + j * kLanes);
      __asm__("" : "+v"(column));  // one load for the KW taps (see ring_run)
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) {
        const int p = j - kx;
        if (p >= 0 && p < P) acc[kx] = _mm512_fmadd_ps(grad[p], column, acc[kx]);
      }
    }
#pragma GCC unroll 8
    for (int kx = 0; kx < KW; ++kx) _mm512_storeu_ps(tap_sums + kx * kLanes, acc[kx]);
  }
}

template <int KW, int P, int G, typename E>
void ring_weight_rows(const E* in, const E* go, int64_t c0, const ImageGeometry& g, float* ring, float* sums,
                      bool with_bias) {
  const int64_t C = g.channels, KH = g.kernel_h, row_floats = ring_row_pixels(g) * kLanes;
  const int64_t ring_floats = KH * row_floats, slice_sums = (KH * KW + 1) * kLanes;
  __mmask16 lanes[G];
  for (int s = 0; s < G; ++s) lanes[s] = lane_range(0, C - c0 - s * kLanes);
  int64_t next_row = 0;
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    const int64_t iy0 = oy - g.pad_top;
    advance_ring<G>(in, c0, lanes, g, ring, oy, &next_row);
    const int64_t ky0 = iy0 < 0 ? -iy0 : 0, ky1 = min64(KH, g.in_h - iy0);
    const E* go_row = go + oy * g.out_w * C + c0;
    for (int64_t x = 0; x < g.out_w; x += P)
      for (int s = 0; s < G; ++s) {
        const float* rows[64];
        for (int64_t ky = ky0; ky < ky1; ++ky)
          rows[ky] = ring + s * ring_floats + (iy0 + ky) % KH * row_floats + x * kLanes;
        float* slice = sums + s * slice_sums;
        ring_weight_run<KW, P>(rows, ky0, ky1, go_row + x * C + s * kLanes, C, lanes[s], slice,
                               with_bias ? slice + KH * KW * kLanes : nullptr);
      }
  }
}

template <int KW, int P, typename E>
void ring_weight_channels(const E* in, const E* go, int64_t c0, const ImageGeometry& g, float* ring, float* sums,
                          bool with_bias) {
  switch (min64(kNhwcRingChannels, g.channels - c0 + kLanes - 1) / kLanes) {
    case 1: return ring_weight_rows<KW, P, 1>(in, go, c0, g, ring, sums, with_bias);
    case 2: return ring_weight_rows<KW, P, 2>(in, go, c0, g, ring, sums, with_bias);
    case 3: return ring_weight_rows<KW, P, 3>(in, go, c0, g, ring, sums, with_bias);
    default: return ring_weight_rows<KW, P, 4>(in, go, c0, g, ring, sums, with_bias);
  }
}

}  // namespace

bool supports_nhwc_ring_weight_grad(const ImageGeometry& g) {
  return g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1 &&
         (g.kernel_w == 5 || g.kernel_w == 7) && g.kernel_h <= 64 && (g.out_w == 7 || g.out_w % 14 == 0);
}

int64_t nhwc_ring_weight_grad_sum_floats(const ImageGeometry& g) {
  return kNhwcRingChannels / kLanes * (g.kernel_h * g.kernel_w + 1) * kLanes;
}

void weight_grad_channels_nhwc_ring(const float* in, const float* grad_out, float* sums, bool with_bias, int64_t c0,
                                    const ImageGeometry& g, float* scratch) {
  float* ring = aligned_to_line(scratch);
  const bool wide = g.out_w >= 14;
  if (g.kernel_w == 7) {
    if (wide) return ring_weight_channels<7, 14>(in, grad_out, c0, g, ring, sums, with_bias);
    return ring_weight_channels<7, 7>(in, grad_out, c0, g, ring, sums, with_bias);
  }
  if (wide) return ring_weight_channels<5, 14>(in, grad_out, c0, g, ring, sums, with_bias);
  ring_weight_channels<5, 7>(in, grad_out, c0, g, ring, sums, with_bias);
}

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
