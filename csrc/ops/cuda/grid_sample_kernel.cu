// CUDA kernels of the Spatial Transformer sampler (Jaderberg et al., 2015, "Spatial Transformer
// Networks"), 2-D:
//
//   fastcnn::grid_sample(input, grid, ...)              == F.grid_sample(input, grid, ...)
//   fastcnn::affine_grid_sample(input, theta, size, ...) == F.grid_sample(input,
//                                                            F.affine_grid(theta, size, ...), ...)
//   and their backwards (fastcnn::_grid_sample_backward, fastcnn::_affine_grid_sample_backward).
//
// All coordinate and weight arithmetic (affine base grid, unnormalisation, padding rules, the
// non-finite-coordinate rule, bilinear taps and their coordinate derivatives) comes from
// csrc/common/grid_sample_coords.h, shared with the CPU kernel so that its tests exercise this
// arithmetic too. Everything is computed in at::opmath_type<scalar_t> (fp32 for fp16/bf16) and
// cast once on store.
//
// Layouts: NCHW-contiguous and channels_last are both native paths. input and grad_output are
// made contiguous in input.suggest_memory_format() (a no-op when they already are), the grid and
// theta plainly contiguous; output and grad_input follow that format, grad_grid is contiguous
// [N, Ho, Wo, 2] and grad_theta [N, 2, 3], both in the coordinates' dtype. An output not asked for
// in output_mask comes back as an empty tensor.
//
// Forward: one thread per output pixel computes its source coordinate once -- read from the grid,
// or for the affine op from theta in registers (affine_base_coord x theta rows; the N x Ho x Wo x 2
// grid never exists) -- then loops over the channels: NCHW one channel at a time (consecutive
// threads write consecutive pixels of a plane), channels_last with a block of lanes per pixel
// that each load 16-byte vectors of channels when C and the pointers allow it.
//
// Backward, coordinate gradient: one thread per output pixel sums over the channels
// g * d(sample)/d(x, y) and multiplies by d(pixel)/d(grid) (the padding rule's slope). grad_grid
// is written per pixel. For theta, the per-pixel gradients times [bx, by, 1] are reduced per image
// deterministically: each block covers a fixed chunk of one image's pixels and reduces its six
// partial sums in a fixed order (warp shuffles, then warps in order); a second kernel sums the
// chunks of each image in order. The chunking depends only on the shapes: no float atomics.
//
// Backward, grad_input (a scatter: several output pixels read the same input pixel). Two paths,
// chosen by at::globalContext().deterministicAlgorithms():
//   (a) default: the coordinate-gradient kernel also atomically adds weight * g into grad_input
//       (atomicAdd on float/double; fp16/bf16 accumulate into an fp32 scratch tensor of the same
//       layout that is cast once at the end -- more accurate than PyTorch's half atomics).
//   (b) deterministic: bitwise reproducible. A kernel records, for every (output pixel, tap) entry
//       e = pixel * taps + tap, the flat input-pixel key n*Hi*Wi + y*Wi + x (or a sentinel past
//       the end when the tap is out of bounds) and the tap weight. A stable sort of the keys
//       (at::sort(stable=true), a radix sort) groups the entries of each input pixel in
//       ascending e; a kernel marks where each key's run starts and ends; a gather kernel then
//       writes every grad_input element exactly once: the sum over its run, in sorted order, of
//       weight * grad_output. In-bounds taps of weight zero are kept, so a non-finite grad_output
//       propagates as it does through the atomic path and PyTorch.
//       FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC picks one of two variants, not the default until
//       measured on a GPU, both bitwise equal to this path (the same sums in the same order):
//       =sort32: keys, entry indices and run bounds are int32 when they fit, and the radix sort
//       runs over the key bits in use only (ceil(log2(N*Hi*Wi + 1)): 16 for 64x1x28x28, against
//       64 for at::sort's int64 keys).
//       =gather (affine op, zeros padding): no sort; one thread per input pixel inverts the map
//       to find the output pixels that reach it (grid_sample_affine_gather.h).
// PyTorch's own CUDA grid_sampler_2d_backward always uses atomics (and raises in deterministic
// mode); this kernel honours torch.use_deterministic_algorithms(True) instead.
//
// Non-finite coordinates (NaN, +-Inf, beyond int32) follow grid_sample_coords.h: they leave
// source_index as -100, outside the input for every tap, so they sample zero padding and
// contribute no gradient; no NaN ever reaches an integer cast.
//
// Index arithmetic is int64 throughout except the decomposition of a flat pixel index into
// (n, y, x), which uses 32-bit division when the pixel count fits.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/cub.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/grid_sample_checks.h"
#include "common/grid_sample_coords.h"
#include "ops/cuda/grid_sample_affine_gather.h"

