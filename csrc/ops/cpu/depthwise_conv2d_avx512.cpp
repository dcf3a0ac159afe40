// Depthwise 2-D convolution in fp32 on AVX-512: reference op F.conv2d(groups=C), as in MobileNets
// (Howard et al., 2017). NCHW planes (3x3 and 5x5, stride 1 or 2; the forward of larger windows
// at stride 1 from a bordered copy, as in RepLKNet's 31x31 and ConvNeXt's 7x7) and channels_last
// rows (any window; weight gradient 3x3 and 5x5).
//
// Why it is written this way (NCHW):
// - The planes are read where they lie. 16 output columns are one vector; each tap is one masked
//   load of 16 input columns (stride 2: two loads shared by two taps, and a permute that keeps
//   every other column). Lanes that fall left or right of the image, or past the output row, read
//   as zero without touching memory (AVX-512 masked loads suppress faults), so there is no
//   zero-padded copy and no transpose to channel blocks: the input is read once from memory and
//   the output written once.
// - 3x3 and 5x5 windows (stride 1 or 2) take the rolled rows (see "rolled rows"
//   below): a chunk walks down the plane loading each input row once, its taps made in registers,
//   every accumulator a named register; 7x7 maps two planes to a vector. They are 1.3-3x faster
//   in L2 than the block kernels that follow, which stay for dilated windows and as their
//   reference under FASTCNN_DEPTHWISE_ROLLED=0.
// - The block kernels keep their weights in registers and share each loaded input row among the
//   R output rows it feeds (R = 7 for 3x3: 112, 56, 28, 14 and 7 are multiples of 7).
// - Row blocks wholly inside the input run without row checks; border blocks load the rows
//   outside with an empty mask. With a branch per row GCC kept the accumulators on the stack, and
//   the weight gradient ran 3x slower.
// - The weight gradient keeps one accumulator per tap, in vector form across planes (a 7x7 plane
//   is 49 pixels: reducing nine vectors per plane cost 3x the arithmetic).
// - The stride-2 input gradient is a gather: each grad_in vector permutes one load of grad_out
//   per kernel row onto the lanes of matching parity; no scatter, no atomics. For 3x3 windows with
//   padding 0 or 1, and 5x5 windows, it is rolled: a walk down grad_out makes each row's permutes
//   once and completes two grad_in rows a step.
// - Stride-2 maps whose output rows fill at most half a vector (14x14 -> 7x7) run two planes at
//   once, one in each half: one two-source permute makes both planes' taps, where a single plane
//   used 7 of 16 lanes (32x512x14x14, 2 threads: forward 1.8x, weight gradient 1.6x faster).
// - Planes of at most 64 outputs as wide as their input (7x7 maps at stride 1) are one flat array
//   of 4 vectors: each tap a masked load at a fixed flat offset, the masks computed once per call.
//   The row kernels spend 7 vectors on a 7x7 plane, 9 of 16 lanes idle (32x1024x7x7, one thread:
//   forward 2.4 -> 1.3 ms, weight gradient 2.6 -> 1.5 ms). Where two such planes share a vector
//   in the rolled rows (3x3 windows; the 5x5 forward) the pairs run instead; the flat planes keep
//   the 5x5 weight gradient.
// - Windows of 25 taps and more at stride 1 (forward only) copy the plane into a zero-bordered
//   buffer and run blocks of output rows x up to 4 vectors, each input load feeding every output
//   row of the block it reaches (8x128x56x56, 2 threads, against the 8-lane channel tiles: 7x7
//   1.5x, 31x31 2.1x faster). Undilated windows unroll the block's rows so that no test is left
//   in its loops, 7x7 windows its taps too (7x7 on 56x56 and 28x28 maps 1.3-1.8x faster again;
//   14x14 maps, one block of 14 rows, left the tiles). channels_last windows of 13x13 and more
//   scatter 16 channels into such planes and gather the outputs back (31x31 1.3x faster than the
//   sliding rows below).
//
// channels_last: 16 channels are one vector, the image's own layout. A channel group of 4, 2 or 1
// vectors and 2, 4 or 8 adjacent pixels keep 8 chains of multiply-adds in flight (one pixel at a
// time ran at the FMA latency on narrow maps); the weight gradient holds 2 vectors x 9 taps of
// accumulators for a row; the strided input gradient gathers the landing taps of each pixel. The
// row walks prefetch their leading edge (see kPrefetchPixels); the backward is one pass (see
// backward_nhwc_fused_avx512 in depthwise_conv2d_kernel.cpp). The row kernels are templates on
// the element type: bf16 and fp16 rows are read with masked 16-bit loads and widened in registers
// (see Bf16), the arithmetic is the fp32 kernels'.
// Measured at N=32, 2 threads, reuse, ms, 8-wide kernels -> these: 32x32x112x112 forward 7.7 -> 5.9,
// weight gradient 9.7 -> 5.8; 8x128x56x56 7x7 forward 7.9 -> 3.9; stride-2 input gradient of
// 32x128x56x56 3.8 -> 2.5.
//
// channels_last 5- and 7-wide windows at unit stride (and NCHW 7-wide windows on maps narrower
// than 14, transposed) go through a ring of the window's input rows as 16-channel pixels instead:
// read in place, a run's pixels, C floats apart, fell in a few L1 sets (see rows_nhwc_ring.cpp).
//
// The kernels live in depthwise_avx512/, one translation unit per family (planes_rolled3,
// planes_rolled5, planes_block, planes_flat, planes_bordered, rows_nhwc, rows_nhwc_ring), each compiled for
// AVX-512 (common.h sets the target); this file dispatches the NCHW planes among them
// (plane_kernels.h) and holds the stubs of builds without AVX-512. Only plain types cross the
// units' boundaries, and they include no template library headers: an inline function
// instantiated in an AVX-512 unit could otherwise be picked by the linker for code that runs on
// CPUs without it.

