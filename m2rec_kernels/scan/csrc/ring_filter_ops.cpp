// Torch-facing side of the causal filter's streaming step: the op torch.ops.m2rec_scan_cpu.ring_filter_step
// (a fragment of the scan's library; same ISA rule). The history is updated in place; Python
// (m2rec/layers/frequency_filter.py, FrequencyFilter.step) checks the arguments and calls it only for
// fp32 histories with unit stride along d and an fp32 kernel, otherwise it runs the PyTorch form.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu_isa.h"
#include "ring_filter_api.h"

namespace m2rec_ring_filter {
namespace {

const RingFilterKernelTable* table(int64_t isa) {
  const RingFilterKernelTable* t = nullptr;
  if (m2rec_cpu::cpu_has(isa)) {
    switch (isa) {
#ifdef M2REC_HAVE_AVX512
      case m2rec_cpu::kAvx512: t = ring_filter_kernels_avx512(); break;
#endif
#ifdef M2REC_HAVE_AVX2
      case m2rec_cpu::kAvx2: t = ring_filter_kernels_avx2(); break;
#endif
      case m2rec_cpu::kGeneric: t = ring_filter_kernels_generic(); break;
      default: break;
    }
  }
  TORCH_CHECK(t != nullptr, "m2rec_scan_cpu.ring_filter_step: ISA variant ", isa,
              " is not in this build or not supported by this CPU");
  return t;
}

at::Tensor ring_filter_step_op(const at::Tensor& history, const at::Tensor& x, const at::Tensor& taps,
                               const at::Tensor& positions, int64_t isa) {
  const RingFilterKernelTable* k = table(isa);
  TORCH_CHECK(history.device().is_cpu() && history.scalar_type() == at::kFloat && history.dim() == 3 &&
                  (history.size(2) <= 1 || history.stride(2) == 1),
              "m2rec_scan_cpu.ring_filter_step: history must be a float32 CPU tensor (batch, M, d) with unit stride along d");
  const int64_t batch = history.size(0), M = history.size(1), d = history.size(2);
  TORCH_CHECK(x.sizes() == at::IntArrayRef({batch, d}) && taps.sizes() == at::IntArrayRef({M, d}) &&
                  positions.sizes() == at::IntArrayRef({batch}),
              "m2rec_scan_cpu.ring_filter_step: x (batch, d), taps (M, d) and positions (batch,) must match history");
  at::Tensor xf = x.scalar_type() == at::kFloat && (d <= 1 || x.stride(1) == 1) ? x : x.to(at::kFloat).contiguous();
  at::Tensor tf = taps.to(at::kFloat).contiguous();
  at::Tensor pos = positions.to(at::kLong).contiguous();
  at::Tensor y = at::empty({batch, d}, history.options());
  RingFilterParams p{};
  p.batch = batch; p.M = M; p.d = d;
  p.history = history.data_ptr<float>(); p.h_sb = history.stride(0); p.h_ss = history.stride(1);
  p.x = xf.data_ptr<float>(); p.x_sb = xf.stride(0);
  p.taps = tf.data_ptr<float>();
  p.positions = pos.data_ptr<int64_t>();
  p.y = y.data_ptr<float>();
  if (batch > 0 && M > 0 && d > 0) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, M * d));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) { k->run(p, begin, end); });
  }
  return y;
}

}  // namespace
}  // namespace m2rec_ring_filter

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("ring_filter_step(Tensor(a!) history, Tensor x, Tensor taps, Tensor positions, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("ring_filter_step", &m2rec_ring_filter::ring_filter_step_op);
}
