// The portable vectorised kernels of the CPU depthwise convolution: NCHW planes (zero-padded,
// phase-split copies), channels_last rows, and NCHW channel-block tiles, written with GCC vector
// types and compiled for x86-64-v4, v3 and a baseline (target_clones).
// Private to depthwise_conv2d_kernel.cpp, the one translation unit that includes it (everything here
// is in an anonymous namespace).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/depthwise_conv2d_checks.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTCNN_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTCNN_SIMD_CLONES
#endif
#define FASTCNN_INLINE inline __attribute__((always_inline))
// The hot loops read one buffer and write another; without this GCC versions them for aliasing
// and gives up on vectorising once a window has more taps than it will check at run time.
#define FASTCNN_IVDEP _Pragma("GCC ivdep")
// The weight-gradient kernels keep a group of up to 10 taps in registers, the group size a
// template parameter: this turns the run-time size `count` into CALL(1) ... CALL(10).
#define FASTCNN_WITH_GROUP_SIZE(count, CALL) \
  switch (count) {                           \
    case 1: CALL(1); break;                  \
    case 2: CALL(2); break;                  \
    case 3: CALL(3); break;                  \
    case 4: CALL(4); break;                  \
    case 5: CALL(5); break;                  \
    case 6: CALL(6); break;                  \
    case 7: CALL(7); break;                  \
    case 8: CALL(8); break;                  \
    case 9: CALL(9); break;                  \
    default: CALL(10); break;                \
  }

