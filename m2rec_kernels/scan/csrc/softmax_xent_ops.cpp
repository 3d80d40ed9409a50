// Torch-facing side of the row-wise softmax cross-entropy (softmax_xent_api.h): the op
// torch.ops.m2rec_scan_cpu.softmax_xent_rows (a fragment of the scan's library; same ISA rule). Python
// (m2rec_kernels/softmax_xent_cpu.py) calls it for the fp32 logits chunks of the training loss
// (m2rec/models/catalogue_loss.py); the argument checks here are cheap (one pass over the targets).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_isa.h"
#include "softmax_xent_api.h"

namespace m2rec_xent {
namespace {

const XentKernelTable* table(int64_t isa) {
  return m2rec_cpu::required_variant_table("m2rec_scan_cpu.softmax_xent_rows", isa, M2REC_AVX512_OR_NULL(xent_kernels_avx512),
                                           M2REC_AVX2_OR_NULL(xent_kernels_avx2),
                                           &xent_kernels_generic);
}

// (rows,) float64 losses logsumexp(logits[r]) - logits[r][targets[r]]; with grad, logits is overwritten
// in place by softmax(logits) - onehot(targets), row by row.
at::Tensor softmax_xent_rows_op(const at::Tensor& logits, const at::Tensor& targets, bool grad, int64_t isa) {
  const XentKernelTable* k = table(isa);
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                  (logits.size(1) <= 1 || logits.stride(1) == 1),
              "m2rec_scan_cpu.softmax_xent_rows: logits must be a float32 CPU tensor (rows, classes) with unit "
              "stride along classes, got ", logits.scalar_type(), " of shape ", logits.sizes(), " and strides ",
              logits.strides());
  const int64_t rows = logits.size(0), classes = logits.size(1);
  TORCH_CHECK(targets.device().is_cpu() && targets.dim() == 1 && targets.size(0) == rows &&
                  at::isIntegralType(targets.scalar_type(), /*includeBool=*/false),
              "m2rec_scan_cpu.softmax_xent_rows: targets must be an integer CPU tensor of shape (rows,) = (", rows,
              ",), got ", targets.scalar_type(), " of shape ", targets.sizes());
  TORCH_CHECK(rows == 0 || classes > 0, "m2rec_scan_cpu.softmax_xent_rows: logits has no classes");
  at::Tensor tg = targets.to(at::kLong).contiguous();
  const int64_t* t = tg.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(t[r] >= 0 && t[r] < classes, "m2rec_scan_cpu.softmax_xent_rows: targets[", r, "] = ", t[r],
                " is out of range [0, ", classes, ")");
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kDouble));
  XentParams p{};
  p.rows = rows;
  p.classes = classes;
  p.logits = logits.data_ptr<float>();
  p.row_stride = logits.stride(0);
  p.targets = t;
  p.loss = loss.data_ptr<double>();
  p.grad = grad;
  if (rows > 0) {
    const int64_t grain = std::max<int64_t>(1, 16384 / classes);  // at least ~16k elements per task
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { k->run(p, begin, end); });
  }
  return loss;
}

}  // namespace
}  // namespace m2rec_xent

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("softmax_xent_rows(Tensor(a!) logits, Tensor targets, bool grad, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("softmax_xent_rows", &m2rec_xent::softmax_xent_rows_op);
}