namespace fastcnn {
namespace {

namespace gs = grid_sample;

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks
constexpr int kWarps = kThreads / 32;
// Backward of the affine op: output pixels per block, all from one image (4 per thread).
constexpr int64_t kChunkPixels = kThreads * 4;
// Grid-stride kernels launch at most this many blocks.
constexpr int64_t kMaxBlocks = int64_t{1} << 24;

struct Geom {
  int64_t N, C, Hi, Wi, Ho, Wo;
  gs::Padding padding;
  bool nearest;
  bool align_corners;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Vec<scalar_t, VEC> load_vec(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, VEC>*>(p);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0; the order of additions is fixed
}

// Flat index over [A, H, W] -> (a, y, x); 32-bit division when `small` (index < 2^31).
__device__ __forceinline__ void split3(int64_t i, int64_t H, int64_t W, bool small, int64_t& a, int64_t& y,
                                       int64_t& x) {
  if (small) {
    const uint32_t q = static_cast<uint32_t>(i), w = static_cast<uint32_t>(W), h = static_cast<uint32_t>(H);
    const uint32_t t = q / w;
    x = static_cast<int64_t>(q - t * w);
    const uint32_t a32 = t / h;
    y = static_cast<int64_t>(t - a32 * h);
    a = static_cast<int64_t>(a32);
  } else {
    const int64_t t = i / W;
    x = i - t * W;
    a = t / H;
    y = t - a * H;
  }
}

// Source position of output pixel (n, oy, ox): pixel coordinates after the padding rule, their
// derivatives with respect to the normalised grid coordinates, and (affine) the base coordinates.
template <typename acc_t>
struct Source {
  acc_t x, y;    // pixel coordinates, safe (finite, within int32) or -100
  acc_t mx, my;  // d(x)/d(grid x), d(y)/d(grid y)
  acc_t bx, by;  // affine base grid coordinates (affine op only)
};

template <typename scalar_t, bool kAffine>
__device__ __forceinline__ Source<at::opmath_type<scalar_t>> source_of(
    const scalar_t* __restrict__ coords, const Geom& g, int64_t n, int64_t oy, int64_t ox, int64_t p) {
  using acc_t = at::opmath_type<scalar_t>;
  Source<acc_t> s;
  acc_t gx, gy;
  if constexpr (kAffine) {
    const scalar_t* th = coords + n * 6;
    s.bx = gs::affine_base_coord<acc_t>(ox, g.Wo, g.align_corners);
    s.by = gs::affine_base_coord<acc_t>(oy, g.Ho, g.align_corners);
    gx = static_cast<acc_t>(th[0]) * s.bx + static_cast<acc_t>(th[1]) * s.by + static_cast<acc_t>(th[2]);
    gy = static_cast<acc_t>(th[3]) * s.bx + static_cast<acc_t>(th[4]) * s.by + static_cast<acc_t>(th[5]);
  } else {
    s.bx = acc_t(0);
    s.by = acc_t(0);
    gx = static_cast<acc_t>(coords[2 * p]);
    gy = static_cast<acc_t>(coords[2 * p + 1]);
  }
  s.x = gs::source_index(gx, g.Wi, g.padding, g.align_corners, &s.mx);
  s.y = gs::source_index(gy, g.Hi, g.padding, g.align_corners, &s.my);
  return s;
}

// The four bilinear taps (nw, ne, sw, se) as in-image pixel offsets y*Wi + x, in-bounds flags and
// weights.
template <typename acc_t>
struct Bilinear {
  gs::BilinearTaps<acc_t> t;
  int64_t off[4];
  bool ok[4];
  acc_t w[4];
};

template <typename acc_t>
__device__ __forceinline__ Bilinear<acc_t> bilinear_of(acc_t x, acc_t y, const Geom& g) {
  Bilinear<acc_t> b;
  b.t = gs::bilinear_taps(x, y);
  const int64_t x0 = b.t.x0, y0 = b.t.y0;
  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  b.w[0] = b.t.nw();
  b.w[1] = b.t.ne();
  b.w[2] = b.t.sw();
  b.w[3] = b.t.se();
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    b.ok[k] = gs::in_bounds(xs[k], ys[k], g.Wi, g.Hi);
    b.off[k] = b.ok[k] ? ys[k] * g.Wi + xs[k] : 0;
  }
  return b;
}

struct NearestTap {
  int64_t off;
  bool ok;
};

template <typename acc_t>
__device__ __forceinline__ NearestTap nearest_of(acc_t x, acc_t y, const Geom& g) {
  const int64_t xi = gs::nearest_index(x), yi = gs::nearest_index(y);
  NearestTap t;
  t.ok = gs::in_bounds(xi, yi, g.Wi, g.Hi);
  t.off = t.ok ? yi * g.Wi + xi : 0;
  return t;
}

// ------------------------------------------------------------------------------------------------
// Forward.
// ------------------------------------------------------------------------------------------------

// NCHW: thread per output pixel p = (n, oy, ox), loop over channels.
template <typename scalar_t, bool kAffine>
__global__ void __launch_bounds__(kThreads) gs_forward_nchw(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ coords, scalar_t* __restrict__ out, const Geom g,
    const bool small) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.N * g.Ho * g.Wo;
  const int64_t in_plane = g.Hi * g.Wi, out_plane = g.Ho * g.Wo;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += step) {
    int64_t n, oy, ox;
    split3(p, g.Ho, g.Wo, small, n, oy, ox);
    const Source<acc_t> s = source_of<scalar_t, kAffine>(coords, g, n, oy, ox, p);
    const scalar_t* src = in + n * g.C * in_plane;
    scalar_t* dst = out + n * g.C * out_plane + (oy * g.Wo + ox);
    if (g.nearest) {
      const NearestTap t = nearest_of(s.x, s.y, g);
      for (int64_t c = 0; c < g.C; ++c) {
        dst[c * out_plane] = t.ok ? src[c * in_plane + t.off] : static_cast<scalar_t>(acc_t(0));
      }
    } else {
      const Bilinear<acc_t> b = bilinear_of(s.x, s.y, g);
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* plane = src + c * in_plane;
        acc_t acc = acc_t(0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (b.ok[k]) acc += static_cast<acc_t>(plane[b.off[k]]) * b.w[k];
        }
        dst[c * out_plane] = static_cast<scalar_t>(acc);
      }
    }
  }
}

