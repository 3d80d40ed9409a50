// The interface between the torch-facing binding of the row-wise softmax cross-entropy
// (softmax_xent_ops.cpp) and its per-ISA kernels (softmax_xent_isa.cpp): plain pointers, no torch types.
//
// Per row r of an fp32 logits block x (rows, classes), unit stride along classes, with t = targets[r]:
//   loss[r] = logsumexp(x[r]) - x[r][t]
// and, when grad is set, x[r] is overwritten by softmax(x[r]) - onehot(t), the loss's gradient w.r.t. the
// row (the training loss's per-chunk work in m2rec/models/catalogue_loss.py). Rows are independent.
#pragma once

#include <stdint.h>

namespace m2rec_xent {

struct XentParams {
  int64_t rows, classes;
  float* logits; int64_t row_stride;  // x[r][c] at logits + r * row_stride + c
  const int64_t* targets;             // (rows,), each in [0, classes) (the binding checks)
  double* loss;                       // (rows,)
  bool grad;                          // overwrite the rows with softmax - onehot
};

struct XentKernelTable {
  const char* name;  // "avx512", "avx2", "generic"
  int width;         // floats per vector
  void (*run)(const XentParams& p, int64_t row_begin, int64_t row_end);
};

// Defined by softmax_xent_isa.cpp, once per ISA compiled into the library.
const XentKernelTable* xent_kernels_avx512();
const XentKernelTable* xent_kernels_avx2();
const XentKernelTable* xent_kernels_generic();

}  // namespace m2rec_xent
