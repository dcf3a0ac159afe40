// Where the CPU kernels' outputs live.
//
// A fresh multi-megabyte buffer from glibc is a new mmap, and its first write faults in one 4 KiB
// page at a time: on the development machine a 49 MiB output costs about 20 ms of faults, several
// times the kernel that fills it. Outputs of 2 MiB and more are therefore 2 MiB-aligned and
// advised as transparent huge pages (what PyTorch does for every tensor under
// THP_MEM_ALLOC_ENABLE=1): one fault per 2 MiB, the same buffer in about 4 ms. Set
// FASTCNN_HUGE_PAGES=0 to get plain at::empty; where the kernel never grants huge pages
// (transparent_hugepage=never) the advice is a no-op.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastcnn {
namespace cpu {

// at::empty(sizes, options.memory_format(format)) for a CPU kernel's output.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format);

// False when FASTCNN_HUGE_PAGES=0 or the platform has no madvise.
bool huge_page_outputs_enabled();

}  // namespace cpu
}  // namespace fastcnn
