// Outputs written to memory with non-temporal (streaming) stores.
//
// A plain store to a line that is not in cache first reads the line (read for ownership), so a
// kernel that reads one tensor and writes another moves three tensors' worth of bytes. Streaming
// stores write whole lines without reading them. On the development machine (Xeon, 2 threads,
// 49 MiB): a pass that reads one buffer and writes another takes 4.3 ms with plain stores and
// 2.0-3.0 ms streamed; reading 49 MiB alone takes 1.7 ms. The cost: the data is no longer in
// cache, so a consumer that reads it right after pays memory latency (0.36 -> 0.86 ms to read
// back a 12.8 MB tensor, which plain stores leave in the last-level cache). Hence only outputs too
// large for that cache are streamed: 32 MiB and more, or half that where the call's own reads
// (64 MiB or more) push the output out of the cache anyway.
//
// The streaming stores must interleave with the kernel's loads, and fill whole lines close
// together: the AVX-512 depthwise kernels stream each channels_last vector (a whole line) as they
// make it, and copy each NCHW block of rows out of a stage buffer right after making it (see
// stream_rows in depthwise_avx512/common.h for what did not work).
#pragma once

#include <cstdint>

namespace fastcnn {
namespace cpu {

// Whether a kernel streams an output of `bytes` bytes while reading `read_bytes` besides: at least
// 32 MiB, or at least 16 MiB when the call reads at least 64 MiB (see streaming_stores.cpp).
// FASTCNN_STREAMING_STORES=0 streams nothing, =all every output (for tests); read on every call.
bool stream_output_bytes(int64_t bytes, int64_t read_bytes = 0);

// Orders a thread's streaming stores before what follows: call it before the thread's part of a
// parallel region ends.
void stream_fence();

}  // namespace cpu
}  // namespace fastcnn
