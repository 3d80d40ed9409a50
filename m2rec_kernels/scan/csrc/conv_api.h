// The interface between the torch-facing binding of the causal depthwise conv1d (conv_ops.cpp) and its
// per-ISA kernels (conv_isa.cpp): plain pointers, sizes and strides, no torch types.
//
// Layout: time-major, as the transpose of a (batch, L, dim) tensor: element [b][c][t] of a sequence
// tensor at data[b * sb + c + t * st] (unit stride along channels, so one vector holds W channels of
// one step). Work is split in tasks, one per (batch row b, group of channel blocks): a task owns its
// outputs and writes the weight and bias gradients of its batch row to per-row partials that the
// binding sums over the batch in a fixed order (results independent of the number of threads).
#pragma once

#include <stdint.h>

namespace m2rec_conv {

struct ConvParams {
  int64_t batch, dim, L, K;            // K taps (the conv width)
  int64_t group;                       // channels per task (a multiple of the vector width, or dim)
  int64_t n_groups;                    // ceil(dim / group)
  const float* x; int64_t x_sb, x_st;  // input (batch, dim, L), time-major
  const float* weight;                 // (dim, K) contiguous: y_t = bias + sum_k w[k] x[t - (K - 1) + k]
  const float* bias;                   // (dim,) or nullptr
  bool silu;                           // y = silu(conv) instead of conv
  float* y; int64_t y_sb, y_st;        // forward output, time-major
  const float* dy; int64_t dy_sb, dy_st;  // backward: gradient of y, time-major
  float* dx; int64_t dx_sb, dx_st;     // backward: gradient of x, time-major
  float* dw_part;                      // (batch, dim, K): per-row partials of the weight gradient
  float* db_part;                      // (batch, dim) or nullptr
};

struct ConvKernelTable {
  const char* name;  // "avx512", "avx2", "generic"
  int width;         // W: channels per vector
  // run tasks [begin, end): task = b * n_groups + g
  void (*forward)(const ConvParams& p, int64_t begin, int64_t end);
  void (*backward)(const ConvParams& p, int64_t begin, int64_t end);
};

// Defined by conv_isa.cpp, once per ISA compiled into the library.
const ConvKernelTable* conv_kernels_avx512();
const ConvKernelTable* conv_kernels_avx2();
const ConvKernelTable* conv_kernels_generic();

}  // namespace m2rec_conv
