// Depthwise convolution on AVX-512: NCHW planes of at most 64 outputs (7x7 maps) as one flat
// array of four vectors. See FlatPlane in depthwise_conv2d_avx512.h.
#include "ops/cpu/depthwise_avx512/common.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/depthwise_avx512/plane_kernels.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

namespace {

template <int kTaps>
void forward_flat(const float* in, const float* taps, float bias, float* out, const FlatPlane& f) {
  __m512 acc[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) acc[v] = _mm512_set1_ps(bias);
#pragma GCC unroll 25
  for (int t = 0; t < kTaps; ++t) {
    const __m512 w = _mm512_set1_ps(taps[t]);
    const float* src = in + f.offset[t];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc[v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(f.load_mask[v][t], src + v * kLanes), acc[v]);
  }
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(out + v * kLanes, f.store_mask[v], acc[v]);
}

template <int kTaps>
void weight_grad_flat(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                      const FlatPlane& f) {
  __m512 grad[4];
#pragma GCC unroll 4
  for (int v = 0; v < 4; ++v) grad[v] = _mm512_maskz_loadu_ps(f.store_mask[v], grad_out + v * kLanes);
  if (bias_lanes) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(grad[0], grad[1]), _mm512_add_ps(grad[2], grad[3]));
    _mm512_storeu_ps(bias_lanes, _mm512_add_ps(_mm512_loadu_ps(bias_lanes), sum));
  }
#pragma GCC unroll 25
  for (int t = 0; t < kTaps; ++t) {
    const float* src = in + f.offset[t];
    __m512 acc = _mm512_loadu_ps(tap_lanes + t * kLanes);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v)
      acc = _mm512_fmadd_ps(grad[v], _mm512_maskz_loadu_ps(f.load_mask[v][t], src + v * kLanes), acc);
    _mm512_storeu_ps(tap_lanes + t * kLanes, acc);
  }
}

}  // namespace

bool flat_plane(const PlaneGeometry& g, FlatPlane* f) {
  const int64_t k = g.kernel_h;
  if (!(g.stride == 1 && g.dilation_h == 1 && g.dilation_w == 1 && (k == 3 || k == 5) && g.kernel_w == k &&
        g.out_w == g.in_w && g.in_row_stride == g.in_w && g.out_row_stride == g.out_w &&
        g.out_h * g.out_w <= 4 * kLanes && g.out_h * g.out_w > 0))
    return false;
  f->taps = static_cast<int32_t>(k * k);
  for (int64_t ky = 0; ky < k; ++ky)
    for (int64_t kx = 0; kx < k; ++kx)
      f->offset[ky * k + kx] = static_cast<int32_t>((ky - g.pad_top) * g.in_w + kx - g.pad_left);
  for (int v = 0; v < 4; ++v) {
    f->store_mask[v] = 0;
    for (int t = 0; t < 25; ++t) f->load_mask[v][t] = 0;
    for (int l = 0; l < kLanes; ++l) {
      const int64_t q = v * kLanes + l;
      if (q >= g.out_h * g.out_w) continue;
      const uint16_t bit = static_cast<uint16_t>(1u << l);
      f->store_mask[v] |= bit;
      const int64_t oy = q / g.out_w, ox = q % g.out_w;
      for (int64_t ky = 0; ky < k; ++ky)
        for (int64_t kx = 0; kx < k; ++kx)
          if (row_inside(oy + ky - g.pad_top, g.in_h) && row_inside(ox + kx - g.pad_left, g.in_w))
            f->load_mask[v][ky * k + kx] |= bit;
    }
  }
  return true;
}

void forward_plane_flat(const float* in, const float* taps, float bias, float* out, const FlatPlane& f) {
  if (f.taps == 9) return forward_flat<9>(in, taps, bias, out, f);
  forward_flat<25>(in, taps, bias, out, f);
}

void weight_grad_plane_flat(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                            const FlatPlane& f) {
  if (f.taps == 9) return weight_grad_flat<9>(grad_out, in, tap_lanes, bias_lanes, f);
  weight_grad_flat<25>(grad_out, in, tap_lanes, bias_lanes, f);
}

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn

#endif  // FASTCNN_AVX512_PLANES
