// The interface between the torch-facing binding of the fused Mamba streaming step (mamba_step_ops.cpp)
// and its per-ISA conv kernel (mamba_step_isa.cpp): plain pointers and strides, no torch types.
//
// The conv part of one step, per batch row b and channel d (the depthwise causal conv's window of the
// last K inputs, oldest first, updated in place):
//   window[b][d][:] = (window[b][d][1:], x[b][d]);   out[b][d] = silu(sum_k window[b][d][k] taps[d][k] + bias[d])
// The rest of the step (x_proj, dt_proj, the state update, out_proj) is in the binding.
#pragma once

#include <stdint.h>

namespace m2rec_mamba_step {

struct ConvStepParams {
  int64_t batch, dim, K;
  float* window; int64_t w_sb, w_sd;  // window[b][d][k] at window + b * w_sb + d * w_sd + k
  const float* x; int64_t x_sb;       // (batch, dim) the new column
  const float* taps;                  // (dim, K) contiguous (conv1d.weight[:, 0, :])
  const float* bias;                  // (dim,) or nullptr
  float* out;                         // (batch, dim) contiguous
};

struct ConvStepKernelTable {
  const char* name;
  int width;
  void (*run)(const ConvStepParams& p, int64_t row_begin, int64_t row_end);  // batch rows [begin, end)
};

const ConvStepKernelTable* conv_step_kernels_avx512();
const ConvStepKernelTable* conv_step_kernels_avx2();
const ConvStepKernelTable* conv_step_kernels_generic();

}  // namespace m2rec_mamba_step
