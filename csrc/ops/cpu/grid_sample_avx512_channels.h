// The CPU sampler's AVX-512 paths (fp32) for feature maps of many channels, forward and
// backward: channel vectors, NCHW images through a channels_last copy. Private to
// grid_sample_kernel.cpp, the one translation unit that includes it (everything here is in an
// anonymous namespace).
#pragma once

#include "ops/cpu/avx512_transpose.h"
#include "ops/cpu/grid_sample_avx512.h"

#ifdef FASTCNN_GRID_SAMPLE_AVX2

namespace fastcnn {
namespace grid_sample {
namespace {

FASTCNN_GRID_SAMPLE_AVX512_BEGIN
namespace avx512 {

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

using cpu::transpose16;

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
FASTCNN_GRID_SAMPLE_AVX512_END

}  // namespace
}  // namespace grid_sample
}  // namespace fastcnn
#endif  // FASTCNN_GRID_SAMPLE_AVX2
