// Software prefetch of the planes an NCHW plane loop reads and writes next.
//
// A thread of the plane kernels walks its planes in address order, a few hundred cycles a plane
// on maps of 7x7 to 28x28. With the planes out of cache (as in a network, where the layers between
// evict them) those kernels waited on memory most of the time: one plane's loads keep too few
// lines in flight, and the hardware's prefetcher did not make up for it (32x512x14x14 3x3, 2
// threads, caches flushed before each call: forward 2.0 ms where copying the input takes 0.5).
// Fetching every line of the plane kPrefetchBytes ahead, input and output alike (a plain store to
// a line out of cache reads it first), as each plane starts: forward 1.0 ms, forward + backward
// 5.7 -> 2.9 ms; 7x7 maps 4.9 -> 2.7 ms, 28x28 9.4 -> 5.5 ms. 1 to 4 KiB ahead were alike.
// Strided planes gain at any size (kPrefetchMaxPlaneBytes). Measured on an AMD Zen 4 (1 MiB L2 a
// core, 32 MiB L3); the Xeon of earlier sessions, where a prefetch of the next planes was once
// found to gain nothing, has not run this version (see README).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace fastcnn {
namespace cpu {

// How far ahead of the plane being made the loop fetches: FASTCNN_PLANE_PREFETCH bytes (0: none;
// read on every call, for A/B runs), by default kPrefetchBytes.
constexpr int64_t kPrefetchBytes = 2048;

inline int64_t plane_prefetch_bytes() {
  const char* value = std::getenv("FASTCNN_PLANE_PREFETCH");
  return value != nullptr ? std::max<int64_t>(0, std::atoll(value)) : kPrefetchBytes;
}

// Unit-stride planes larger than this stream well enough on the kernels' own prefetch of the rows
// ahead (32x32x112x112 and 32x128x56x56: 5-15% slower with these fetches). Strided planes gain at
// any size (32x64x112x112 stride 2, 49 KiB planes: forward 8.1 -> 6.4 ms, backward 19.7 -> 10.2).
constexpr int64_t kPrefetchMaxPlaneBytes = 8192;

// How many planes ahead of the current one to fetch (0: none) for planes of plane_bytes, read
// `strided` or not.
inline int64_t prefetch_distance(int64_t plane_bytes, bool strided) {
  const int64_t ahead = plane_prefetch_bytes();
  if (ahead == 0 || plane_bytes <= 0 || (!strided && plane_bytes > kPrefetchMaxPlaneBytes)) return 0;
  return std::max<int64_t>(1, (ahead + plane_bytes - 1) / plane_bytes);
}

// Fetches the line at p into every cache level. An asm statement, because GCC 12 deleted whole
// loops of __builtin_prefetch once they were inlined (a prefetch has no side effect it must keep).
// A line about to be written is fetched the same way: with no other core holding it, it arrives
// exclusive and the store needs nothing more.
inline void prefetch_line(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Every line of `rows` rows of `row_elements` elements, `row_stride` elements apart.
template <typename T>
inline void prefetch_plane(const T* first, int64_t rows, int64_t row_elements, int64_t row_stride) {
  constexpr uintptr_t kLine = 64;
  const uintptr_t base = reinterpret_cast<uintptr_t>(first);
  const uintptr_t row_bytes = static_cast<uintptr_t>(row_elements) * sizeof(T);
  const uintptr_t stride_bytes = static_cast<uintptr_t>(row_stride) * sizeof(T);
  // Dense rows are one range: one prefetch a line, not a line a row.
  const bool dense = row_stride == row_elements;
  const int64_t spans = dense ? 1 : rows;
  const uintptr_t span_bytes = dense ? static_cast<uintptr_t>(rows) * row_bytes : row_bytes;
  if (rows <= 0 || row_elements <= 0) return;
  for (int64_t r = 0; r < spans; ++r) {
    const uintptr_t first_line = (base + r * stride_bytes) & ~(kLine - 1);
    const uintptr_t last_line = (base + r * stride_bytes + span_bytes - 1) & ~(kLine - 1);
    const char* line = reinterpret_cast<const char*>(first_line);
    for (uintptr_t i = 0, lines = (last_line - first_line) / kLine + 1; i < lines; ++i, line += kLine)
      prefetch_line(line);
  }
}

// A thread's walk over its planes (steps begin..end, in the order it makes them): before it makes
// the planes of steps [step, step + count), fetch(k) is called once for each step k up to
// `distance` steps past them.
template <typename Fetch>
class PlanePrefetcher {
 public:
  PlanePrefetcher(int64_t begin, int64_t end, int64_t distance, Fetch fetch)
      : fetched_(begin), end_(end), distance_(distance), fetch_(fetch) {}

  void before(int64_t step, int64_t count = 1) {
    if (distance_ == 0) return;
    for (const int64_t until = std::min(end_, step + count + distance_); fetched_ < until; ++fetched_) fetch_(fetched_);
  }

 private:
  int64_t fetched_;  // steps before it are fetched, or made
  const int64_t end_, distance_;
  Fetch fetch_;
};

}  // namespace cpu
}  // namespace fastcnn