namespace fastcnn {
namespace {

using depthwise::Geometry;

// ---------------------------------------------------------------------------------------------
// Plane kernels (NCHW). `T` is the accumulation type.
//
// A padded input plane is stored with each row split into `stride_w` phases: column c lives at
// (c % stride_w) * phase_w + c / stride_w. Output column x of tap kx then reads element
// x + (kx*dw) / stride_w of one phase, so every load is unit-stride whatever the stride, and the
// de-interleave is paid once per element on load instead of once per tap.

struct PlaneShape {
  int64_t out_h, out_w;
  int64_t row_stride;  // elements per stored row: stride_w * phase_w
  int64_t phase_w;     // elements per phase of a row
  int64_t kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w;
  // Offset of every tap (ky, kx) from the element of output (0, 0), in kernel order: divisions
  // kept out of the hot loops.
  std::vector<int64_t> tap_offsets;
};

FASTCNN_INLINE int64_t column_offset(int64_t column, int64_t stride_w, int64_t phase_w) {
  return (column % stride_w) * phase_w + column / stride_w;
}

PlaneShape make_plane_shape(int64_t out_h, int64_t out_w, int64_t padded_w, int64_t kernel_h, int64_t kernel_w,
                            int64_t stride_h, int64_t stride_w, int64_t dilation_h, int64_t dilation_w) {
  const int64_t phase_w = (padded_w + stride_w - 1) / stride_w;
  PlaneShape s{out_h, out_w, phase_w * stride_w, phase_w, kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w,
               std::vector<int64_t>(kernel_h * kernel_w)};
  for (int64_t ky = 0; ky < kernel_h; ++ky)
    for (int64_t kx = 0; kx < kernel_w; ++kx)
      s.tap_offsets[ky * kernel_w + kx] =
          ky * dilation_h * s.row_stride + column_offset(kx * dilation_w, stride_w, phase_w);
  return s;
}

// 32-byte vectors: native on AVX2 and AVX-512 alike. Wider GCC vectors on an AVX2 target are
// split through the stack (seen here: a 20x slowdown), and memory bandwidth, not vector width,
// bounds the common 3x3 layers.
// GCC notes that returning such a vector from code built without AVX "changes the ABI": only
// inline functions of this translation unit return them, so no ABI is crossed.
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef float unaligned __attribute__((vector_size(32), aligned(4)));
  typedef int32_t index __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef double unaligned __attribute__((vector_size(32), aligned(8)));
  typedef int64_t index __attribute__((vector_size(32)));
  static constexpr int width = 4;
};

template <typename T>
FASTCNN_INLINE typename Simd<T>::type load(const T* p) {
  return *reinterpret_cast<const typename Simd<T>::unaligned*>(p);
}

// Buffers read by the vector kernels carry this many elements of slack past their end, so a
// vector that straddles the last row (its extra lanes discarded or masked) stays in bounds.
constexpr int64_t kSlack = 64;

// out[oy][ox] = bias + sum_{ky,kx} w[ky][kx] * padded[oy*sh + ky*dh][ox*sw + kx*dw]
//
// B vectors of adjacent outputs stay in registers while every tap of the window is added, so an
// output is written once whatever the kernel size. Lanes past the row end are computed from
// in-bounds (slack) memory and dropped on store.
template <typename T, int B>
FASTCNN_INLINE void forward_chunk(const T* row0, const T* w, T bias, T* out, int64_t valid, const PlaneShape& s) {
  using V = typename Simd<T>::type;
  constexpr int L = Simd<T>::width;
  V acc[B];
  for (int b = 0; b < B; ++b) acc[b] = V{} + bias;
  const int64_t taps = s.kernel_h * s.kernel_w;
  const int64_t* offsets = s.tap_offsets.data();
  for (int64_t t = 0; t < taps; ++t) {
    const T* p = row0 + offsets[t];
    const T wv = w[t];
    for (int b = 0; b < B; ++b) acc[b] += wv * load(p + b * L);
  }
  using U = typename Simd<T>::unaligned;
  for (int b = 0; b < B; ++b) {
    const int64_t lanes = std::min<int64_t>(L, valid - b * L);
    if (lanes == L) {
      *reinterpret_cast<U*>(out + b * L) = acc[b];
    } else {
      T spill[L];
      *reinterpret_cast<U*>(spill) = acc[b];
      for (int64_t i = 0; i < lanes; ++i) out[b * L + i] = spill[i];
    }
  }
}

// `out` is a dense plane written row after row, so a row's last partial vector may spill whole
// into the rows below (overwritten when their turn comes); only the plane's end needs exact stores.
template <typename T>
FASTCNN_INLINE void forward_plane_impl(const T* padded, const T* w, T bias, T* out, const PlaneShape& s) {
  constexpr int L = Simd<T>::width, B = 4;
  const int64_t plane_end = s.out_h * s.out_w;
  for (int64_t oy = 0; oy < s.out_h; ++oy) {
    const T* row0 = padded + oy * s.stride_h * s.row_stride;
    T* out_row = out + oy * s.out_w;
    for (int64_t x = 0; x < s.out_w; x += B * L) {
      int64_t valid = std::min<int64_t>(B * L, s.out_w - x);
      const int64_t rounded = (valid + L - 1) / L * L;
      if (oy * s.out_w + x + rounded <= plane_end) valid = rounded;
      switch ((valid + L - 1) / L) {
        case 1: forward_chunk<T, 1>(row0 + x, w, bias, out_row + x, valid, s); break;
        case 2: forward_chunk<T, 2>(row0 + x, w, bias, out_row + x, valid, s); break;
        case 3: forward_chunk<T, 3>(row0 + x, w, bias, out_row + x, valid, s); break;
        default: forward_chunk<T, 4>(row0 + x, w, bias, out_row + x, valid, s); break;
      }
    }
  }
}

// The transpose of the forward for strides > 1 (unit strides run as a forward convolution
// instead): padded_grad, in the same phase-split layout as the padded input and zeroed by the
// caller, receives every output's gradient through every tap. In that layout each tap's targets
// are contiguous, so each tap is a unit-stride axpy.
template <typename T>
FASTCNN_INLINE void backward_input_plane_impl(const T* grad_out, const T* w, T* padded_grad, const PlaneShape& s) {
  const int64_t taps = s.kernel_h * s.kernel_w;
  for (int64_t oy = 0; oy < s.out_h; ++oy) {
    const T* go_row = grad_out + oy * s.out_w;
    T* base = padded_grad + oy * s.stride_h * s.row_stride;
    for (int64_t t = 0; t < taps; ++t) {
      T* dst = base + s.tap_offsets[t];
      const T wv = w[t];
      FASTCNN_IVDEP
      for (int64_t x = 0; x < s.out_w; ++x) dst[x] += wv * go_row[x];
    }
  }
}

// grad_w[ky][kx] += sum_{oy,ox} grad_out[oy][ox] * padded[oy*sh + ky*dh][ox*sw + kx*dw]
//
// Up to 10 taps at a time keep a vector accumulator each while the plane streams past once, so
// grad_output is loaded once per group instead of once per tap. The last vector of a row is
// masked with a select (never a multiply by zero: the lanes past the row may hold inf).
template <typename T, int G>
FASTCNN_INLINE void weight_grad_taps(const T* go, int64_t go_stride, const T* padded, const int64_t* offsets, T* sums,
                                     const PlaneShape& s) {
  using V = typename Simd<T>::type;
  using I = typename Simd<T>::index;
  using lane_t = std::remove_reference_t<decltype(std::declval<I>()[0])>;
  constexpr int L = Simd<T>::width;
  V lanes[G];
  for (int j = 0; j < G; ++j) lanes[j] = V{};
  I lane_index;
  for (int i = 0; i < L; ++i) lane_index[i] = i;
  for (int64_t xc = 0; xc < s.out_w; xc += L) {
    const I limit = I{} + static_cast<lane_t>(s.out_w - xc);
    const auto valid = lane_index < limit;
    for (int64_t oy = 0; oy < s.out_h; ++oy) {
      const V g = load(go + oy * go_stride + xc);
      const T* base = padded + oy * s.stride_h * s.row_stride + xc;
      for (int j = 0; j < G; ++j) {
        const V product = g * load(base + offsets[j]);
        lanes[j] += valid ? product : V{};
      }
    }
  }
  for (int j = 0; j < G; ++j) {
    T sum = T(0);
    for (int i = 0; i < L; ++i) sum += lanes[j][i];
    sums[j] += sum;
  }
}

template <typename T>
FASTCNN_INLINE void backward_weight_plane_impl(const T* go, int64_t go_stride, const T* padded, T* grad_w,
                                               const PlaneShape& s) {
  constexpr int G = 10;
  const int64_t kernel_area = s.kernel_h * s.kernel_w;
  for (int64_t t0 = 0; t0 < kernel_area; t0 += G) {
    const int64_t count = std::min<int64_t>(G, kernel_area - t0);
    const int64_t* offsets = s.tap_offsets.data() + t0;
    T* sums = grad_w + t0;
#define FASTCNN_CALL(N) weight_grad_taps<T, N>(go, go_stride, padded, offsets, sums, s)
    FASTCNN_WITH_GROUP_SIZE(count, FASTCNN_CALL);
#undef FASTCNN_CALL
  }
}

// ---------------------------------------------------------------------------------------------
// Row kernels (channels_last): one output pixel at a time, vectorised over channels.

template <typename T>
FASTCNN_INLINE void channel_axpy(T* acc, const T* w, const T* x, int64_t channels) {
  FASTCNN_IVDEP
  for (int64_t c = 0; c < channels; ++c) acc[c] += w[c] * x[c];
}

// Geometry of a channels_last image for the row kernels. Padding may be negative (a crop): the
// input gradient runs the forward row kernel over grad_output with that window.
struct RowShape {
  int64_t channels, in_h, in_w, out_w, kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left, dilation_h,
      dilation_w;
};

// [first, last) of taps k with 0 <= o*stride - pad + k*dilation < size.
FASTCNN_INLINE void valid_taps(int64_t o, int64_t stride, int64_t pad, int64_t dilation, int64_t size, int64_t kernel,
                               int64_t* first, int64_t* last) {
  const int64_t start = o * stride - pad;
  int64_t lo = start >= 0 ? 0 : (-start + dilation - 1) / dilation;
  int64_t hi = start > size - 1 ? 0 : (size - 1 - start) / dilation + 1;
  *first = std::min(lo, kernel);
  *last = std::max(*first, std::min(hi, kernel));
}

// R adjacent output pixels x B channel vectors in registers: each tap's weights are loaded once
// for the R pixels. A pixel whose tap falls outside the image reads a zero vector instead, so
// edges need no separate path.
template <typename T, int R, int B>
FASTCNN_INLINE void nhwc_pixels_block(const T* in, const T* taps, const T* bias, T* out_row, const T* zeros, int64_t c0,
                                      int64_t ox0, int64_t ky0, int64_t ky1, int64_t iy0, const RowShape& s) {
  using V = typename Simd<T>::type;
  using U = typename Simd<T>::unaligned;
  constexpr int L = Simd<T>::width;
  const int64_t C = s.channels;
  V acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = bias ? load(bias + c0 + b * L) : V{};
  int64_t ix0[R];
  for (int r = 0; r < R; ++r) ix0[r] = (ox0 + r) * s.stride_w - s.pad_left;
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const T* in_row = in + (iy0 + ky * s.dilation_h) * s.in_w * C + c0;
    const T* tap_row = taps + ky * s.kernel_w * C + c0;
    for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
      V w[B];
      for (int b = 0; b < B; ++b) w[b] = load(tap_row + kx * C + b * L);
      for (int r = 0; r < R; ++r) {
        const int64_t ix = ix0[r] + kx * s.dilation_w;
        const T* x = static_cast<uint64_t>(ix) < static_cast<uint64_t>(s.in_w) ? in_row + ix * C : zeros;
        for (int b = 0; b < B; ++b) acc[r][b] += w[b] * load(x + b * L);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) *reinterpret_cast<U*>(out_row + (ox0 + r) * C + c0 + b * L) = acc[r][b];
}

template <typename T, int B>
FASTCNN_INLINE void nhwc_row_channels(const T* in, const T* taps, const T* bias, T* out_row, const T* zeros, int64_t c0,
                                      int64_t ky0, int64_t ky1, int64_t iy0, const RowShape& s) {
  constexpr int R = 4;
  int64_t ox = 0;
  for (; ox + R <= s.out_w; ox += R) nhwc_pixels_block<T, R, B>(in, taps, bias, out_row, zeros, c0, ox, ky0, ky1, iy0, s);
  for (; ox < s.out_w; ++ox) nhwc_pixels_block<T, 1, B>(in, taps, bias, out_row, zeros, c0, ox, ky0, ky1, iy0, s);
}

// Small windows: one pixel at a time with B channel vectors in registers, only its in-bounds taps.
// The whole channel vector of a pixel is done while its few input rows sit in L1.
template <typename T, int B>
FASTCNN_INLINE void nhwc_pixel_channels(const T* in, const T* taps, const T* bias, T* out, int64_t c0, int64_t ky0,
                                        int64_t ky1, int64_t kx0, int64_t kx1, int64_t iy0, int64_t ix0,
                                        const RowShape& s) {
  using V = typename Simd<T>::type;
  using U = typename Simd<T>::unaligned;
  constexpr int L = Simd<T>::width;
  const int64_t C = s.channels;
  V acc[B];
  for (int b = 0; b < B; ++b) acc[b] = bias ? load(bias + c0 + b * L) : V{};
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const T* in_row = in + (iy0 + ky * s.dilation_h) * s.in_w * C + c0;
    const T* tap_row = taps + ky * s.kernel_w * C + c0;
    for (int64_t kx = kx0; kx < kx1; ++kx) {
      const T* x = in_row + (ix0 + kx * s.dilation_w) * C;
      const T* w = tap_row + kx * C;
      for (int b = 0; b < B; ++b) acc[b] += load(w + b * L) * load(x + b * L);
    }
  }
  for (int b = 0; b < B; ++b) *reinterpret_cast<U*>(out + c0 + b * L) = acc[b];
}

