// Plane and tile buffers of the CPU depthwise convolution: loads and stores between tensors of
// any strides and dtype and the accumulation-type planes and channel-block tiles the kernels read.
// Private to depthwise_conv2d_kernel.cpp, the one translation unit that includes it (everything here
// is in an anonymous namespace).
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "ops/cpu/depthwise_conv2d_vector_kernels.h"

namespace fastcnn {
namespace {

using depthwise::Geometry;

// ---------------------------------------------------------------------------------------------
// Plane loads and stores: any strides, any dtype, converted to/from the accumulation type.

template <typename scalar_t, typename T>
void copy_columns(T* dst, const scalar_t* src, int64_t n, int64_t step) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    gather_strided(dst, src, n, step);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i * step]);
  }
}

// Padded row r, column c of a window is src[r - off_y][c - off_x], zero outside the source plane
// (h x w, strides sh, sw); offsets may be negative (a crop). Rows are stored split into
// `phases` phases as column_offset() describes (phases == 1: plain rows).
template <typename scalar_t, typename T>
void load_window(const scalar_t* src, int64_t h, int64_t w, int64_t sh, int64_t sw, int64_t off_y, int64_t off_x,
                 T* dst, int64_t dst_h, int64_t dst_w, int64_t phases) {
  const int64_t phase_w = (dst_w + phases - 1) / phases, row_stride = phase_w * phases;
  const int64_t c_begin = std::clamp<int64_t>(off_x, 0, dst_w), c_end = std::clamp<int64_t>(off_x + w, 0, dst_w);
  for (int64_t r = 0; r < dst_h; ++r) {
    T* row = dst + r * row_stride;
    const int64_t y = r - off_y;
    if (!(y >= 0 && y < h) || c_begin >= c_end) {
      std::fill(row, row + row_stride, T(0));
      continue;
    }
    const scalar_t* src_row = src + y * sh - off_x * sw;  // src_row[c * sw] is padded column c
    if (phases == 1) {
      // Plain loops: rows of small maps (14, 7 wide) are too short to pay for library calls.
      for (int64_t c = 0; c < c_begin; ++c) row[c] = T(0);
      copy_columns(row + c_begin, src_row + c_begin * sw, c_end - c_begin, sw);
      for (int64_t c = c_end; c < row_stride; ++c) row[c] = T(0);
      continue;
    }
    for (int64_t p = 0; p < phases; ++p) {
      T* phase = row + p * phase_w;
      // phase element i is padded column i * phases + p; [i_begin, i_end) are the source columns
      const int64_t i_begin = std::min(phase_w, std::max<int64_t>(0, (c_begin - p + phases - 1) / phases));
      const int64_t i_end = std::max(i_begin, std::min(phase_w, std::max<int64_t>(0, (c_end - p + phases - 1) / phases)));
      std::fill(phase, phase + i_begin, T(0));
      copy_columns(phase + i_begin, src_row + (i_begin * phases + p) * sw, i_end - i_begin, phases * sw);
      std::fill(phase + i_end, phase + phase_w, T(0));
    }
  }
}

// A dense view of a (h x w) plane in type T: the plane itself when it already is one, else a copy.
template <typename scalar_t, typename T>
const T* dense_plane(const scalar_t* src, int64_t h, int64_t w, int64_t sh, int64_t sw, std::vector<T>& buffer,
                     bool with_slack) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (!with_slack && sw == 1 && sh == w) return src;
  }
  buffer.resize(h * w + (with_slack ? kSlack : 0));
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x) buffer[y * w + x] = static_cast<T>(src[y * sh + x * sw]);
  return buffer.data();
}

template <typename scalar_t, typename T>
void store_plane(const T* src, int64_t h, int64_t w, scalar_t* dst, int64_t sh, int64_t sw, int64_t src_stride,
                 int64_t src_offset) {
  for (int64_t y = 0; y < h; ++y) {
    const T* row = src + src_offset + y * src_stride;
    for (int64_t x = 0; x < w; ++x) dst[y * sh + x * sw] = static_cast<scalar_t>(row[x]);
  }
}

