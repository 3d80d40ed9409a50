// Torch-facing side of the causal filter's streaming step: the op torch.ops.m2rec_scan_cpu.ring_filter_step
// (and causal_filter_last, the filter's output at each sequence's last position, below)
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
  return m2rec_cpu::required_variant_table("m2rec_scan_cpu.ring_filter_step", isa, M2REC_AVX512_OR_NULL(ring_filter_kernels_avx512),
                                           M2REC_AVX2_OR_NULL(ring_filter_kernels_avx2),
                                           &ring_filter_kernels_generic);
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

// The causal filter's output at each sequence's last position (FrequencyFilter.forward_last):
//   y[b][:] = sum_{t < n_b} x[b][t][:] * taps[n_b - 1 - t][:],   n_b = lengths[b] in [1, L]
// One pass over each sequence's history, accumulated in fp32 in time order: no (batch, L, d) tap table
// or product is formed (the PyTorch form's multiply and sum wrote and re-read 33 MB at batch 64, L 2000,
// d 64). Memory-bound, so a plain loop the compiler vectorises along d serves every ISA.
at::Tensor causal_filter_last_op(const at::Tensor& x, const at::Tensor& taps, const at::Tensor& lengths) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 &&
                  (x.size(2) <= 1 || x.stride(2) == 1),
              "m2rec_scan_cpu.causal_filter_last: x must be a float32 CPU tensor (batch, L, d) with unit stride along d");
  const int64_t batch = x.size(0), L = x.size(1), d = x.size(2);
  TORCH_CHECK(taps.scalar_type() == at::kFloat && taps.dim() == 2 && taps.size(0) >= L && taps.size(1) == d,
              "m2rec_scan_cpu.causal_filter_last: taps must be float32 (>= L, d)");
  TORCH_CHECK(lengths.sizes() == at::IntArrayRef({batch}),
              "m2rec_scan_cpu.causal_filter_last: lengths must have shape (batch,)");
  at::Tensor tf = taps.contiguous();
  at::Tensor len = lengths.to(at::kLong).contiguous();
  const int64_t* n = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(n[b] >= 1 && n[b] <= L, "m2rec_scan_cpu.causal_filter_last: lengths must lie in [1, L = ", L,
                "], got ", n[b]);
  }
  at::Tensor y = at::zeros({batch, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* kp = tf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t sb = x.stride(0), st = x.stride(1);
  if (batch > 0 && d > 0) {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        float* acc = yp + b * d;
        const int64_t nb = n[b];
        for (int64_t t = 0; t < nb; ++t) {
          const float* xr = xp + b * sb + t * st;
          const float* kr = kp + (nb - 1 - t) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += xr[c] * kr[c];
        }
      }
    });
  }
  return y;
}

}  // namespace
}  // namespace m2rec_ring_filter

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("ring_filter_step(Tensor(a!) history, Tensor x, Tensor taps, Tensor positions, int isa) -> Tensor");
  m.def("causal_filter_last(Tensor x, Tensor taps, Tensor lengths) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("ring_filter_step", &m2rec_ring_filter::ring_filter_step_op);
  m.impl("causal_filter_last", &m2rec_ring_filter::causal_filter_last_op);
}