template <typename T>
FASTCNN_INLINE void forward_row_nhwc_pixelwise(const T* in, const T* taps, const T* bias, T* out_row, int64_t ky0,
                                               int64_t ky1, int64_t iy0, int64_t full, const RowShape& s) {
  constexpr int L = Simd<T>::width;
  for (int64_t ox = 0; ox < s.out_w; ++ox) {
    int64_t kx0, kx1;
    valid_taps(ox, s.stride_w, s.pad_left, s.dilation_w, s.in_w, s.kernel_w, &kx0, &kx1);
    const int64_t ix0 = ox * s.stride_w - s.pad_left;
    T* out = out_row + ox * s.channels;
    int64_t c0 = 0;
    for (; c0 + 4 * L <= full; c0 += 4 * L)
      nhwc_pixel_channels<T, 4>(in, taps, bias, out, c0, ky0, ky1, kx0, kx1, iy0, ix0, s);
    for (; c0 + L <= full; c0 += L) nhwc_pixel_channels<T, 1>(in, taps, bias, out, c0, ky0, ky1, kx0, kx1, iy0, ix0, s);
  }
}

// `zeros` holds at least 2 * Simd<T>::width zeros.
template <typename T>
FASTCNN_INLINE void forward_row_nhwc_impl(const T* in, const T* taps, const T* bias, T* out_row, const T* zeros,
                                          int64_t oy, const RowShape& s) {
  constexpr int L = Simd<T>::width;
  const int64_t C = s.channels, full = C / L * L;
  int64_t ky0, ky1;
  valid_taps(oy, s.stride_h, s.pad_top, s.dilation_h, s.in_h, s.kernel_h, &ky0, &ky1);
  const int64_t iy0 = oy * s.stride_h - s.pad_top;
  if (s.kernel_h * s.kernel_w <= 25) {
    forward_row_nhwc_pixelwise(in, taps, bias, out_row, ky0, ky1, iy0, full, s);
  } else {
    // Large windows: channel blocks outermost, so one block's weights (kH*kW*16 values) and input
    // columns stay in L2 for the whole row; pixels blocked by four to share each weight load.
    int64_t c0 = 0;
    for (; c0 + 2 * L <= full; c0 += 2 * L) nhwc_row_channels<T, 2>(in, taps, bias, out_row, zeros, c0, ky0, ky1, iy0, s);
    for (; c0 + L <= full; c0 += L) nhwc_row_channels<T, 1>(in, taps, bias, out_row, zeros, c0, ky0, ky1, iy0, s);
  }
  if (full == C) return;
  for (int64_t ox = 0; ox < s.out_w; ++ox) {
    int64_t kx0, kx1;
    valid_taps(ox, s.stride_w, s.pad_left, s.dilation_w, s.in_w, s.kernel_w, &kx0, &kx1);
    const int64_t ix0 = ox * s.stride_w - s.pad_left;
    for (int64_t c = full; c < C; ++c) {
      T acc = bias ? bias[c] : T(0);
      for (int64_t ky = ky0; ky < ky1; ++ky)
        for (int64_t kx = kx0; kx < kx1; ++kx)
          acc += taps[(ky * s.kernel_w + kx) * C + c] *
                 in[((iy0 + ky * s.dilation_h) * s.in_w + ix0 + kx * s.dilation_w) * C + c];
      out_row[ox * C + c] = acc;
    }
  }
}

