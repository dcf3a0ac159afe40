// Coordinate and weight arithmetic of the Spatial Transformer sampler (Jaderberg et al., 2015),
// with the semantics of F.affine_grid + F.grid_sample (2-D). Shared by the CPU and CUDA kernels so
// the CPU tests exercise the CUDA kernel's arithmetic; the Triton kernels mirror it line by line.
//
// A source coordinate goes: normalised grid value in [-1, 1] -> pixel space (unnormalize) ->
// padding rule (border clips, reflection folds then clips) -> safe_coordinate, which sends NaN,
// Inf and anything outside the int32 range to -100: out of bounds for every tap, so such a
// sample reads as zero padding and no NaN ever reaches an integer cast. Under zeros padding that
// is what PyTorch's CUDA kernel does (safe_downgrade_to_int_range); its vectorised CPU kernel
// returns NaN there instead. Under border padding +-Inf clamps to the edge, as in PyTorch. Where
// PyTorch clamps a NaN (border, reflection) or a reflected Inf onto pixel 0, we sample padding:
// a non-finite coordinate never picks a pixel.
//
// Every range test is written so that a NaN fails it.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace fastcnn {
namespace grid_sample {

// The integer codes of PyTorch's GridSamplerInterpolation and GridSamplerPadding.
enum class Interpolation : int64_t { Bilinear = 0, Nearest = 1 };
enum class Padding : int64_t { Zeros = 0, Border = 1, Reflection = 2 };

// Coordinate of output index i along an axis of `size` samples in F.affine_grid's base grid:
// torch.linspace(-1, 1, size), scaled by (size - 1) / size without align_corners. linspace fills
// the first half from -1 upwards and the second half from +1 downwards; so do we, so that the
// fused kernels see the same floats as the two-op PyTorch path.
template <typename T>
C10_HOST_DEVICE inline T affine_base_coord(int64_t i, int64_t size, bool align_corners) {
  if (size <= 1) return T(0);
  const T step = T(2) / T(size - 1);
  T value = i < size / 2 ? T(-1) + step * T(i) : T(1) - step * T(size - 1 - i);
  if (!align_corners) value = value * T(size - 1) / T(size);
  return value;
}

// Normalised [-1, 1] -> pixel coordinate. With align_corners, -1 and 1 are the centres of the
// edge pixels; without, they are the outer edges of the edge pixels. *scale is d(pixel)/d(grid).
template <typename T>
C10_HOST_DEVICE inline T unnormalize(T coord, int64_t size, bool align_corners, T* scale) {
  if (align_corners) {
    *scale = T(size - 1) / T(2);
    return (coord + T(1)) / T(2) * T(size - 1);
  }
  *scale = T(size) / T(2);
  return ((coord + T(1)) * T(size) - T(1)) / T(2);
}

// Clamp to [0, size - 1]; *grad is 1 inside and 0 where clamped (and for NaN, which the clamp
// passes through for safe_coordinate to catch).
template <typename T>
C10_HOST_DEVICE inline T clip_coordinate(T x, int64_t size, T* grad) {
  const T high = T(size - 1);
  if (x <= T(0)) {
    *grad = T(0);
    return T(0);
  }
  if (x >= high) {
    *grad = T(0);
    return high;
  }
  *grad = T(1);
  return x;
}

// Reflect x into [low, high] where twice_low = 2 * low and twice_high = 2 * high (half-integers
// without align_corners). *grad is +1 or -1: the slope of the fold at x.
template <typename T>
C10_HOST_DEVICE inline T reflect_coordinate(T x, int64_t twice_low, int64_t twice_high, T* grad) {
  if (twice_low == twice_high) {
    *grad = T(0);
    return T(0);
  }
  const T low = T(twice_low) / T(2);
  const T span = T(twice_high - twice_low) / T(2);
  T sign = T(1);
  x = x - low;
  if (x < T(0)) {
    sign = T(-1);
    x = -x;
  }
  // Parity of the number of folds in floating point: an integer cast would overflow for large x.
  const T flips = ::floor(x / span);
  const T extra = ::fmod(x, span);
  if (::fmod(flips, T(2)) == T(0)) {
    *grad = sign;
    return extra + low;
  }
  *grad = -sign;
  return span - extra + low;
}

// NaN, +-Inf and values beyond int32 become -100: outside the input for every tap.
template <typename T>
C10_HOST_DEVICE inline T safe_coordinate(T x) {
  if (!(x > T(-2147483648.0) && x < T(2147483520.0))) return T(-100);
  return x;
}

// Normalised grid coordinate -> pixel coordinate after the padding rule. *grad is
// d(pixel coordinate)/d(grid coordinate) (0 where clipped).
template <typename T>
C10_HOST_DEVICE inline T source_index(T coord, int64_t size, Padding padding, bool align_corners, T* grad) {
  T scale;
  T x = unnormalize(coord, size, align_corners, &scale);
  if (padding == Padding::Border) {
    T clip_grad;
    x = clip_coordinate(x, size, &clip_grad);
    scale *= clip_grad;
  } else if (padding == Padding::Reflection) {
    T reflect_grad, clip_grad;
    if (!(x > T(-2147483648.0) && x < T(2147483520.0))) {
      *grad = T(0);
      return T(-100);
    }
    x = align_corners ? reflect_coordinate(x, 0, 2 * (size - 1), &reflect_grad)
                      : reflect_coordinate(x, -1, 2 * size - 1, &reflect_grad);
    x = clip_coordinate(x, size, &clip_grad);
    scale *= reflect_grad * clip_grad;
  }
  x = safe_coordinate(x);
  *grad = scale;
  return x;
}

C10_HOST_DEVICE inline bool in_bounds(int64_t x, int64_t y, int64_t width, int64_t height) {
  return x >= 0 && x < width && y >= 0 && y < height;
}

// The four taps of a bilinear sample at pixel coordinate (x, y), already passed through
// source_index (so finite and within int32). Weights as PyTorch writes them: nw = (x1 - x)(y1 - y).
template <typename T>
struct BilinearTaps {
  int64_t x0, y0;  // north-west corner; the others are x0 + 1, y0 + 1
  T dx0, dx1;      // x - x0 and x0 + 1 - x
  T dy0, dy1;      // y - y0 and y0 + 1 - y
  C10_HOST_DEVICE T nw() const { return dx1 * dy1; }
  C10_HOST_DEVICE T ne() const { return dx0 * dy1; }
  C10_HOST_DEVICE T sw() const { return dx1 * dy0; }
  C10_HOST_DEVICE T se() const { return dx0 * dy0; }
};

template <typename T>
C10_HOST_DEVICE inline BilinearTaps<T> bilinear_taps(T x, T y) {
  const T fx = ::floor(x), fy = ::floor(y);
  BilinearTaps<T> taps;
  taps.x0 = static_cast<int64_t>(fx);
  taps.y0 = static_cast<int64_t>(fy);
  taps.dx0 = x - fx;
  taps.dx1 = fx + T(1) - x;
  taps.dy0 = y - fy;
  taps.dy1 = fy + T(1) - y;
  return taps;
}

// Nearest pixel, ties to even (std::nearbyint under the default rounding mode), as PyTorch.
template <typename T>
C10_HOST_DEVICE inline int64_t nearest_index(T x) {
  return static_cast<int64_t>(::nearbyint(x));
}

// d(sample)/dx and d(sample)/dy of a bilinear sample from its four tap values (zero for taps
// outside the input).
template <typename T>
C10_HOST_DEVICE inline void bilinear_coordinate_grad(const BilinearTaps<T>& taps, T v_nw, T v_ne, T v_sw, T v_se,
                                                      T* d_dx, T* d_dy) {
  *d_dx = (v_ne - v_nw) * taps.dy1 + (v_se - v_sw) * taps.dy0;
  *d_dy = (v_sw - v_nw) * taps.dx1 + (v_se - v_ne) * taps.dx0;
}

}  // namespace grid_sample
}  // namespace fastcnn
