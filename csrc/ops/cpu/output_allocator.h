// Where the CPU kernels' outputs live.
//
// A fresh multi-megabyte buffer from glibc is a new mmap, and its first write faults in one 4 KiB
// page at a time: on the development machine a 49 MiB output costs about 20 ms of faults, several
// times the kernel that fills it. Outputs of 2 MiB and more are therefore 2 MiB-aligned and
// advised as transparent huge pages (what PyTorch does for every tensor under
// THP_MEM_ALLOC_ENABLE=1): one fault per 2 MiB, the same buffer in about 4 ms. Set
// FASTCNN_HUGE_PAGES=0 to get plain at::empty; where the kernel never grants huge pages
// (transparent_hugepage=never) the advice is a no-op.
//
// Even on huge pages a fresh buffer is zeroed and faulted in by the kernel (7 ms for 49 MiB here,
// more than the depthwise forward that fills it), and a training step frees and allocates the same
// sizes every iteration. So freed outputs are kept, by size, for the next output of that size, as
// PyTorch's CUDA caching allocator does: up to FASTCNN_OUTPUT_CACHE_MB MiB (default 1024; 0 keeps
// none). torch.ops.fastcnn._output_cache_clear() hands them back to the system.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastcnn {
namespace cpu {

// at::empty(sizes, options.memory_format(format)) for a CPU kernel's output.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);

// False when FASTCNN_HUGE_PAGES=0 or the platform has no madvise.
bool huge_page_outputs_enabled();

// The most bytes of freed outputs kept for reuse (0 when none are, or without huge-page outputs).
int64_t output_cache_capacity();

}  // namespace cpu
}  // namespace fastcnn