// grad_in[iy][ix][c] = sum over taps landing on (iy, ix) of taps[t][c] * grad_out[oy][ox][c]: the
// gather form of the input gradient for any stride (a tap lands only when the stride divides).
template <typename T, int B>
FASTCNN_INLINE void nhwc_gather_channels(const T* go, const T* taps, T* out, int64_t c0, const int64_t* oys,
                                         const int64_t* kys, int64_t rows, const int64_t* oxs, const int64_t* kxs,
                                         int64_t cols, const RowShape& s) {
  using V = typename Simd<T>::type;
  using U = typename Simd<T>::unaligned;
  constexpr int L = Simd<T>::width;
  const int64_t C = s.channels;
  V acc[B];
  for (int b = 0; b < B; ++b) acc[b] = V{};
  for (int64_t i = 0; i < rows; ++i) {
    const T* go_row = go + oys[i] * s.out_w * C + c0;
    const T* tap_row = taps + kys[i] * s.kernel_w * C + c0;
    for (int64_t j = 0; j < cols; ++j) {
      const T* g = go_row + oxs[j] * C;
      const T* w = tap_row + kxs[j] * C;
      for (int b = 0; b < B; ++b) acc[b] += load(w + b * L) * load(g + b * L);
    }
  }
  for (int b = 0; b < B; ++b) *reinterpret_cast<U*>(out + c0 + b * L) = acc[b];
}