#include "ops/cpu/depthwise_conv2d_avx512.h"

#if FASTCNN_AVX512_PLANES
#include "ops/cpu/depthwise_avx512/plane_kernels.h"
#endif

namespace fastcnn {
namespace depthwise {
namespace avx512 {

#if FASTCNN_AVX512_PLANES

bool pairs_planes(const PlaneGeometry& g) {
  if (g.stride == 1) return rolled3::pairs(g) || rolled5::pairs(g);
  if (!(g.stride == 2 && g.dilation_w == 1 && (g.kernel_h == 3 || g.kernel_h == 5) && g.kernel_w == g.kernel_h &&
        g.out_w <= 8))
    return false;
  // Every tap within 16 columns from -pad_left; or, for 5x5 windows (14x14 -> 7x7), the taps past
  // them right of the row (zero: PairedColumns masks them).
  return 2 * (g.out_w - 1) + g.kernel_w <= kLanes || (g.kernel_h == 5 && g.in_w + g.pad_left <= kLanes);
}

// 5x5 windows: at stride 2 the rolled walk (so not under FASTCNN_DEPTHWISE_ROLLED=0); at unit
// stride the forward only, the flat planes keep their weight gradient.
bool pairs_weight_grad_planes(const PlaneGeometry& g) {
  return pairs_planes(g) && (g.kernel_h == 3 || (g.stride == 2 && g.rolled_rows));
}

void forward_plane_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                        float bias_b, float* out_a, float* out_b, const PlaneGeometry& g) {
  if (g.stride == 1) {
    if (g.kernel_h == 3) return rolled3::forward_pair(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
    return rolled5::forward_pair(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
  }
  block::forward_pair(in_a, in_b, taps_a, taps_b, bias_a, bias_b, out_a, out_b, g);
}

void weight_grad_plane_pair(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                            float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                            const PlaneGeometry& g) {
  if (g.stride == 1)
    return rolled3::weight_grad_pair(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, bias_lanes_a,
                                     bias_lanes_b, g);
  if (g.kernel_h == 5)
    return rolled5::weight_grad_pair_stride2(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b,
                                             bias_lanes_a, bias_lanes_b, g);
  block::weight_grad_pair(grad_out_a, grad_out_b, in_a, in_b, tap_lanes_a, tap_lanes_b, bias_lanes_a,
                                  bias_lanes_b, g);
}

void forward_plane(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g) {
  if (g.stride == 2) {
    if (rolled3::rolls_stride2(g)) return rolled3::forward_stride2(in, taps, bias, out, g);
    if (rolled5::rolls_stride2(g)) return rolled5::forward_stride2(in, taps, bias, out, g);
    return block::forward(in, taps, bias, out, g);
  }
  if (rolled3::rolls(g)) return rolled3::forward(in, taps, bias, out, g);
  if (rolled5::rolls(g)) return rolled5::forward(in, taps, bias, out, g);
  block::forward(in, taps, bias, out, g);
}

void grad_input_plane_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g) {
  if (rolled3::rolls_grad_input_stride2(g)) return rolled3::grad_input_stride2(grad_out, taps, grad_in, g);
  if (rolled5::rolls_stride2(g)) return rolled5::grad_input_stride2(grad_out, taps, grad_in, g);
  block::grad_input_stride2(grad_out, taps, grad_in, g);
}

void weight_grad_plane(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                       const PlaneGeometry& g) {
  if (g.stride == 2) {
    if (rolled3::rolls_stride2(g)) return rolled3::weight_grad_stride2(grad_out, in, tap_lanes, bias_lanes, g);
    if (rolled5::rolls_stride2(g)) return rolled5::weight_grad_stride2(grad_out, in, tap_lanes, bias_lanes, g);
    return block::weight_grad(grad_out, in, tap_lanes, bias_lanes, g);
  }
  if (rolled3::rolls(g)) return rolled3::weight_grad(grad_out, in, tap_lanes, bias_lanes, g);
  if (rolled5::rolls(g)) return rolled5::weight_grad(grad_out, in, tap_lanes, bias_lanes, g);
  block::weight_grad(grad_out, in, tap_lanes, bias_lanes, g);
}

#else  // never called: enabled() is false

void bf16_to_float(const uint16_t*, float*, int64_t) {}
void float_to_bf16(const float*, uint16_t*, int64_t) {}
void half_to_float(const uint16_t*, float*, int64_t) {}
void float_to_half(const float*, uint16_t*, int64_t) {}

void forward_row_nhwc(const float*, const float*, const float*, float*, int64_t, const ImageGeometry&) {}
void forward_row_nhwc_bf16(const uint16_t*, const float*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}
void forward_row_nhwc_fp16(const uint16_t*, const float*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}
bool supports_nhwc_bf16_dot(const ImageGeometry&) { return false; }
int64_t nhwc_bf16_dot_weight_words(const ImageGeometry&) { return 0; }
int64_t nhwc_bf16_dot_bias_floats(const ImageGeometry&) { return 0; }
void nhwc_bf16_dot_weights(const uint16_t*, const uint16_t*, const ImageGeometry&, uint32_t*, float*) {}
int64_t nhwc_bf16_dot_groups(const ImageGeometry&) { return 0; }
bool supports_nhwc_bf16_dot_weight_grad(const ImageGeometry&) { return false; }
int64_t nhwc_bf16_dot_weight_grad_floats(const ImageGeometry&) { return 0; }
void weight_grad_block_nhwc_bf16_dot(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, const ImageGeometry&,
                                     float*) {}
void nhwc_bf16_dot_weight_grad_add(const float*, float*, float*, const ImageGeometry&) {}
void forward_block_nhwc_bf16_dot(const uint16_t*, const uint32_t*, const float*, uint16_t*, int64_t, int64_t, int64_t,
                                 int64_t, const ImageGeometry&) {}
void weight_grad_row_nhwc(const float*, const float*, float*, float*, int64_t, const ImageGeometry&) {}
void weight_grad_row_nhwc_bf16(const uint16_t*, const uint16_t*, float*, float*, int64_t, const ImageGeometry&) {}
void weight_grad_row_nhwc_fp16(const uint16_t*, const uint16_t*, float*, float*, int64_t, const ImageGeometry&) {}
void grad_input_row_nhwc(const float*, const float*, float*, int64_t, const ImageGeometry&) {}
void grad_input_row_nhwc_bf16(const uint16_t*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}
void grad_input_row_nhwc_fp16(const uint16_t*, const float*, uint16_t*, int64_t, const ImageGeometry&) {}

void forward_plane(const float*, const float*, float, float*, const PlaneGeometry&) {}
bool pairs_planes(const PlaneGeometry&) { return false; }
bool pairs_weight_grad_planes(const PlaneGeometry&) { return false; }
void weight_grad_plane_pair(const float*, const float*, const float*, const float*, float*, float*, float*, float*,
                            const PlaneGeometry&) {}
void forward_plane_pair(const float*, const float*, const float*, const float*, float, float, float*, float*,
                        const PlaneGeometry&) {}
int64_t bordered_plane_floats(const PlaneGeometry&) { return 0; }
int64_t nhwc_bordered_floats(const ImageGeometry&) { return 0; }
void forward_channels_nhwc_bordered(const float*, const float*, const float*, float*, int64_t, const ImageGeometry&,
                                    float*) {}
void forward_plane_bordered(const float*, const float*, float, float*, const PlaneGeometry&, float*) {}
bool supports_nhwc_ring(const ImageGeometry&) { return false; }
int64_t nhwc_ring_floats(const ImageGeometry&) { return 0; }
int64_t nhwc_ring_weight_floats(const ImageGeometry&) { return 0; }
void nhwc_ring_weights(const float*, int64_t, const ImageGeometry&, float*) {}
void forward_channels_nhwc_ring(const float*, const float*, const float*, float*, int64_t, const ImageGeometry&,
                                float*) {}
void forward_channels_nhwc_ring_bf16(const uint16_t*, const float*, const float*, uint16_t*, int64_t,
                                     const ImageGeometry&, float*) {}
void forward_channels_nhwc_ring_fp16(const uint16_t*, const float*, const float*, uint16_t*, int64_t,
                                     const ImageGeometry&, float*) {}
bool supports_nhwc_ring_weight_grad(const ImageGeometry&) { return false; }
int64_t nhwc_ring_weight_grad_sum_floats(const ImageGeometry&) { return 0; }
void weight_grad_channels_nhwc_ring(const float*, const float*, float*, bool, int64_t, const ImageGeometry&, float*) {}
void transpose_floats(const float*, int64_t, int64_t, int64_t, float*, int64_t) {}
bool flat_plane(const PlaneGeometry&, FlatPlane*) { return false; }
void forward_plane_flat(const float*, const float*, float, float*, const FlatPlane&) {}
void weight_grad_plane_flat(const float*, const float*, float*, float*, const FlatPlane&) {}
void weight_grad_plane(const float*, const float*, float*, float*, const PlaneGeometry&) {}
void grad_input_plane_stride2(const float*, const float*, float*, const PlaneGeometry&) {}

#endif  // FASTCNN_AVX512_PLANES

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn
