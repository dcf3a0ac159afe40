#include "ops/cpu/output_allocator.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastcnn {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;

#if defined(__linux__) && defined(MADV_HUGEPAGE)

void release(void* data) { std::free(data); }

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* data = nullptr;
    if (nbytes > 0) {
      TORCH_CHECK(posix_memalign(&data, kHugePage, nbytes) == 0 && data != nullptr,
                  "fastcnn: could not allocate ", nbytes, " bytes");
      // Advice only: on failure (e.g. THP disabled) the pages are ordinary ones.
      madvise(data, nbytes, MADV_HUGEPAGE);
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

c10::Allocator* huge_page_allocator() {
  static HugePageAllocator allocator;
  return &allocator;
}

#else

c10::Allocator* huge_page_allocator() { return nullptr; }

#endif

bool read_enabled() {
  if (huge_page_allocator() == nullptr) return false;
  const char* value = std::getenv("FASTCNN_HUGE_PAGES");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

}  // namespace

bool huge_page_outputs_enabled() {
  static const bool enabled = read_enabled();
  return enabled;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  size_t nbytes = options.dtype().itemsize();
  for (const auto size : sizes) nbytes *= static_cast<size_t>(size);
  if (nbytes < kHugePage || !huge_page_outputs_enabled()) {
    return at::empty(sizes, options.memory_format(format));
  }
  return at::detail::empty_generic(sizes, huge_page_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), format);
}

}  // namespace cpu
}  // namespace fastcnn
