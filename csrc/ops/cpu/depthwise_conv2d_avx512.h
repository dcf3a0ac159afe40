// Depthwise convolution on NCHW fp32 planes and channels_last rows, read in place with AVX-512
// masked loads (the kernels in csrc/ops/cpu/depthwise_avx512/, dispatched by
// depthwise_conv2d_avx512.cpp). Plain types only: this header is shared by translation units
// compiled for AVX-512 and one that is not.
#pragma once

#include <cstdint>

// GCC on x86-64 builds these kernels (the translation unit uses `#pragma GCC target`); elsewhere
// enabled() is false and the portable kernels run.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTCNN_AVX512_PLANES 1
#else
#define FASTCNN_AVX512_PLANES 0
#endif

namespace fastcnn {
namespace depthwise {
namespace avx512 {

// One input plane and one output plane of a depthwise convolution with stride 1 or 2 (the same
// along both axes). Columns are adjacent in memory; rows are `*_row_stride` floats apart. The
// output has out_h x out_w pixels: out[oy][ox] reads
// in[oy*stride - pad_top + ky*dilation_h][ox*stride - pad_left + kx*dilation_w], zero outside the
// input. Pads may be negative (the unit-stride input gradient's window is a crop when the padding
// is wider than the kernel's reach).
struct PlaneGeometry {
  int64_t in_h, in_w, in_row_stride;
  int64_t out_h, out_w, out_row_stride;
  int64_t kernel_h, kernel_w, pad_top, pad_left, dilation_h, dilation_w, stride;
  // Write the output with streaming stores (see ops/cpu/streaming_stores.h) where the kernel can:
  // dense output rows (out_row_stride == out_w) of 3x3 and 5x5 windows. The caller fences.
  bool stream_output = false;
  // Take the rolled-row kernels where they apply (3x3 windows at stride 1 or 2, dilation 1). The
  // caller sets it from rolled_rows_enabled().
  bool rolled_rows = true;
};

// FASTCNN_DEPTHWISE_ROLLED=0 sends the planes the rolled-row kernels take to the block kernels,
// the bordered planes to the blocks with tests, and the channels_last images the ring takes to
// the row kernels (read on every call: A/B timing, and tests that hold one to the other).
bool rolled_rows_enabled();

// enabled() and supports() are defined in depthwise_conv2d_kernel.cpp: code in the AVX-512
// translation unit must not run before the CPU check.

// Whether these kernels run here: the CPU has AVX-512F, BW and VL, and FASTCNN_AVX512 is not 0
// (read on every call, so that tests can run both paths in one process).
bool enabled();

// The windows these kernels are written for: 3x3 and 5x5 (weights in registers); stride 1 with
// dilation_h 1, or stride 2 with dilation 1. Others take the portable kernels.
bool supports(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t dilation_h,
              int64_t dilation_w);

// out = bias + the window sums of `in` with `taps` ([kernel_h][kernel_w], row-major).
void forward_plane(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g);

// Planes whose rows fit in half a vector: two planes at once, plane a in lanes 0-7 and plane b in
// lanes 8-15. Stride 2 (14x14 -> 7x7 maps, where one plane's rows use 7 of 16 lanes): one
// two-source permute serves both. Unit stride (3x3 windows, a row and its left padding in 8
// lanes: 7x7 maps; 5x5 windows on rows of at most 8 columns), with the rolled rows. Same results
// as forward_plane on each.
bool pairs_planes(const PlaneGeometry& g);
void forward_plane_pair(const float* in_a, const float* in_b, const float* taps_a, const float* taps_b, float bias_a,
                        float bias_b, float* out_a, float* out_b, const PlaneGeometry& g);
// The weight gradient the same way (3x3 windows, and 5x5 at stride 2): plane a's partial sums go
// to lanes 0-7 of its tap_lanes, plane b's to lanes 8-15 of its own, each lane's sum in the order
// weight_grad_plane adds it (the same bits whichever way a channel is paired; at unit stride the
// unpaired planes must take weight_grad_plane, not the flat planes).
bool pairs_weight_grad_planes(const PlaneGeometry& g);
void weight_grad_plane_pair(const float* grad_out_a, const float* grad_out_b, const float* in_a, const float* in_b,
                            float* tap_lanes_a, float* tap_lanes_b, float* bias_lanes_a, float* bias_lanes_b,
                            const PlaneGeometry& g);

// Unit-stride windows of 25 taps and more that the plane kernels leave out (7x7 to 31x31,
// rectangular, dilated), on rows of 24 outputs and more (7x7 windows: 14): the plane is copied
// once into a zero-bordered buffer, then blocks of up to 4 vectors x 4 to 14 output rows take
// every tap from it with plain loads (the window's weights do not fit in registers), each load
// feeding every row it reaches.
// `bordered` holds bordered_plane_floats(g) floats, zeroed by the caller once for a run of planes
// of the same geometry (only the input's rectangle is written).
bool supports_bordered(int64_t kernel_h, int64_t kernel_w, int64_t stride_h, int64_t stride_w, int64_t out_w);
int64_t bordered_plane_floats(const PlaneGeometry& g);
void forward_plane_bordered(const float* in, const float* taps, float bias, float* out, const PlaneGeometry& g,
                            float* bordered);

// The input gradient of one plane at stride 2 (at stride 1 it is forward_plane over grad_out with
// the flipped kernel): grad_in[iy][ix] = sum of taps[ky][kx] * grad_out[oy][ox] over the taps with
// oy*2 - pad_top + ky = iy and ox*2 - pad_left + kx = ix. `g` is the forward's geometry with
// in_row_stride grad_in's; out_* are grad_out's.
void grad_input_plane_stride2(const float* grad_out, const float* taps, float* grad_in, const PlaneGeometry& g);

// The weight and bias gradients of one plane, added into per-lane partial sums: tap_lanes is
// [kernel_h * kernel_w][16] and bias_lanes [16] floats. They stay in vector form from plane to
// plane so a small plane is not dominated by horizontal sums; the caller adds the 16 lanes once
// per channel. bias_lanes may be null. Here `in` is the forward's input and out_* are grad_out's.
void weight_grad_plane(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                       const PlaneGeometry& g);

// Dense planes of at most 64 outputs (7x7 maps and smaller) whose rows are as wide as the input's
// (stride 1, dilation 1, a 3x3 or 5x5 window padded to keep the width): the plane is one flat
// array, each tap one load at a fixed flat offset with its lanes masked where the tap leaves the
// image. Four vectors hold a 7x7 plane, where the row kernels use seven with 9 of 16 lanes idle.
struct FlatPlane {
  int32_t taps;
  int32_t offset[25];          // flat input offset of each tap from the output pixel
  uint16_t load_mask[4][25];   // [vector][tap]: lanes whose tap lies inside the input
  uint16_t store_mask[4];      // lanes that are output pixels
};

// Fills `flat` for g and returns true when the plane qualifies (call only when enabled()).
bool flat_plane(const PlaneGeometry& g, FlatPlane* flat);

// forward_plane and weight_grad_plane for planes that flat_plane accepted.
void forward_plane_flat(const float* in, const float* taps, float bias, float* out, const FlatPlane& f);
void weight_grad_plane_flat(const float* grad_out, const float* in, float* tap_lanes, float* bias_lanes,
                            const FlatPlane& f);

constexpr int64_t kLanes = 16;

// channels_last: one image of in_h x in_w pixels of `channels` floats each, and its output of
// out_h x out_w pixels, both dense. Any stride, padding (may be negative) and dilation.
struct ImageGeometry {
  int64_t channels, in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w;
  // Write the output with streaming stores (see ops/cpu/streaming_stores.h). Set only when
  // channels is a multiple of 16 and the output 64-byte aligned: every vector stored is then one
  // whole cache line. The caller fences.
  bool stream_output = false;
};

// bfloat16 rows to fp32 and back, 16 at a time (the bits as uint16_t: this file's boundary takes
// plain types). to_bf16 rounds to nearest even and turns NaN into the quiet NaN 0x7FC0, as
// c10::BFloat16 does, so a bf16 output made here has the bits PyTorch's conversion would give.
void bf16_to_float(const uint16_t* in, float* out, int64_t count);
void float_to_bf16(const float* in, uint16_t* out, int64_t count);
// IEEE half (fp16) rows the same way: vcvtph2ps, and vcvtps2ph rounding to nearest even.
void half_to_float(const uint16_t* in, float* out, int64_t count);
void float_to_half(const float* in, uint16_t* out, int64_t count);

// Output row oy of a channels_last image: out_row[ox][c] = bias[c] + sum over the window of
// taps[t][c] * in[...][c], with taps [kernel_h * kernel_w][channels] and bias null for none.
void forward_row_nhwc(const float* in, const float* taps, const float* bias, float* out_row, int64_t oy,
                      const ImageGeometry& g);
// The same row of a bf16 or fp16 image (the bits as uint16_t): each input vector widened to fp32
// as it is loaded, each output rounded once (to nearest even) as it is stored, so the row is
// forward_row_nhwc's on the widened image, rounded. Needs AVX-512BW/VL (enabled() checks).
void forward_row_nhwc_bf16(const uint16_t* in, const float* taps, const float* bias, uint16_t* out_row, int64_t oy,
                           const ImageGeometry& g);
void forward_row_nhwc_fp16(const uint16_t* in, const float* taps, const float* bias, uint16_t* out_row, int64_t oy,
                           const ImageGeometry& g);

// bf16 rows through AVX512_BF16's pair dot products (rows_nhwc_bf16_dot.cpp): channel counts that
// are a multiple of 32, 3- and 5-wide windows at stride 1 or 2 along the row, any height and
// stride down, undilated. The weights and
// bias in the kernel's order: nhwc_bf16_dot_weights of the op's bf16 weight ([channels][kernel_h]
// [kernel_w]) and bias (null for none), as bits, into nhwc_bf16_dot_weight_words(g) words and
// nhwc_bf16_dot_bias_floats(g) floats. The sums are forward_row_nhwc_bf16's to fp32 rounding in
// another order, with denormals flushed. Call only where bf16_dot_enabled().
bool bf16_dot_enabled();
bool supports_nhwc_bf16_dot(const ImageGeometry& g);
int64_t nhwc_bf16_dot_weight_words(const ImageGeometry& g);
int64_t nhwc_bf16_dot_bias_floats(const ImageGeometry& g);
void nhwc_bf16_dot_weights(const uint16_t* weight, const uint16_t* bias, const ImageGeometry& g, uint32_t* words,
                           float* bias_lanes);
// Output rows [oy0, oy1) of one image, groups of 32 channels [group0, group1) (of
// nhwc_bf16_dot_groups(g)), a group's rows in turn.
int64_t nhwc_bf16_dot_groups(const ImageGeometry& g);

// The bf16 weight (and bias) gradient of 3x3 windows (channel counts that are a multiple of 32,
// stride 1 or 2 along the row, undilated) through the pair dot products: weight_grad_block_nhwc_bf16_dot adds output rows [oy0, oy1) of
// one image (in and grad_out at its first pixel) for one group of 32 channels to `sums`
// (nhwc_bf16_dot_weight_grad_floats(g) floats, zeroed by the caller, in the kernel's lane order);
// nhwc_bf16_dot_weight_grad_add then adds them to part ([9][channels]) and part_bias (null for
// none) in channel order. Sums in fp32, denormals flushed (see rows_nhwc_bf16_dot.cpp).
bool supports_nhwc_bf16_dot_weight_grad(const ImageGeometry& g);
int64_t nhwc_bf16_dot_weight_grad_floats(const ImageGeometry& g);
void weight_grad_block_nhwc_bf16_dot(const uint16_t* in, const uint16_t* grad_out, int64_t oy0, int64_t oy1,
                                     int64_t group, const ImageGeometry& g, float* sums);
void nhwc_bf16_dot_weight_grad_add(const float* sums, float* part, float* part_bias, const ImageGeometry& g);
void forward_block_nhwc_bf16_dot(const uint16_t* in, const uint32_t* words, const float* bias_lanes, uint16_t* out,
                                 int64_t oy0, int64_t oy1, int64_t group0, int64_t group1, const ImageGeometry& g);

// channels_last through the bordered planes (supports_bordered's windows, 169 taps and more for
// this layout): 16 channels of one image from channel c0 scattered into 16 bordered planes, each
// run as forward_plane_bordered does, the outputs gathered back. `scratch` holds
// nhwc_bordered_floats(g) floats, zeroed by the caller once for images of the same geometry.
int64_t nhwc_bordered_floats(const ImageGeometry& g);
void forward_channels_nhwc_bordered(const float* in, const float* taps, const float* bias, float* out, int64_t c0,
                                    const ImageGeometry& g, float* scratch);

// channels_last, undilated, windows of at most 64 rows, rows of at least 7 outputs: 5- and 7-wide
// windows at unit stride, and on rows of exactly 7 outputs 3-, 5- and 7-wide windows at stride 1
// or 2 (2 along the rows). kNhwcRingChannels channels of one image from channel c0, the
// window's input rows copied one at a time into a ring of zero-bordered rows of 16-channel pixels,
// runs of 14 (or 7) output pixels made from it. `scratch` holds nhwc_ring_floats(g) floats (the
// ring), zeroed by the caller once for images of the same geometry; `weights` the
// nhwc_ring_weight_floats(g) floats nhwc_ring_weights made of the channels from c0 (`weight` as
// the tensor holds it, [C][kernel_h * kernel_w]), once for every image of those channels.
constexpr int64_t kNhwcRingChannels = 64;  // channels a call makes (fewer at the end)
bool supports_nhwc_ring(const ImageGeometry& g);
int64_t nhwc_ring_floats(const ImageGeometry& g);
int64_t nhwc_ring_weight_floats(const ImageGeometry& g);
void nhwc_ring_weights(const float* weight, int64_t c0, const ImageGeometry& g, float* weights);
void forward_channels_nhwc_ring(const float* in, const float* weights, const float* bias, float* out, int64_t c0,
                                const ImageGeometry& g, float* scratch);
// The same for bf16 or fp16 images (the bits as uint16_t): each input pixel widened to fp32 as it
// is copied into the ring, each output rounded once as it is stored.
void forward_channels_nhwc_ring_bf16(const uint16_t* in, const float* weights, const float* bias, uint16_t* out,
                                     int64_t c0, const ImageGeometry& g, float* scratch);
void forward_channels_nhwc_ring_fp16(const uint16_t* in, const float* weights, const float* bias, uint16_t* out,
                                     int64_t c0, const ImageGeometry& g, float* scratch);

// The weight (and bias) gradient of the same windows at unit stride on rows of 7 outputs or a
// multiple of 14: for kNhwcRingChannels channels of one image from c0, grad_out's products with
// the ring's input added into `sums` ([vector][kernel_h * kernel_w taps, then the bias][16
// lanes], nhwc_ring_weight_grad_sum_floats(g) floats; the bias sums only when with_bias). `scratch` as for forward_channels_nhwc_ring.
bool supports_nhwc_ring_weight_grad(const ImageGeometry& g);
int64_t nhwc_ring_weight_grad_sum_floats(const ImageGeometry& g);
void weight_grad_channels_nhwc_ring(const float* in, const float* grad_out, float* sums, bool with_bias, int64_t c0,
                                    const ImageGeometry& g, float* scratch);
// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols: NCHW planes to the
// ring's pixels and back, 16 x 16 tiles transposed in registers.
void transpose_floats(const float* src, int64_t src_stride, int64_t rows, int64_t cols, float* dst,
                      int64_t dst_stride);

// Input-gradient row iy of a channels_last image at any stride, in gather form:
// grad_in_row[ix][c] = sum over the taps t that land on (iy, ix) of taps[t][c] * grad_out[oy][ox][c].
// Here in_* are grad_in's sizes and out_* grad_out's; kernel_h and kernel_w at most 64.
void grad_input_row_nhwc(const float* grad_out, const float* taps, float* grad_in_row, int64_t iy,
                         const ImageGeometry& g);
// The same for bf16 or fp16 (the bits as uint16_t): loads widened, each output rounded once.
void grad_input_row_nhwc_bf16(const uint16_t* grad_out, const float* taps, uint16_t* grad_in_row, int64_t iy,
                              const ImageGeometry& g);
void grad_input_row_nhwc_fp16(const uint16_t* grad_out, const float* taps, uint16_t* grad_in_row, int64_t iy,
                              const ImageGeometry& g);

// Whether weight_grad_row_nhwc takes this window: 3x3 and 5x5 (one accumulator per tap), and
// 7 to 9 columns at unit stride and dilation along the row (a kernel row's taps at a time).
bool supports_weight_grad_nhwc(int64_t kernel_h, int64_t kernel_w, int64_t stride_w, int64_t dilation_w);

// part[t][c] += sum over output row oy of grad_out_row[ox][c] * in[...][c] under tap t, and
// part_bias[c] += sum of grad_out_row[ox][c] (part_bias may be null).
void weight_grad_row_nhwc(const float* in, const float* grad_out_row, float* part, float* part_bias, int64_t oy,
                          const ImageGeometry& g);
// The same over bf16 or fp16 rows (the bits as uint16_t), each vector widened to fp32 as it is
// loaded; the sums stay fp32 (the same partials as weight_grad_row_nhwc's on the widened rows).
void weight_grad_row_nhwc_bf16(const uint16_t* in, const uint16_t* grad_out_row, float* part, float* part_bias,
                               int64_t oy, const ImageGeometry& g);
void weight_grad_row_nhwc_fp16(const uint16_t* in, const uint16_t* grad_out_row, float* part, float* part_bias,
                               int64_t oy, const ImageGeometry& g);

}  // namespace avx512
}  // namespace depthwise
}  // namespace fastcnn
