// Torch-facing side of the fused Mamba streaming step: the op torch.ops.m2rec_scan_cpu.mamba_step (a
// fragment of the scan's library; same ISA rule). One call does MambaMixer's whole step for one token
// per row — in_proj, the conv window update + taps dot + bias + SiLU (mamba_step_isa.cpp), x_proj, dt_proj,
// the state update with D skip and silu(z) gate (state_update_isa.cpp's kernel), out_proj — so the
// ~15 small torch ops of the Python step, whose per-op dispatch cost more than their arithmetic at
// batch 64 (DESIGN §10, "Streaming"), become one. The matrix products go through ATen (at::linear /
// at::mm, the BLAS torch uses). The conv window and the SSM state are updated in place.
//
// Python (m2rec/layers/mamba_mixer.py, MambaMixer.step_unchecked) calls it only for fp32 weights and
// states with unit stride along their last axis, no gradient; the checks here name what is wrong.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu_isa.h"
#include "mamba_step_api.h"
#include "state_update_api.h"

namespace m2rec_mamba_step {
namespace {

using m2rec_state_update::StateUpdateKernelTable;
using m2rec_state_update::StateUpdateParams;

constexpr const char* kOp = "m2rec_scan_cpu.mamba_step";

void tables(int64_t isa, const ConvStepKernelTable*& conv, const StateUpdateKernelTable*& update) {
  conv = nullptr;
  update = nullptr;
  if (m2rec_cpu::cpu_has(isa)) {
    switch (isa) {
#ifdef M2REC_HAVE_AVX512
      case m2rec_cpu::kAvx512:
        conv = conv_step_kernels_avx512();
        update = m2rec_state_update::state_update_kernels_avx512();
        break;
#endif
#ifdef M2REC_HAVE_AVX2
      case m2rec_cpu::kAvx2:
        conv = conv_step_kernels_avx2();
        update = m2rec_state_update::state_update_kernels_avx2();
        break;
#endif
      case m2rec_cpu::kGeneric:
        conv = conv_step_kernels_generic();
        update = m2rec_state_update::state_update_kernels_generic();
        break;
      default: break;
    }
  }
  TORCH_CHECK(conv != nullptr && update != nullptr, kOp, ": ISA variant ", isa,
              " is not in this build or not supported by this CPU");
}

void check_f32(const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, kOp, ": ", name,
              " must be an fp32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes().equals(shape), kOp, ": ", name, " must have shape ", at::IntArrayRef(shape), ", got ",
              t.sizes());
}

at::Tensor mamba_step_op(const at::Tensor& hidden, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                         const at::Tensor& in_weight, const std::optional<at::Tensor>& in_bias,
                         const at::Tensor& conv_taps, const std::optional<at::Tensor>& conv_bias,
                         const at::Tensor& x_proj_weight, const at::Tensor& dt_proj_weight, const at::Tensor& A,
                         const at::Tensor& D, const at::Tensor& dt_bias, const at::Tensor& out_weight,
                         const std::optional<at::Tensor>& out_bias, int64_t isa) {
  const ConvStepKernelTable* conv_k;
  const StateUpdateKernelTable* update_k;
  tables(isa, conv_k, update_k);
  TORCH_CHECK(hidden.dim() == 2, kOp, ": hidden must be (batch, d_model), got ", hidden.sizes());
  TORCH_CHECK(conv_state.dim() == 3 && ssm_state.dim() == 3 && A.dim() == 2 && x_proj_weight.dim() == 2 &&
                  dt_proj_weight.dim() == 2,
              kOp, ": conv_state, ssm_state must be 3-d and A, x_proj_weight, dt_proj_weight 2-d");
  const int64_t batch = hidden.size(0), d_model = hidden.size(1);
  const int64_t di = conv_state.size(1), K = conv_state.size(2), N = A.size(1), R = dt_proj_weight.size(1);
  check_f32("hidden", hidden, {batch, d_model});
  check_f32("conv_state", conv_state, {batch, di, K});
  check_f32("ssm_state", ssm_state, {batch, di, N});
  check_f32("in_weight", in_weight, {2 * di, d_model});
  if (in_bias) check_f32("in_bias", *in_bias, {2 * di});
  check_f32("conv_taps", conv_taps, {di, K});
  if (conv_bias) check_f32("conv_bias", *conv_bias, {di});
  check_f32("x_proj_weight", x_proj_weight, {R + 2 * N, di});
  check_f32("dt_proj_weight", dt_proj_weight, {di, R});
  check_f32("A", A, {di, N});
  check_f32("D", D, {di});
  check_f32("dt_bias", dt_bias, {di});
  check_f32("out_weight", out_weight, {out_weight.size(0), di});
  if (out_bias) check_f32("out_bias", *out_bias, {out_weight.size(0)});
  TORCH_CHECK(K >= 1 && (K == 1 || conv_state.stride(2) == 1) && (N <= 1 || ssm_state.stride(2) == 1), kOp,
              ": conv_state and ssm_state must have unit stride along their last axis (they are updated in place)");
  TORCH_CHECK(conv_taps.is_contiguous() && A.is_contiguous() && D.is_contiguous() && dt_bias.is_contiguous() &&
                  (!conv_bias || conv_bias->is_contiguous()),
              kOp, ": conv_taps, conv_bias, A, D and dt_bias must be contiguous");

  // in_proj: x and z are column halves of one (batch, 2 d_inner) product, read in place
  const at::Tensor xz = at::linear(hidden, in_weight, in_bias);
  at::Tensor xc = at::empty({batch, di}, hidden.options());
  ConvStepParams cp{};
  cp.batch = batch; cp.dim = di; cp.K = K;
  cp.window = conv_state.data_ptr<float>(); cp.w_sb = conv_state.stride(0); cp.w_sd = conv_state.stride(1);
  cp.x = xz.data_ptr<float>(); cp.x_sb = xz.stride(0);
  cp.taps = conv_taps.data_ptr<float>();
  cp.bias = conv_bias ? conv_bias->data_ptr<float>() : nullptr;
  cp.out = xc.data_ptr<float>();
  // one row is ~d_inner * K multiply-adds: split only when a block is worth a thread
  const int64_t conv_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, di * K));
  if (batch > 0 && di > 0)
    at::parallel_for(0, batch, conv_grain, [&](int64_t begin, int64_t end) { conv_k->run(cp, begin, end); });

  // x_proj -> (dt_low, B, C); dt_proj without its bias (the update adds it before the softplus)
  const at::Tensor x_dbl = at::mm(xc, x_proj_weight.t());
  const at::Tensor dt = at::mm(x_dbl.narrow(1, 0, R), dt_proj_weight.t());

  at::Tensor y = at::empty({batch, di}, hidden.options());
  StateUpdateParams p{};
  p.batch = batch; p.dim = di; p.N = N;
  p.state = ssm_state.data_ptr<float>(); p.state_sb = ssm_state.stride(0); p.state_sd = ssm_state.stride(1);
  p.indices = nullptr;
  p.x = xc.data_ptr<float>(); p.x_sb = di;
  p.dt = dt.data_ptr<float>(); p.dt_sb = dt.stride(0);
  p.z = xz.data_ptr<float>() + di * xz.stride(1); p.z_sb = xz.stride(0);
  p.B = x_dbl.data_ptr<float>() + R; p.B_sb = x_dbl.stride(0);
  p.C = x_dbl.data_ptr<float>() + R + N; p.C_sb = x_dbl.stride(0);
  p.A = A.data_ptr<float>();
  p.D = D.data_ptr<float>();
  p.dt_bias = dt_bias.data_ptr<float>();
  p.softplus = true;
  p.out = y.data_ptr<float>();
  if (batch > 0 && di > 0) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, di * N));  // as state_update
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) { update_k->run(p, begin, end); });
  }
  return at::linear(y, out_weight, out_bias);
}

}  // namespace
}  // namespace m2rec_mamba_step

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("mamba_step(Tensor hidden, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor in_weight, "
        "Tensor? in_bias, Tensor conv_taps, Tensor? conv_bias, Tensor x_proj_weight, Tensor dt_proj_weight, "
        "Tensor A, Tensor D, Tensor dt_bias, Tensor out_weight, Tensor? out_bias, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("mamba_step", &m2rec_mamba_step::mamba_step_op);
}