// channels_last: block (tx, ty); threadIdx.y picks the pixel, the tx lanes of a pixel split its
// channels in vectors of VEC (VEC > 1 only when C % VEC == 0 and the pointers are 16-byte aligned).
template <typename scalar_t, bool kAffine, int VEC>
__global__ void __launch_bounds__(kThreads) gs_forward_cl(
    const scalar_t* __restrict__ in, const scalar_t* __restrict__ coords, scalar_t* __restrict__ out, const Geom g,
    const bool small) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.N * g.Ho * g.Wo;
  const int64_t C = g.C;
  const int64_t c_step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.y) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; p < P; p += step) {
    int64_t n, oy, ox;
    split3(p, g.Ho, g.Wo, small, n, oy, ox);
    const Source<acc_t> s = source_of<scalar_t, kAffine>(coords, g, n, oy, ox, p);
    const scalar_t* src = in + n * g.Hi * g.Wi * C;
    scalar_t* dst = out + p * C;
    if (g.nearest) {
      const NearestTap t = nearest_of(s.x, s.y, g);
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < C; c += c_step) {
        Vec<scalar_t, VEC> v;
        if (t.ok) {
          v = load_vec<VEC>(src + t.off * C + c);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) v.v[j] = static_cast<scalar_t>(acc_t(0));
        }
        *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + c) = v;
      }
    } else {
      const Bilinear<acc_t> b = bilinear_of(s.x, s.y, g);
      for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < C; c += c_step) {
        acc_t acc[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (b.ok[k]) {
            const Vec<scalar_t, VEC> v = load_vec<VEC>(src + b.off[k] * C + c);
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += static_cast<acc_t>(v.v[j]) * b.w[k];
          }
        }
        Vec<scalar_t, VEC> y;
#pragma unroll
        for (int j = 0; j < VEC; ++j) y.v[j] = static_cast<scalar_t>(acc[j]);
        *reinterpret_cast<Vec<scalar_t, VEC>*>(dst + c) = y;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: coordinate gradient (+ atomic grad_input) per output pixel.
// ------------------------------------------------------------------------------------------------

// One output pixel (n, oy, ox) = flat p (s = oy*Wo + ox within the image). Returns the gradient
// with respect to the normalised grid coordinates in (*ggx, *ggy) when need_coord, and adds
// weight * g into gin (the atomic grad_input target, in the input's layout) when gin != nullptr.
template <typename scalar_t, bool kAffine, bool kCL, int VEC>
__device__ __forceinline__ Source<at::opmath_type<scalar_t>> backward_pixel(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ in, const scalar_t* __restrict__ coords,
    at::opmath_type<scalar_t>* gin, const Geom& g, int64_t n, int64_t oy, int64_t ox, int64_t p, bool need_coord,
    at::opmath_type<scalar_t>* ggx, at::opmath_type<scalar_t>* ggy) {
  using acc_t = at::opmath_type<scalar_t>;
  const Source<acc_t> s = source_of<scalar_t, kAffine>(coords, g, n, oy, ox, p);
  const int64_t C = g.C;
  const int64_t in_plane = g.Hi * g.Wi, out_plane = g.Ho * g.Wo;
  const int64_t so = oy * g.Wo + ox;
  acc_t gx = acc_t(0), gy = acc_t(0);  // d(loss)/d(pixel coordinate), summed over channels
  if (g.nearest) {
    // The coordinate gradient of a nearest sample is zero; only grad_input flows.
    if (gin != nullptr) {
      const NearestTap t = nearest_of(s.x, s.y, g);
      if (t.ok) {
        if constexpr (kCL) {
          const scalar_t* gop = go + p * C;
          acc_t* gip = gin + (n * in_plane + t.off) * C;
          for (int64_t c = 0; c < C; ++c) atomicAdd(gip + c, static_cast<acc_t>(gop[c]));
        } else {
          const scalar_t* gop = go + n * C * out_plane + so;
          acc_t* gip = gin + n * C * in_plane + t.off;
          for (int64_t c = 0; c < C; ++c) atomicAdd(gip + c * in_plane, static_cast<acc_t>(gop[c * out_plane]));
        }
      }
    }
  } else {
    const Bilinear<acc_t> b = bilinear_of(s.x, s.y, g);
    if constexpr (kCL) {
      const scalar_t* gop = go + p * C;
      const scalar_t* inp = in + n * in_plane * C;
      acc_t* gip = gin != nullptr ? gin + n * in_plane * C : nullptr;
      for (int64_t c = 0; c < C; c += VEC) {
        const Vec<scalar_t, VEC> gv = load_vec<VEC>(gop + c);
        if (gip != nullptr) {
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (b.ok[k]) {
#pragma unroll
              for (int j = 0; j < VEC; ++j)
                atomicAdd(gip + b.off[k] * C + c + j, b.w[k] * static_cast<acc_t>(gv.v[j]));
            }
          }
        }
        if (need_coord) {
          Vec<scalar_t, VEC> tv[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (b.ok[k]) {
              tv[k] = load_vec<VEC>(inp + b.off[k] * C + c);
            } else {
#pragma unroll
              for (int j = 0; j < VEC; ++j) tv[k].v[j] = static_cast<scalar_t>(acc_t(0));
            }
          }
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            acc_t dx, dy;
            gs::bilinear_coordinate_grad(b.t, static_cast<acc_t>(tv[0].v[j]), static_cast<acc_t>(tv[1].v[j]),
                                         static_cast<acc_t>(tv[2].v[j]), static_cast<acc_t>(tv[3].v[j]), &dx, &dy);
            const acc_t gval = static_cast<acc_t>(gv.v[j]);
            gx += gval * dx;
            gy += gval * dy;
          }
        }
      }
    } else {
      const scalar_t* gop = go + n * C * out_plane + so;
      const scalar_t* inp = in + n * C * in_plane;
      acc_t* gip = gin != nullptr ? gin + n * C * in_plane : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t gval = static_cast<acc_t>(gop[c * out_plane]);
        if (gip != nullptr) {
          acc_t* plane = gip + c * in_plane;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (b.ok[k]) atomicAdd(plane + b.off[k], b.w[k] * gval);
          }
        }
        if (need_coord) {
          const scalar_t* plane = inp + c * in_plane;
          acc_t v[4];
#pragma unroll
          for (int k = 0; k < 4; ++k) v[k] = b.ok[k] ? static_cast<acc_t>(plane[b.off[k]]) : acc_t(0);
          acc_t dx, dy;
          gs::bilinear_coordinate_grad(b.t, v[0], v[1], v[2], v[3], &dx, &dy);
          gx += gval * dx;
          gy += gval * dy;
        }
      }
    }
  }
  *ggx = gx * s.mx;
  *ggy = gy * s.my;
  return s;
}