// Here in_h/in_w are the input's (gradient's) size and out_w grad_output's width.
template <typename T>
FASTCNN_INLINE void grad_input_row_nhwc_impl(const T* go, const T* taps, T* gi_row, int64_t iy, int64_t out_h,
                                             const RowShape& s) {
  constexpr int L = Simd<T>::width;
  const int64_t C = s.channels, full = C / L * L;
  int64_t oys[64], kys[64], oxs[64], kxs[64];  // taps that land; a window of up to 64 x 64
  int64_t rows = 0;
  for (int64_t ky = 0; ky < s.kernel_h; ++ky) {
    const int64_t oy = depthwise::output_index_for_input(iy, ky, s.stride_h, s.pad_top, s.dilation_h, out_h);
    if (oy >= 0) {
      oys[rows] = oy;
      kys[rows++] = ky;
    }
  }
  for (int64_t ix = 0; ix < s.in_w; ++ix) {
    int64_t cols = 0;
    for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
      const int64_t ox = depthwise::output_index_for_input(ix, kx, s.stride_w, s.pad_left, s.dilation_w, s.out_w);
      if (ox >= 0) {
        oxs[cols] = ox;
        kxs[cols++] = kx;
      }
    }
    T* out = gi_row + ix * C;
    int64_t c0 = 0;
    for (; c0 + 4 * L <= full; c0 += 4 * L) nhwc_gather_channels<T, 4>(go, taps, out, c0, oys, kys, rows, oxs, kxs, cols, s);
    for (; c0 + L <= full; c0 += L) nhwc_gather_channels<T, 1>(go, taps, out, c0, oys, kys, rows, oxs, kxs, cols, s);
    for (int64_t c = full; c < C; ++c) {
      T acc = T(0);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
          acc += taps[(kys[i] * s.kernel_w + kxs[j]) * C + c] * go[(oys[i] * s.out_w + oxs[j]) * C + c];
      out[c] = acc;
    }
  }
}

// part[t][c] += sum over the row's outputs of go[ox][c] * in[iy][ix][c] for every in-bounds tap t,
// and part_bias[c] += sum of go[ox][c]: each tap's sum over the row stays in registers.
template <typename T, int B>
FASTCNN_INLINE void nhwc_weight_grad_block(const T* in, const T* go_row, T* part, int64_t c0, int64_t ky0, int64_t ky1,
                                           int64_t iy0, const RowShape& s) {
  using V = typename Simd<T>::type;
  using U = typename Simd<T>::unaligned;
  constexpr int L = Simd<T>::width;
  const int64_t C = s.channels;
  for (int64_t ky = ky0; ky < ky1; ++ky) {
    const T* in_row = in + (iy0 + ky * s.dilation_h) * s.in_w * C + c0;
    for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
      // outputs whose tap kx lands inside the row
      int64_t first, last;
      depthwise::valid_output_range(kx, s.stride_w, s.pad_left, s.dilation_w, s.in_w, s.out_w, &first, &last);
      V acc[B];
      for (int b = 0; b < B; ++b) acc[b] = V{};
      for (int64_t ox = first; ox < last; ++ox) {
        const T* g = go_row + ox * C + c0;
        const T* x = in_row + (ox * s.stride_w - s.pad_left + kx * s.dilation_w) * C;
        for (int b = 0; b < B; ++b) acc[b] += load(g + b * L) * load(x + b * L);
      }
      T* dst = part + (ky * s.kernel_w + kx) * C + c0;
      for (int b = 0; b < B; ++b) *reinterpret_cast<U*>(dst + b * L) = load(dst + b * L) + acc[b];
    }
  }
}

template <typename T>
FASTCNN_INLINE void weight_grad_row_nhwc_impl(const T* in, const T* go_row, T* part, T* part_bias, int64_t oy,
                                              const RowShape& s) {
  constexpr int L = Simd<T>::width;
  const int64_t C = s.channels, full = C / L * L;
  if (part_bias) {
    for (int64_t ox = 0; ox < s.out_w; ++ox) {
      const T* g = go_row + ox * C;
      FASTCNN_IVDEP
      for (int64_t c = 0; c < C; ++c) part_bias[c] += g[c];
    }
  }
  if (!part) return;
  int64_t ky0, ky1;
  valid_taps(oy, s.stride_h, s.pad_top, s.dilation_h, s.in_h, s.kernel_h, &ky0, &ky1);
  const int64_t iy0 = oy * s.stride_h - s.pad_top;
  int64_t c0 = 0;
  for (; c0 + 4 * L <= full; c0 += 4 * L) nhwc_weight_grad_block<T, 4>(in, go_row, part, c0, ky0, ky1, iy0, s);
  for (; c0 + L <= full; c0 += L) nhwc_weight_grad_block<T, 1>(in, go_row, part, c0, ky0, ky1, iy0, s);
  for (int64_t c = full; c < C; ++c) {
    for (int64_t ky = ky0; ky < ky1; ++ky) {
      for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
        int64_t first, last;
        depthwise::valid_output_range(kx, s.stride_w, s.pad_left, s.dilation_w, s.in_w, s.out_w, &first, &last);
        T acc = T(0);
        for (int64_t ox = first; ox < last; ++ox)
          acc += go_row[ox * C + c] *
                 in[((iy0 + ky * s.dilation_h) * s.in_w + ox * s.stride_w - s.pad_left + kx * s.dilation_w) * C + c];
        part[(ky * s.kernel_w + kx) * C + c] += acc;
      }
    }
  }
}