// dst[y][x] = padded row (y + top), padded column (x + left) of a phase-split buffer. Walks the
// destination in order (contiguous stores into the large output), the phase and its index
// advanced by counters rather than divisions.
template <typename scalar_t, typename T>
void store_phased_plane(const T* src, const PlaneShape& s, int64_t top, int64_t left, int64_t h, int64_t w,
                        scalar_t* dst, int64_t sh, int64_t sw) {
  const int64_t phases = s.stride_w;
  for (int64_t y = 0; y < h; ++y) {
    const T* row = src + (y + top) * s.row_stride;
    scalar_t* out = dst + y * sh;
    int64_t phase = left % phases, index = left / phases;
    for (int64_t x = 0; x < w; ++x) {
      out[x * sw] = static_cast<scalar_t>(row[phase * s.phase_w + index]);
      if (++phase == phases) {
        phase = 0;
        ++index;
      }
    }
  }
}

// Channel-block tiles (see forward_tile): tile[(y + top) * tile_w + x + left][l] holds channel l
// of the block. Lanes past `lanes` repeat the last channel, so every lane stays finite.
template <typename scalar_t, typename T>
void load_tile(const scalar_t* block, int64_t channel_stride, int64_t lanes, int64_t h, int64_t w, int64_t sh,
               int64_t sw, int64_t top, int64_t left, int64_t tile_w, T* tile) {
  constexpr int64_t L = Simd<T>::width;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
    if (sw == 1 && sh == w && h * w >= 8) {
      const float* planes[8];
      for (int64_t l = 0; l < 8; ++l) planes[l] = block + std::min(l, lanes - 1) * channel_stride;
      load_tile_flat(planes, h * w, w, tile_w, top, left, tile);
      return;
    }
    if (sw == 1 && w >= 8) {
      for (int64_t y = 0; y < h; ++y) {
        const float* rows[8];
        for (int64_t l = 0; l < 8; ++l) rows[l] = block + std::min(l, lanes - 1) * channel_stride + y * sh;
        load_tile_flat(rows, w, w, tile_w, y + top, left, tile);
      }
      return;
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    const scalar_t* plane = block + std::min(l, lanes - 1) * channel_stride;
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        tile[((y + top) * tile_w + x + left) * L + l] = static_cast<T>(plane[y * sh + x * sw]);
  }
}

template <typename scalar_t, typename T>
void store_tile(const T* tile, int64_t top, int64_t left, int64_t tile_w, int64_t lanes, int64_t h, int64_t w,
                scalar_t* block, int64_t channel_stride, int64_t sh, int64_t sw) {
  constexpr int64_t L = Simd<T>::width;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<T, float>) {
    if (sw == 1 && sh == w && h * w >= 8 && lanes == 8) {
      float* planes[8];
      for (int64_t l = 0; l < 8; ++l) planes[l] = block + l * channel_stride;
      store_tile_flat(tile, h * w, w, tile_w, top, left, planes);
      return;
    }
    if (sw == 1 && w >= 8 && lanes == 8) {
      for (int64_t y = 0; y < h; ++y) {
        float* rows[8];
        for (int64_t l = 0; l < 8; ++l) rows[l] = block + l * channel_stride + y * sh;
        store_tile_flat(tile, w, w, tile_w, y + top, left, rows);
      }
      return;
    }
  }
  for (int64_t l = 0; l < lanes; ++l) {
    scalar_t* plane = block + l * channel_stride;
    for (int64_t y = 0; y < h; ++y)
      for (int64_t x = 0; x < w; ++x)
        plane[y * sh + x * sw] = static_cast<scalar_t>(tile[((y + top) * tile_w + x + left) * L + l]);
  }
}

// Per-thread tile buffers, left uninitialised: std::vector zeroed the whole tile on every call,
// about 0.8 MB per thread for a 112x112 map (in and out tiles), a sixth of an N=1 layer.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t size) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(size)]);
}

// A [tile_h][tile_w][L] tile whose (h x w) interior at (top, left) every item overwrites: only
// the border around it is zeroed, once.
template <typename T>
std::unique_ptr<T[]> bordered_tile(int64_t tile_h, int64_t tile_w, int64_t top, int64_t left, int64_t h, int64_t w) {
  constexpr int64_t L = Simd<T>::width;
  auto tile = scratch<T>(tile_h * tile_w * L);
  T* data = tile.get();
  for (int64_t y = 0; y < tile_h; ++y) {
    T* row = data + y * tile_w * L;
    if (y < top || y >= top + h) {
      std::fill(row, row + tile_w * L, T(0));
    } else {
      std::fill(row, row + left * L, T(0));
      std::fill(row + (left + w) * L, row + tile_w * L, T(0));
    }
  }
  return tile;
}

}  // namespace
}  // namespace fastcnn