// grid_sample: flat grid-stride loop over output pixels; grad_grid may be nullptr (grad_input only).
template <typename scalar_t, bool kCL, int VEC>
__global__ void __launch_bounds__(kThreads) gs_backward_grid(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ in, const scalar_t* __restrict__ grid,
    scalar_t* __restrict__ grad_grid, at::opmath_type<scalar_t>* gin, const Geom g, const bool small) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.N * g.Ho * g.Wo;
  const bool need_coord = grad_grid != nullptr;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += step) {
    int64_t n, oy, ox;
    split3(p, g.Ho, g.Wo, small, n, oy, ox);
    acc_t ggx, ggy;
    backward_pixel<scalar_t, false, kCL, VEC>(go, in, grid, gin, g, n, oy, ox, p, need_coord, &ggx, &ggy);
    if (need_coord) {
      grad_grid[2 * p] = static_cast<scalar_t>(ggx);
      grad_grid[2 * p + 1] = static_cast<scalar_t>(ggy);
    }
  }
}

// affine_grid_sample: block b covers pixels [chunk * kChunkPixels, (chunk + 1) * kChunkPixels) of
// image n = b / chunks; with theta_partial, the block's sums of ggx * [bx, by, 1] and
// ggy * [bx, by, 1] go to theta_partial[b * 6 .. b * 6 + 5] (fixed-order block reduction).
// Launched with exactly kThreads threads.
template <typename scalar_t, bool kCL, int VEC>
__global__ void __launch_bounds__(kThreads) gs_backward_affine(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ in, const scalar_t* __restrict__ theta,
    at::opmath_type<scalar_t>* __restrict__ theta_partial, at::opmath_type<scalar_t>* gin, const Geom g,
    const int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t warp_sums[kWarps][6];
  const bool need_coord = theta_partial != nullptr;  // uniform over the block
  const int64_t b = blockIdx.x;
  const int64_t n = b / chunks;
  const int64_t chunk = b - n * chunks;
  const int64_t HW = g.Ho * g.Wo;
  const int64_t begin = chunk * kChunkPixels;
  const int64_t end = begin + kChunkPixels < HW ? begin + kChunkPixels : HW;
  acc_t sums[6];
#pragma unroll
  for (int j = 0; j < 6; ++j) sums[j] = acc_t(0);
  for (int64_t so = begin + threadIdx.x; so < end; so += kThreads) {
    const int64_t oy = so / g.Wo, ox = so - oy * g.Wo;
    acc_t ggx, ggy;
    const Source<acc_t> s = backward_pixel<scalar_t, true, kCL, VEC>(
        go, in, theta, gin, g, n, oy, ox, n * HW + so, need_coord, &ggx, &ggy);
    if (need_coord) {
      sums[0] += ggx * s.bx;
      sums[1] += ggx * s.by;
      sums[2] += ggx;
      sums[3] += ggy * s.bx;
      sums[4] += ggy * s.by;
      sums[5] += ggy;
    }
  }
  if (!need_coord) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < 6; ++j) sums[j] = warp_sum(sums[j]);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < 6; ++j) warp_sums[warp][j] = sums[j];
  }
  __syncthreads();
  if (threadIdx.x < 6) {
    acc_t acc = acc_t(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) acc += warp_sums[w][threadIdx.x];
    theta_partial[b * 6 + threadIdx.x] = acc;
  }
}

// grad_theta[n, j / 3, j % 3] = sum over the image's chunks, in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gs_theta_finish(
    const at::opmath_type<scalar_t>* __restrict__ partial, scalar_t* __restrict__ grad_theta, const int64_t N,
    const int64_t chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * 6;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t n = i / 6, j = i - n * 6;
    const acc_t* src = partial + n * chunks * 6 + j;
    acc_t acc = acc_t(0);
    for (int64_t k = 0; k < chunks; ++k) acc += src[k * 6];
    grad_theta[i] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: deterministic grad_input (record taps, stable sort, run bounds, ordered gather).
// ------------------------------------------------------------------------------------------------

// Entry e = p * taps + k (taps = 4 bilinear, 1 nearest): keys[e] = n*Hi*Wi + y*Wi + x of tap k of
// output pixel p, or `sentinel` (= N*Hi*Wi, last in its run of images: see sort_entries) when out
// of bounds; weights[e] its weight; entries[e] = e when `entries` is given (the values the int32
// radix sort permutes; at::sort makes its own).
template <typename scalar_t, bool kAffine, typename key_t>
__global__ void __launch_bounds__(kThreads) gs_record_taps(
    const scalar_t* __restrict__ coords, key_t* __restrict__ keys, key_t* __restrict__ entries,
    at::opmath_type<scalar_t>* __restrict__ weights, const Geom g, const bool small) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t P = g.N * g.Ho * g.Wo;
  const int64_t in_plane = g.Hi * g.Wi;
  const int64_t sentinel = g.N * in_plane;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P; p += step) {
    int64_t n, oy, ox;
    split3(p, g.Ho, g.Wo, small, n, oy, ox);
    const Source<acc_t> s = source_of<scalar_t, kAffine>(coords, g, n, oy, ox, p);
    if (g.nearest) {
      const NearestTap t = nearest_of(s.x, s.y, g);
      keys[p] = static_cast<key_t>(t.ok ? n * in_plane + t.off : sentinel);
      weights[p] = acc_t(1);
      if (entries != nullptr) entries[p] = static_cast<key_t>(p);
    } else {
      const Bilinear<acc_t> b = bilinear_of(s.x, s.y, g);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        keys[4 * p + k] = static_cast<key_t>(b.ok[k] ? n * in_plane + b.off[k] : sentinel);
        weights[4 * p + k] = b.w[k];
        if (entries != nullptr) entries[4 * p + k] = static_cast<key_t>(4 * p + k);
      }
    }
  }
}