// dst[i] = src[i * step]: the row copies of load_window, unit and stride-2 steps vectorised.
template <typename T>
FASTCNN_INLINE void gather_strided_impl(T* dst, const T* src, int64_t n, int64_t step) {
  if (step == 1 && n < 64) {
    FASTCNN_IVDEP
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  } else if (step == 1) {
    std::memcpy(dst, src, n * sizeof(T));
  } else if (step == 2) {
    // Stream the source span into L1 with memcpy first: a shuffle loop reading straight from DRAM
    // stalls on every load (seen here: 3x slower than the copy it replaces).
    using V = typename Simd<T>::type;
    using I = typename Simd<T>::index;
    constexpr int L = Simd<T>::width;
    constexpr int64_t kChunk = 512;
    T staged[2 * kChunk + 2 * L];
    I even;
    for (int i = 0; i < L; ++i) even[i] = 2 * i;
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      const int64_t count = std::min(kChunk, n - begin);
      std::memcpy(staged, src + 2 * begin, (2 * count - 1) * sizeof(T));
      int64_t i = 0;
      for (; i + L <= count; i += L) {
        const V a = load(staged + 2 * i), b = load(staged + 2 * i + L);
        *reinterpret_cast<typename Simd<T>::unaligned*>(dst + begin + i) = __builtin_shuffle(a, b, even);
      }
      for (; i < count; ++i) dst[begin + i] = staged[2 * i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * step];
  }
}

// Small NCHW maps (14x14, 7x7) cost more per plane than per output. There, one vector's worth of
// channels is transposed into a zero-padded channels-last tile [padded_h][padded_w][L] and
// convolved one output pixel at a time, each tap one vector multiply-add over the L channels;
// out_tile is [out_h][out_w][L].
// acc[i][j] = b + the window sum of output pixel (oy + i, ox + j) over a channel tile. RY x RX
// pixels at a time: one weight load feeds RY * RX independent accumulators. One pixel at a time,
// each output waited on a chain of kernel_area dependent multiply-adds (4 cycles each), which
// made the 14x14 layers latency-bound at a fifth of the FMA rate.
template <typename T, int RY, int RX>
FASTCNN_INLINE void tile_window_sums(const T* tile, const T* taps, typename Simd<T>::type b, int64_t oy, int64_t ox,
                                     const PlaneShape& s, int64_t padded_w, typename Simd<T>::type (&acc)[RY][RX]) {
  using V = typename Simd<T>::type;
  constexpr int L = Simd<T>::width;
  for (int i = 0; i < RY; ++i)
    for (int j = 0; j < RX; ++j) acc[i][j] = b;
  const int64_t step_x = s.stride_w * L, step_y = s.stride_h * padded_w * L;
  const T* origin = tile + (oy * s.stride_h * padded_w + ox * s.stride_w) * L;
  for (int64_t ky = 0; ky < s.kernel_h; ++ky) {
    const T* row = origin + ky * s.dilation_h * padded_w * L;
    const T* w = taps + ky * s.kernel_w * L;
    for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
      const V weight = load(w + kx * L);
      const T* p = row + kx * s.dilation_w * L;
      for (int i = 0; i < RY; ++i)
        for (int j = 0; j < RX; ++j) acc[i][j] += weight * load(p + i * step_y + j * step_x);
    }
  }
}

template <typename T, int RY, int RX>
FASTCNN_INLINE void forward_tile_pixels(const T* tile, const T* taps, typename Simd<T>::type b, T* out_tile,
                                        int64_t oy, int64_t ox, const PlaneShape& s, int64_t padded_w) {
  using U = typename Simd<T>::unaligned;
  constexpr int L = Simd<T>::width;
  typename Simd<T>::type acc[RY][RX];
  tile_window_sums<T, RY, RX>(tile, taps, b, oy, ox, s, padded_w, acc);
  for (int i = 0; i < RY; ++i)
    for (int j = 0; j < RX; ++j) *reinterpret_cast<U*>(out_tile + ((oy + i) * s.out_w + ox + j) * L) = acc[i][j];
}

// NCHW channel-block tiles (see use_tiles): one vector's worth of channels is transposed into a
// zero-padded channels-last tile [padded_h][padded_w][L] and convolved a block of output pixels
// at a time, each tap one vector multiply-add over the L channels; out_tile is [out_h][out_w][L]. Edge blocks overlap the previous ones (out_tile is
// scratch: a pixel computed twice is written twice with the same value).
template <typename T>
FASTCNN_INLINE void forward_tile_impl(const T* tile, const T* taps, const T* bias, T* out_tile, const PlaneShape& s,
                                      int64_t padded_w) {
  constexpr int RY = 2, RX = 4;
  const typename Simd<T>::type b = load(bias);
  if (s.out_h < RY || s.out_w < RX) {
    for (int64_t oy = 0; oy < s.out_h; ++oy)
      for (int64_t ox = 0; ox < s.out_w; ++ox) forward_tile_pixels<T, 1, 1>(tile, taps, b, out_tile, oy, ox, s, padded_w);
    return;
  }
  for (int64_t oy0 = 0; oy0 < s.out_h; oy0 += RY) {
    const int64_t oy = std::min(oy0, s.out_h - RY);
    for (int64_t ox0 = 0; ox0 < s.out_w; ox0 += RX) {
      forward_tile_pixels<T, RY, RX>(tile, taps, b, out_tile, oy, std::min(ox0, s.out_w - RX), s, padded_w);
    }
  }
}

