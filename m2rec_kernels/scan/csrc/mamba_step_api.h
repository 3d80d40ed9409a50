// The interface between the torch-facing binding of the fused Mamba streaming step (mamba_step_ops.cpp)
// and its per-ISA conv kernel (mamba_step_isa.cpp): plain pointers and strides, no torch types.
//
// The conv part of one step, per batch row b and channel d (the depthwise causal conv's window of the
// last K inputs, oldest first, updated in place):
//   window[b][d][:] = (window[b][d][1:], x[b][d]);   out[b][d] = silu(sum_k window[b][d][k] taps[d][k] + bias[d])
// and the step's small matrix products (in_proj, x_proj, dt_proj, out_proj), one kernel for all:
//   out[b][j] = bias[j] + sum_k in[b][k] wt[k][j]   (j < n; wt the weight's transpose, (K, n_pad), its
//   columns zero-padded to whole vectors, so the inner loop reads whole vectors only)
// The state update is state_update_isa.cpp's kernel.
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

struct RowsGemmParams {
  int64_t K, n, n_pad;
  const float* in; int64_t in_sb;  // in[b][k] at in + b * in_sb + k
  const float* wt;                 // (K, n_pad) contiguous, n_pad a multiple of the ISA's width
  const float* bias;               // (n,) or nullptr
  float* out; int64_t out_sb;      // out[b][j] at out + b * out_sb + j
};

// The gate and the first LayerNorm of the M2Rec layer's step (fusion_step_ops.cpp), per row r:
//   alpha = softmax(gate_weight · cat_i(branch_i[r]) + gate_bias),  out[r] = LayerNorm(h[r] + sum_i alpha_i branch_i[r])
struct GateNormParams {
  int64_t k, d;
  const float* const* branches; const int64_t* branch_sr;  // branch i's row r at branches[i] + r * branch_sr[i]
  const float* h; int64_t h_sr;
  const float* gate_weight;  // (k, k d) contiguous
  const float* gate_bias;    // (k,)
  const float* norm_weight; const float* norm_bias; float eps;
  float* out;                // (rows, d) contiguous
};

struct ConvStepKernelTable {
  const char* name;
  int width;
  void (*run)(const ConvStepParams& p, int64_t row_begin, int64_t row_end);  // batch rows [begin, end)
  void (*gemm)(const RowsGemmParams& p, int64_t row_begin, int64_t row_end);
  void (*gelu)(float* v, int64_t n);  // v = v Phi(v) in place (exact GELU, erf to ~1.5e-7; the FFN's)
  void (*gate_norm)(const GateNormParams& p, int64_t row_begin, int64_t row_end);
  // out[r] = LayerNorm(out[r] + res[r]) for rows [0, rows) of d contiguous values (the FFN's residual)
  void (*residual_norm)(float* out, const float* res, int64_t rows, int64_t d, const float* weight,
                        const float* bias, float eps);
};

const ConvStepKernelTable* conv_step_kernels_avx512();
const ConvStepKernelTable* conv_step_kernels_avx2();
const ConvStepKernelTable* conv_step_kernels_generic();

// The variant for an ISA code (m2rec_cpu::Isa), or an error naming the op when it is not built or this
// CPU lacks it (defined in mamba_step_ops.cpp; also used by fusion_step_ops.cpp).
const ConvStepKernelTable* conv_step_table(int64_t isa, const char* op);
// k->gemm over batch rows [0, batch), split across threads when a block is worth one (mamba_step_ops.cpp).
void rows_gemm_parallel(const ConvStepKernelTable* k, const RowsGemmParams& g, int64_t batch);

}  // namespace m2rec_mamba_step