// start[key] / end[key]: the run of `key` in the sorted keys is [start, end). Both arrays are
// zero-initialised, so a pixel no tap reaches has an empty run. Each element is written by one
// thread at most.
template <typename key_t>
__global__ void __launch_bounds__(kThreads) gs_run_bounds(
    const key_t* __restrict__ sorted, const int64_t M, const int64_t num_keys, key_t* __restrict__ start,
    key_t* __restrict__ end) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M; i += step) {
    const int64_t key = sorted[i];
    if (!(key >= 0 && key < num_keys)) continue;
    if (i == 0 || sorted[i - 1] != key) start[key] = static_cast<key_t>(i);
    if (i == M - 1 || sorted[i + 1] != key) end[key] = static_cast<key_t>(i + 1);
  }
}

// NCHW: thread per grad_input element (n, c, y, x); sums its run in sorted order.
template <typename scalar_t, typename key_t>
__global__ void __launch_bounds__(kThreads) gs_gather_nchw(
    const scalar_t* __restrict__ go, const key_t* __restrict__ perm, const at::opmath_type<scalar_t>* __restrict__ weights,
    const key_t* __restrict__ start, const key_t* __restrict__ end, scalar_t* __restrict__ grad_in, const Geom g,
    const int tap_shift, const bool small) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t in_plane = g.Hi * g.Wi, out_plane = g.Ho * g.Wo;
  const int64_t total = g.N * g.C * in_plane;
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t n, c, sp;
    split3(i, g.C, in_plane, small, n, c, sp);
    const int64_t q = n * in_plane + sp;
    const scalar_t* gop = go + (n * g.C + c) * out_plane;
    const int64_t p0 = n * out_plane;  // first output pixel of image n
    acc_t acc = acc_t(0);
    const int64_t r_end = end[q];
    for (int64_t r = start[q]; r < r_end; ++r) {
      const int64_t e = perm[r];
      const int64_t p = e >> tap_shift;
      acc += weights[e] * static_cast<acc_t>(gop[p - p0]);
    }
    grad_in[i] = static_cast<scalar_t>(acc);
  }
}

// channels_last: block (tx, ty); threadIdx.y picks the input pixel q, the lanes split its channels.
template <typename scalar_t, int VEC, typename key_t>
__global__ void __launch_bounds__(kThreads) gs_gather_cl(
    const scalar_t* __restrict__ go, const key_t* __restrict__ perm, const at::opmath_type<scalar_t>* __restrict__ weights,
    const key_t* __restrict__ start, const key_t* __restrict__ end, scalar_t* __restrict__ grad_in, const Geom g,
    const int tap_shift) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = g.N * g.Hi * g.Wi;
  const int64_t C = g.C;
  const int64_t c_step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t step = static_cast<int64_t>(blockDim.y) * gridDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; q < Q; q += step) {
    const int64_t r_begin = start[q], r_end = end[q];
    for (int64_t c = static_cast<int64_t>(threadIdx.x) * VEC; c < C; c += c_step) {
      acc_t acc[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t e = perm[r];
        const int64_t p = e >> tap_shift;
        const acc_t w = weights[e];
        const Vec<scalar_t, VEC> v = load_vec<VEC>(go + p * C + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += w * static_cast<acc_t>(v.v[j]);
      }
      Vec<scalar_t, VEC> y;
#pragma unroll
      for (int j = 0; j < VEC; ++j) y.v[j] = static_cast<scalar_t>(acc[j]);
      *reinterpret_cast<Vec<scalar_t, VEC>*>(grad_in + q * C + c) = y;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launchers.
// ------------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline unsigned int blocks_for(int64_t units, int64_t per_block) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(ceil_div(units, per_block), kMaxBlocks)));
}

inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x && p < (1 << 30)) p <<= 1;
  return p;
}

inline bool fits_int32(int64_t n) {
  return n <= std::numeric_limits<int32_t>::max();
}

// Vector width for channels_last: 16 bytes of channels when C allows and every pointer is
// 16-byte aligned; otherwise 1.
template <typename scalar_t>
int channel_vector(int64_t C, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
  if (C % kVec != 0) return 1;
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return kVec;
}

// Block (tx, ty) for the channels_last kernels: tx lanes per pixel (a power of two up to 32
// covering the channel vectors), ty = kThreads / tx pixels per block.
struct ClShape {
  dim3 block;
  unsigned int grid;
};

inline ClShape cl_shape(int64_t C, int vec, int64_t pixels) {
  const int64_t vectors = std::max<int64_t>(1, ceil_div(C, vec));
  const int tx = std::min(32, next_pow2(vectors));
  const int ty = kThreads / tx;
  return ClShape{dim3(static_cast<unsigned int>(tx), static_cast<unsigned int>(ty)), blocks_for(pixels, ty)};
}

