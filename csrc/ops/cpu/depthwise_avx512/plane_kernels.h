// The NCHW plane kernels of this folder, by family, for the dispatch in
// depthwise_conv2d_avx512.cpp (forward_plane, weight_grad_plane, grad_input_plane_stride2 and the
// pairs). Plain types only, as in depthwise_conv2d_avx512.h; call only when enabled(). tap_lanes
// and bias_lanes are the per-lane partial sums of weight_grad_plane (bias_lanes may be null).
#pragma once

#include "ops/cpu/depthwise_conv2d_avx512.h"

namespace fastcnn {
namespace depthwise {
namespace avx512 {

// planes_rolled3.cpp: 3x3 windows, dilation 1, as rolled rows.
namespace rolled3 {
bool rolls(const PlaneGeometry& g);                     // stride 1
bool pairs(const PlaneGeometry& g);                     // stride 1, two planes to a vector (7x7 maps)
bool rolls_stride2(const PlaneGeometry& g);             // forward and weight gradient at stride 2
bool rolls_grad_input_stride2(const PlaneGeometry& g);  // stride 2, padding 0 or 1 on top and left
void forward(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g);
void weight_grad(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes, const PlaneGeometry& g);
void forward_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                  float bias_b, float* out_a, float* out_b, const PlaneGeometry& g);
void weight_grad_pair(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                      float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                      const PlaneGeometry& g);
void forward_stride2(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g);
void weight_grad_stride2(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                         const PlaneGeometry& g);
void grad_input_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g);
}  // namespace rolled3

// planes_rolled5.cpp: 5x5 windows, dilation 1, as rolled rows.
namespace rolled5 {
bool rolls(const PlaneGeometry& g);          // stride 1, at least four output rows
bool rolls_stride2(const PlaneGeometry& g);  // stride 2 (forward, both gradients; any padding)
bool pairs(const PlaneGeometry& g);          // stride 1, forward two planes to a vector (7x7 maps)
void forward(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g);
void weight_grad(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes, const PlaneGeometry& g);
void forward_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                  float bias_b, float* out_a, float* out_b, const PlaneGeometry& g);
void forward_stride2(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g);
void weight_grad_stride2(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                         const PlaneGeometry& g);
// Two stride-2 planes at once where pairs_planes (14x14 -> 7x7).
void weight_grad_pair_stride2(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                              float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                              const PlaneGeometry& g);
void grad_input_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g);
}  // namespace rolled5

// planes_block.cpp: 3x3 and 5x5 windows (dilated too, at stride 1) in blocks of rows; the rolled
// kernels' reference under FASTCNN_DEPTHWISE_ROLLED=0. And two stride-2 planes to a vector.
namespace block {
void forward(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g);
void weight_grad(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes, const PlaneGeometry& g);
void grad_input_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g);
void forward_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                  float bias_b, float* out_a, float* out_b, const PlaneGeometry& g);  // stride 2
void weight_grad_pair(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                      float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                      const PlaneGeometry& g);  // stride 2
}  // namespace block

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn
