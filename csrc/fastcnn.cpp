// The Python module stub for fastcnn._C. Ops register themselves with the dispatcher from their
// own files (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL); importing this module runs those
// static registrations. `_build_info` tells `fastcnn info` how the extension was built, whether
// CPU outputs go to huge pages and how many MiB of freed ones are kept (ops/cpu/output_allocator.h),
// whether the AVX-512 depthwise planes run, and up to how many rows the grid_sample forward reads
// by rows instead of gathers (measured on this machine).
#include <Python.h>

#include <string>

#include <torch/library.h>

#include "ops/cpu/depthwise_conv2d_avx512.h"
#include "ops/cpu/grid_sample_kernel.h"
#include "ops/cpu/output_allocator.h"

namespace {

std::string build_info() {
  std::string info = "cuda=";
  info += FASTCNN_BUILD_CUDA ? "1" : "0";
#ifdef _OPENMP
  info += ";openmp=" + std::to_string(_OPENMP);
#else
  info += ";openmp=0";
#endif
#if defined(__AVX512F__)
  info += ";baseline_isa=avx512f";
#elif defined(__AVX2__)
  info += ";baseline_isa=avx2";
#else
  info += ";baseline_isa=default";
#endif
  info += ";huge_pages=";
  info += fastcnn::cpu::huge_page_outputs_enabled() ? "1" : "0";
  info += ";output_cache_mb=" + std::to_string(fastcnn::cpu::output_cache_capacity() >> 20);
  info += ";avx512_depthwise=";
  info += fastcnn::depthwise::avx512::enabled() ? "1" : "0";
  info += ";grid_sample_window_rows=" + std::to_string(fastcnn::grid_sample::window_rows_limit());
  return info;
}

}  // namespace

TORCH_LIBRARY(fastcnn, m) {
  m.def("_build_info() -> str");
}

TORCH_LIBRARY_IMPL(fastcnn, CompositeExplicitAutograd, m) {
  m.impl("_build_info", [] { return build_info(); });
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