template <typename scalar_t, bool kAffine>
void launch_forward(const at::Tensor& x, const at::Tensor& coords, at::Tensor& out, const Geom& g, bool channels_last,
                    cudaStream_t stream) {
  const int64_t P = g.N * g.Ho * g.Wo;
  const bool small = fits_int32(P);
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const scalar_t* cs = coords.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  if (!channels_last) {
    gs_forward_nchw<scalar_t, kAffine><<<blocks_for(P, kThreads), kThreads, 0, stream>>>(in, cs, o, g, small);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
  const int vec = channel_vector<scalar_t>(g.C, {in, o});
  const ClShape shape = cl_shape(g.C, vec, P);
  if (vec == kVec) {
    gs_forward_cl<scalar_t, kAffine, kVec><<<shape.grid, shape.block, 0, stream>>>(in, cs, o, g, small);
  } else {
    gs_forward_cl<scalar_t, kAffine, 1><<<shape.grid, shape.block, 0, stream>>>(in, cs, o, g, small);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Coordinate gradient and/or atomic grad_input. grad_coords: grad_grid or grad_theta, undefined
// when not wanted; gin: the atomic grad_input target or nullptr.
template <typename scalar_t, bool kAffine, bool kCL, int VEC>
void launch_backward_pixels(const at::Tensor& go, const at::Tensor& x, const at::Tensor& coords,
                            at::Tensor& grad_coords, at::opmath_type<scalar_t>* gin, const Geom& g,
                            cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gop = go.const_data_ptr<scalar_t>();
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  const scalar_t* cs = coords.const_data_ptr<scalar_t>();
  if constexpr (!kAffine) {
    const int64_t P = g.N * g.Ho * g.Wo;
    scalar_t* gg = grad_coords.defined() ? grad_coords.mutable_data_ptr<scalar_t>() : nullptr;
    gs_backward_grid<scalar_t, kCL, VEC>
        <<<blocks_for(P, kThreads), kThreads, 0, stream>>>(gop, in, cs, gg, gin, g, fits_int32(P));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t chunks = ceil_div(g.Ho * g.Wo, kChunkPixels);
    const int64_t blocks = g.N * chunks;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
                "fastcnn::_affine_grid_sample_backward: too many output pixels (", g.N, " x ", g.Ho, " x ", g.Wo,
                ")");
    at::Tensor partial;
    acc_t* part = nullptr;
    if (grad_coords.defined()) {
      partial = at::empty({blocks * 6}, go.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      part = partial.mutable_data_ptr<acc_t>();
    }
    gs_backward_affine<scalar_t, kCL, VEC>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(gop, in, cs, part, gin, g, chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (grad_coords.defined()) {
      gs_theta_finish<scalar_t><<<blocks_for(g.N * 6, kThreads), kThreads, 0, stream>>>(
          part, grad_coords.mutable_data_ptr<scalar_t>(), g.N, chunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// torch.sort takes at most INT_MAX elements on CUDA (pytorch/pytorch#197470). The entries of
// image n are contiguous and their keys (its pixels) lie above every earlier image's, so sorting
// runs of whole images in place is the same sort, sentinels aside (one per run, at its end;
// gs_run_bounds skips them). FASTCNN_MAX_SORT_ENTRIES (read per call) lowers the run length for
// tests.
int64_t sort_limit() {
  int64_t limit = std::numeric_limits<int32_t>::max();
  if (const char* value = std::getenv("FASTCNN_MAX_SORT_ENTRIES")) limit = std::max<int64_t>(1, std::atoll(value));
  return limit;
}

std::tuple<at::Tensor, at::Tensor> sort_entries(const at::Tensor& keys, int64_t per_image) {
  const int64_t limit = sort_limit();
  const int64_t total = keys.numel();
  if (total <= limit) return at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  TORCH_CHECK(per_image <= limit, "grid_sample: the deterministic backward sorts ", per_image,
              " entries for one image, more than torch.sort takes (", limit,
              "); use the default backward (no torch.use_deterministic_algorithms) or a smaller output");
  at::Tensor sorted = at::empty_like(keys), perm = at::empty({total}, keys.options().dtype(at::kLong));
  const int64_t step = limit / per_image * per_image;
  for (int64_t lo = 0; lo < total; lo += step) {
    const int64_t hi = std::min(total, lo + step);
    at::Tensor run_sorted = sorted.slice(0, lo, hi), run_perm = perm.slice(0, lo, hi);
    at::sort_out(run_sorted, run_perm, keys.slice(0, lo, hi), /*stable=*/true, /*dim=*/0, /*descending=*/false);
    run_perm.add_(lo);
  }
  return {sorted, perm};
}

// FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC (see the note at the top); read per call so that tests
// and benchmarks switch it in process.
bool deterministic_variant_is(const char* name) {
  const char* value = std::getenv("FASTCNN_CUDA_GRID_SAMPLE_DETERMINISTIC");
  return value != nullptr && std::strcmp(value, name) == 0;
}

// Bits that hold every key 0..max_key (max_key = the sentinel).
int64_t key_bits(int64_t max_key) {
  int64_t bits = 1;
  while (bits < 63 && (max_key >> bits) != 0) ++bits;
  return bits;
}

template <typename scalar_t, bool kAffine, typename key_t>
void deterministic_grad_input(const at::Tensor& go, const at::Tensor& coords, at::Tensor& grad_input, const Geom& g,
                              bool channels_last, cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kNarrow = std::is_same_v<key_t, int32_t>;
  const int64_t P = g.N * g.Ho * g.Wo;
  const int tap_shift = g.nearest ? 0 : 2;
  const int64_t M = P << tap_shift;
  const int64_t num_keys = g.N * g.Hi * g.Wi;
  const auto key_opts = go.options().dtype(kNarrow ? at::kInt : at::kLong);
  at::Tensor keys = at::empty({M}, key_opts);
  at::Tensor entries = kNarrow ? at::empty({M}, key_opts) : at::Tensor();
  at::Tensor weights = at::empty({M}, go.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  gs_record_taps<scalar_t, kAffine, key_t><<<blocks_for(P, kThreads), kThreads, 0, stream>>>(
      coords.const_data_ptr<scalar_t>(), keys.mutable_data_ptr<key_t>(),
      kNarrow ? entries.mutable_data_ptr<key_t>() : nullptr, weights.mutable_data_ptr<acc_t>(), g, fits_int32(P));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Stable: equal keys keep ascending entry order, so every run is summed in a fixed order.
  at::Tensor sorted, perm;
  if constexpr (kNarrow) {
    sorted = at::empty({M}, key_opts);
    perm = at::empty({M}, key_opts);
    at::cuda::cub::radix_sort_pairs<int32_t, int32_t>(
        keys.const_data_ptr<int32_t>(), sorted.mutable_data_ptr<int32_t>(), entries.const_data_ptr<int32_t>(),
        perm.mutable_data_ptr<int32_t>(), M, /*descending=*/false, /*begin_bit=*/0, key_bits(num_keys));
    entries = at::Tensor();
  } else {
    std::tie(sorted, perm) = sort_entries(keys, g.N > 0 ? M / g.N : M);
  }
  keys = at::Tensor();

  at::Tensor start = at::zeros({num_keys}, key_opts);
  at::Tensor end = at::zeros({num_keys}, key_opts);
  gs_run_bounds<key_t><<<blocks_for(M, kThreads), kThreads, 0, stream>>>(
      sorted.const_data_ptr<key_t>(), M, num_keys, start.mutable_data_ptr<key_t>(), end.mutable_data_ptr<key_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const scalar_t* gop = go.const_data_ptr<scalar_t>();
  const key_t* pp = perm.const_data_ptr<key_t>();
  const acc_t* wp = weights.const_data_ptr<acc_t>();
  const key_t* sp = start.const_data_ptr<key_t>();
  const key_t* ep = end.const_data_ptr<key_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  if (!channels_last) {
    const int64_t total = g.N * g.C * g.Hi * g.Wi;
    gs_gather_nchw<scalar_t, key_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        gop, pp, wp, sp, ep, gi, g, tap_shift, fits_int32(total));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
  const int vec = channel_vector<scalar_t>(g.C, {gop, gi});
  const ClShape shape = cl_shape(g.C, vec, num_keys);
  if (vec == kVec) {
    gs_gather_cl<scalar_t, kVec, key_t><<<shape.grid, shape.block, 0, stream>>>(gop, pp, wp, sp, ep, gi, g, tap_shift);
  } else {
    gs_gather_cl<scalar_t, 1, key_t><<<shape.grid, shape.block, 0, stream>>>(gop, pp, wp, sp, ep, gi, g, tap_shift);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void __launch_bounds__(gs::affine_gather::kThreads) gs_affine_gather_grad_input(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ theta, scalar_t* __restrict__ grad_in,
    const gs::affine_gather::Geom g) {
  gs::affine_gather::grad_input_thread<scalar_t>(go, theta, grad_in, g,
                                                 static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                                 static_cast<int64_t>(blockDim.x) * gridDim.x);
}

template <typename scalar_t, bool kAffine>
void launch_deterministic_grad_input(const at::Tensor& go, const at::Tensor& coords, at::Tensor& grad_input,
                                     const Geom& g, bool channels_last, cudaStream_t stream) {
  if (deterministic_variant_is("gather") && gs::affine_gather::supports(kAffine, g.padding)) {
    const gs::affine_gather::Geom ag{g.N, g.C, g.Hi, g.Wi, g.Ho, g.Wo, g.nearest, g.align_corners, channels_last};
    gs_affine_gather_grad_input<scalar_t>
        <<<static_cast<unsigned int>(gs::affine_gather::launch_blocks(ag)), gs::affine_gather::kThreads, 0, stream>>>(
            go.const_data_ptr<scalar_t>(), coords.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(),
            ag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t M = (g.N * g.Ho * g.Wo) << (g.nearest ? 0 : 2);
  const bool narrow = deterministic_variant_is("sort32") && M <= sort_limit() && fits_int32(g.N * g.Hi * g.Wi);
  if (narrow) {
    deterministic_grad_input<scalar_t, kAffine, int32_t>(go, coords, grad_input, g, channels_last, stream);
  } else {
    deterministic_grad_input<scalar_t, kAffine, int64_t>(go, coords, grad_input, g, channels_last, stream);
  }
}

// ------------------------------------------------------------------------------------------------
// The registered functions.
// ------------------------------------------------------------------------------------------------

Geom to_geom(const gs::Geometry& c) {
  Geom g;
  g.N = c.batch;
  g.C = c.channels;
  g.Hi = c.in_h;
  g.Wi = c.in_w;
  g.Ho = c.out_h;
  g.Wo = c.out_w;
  g.padding = c.padding;
  g.nearest = c.interpolation == gs::Interpolation::Nearest;
  g.align_corners = c.align_corners;
  return g;
}

void check_cuda(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": expected input to be a CUDA tensor, but got a tensor on ", input.device());
}

template <bool kAffine>
at::Tensor forward(const at::Tensor& input, const at::Tensor& coords, const Geom& g) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  at::Tensor out = at::empty({g.N, g.C, g.Ho, g.Wo}, input.options().memory_format(format));
  if (out.numel() == 0) return out;
  const at::Tensor x = input.contiguous(format);
  const at::Tensor cs = coords.contiguous();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastcnn_grid_sample_cuda", [&] {
    launch_forward<scalar_t, kAffine>(x, cs, out, g, channels_last, stream);
  });
  return out;
}

template <bool kAffine>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                            const at::Tensor& coords, const Geom& g,
                                            std::array<bool, 2> output_mask) {
  c10::cuda::CUDAGuard guard(input.device());
  const auto format = input.suggest_memory_format();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  at::Tensor grad_input = output_mask[0] ? at::empty(input.sizes(), input.options().memory_format(format))
                                         : at::empty({0}, input.options());
  at::Tensor grad_coords = output_mask[1] ? at::empty(coords.sizes(), coords.options()) : at::empty({0}, input.options());
  const bool need_input = output_mask[0] && grad_input.numel() > 0;
  const bool need_coords = output_mask[1] && grad_coords.numel() > 0;
  if (!need_input && !need_coords) return {grad_input, grad_coords};
  if (g.N * g.Ho * g.Wo == 0 || g.C == 0) {
    // No output pixel or no channel: nothing flows anywhere.
    if (need_input) grad_input.zero_();
    if (need_coords) grad_coords.zero_();
    return {grad_input, grad_coords};
  }

  // The coordinate gradient of a nearest sample is zero.
  const bool coord_kernel = need_coords && !g.nearest;
  if (need_coords && g.nearest) grad_coords.zero_();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const bool atomic_input = need_input && !deterministic;
  if (!coord_kernel && !atomic_input && !need_input) return {grad_input, grad_coords};

  const at::Tensor go = grad_output.contiguous(format);  // also materialises expanded gradients
  const at::Tensor cs = coords.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastcnn_grid_sample_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (coord_kernel || atomic_input) {
      const at::Tensor x = input.contiguous(format);
      at::Tensor scratch;  // fp32 atomic target for fp16/bf16
      acc_t* gin = nullptr;
      if (atomic_input) {
        if constexpr (std::is_same<acc_t, scalar_t>::value) {
          grad_input.zero_();
          gin = grad_input.mutable_data_ptr<acc_t>();
        } else {
          // at::zeros would drop the memory format: empty in the input's layout, then zero.
          scratch = at::empty(input.sizes(), input.options()
                                                 .dtype(c10::CppTypeToScalarType<acc_t>::value)
                                                 .memory_format(format));
          scratch.zero_();
          gin = scratch.mutable_data_ptr<acc_t>();
        }
      }
      at::Tensor coord_out = coord_kernel ? grad_coords : at::Tensor();
      if (!channels_last) {
        launch_backward_pixels<scalar_t, kAffine, false, 1>(go, x, cs, coord_out, gin, g, stream);
      } else {
        constexpr int kVec = static_cast<int>(16 / sizeof(scalar_t));
        if (channel_vector<scalar_t>(g.C, {go.const_data_ptr(), x.const_data_ptr()}) == kVec) {
          launch_backward_pixels<scalar_t, kAffine, true, kVec>(go, x, cs, coord_out, gin, g, stream);
        } else {
          launch_backward_pixels<scalar_t, kAffine, true, 1>(go, x, cs, coord_out, gin, g, stream);
        }
      }
      if (scratch.defined()) grad_input.copy_(scratch);
    }
    if (need_input && deterministic) {
      launch_deterministic_grad_input<scalar_t, kAffine>(go, cs, grad_input, g, channels_last, stream);
    }
  });
  return {grad_input, grad_coords};
}

at::Tensor grid_sample_cuda(const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
                            int64_t padding_mode, bool align_corners) {
  check_cuda("fastcnn::grid_sample", input);
  const Geom g = to_geom(gs::check_grid_sample(input, grid, interpolation, padding_mode, align_corners));
  return forward<false>(input, grid, g);
}

at::Tensor affine_grid_sample_cuda(const at::Tensor& input, const at::Tensor& theta, at::IntArrayRef out_size,
                                   int64_t interpolation, int64_t padding_mode, bool align_corners) {
  check_cuda("fastcnn::affine_grid_sample", input);
  TORCH_CHECK(out_size.size() == 2, "affine_grid_sample: out_size must be [H_out, W_out], got ", out_size);
  const Geom g = to_geom(gs::check_affine_grid_sample(input, theta, out_size[0], out_size[1], interpolation,
                                                      padding_mode, align_corners));
  return forward<true>(input, theta, g);
}

std::tuple<at::Tensor, at::Tensor> grid_sample_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& grid, int64_t interpolation,
    int64_t padding_mode, bool align_corners, std::array<bool, 2> output_mask) {
  check_cuda("fastcnn::_grid_sample_backward", input);
  const gs::Geometry checked = gs::check_grid_sample(input, grid, interpolation, padding_mode, align_corners);
  gs::check_grad_output("grid_sample", grad_output, input, checked);
  return backward<false>(grad_output, input, grid, to_geom(checked), output_mask);
}

std::tuple<at::Tensor, at::Tensor> affine_grid_sample_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& theta, int64_t interpolation,
    int64_t padding_mode, bool align_corners, std::array<bool, 2> output_mask) {
  check_cuda("fastcnn::_affine_grid_sample_backward", input);
  TORCH_CHECK(grad_output.dim() == 4, "affine_grid_sample backward: expected grad_output of shape [N, C, H_out, W_out] (4-D), got ",
              grad_output.dim(), "-D tensor of shape ", grad_output.sizes());
  const gs::Geometry checked = gs::check_affine_grid_sample(input, theta, grad_output.size(2), grad_output.size(3),
                                                            interpolation, padding_mode, align_corners);
  gs::check_grad_output("affine_grid_sample", grad_output, input, checked);
  return backward<true>(grad_output, input, theta, to_geom(checked), output_mask);
}

}  // namespace
}  // namespace fastcnn

TORCH_LIBRARY_IMPL(fastcnn, CUDA, m) {
  m.impl("grid_sample", TORCH_FN(fastcnn::grid_sample_cuda));
  m.impl("_grid_sample_backward", TORCH_FN(fastcnn::grid_sample_backward_cuda));
  m.impl("affine_grid_sample", TORCH_FN(fastcnn::affine_grid_sample_cuda));
  m.impl("_affine_grid_sample_backward", TORCH_FN(fastcnn::affine_grid_sample_backward_cuda));
}