// The backward of forward_tile for one image: grad_out_tile [out_h][out_w][L]; in_tile the
// zero-padded input tile; grad_in_tile a zeroed padded tile that receives every output's
// gradient through every tap (scatter form: no stride or bounds tests); grad_taps [taps][L]
// accumulates the weight gradient, up to 10 taps per pass in registers.
template <typename T, int G>
FASTCNN_INLINE void tile_weight_grad_taps(const T* go_tile, int64_t go_w, const T* in_tile, const int64_t* offsets,
                                          T* grad_taps, const PlaneShape& s, int64_t padded_w) {
  using V = typename Simd<T>::type;
  using U = typename Simd<T>::unaligned;
  constexpr int L = Simd<T>::width;
  V acc[G];
  for (int j = 0; j < G; ++j) acc[j] = V{};
  for (int64_t oy = 0; oy < s.out_h; ++oy) {
    for (int64_t ox = 0; ox < s.out_w; ++ox) {
      const V g = load(go_tile + (oy * go_w + ox) * L);
      const T* origin = in_tile + (oy * s.stride_h * padded_w + ox * s.stride_w) * L;
      for (int j = 0; j < G; ++j) acc[j] += g * load(origin + offsets[j]);
    }
  }
  for (int j = 0; j < G; ++j) *reinterpret_cast<U*>(grad_taps + j * L) = load(grad_taps + j * L) + acc[j];
}

template <typename T>
FASTCNN_INLINE void backward_tile_impl(const T* go_tile, int64_t go_w, const T* in_tile, const T* taps,
                                       T* grad_in_tile, T* grad_taps, const PlaneShape& s, int64_t padded_w) {
  using V = typename Simd<T>::type;
  using U = typename Simd<T>::unaligned;
  constexpr int L = Simd<T>::width;
  constexpr int G = 10;
  const int64_t kernel_area = s.kernel_h * s.kernel_w;
  int64_t offsets[G];
  if (grad_taps) {
    for (int64_t t0 = 0; t0 < kernel_area; t0 += G) {
      const int64_t count = std::min<int64_t>(G, kernel_area - t0);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t ky = (t0 + j) / s.kernel_w, kx = (t0 + j) % s.kernel_w;
        offsets[j] = (ky * s.dilation_h * padded_w + kx * s.dilation_w) * L;
      }
      T* sums = grad_taps + t0 * L;
#define FASTCNN_CALL(N) tile_weight_grad_taps<T, N>(go_tile, go_w, in_tile, offsets, sums, s, padded_w)
      FASTCNN_WITH_GROUP_SIZE(count, FASTCNN_CALL);
#undef FASTCNN_CALL
    }
  }
  if (grad_in_tile) {
    for (int64_t oy = 0; oy < s.out_h; ++oy) {
      for (int64_t ox = 0; ox < s.out_w; ++ox) {
        const V g = load(go_tile + (oy * go_w + ox) * L);
        T* origin = grad_in_tile + (oy * s.stride_h * padded_w + ox * s.stride_w) * L;
        for (int64_t ky = 0; ky < s.kernel_h; ++ky) {
          T* row = origin + ky * s.dilation_h * padded_w * L;
          const T* w = taps + ky * s.kernel_w * L;
          for (int64_t kx = 0; kx < s.kernel_w; ++kx) {
            T* dst = row + kx * s.dilation_w * L;
            *reinterpret_cast<U*>(dst) = load(dst) + load(w + kx * L) * g;
          }
        }
      }
    }
  }
}

// r[i] = row i of an 8x8 block in, column i out (three rounds of two-input shuffles; GCC picks the
// instructions for the target: unpck/shufps/vperm2f128 on AVX2).
FASTCNN_INLINE void transpose8x8(Simd<float>::type r[8]) {
  using V = Simd<float>::type;
  using I = Simd<float>::index;
  const I lo_pairs = {0, 8, 1, 9, 4, 12, 5, 13}, hi_pairs = {2, 10, 3, 11, 6, 14, 7, 15};
  const I lo_quads = {0, 1, 8, 9, 4, 5, 12, 13}, hi_quads = {2, 3, 10, 11, 6, 7, 14, 15};
  const I lo_halves = {0, 1, 2, 3, 8, 9, 10, 11}, hi_halves = {4, 5, 6, 7, 12, 13, 14, 15};
  V t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo_pairs);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi_pairs);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], lo_quads);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], hi_quads);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], lo_quads);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], hi_quads);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(u[i], u[i + 4], lo_halves);
    r[i + 4] = __builtin_shuffle(u[i], u[i + 4], hi_halves);
  }
}

// 8 channel planes, each a run of `count` pixels of a map w wide (a whole dense plane, or one row
// of a strided one), into tile pixels [..][8 channels] and back: transposed 8 pixels at a time
// (the last block overlapping the one before), each pixel stored at its place in a tile with
// rows tile_w wide, offset by (top, left). Maps narrower than 8 (7x7) get vector transposes too
// instead of element-by-element copies.
FASTCNN_INLINE void planes_to_tile_flat(const float* const* planes, int64_t count, int64_t w, int64_t tile_w,
                                        int64_t top, int64_t left, float* tile) {
  using U = Simd<float>::unaligned;
  for (int64_t p0 = 0; p0 < count; p0 += 8) {
    const int64_t p = std::min(p0, count - 8);
    Simd<float>::type r[8];
    for (int l = 0; l < 8; ++l) r[l] = load(planes[l] + p);
    transpose8x8(r);
    int64_t y = p / w, x = p % w;
    for (int j = 0; j < 8; ++j) {
      *reinterpret_cast<U*>(tile + ((y + top) * tile_w + x + left) * 8) = r[j];
      if (++x == w) x = 0, ++y;
    }
  }
}

