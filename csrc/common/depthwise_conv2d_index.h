// Index arithmetic of a 2-D convolution window, shared by the CPU and CUDA depthwise kernels so
// that the CPU tests exercise the CUDA kernel's arithmetic too.
//
// Forward:   out[oy] reads in[oy * stride - pad_begin + ky * dilation] for every tap ky.
// Backward:  in[iy] receives from out[oy] for every tap ky with
//            iy + pad_begin - ky * dilation == oy * stride.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace fastcnn {
namespace depthwise {

// Size of one output dimension; negative when the (padded) input is smaller than the window.
C10_HOST_DEVICE inline int64_t output_size(
    int64_t in, int64_t kernel, int64_t stride, int64_t pad_begin, int64_t pad_end, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t padded = in + pad_begin + pad_end;
  return padded < span ? -1 : (padded - span) / stride + 1;
}

C10_HOST_DEVICE inline int64_t input_index(
    int64_t out_index, int64_t tap, int64_t stride, int64_t pad_begin, int64_t dilation) {
  return out_index * stride - pad_begin + tap * dilation;
}

// The output index that tap `tap` maps onto input index `in_index`, or -1 when none does
// (not on the stride grid, or outside [0, out_size)).
C10_HOST_DEVICE inline int64_t output_index_for_input(
    int64_t in_index, int64_t tap, int64_t stride, int64_t pad_begin, int64_t dilation, int64_t out_size) {
  const int64_t numerator = in_index + pad_begin - tap * dilation;
  if (numerator < 0 || numerator % stride != 0) return -1;
  const int64_t out_index = numerator / stride;
  return out_index < out_size ? out_index : -1;
}

// The half-open range [first, last) of output indices whose tap `tap` lands inside [0, in_size):
// on that range the kernel can run without bounds checks.
C10_HOST_DEVICE inline void valid_output_range(
    int64_t tap, int64_t stride, int64_t pad_begin, int64_t dilation, int64_t in_size, int64_t out_size,
    int64_t* first, int64_t* last) {
  const int64_t offset = tap * dilation - pad_begin;  // input index of output 0
  // smallest o with o*stride + offset >= 0
  int64_t lo = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  // largest o with o*stride + offset <= in_size - 1, plus one
  int64_t hi = (in_size - 1 - offset) < 0 ? 0 : (in_size - 1 - offset) / stride + 1;
  if (hi > out_size) hi = out_size;
  if (lo > hi) lo = hi;
  *first = lo;
  *last = hi;
}

}  // namespace depthwise
}  // namespace fastcnn
