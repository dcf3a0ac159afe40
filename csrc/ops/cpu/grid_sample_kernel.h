// What the CPU sampler decided about this machine, for `fastcnn info` (grid_sample_kernel.cpp).
#pragma once

namespace fastcnn {
namespace grid_sample {

// Up to how many input rows the AVX-512 forward reads a vector's taps from plain row vectors
// instead of gathering them (avx512::WindowRows); 0 without AVX-512.
int window_rows_limit();

}  // namespace grid_sample
}  // namespace fastcnn
