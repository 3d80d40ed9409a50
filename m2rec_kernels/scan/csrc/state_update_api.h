// The interface between the torch-facing binding of the one-step selective scan (state_update_ops.cpp)
// and its per-ISA kernels (state_update_isa.cpp): plain pointers, sizes and strides, no torch types.
//
// One step of Mamba's recurrence per (batch row, channel), the state (dim, N) of a row updated in place:
//   delta = softplus?(dt + dt_bias);  state = exp(delta A) state + delta x B;  out = (sum_n state C + D x) silu(z)
// Every per-row operand has unit stride along its last axis (the binding copies those that do not).
#pragma once

#include <stdint.h>

namespace m2rec_state_update {

struct StateUpdateParams {
  int64_t batch, dim, N;
  float* state; int64_t state_sb, state_sd;  // state[r][d][n] at state + r * sb + d * sd + n
  const int64_t* indices;                    // (batch,): row b updates state row indices[b]; < 0 = padding
                                             // (output 0, state untouched); nullptr: row b updates row b
  const float* x; int64_t x_sb;              // (batch, dim)
  const float* dt; int64_t dt_sb;            // (batch, dim)
  const float* z; int64_t z_sb;              // (batch, dim) or nullptr (no gate)
  const float* B; int64_t B_sb;              // (batch, N)
  const float* C; int64_t C_sb;              // (batch, N)
  const float* A;                            // (dim, N) contiguous
  const float* D;                            // (dim,) or nullptr
  const float* dt_bias;                      // (dim,) or nullptr
  bool softplus;
  float* out;                                // (batch, dim) contiguous
};

struct StateUpdateKernelTable {
  const char* name;  // "avx512", "avx2", "generic"
  int width;         // lanes per vector
  void (*run)(const StateUpdateParams& p, int64_t row_begin, int64_t row_end);  // batch rows [begin, end)
};

// Defined by state_update_isa.cpp, once per ISA compiled into the library.
const StateUpdateKernelTable* state_update_kernels_avx512();
const StateUpdateKernelTable* state_update_kernels_avx2();
const StateUpdateKernelTable* state_update_kernels_generic();

}  // namespace m2rec_state_update
