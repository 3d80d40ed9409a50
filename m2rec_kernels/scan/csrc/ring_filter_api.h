// The interface between the torch-facing binding of the causal filter's streaming step
// (ring_filter_ops.cpp) and its per-ISA kernels (ring_filter_isa.cpp): plain pointers and strides.
//
// Per batch row b, with slot = positions[b] mod M (M = max_len):
//   history[b][slot][:] = x[b][:];   y[b][:] = sum_{s < M} history[b][s][:] * taps[(slot - s) mod M][:]
// (the ring of m2rec/layers/frequency_filter.py: the input at position i in slot i mod M, zeros where
// there was none yet, so slot s holds the input of age (slot - s) mod M).
#pragma once

#include <stdint.h>

namespace m2rec_ring_filter {

struct RingFilterParams {
  int64_t batch, M, d;
  float* history; int64_t h_sb, h_ss;  // history[b][s][c] at history + b * h_sb + s * h_ss + c
  const float* x; int64_t x_sb;        // (batch, d)
  const float* taps;                   // (M, d) contiguous
  const int64_t* positions;            // (batch,) >= 0
  float* y;                            // (batch, d) contiguous
};

struct RingFilterKernelTable {
  const char* name;
  int width;
  void (*run)(const RingFilterParams& p, int64_t row_begin, int64_t row_end);
};

const RingFilterKernelTable* ring_filter_kernels_avx512();
const RingFilterKernelTable* ring_filter_kernels_avx2();
const RingFilterKernelTable* ring_filter_kernels_generic();

}  // namespace m2rec_ring_filter