FASTCNN_INLINE void tile_to_planes_flat(const float* tile, int64_t count, int64_t w, int64_t tile_w, int64_t top,
                                        int64_t left, float* const* planes) {
  using U = Simd<float>::unaligned;
  for (int64_t p0 = 0; p0 < count; p0 += 8) {
    const int64_t p = std::min(p0, count - 8);
    Simd<float>::type r[8];
    int64_t y = p / w, x = p % w;
    for (int j = 0; j < 8; ++j) {
      r[j] = load(tile + ((y + top) * tile_w + x + left) * 8);
      if (++x == w) x = 0, ++y;
    }
    transpose8x8(r);
    for (int l = 0; l < 8; ++l) *reinterpret_cast<U*>(planes[l] + p) = r[l];
  }
}

// The non-inlined, multi-versioned entry points for float and double.
#define FASTCNN_DEFINE_CLONES(T)                                                                          \
  FASTCNN_SIMD_CLONES void forward_plane(const T* padded, const T* w, T bias, T* out, const PlaneShape& s) { \
    forward_plane_impl<T>(padded, w, bias, out, s);                                                       \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void backward_input_plane(const T* go, const T* w, T* padded_grad, const PlaneShape& s) { \
    backward_input_plane_impl<T>(go, w, padded_grad, s);                                                  \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void backward_weight_plane(const T* go, int64_t go_stride, const T* padded, T* gw,  \
                                                 const PlaneShape& s) {                                   \
    backward_weight_plane_impl<T>(go, go_stride, padded, gw, s);                                          \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void forward_tile(const T* tile, const T* taps, const T* bias, T* out_tile,        \
                                        const PlaneShape& s, int64_t padded_w) {                          \
    forward_tile_impl<T>(tile, taps, bias, out_tile, s, padded_w);                                        \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void backward_tile(const T* go_tile, int64_t go_w, const T* in_tile, const T* taps, \
                                         T* grad_in_tile, T* grad_taps, const PlaneShape& s,              \
                                         int64_t padded_w) {                                              \
    backward_tile_impl<T>(go_tile, go_w, in_tile, taps, grad_in_tile, grad_taps, s, padded_w);            \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void gather_strided(T* dst, const T* src, int64_t n, int64_t step) {                \
    gather_strided_impl<T>(dst, src, n, step);                                                            \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void channel_axpy_n(T* acc, const T* w, const T* x, int64_t channels) {             \
    channel_axpy<T>(acc, w, x, channels);                                                                 \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void forward_row_nhwc(const T* in, const T* taps, const T* bias, T* out_row,     \
                                            const T* zeros, int64_t oy, const RowShape& s) {              \
    forward_row_nhwc_impl<T>(in, taps, bias, out_row, zeros, oy, s);                                      \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void grad_input_row_nhwc(const T* go, const T* taps, T* gi_row, int64_t iy,          \
                                               int64_t out_h, const RowShape& s) {                        \
    grad_input_row_nhwc_impl<T>(go, taps, gi_row, iy, out_h, s);                                          \
  }                                                                                                       \
  FASTCNN_SIMD_CLONES void weight_grad_row_nhwc(const T* in, const T* go_row, T* part, T* part_bias, int64_t oy, \
                                                const RowShape& s) {                                      \
    weight_grad_row_nhwc_impl<T>(in, go_row, part, part_bias, oy, s);                                     \
  }
FASTCNN_DEFINE_CLONES(float)
FASTCNN_DEFINE_CLONES(double)
#undef FASTCNN_DEFINE_CLONES

FASTCNN_SIMD_CLONES void load_tile_flat(const float* const* planes, int64_t count, int64_t w, int64_t tile_w,
                                        int64_t top, int64_t left, float* tile) {
  planes_to_tile_flat(planes, count, w, tile_w, top, left, tile);
}
FASTCNN_SIMD_CLONES void store_tile_flat(const float* tile, int64_t count, int64_t w, int64_t tile_w, int64_t top,
                                         int64_t left, float* const* planes) {
  tile_to_planes_flat(tile, count, w, tile_w, top, left, planes);
}

// forward_tile for fp32 maps at least 8 wide, written straight into the NCHW planes: 8 adjacent
// outputs of a row are 8 accumulators (8 independent chains), transposed in registers into one
// 8-pixel run per channel. Saves the out_tile round trip and its transposing pass (a sixth of
// the 14x14 forward). The last run of a row overlaps the one before and rewrites equal values.
FASTCNN_SIMD_CLONES void forward_tile_to_planes(const float* tile, const float* taps, const float* bias,
                                                float* const* planes, int64_t lanes, int64_t row_stride,
                                                const PlaneShape& s, int64_t padded_w) {
  using V = Simd<float>::type;
  using U = Simd<float>::unaligned;
  constexpr int L = 8;
  const V b = load(bias);
  for (int64_t oy = 0; oy < s.out_h; ++oy) {
    for (int64_t ox0 = 0; ox0 < s.out_w; ox0 += L) {
      const int64_t ox = std::min(ox0, s.out_w - L);
      V acc[1][L];
      tile_window_sums<float, 1, L>(tile, taps, b, oy, ox, s, padded_w, acc);
      transpose8x8(acc[0]);
      for (int64_t l = 0; l < lanes; ++l) *reinterpret_cast<U*>(planes[l] + oy * row_stride + ox) = acc[0][l];
    }
  }
}

}  // namespace
}  // namespace fastcnn
