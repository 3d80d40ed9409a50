// Torch-facing side of the fused Mamba streaming step: the op torch.ops.m2rec_scan_cpu.mamba_step (a
// fragment of the scan's library; same ISA rule). One call does MambaMixer's whole step for one token
// per row — in_proj, the conv window update + taps dot + bias + SiLU (mamba_step_isa.cpp), x_proj, dt_proj,
// the state update with D skip and silu(z) gate (state_update_isa.cpp's kernel), out_proj — so the
// ~15 small torch ops of the Python step, whose per-op dispatch cost more than their arithmetic at
// batch 64 (DESIGN §10, "Streaming"), become one. The matrix products are the kernel file's rows_gemm,
// on the weights' transposes zero-padded to whole vectors (cached by the caller). The conv window and the
// SSM state are updated in place.
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

const m2rec_state_update::StateUpdateKernelTable* update_table(int64_t isa) {
  return m2rec_cpu::required_variant_table(kOp, isa, M2REC_AVX512_OR_NULL(m2rec_state_update::state_update_kernels_avx512),
                                           M2REC_AVX2_OR_NULL(m2rec_state_update::state_update_kernels_avx2),
                                           &m2rec_state_update::state_update_kernels_generic);
}

void check_f32(const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, kOp, ": ", name,
              " must be an fp32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes().equals(shape), kOp, ": ", name, " must have shape ", at::IntArrayRef(shape), ", got ",
              t.sizes());
}

// A transposed weight (K, n_pad) with n_pad a multiple of the kernel's width and >= n.
void check_weight_t(const char* name, const at::Tensor& t, int64_t K, int64_t n, int width) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous(), kOp, ": ",
              name, " must be a contiguous fp32 CPU matrix, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(t.size(0) == K && t.size(1) >= n && t.size(1) % width == 0, kOp, ": ", name, " must be (", K,
              ", n_pad) with n_pad >= ", n, " a multiple of ", width, " (the weight's transpose, zero-padded), got ",
              t.sizes());
}

void gemm(const ConvStepKernelTable* k, int64_t batch, const float* in, int64_t in_sb, const at::Tensor& wt,
          int64_t n, const std::optional<at::Tensor>& bias, float* out, int64_t out_sb) {
  RowsGemmParams g{};
  g.K = wt.size(0); g.n = n; g.n_pad = wt.size(1);
  g.in = in; g.in_sb = in_sb;
  g.wt = wt.data_ptr<float>();
  g.bias = bias ? bias->data_ptr<float>() : nullptr;
  g.out = out; g.out_sb = out_sb;
  if (n > 0) rows_gemm_parallel(k, g, batch);
}

at::Tensor mamba_step_op(const at::Tensor& hidden, const at::Tensor& conv_state, const at::Tensor& ssm_state,
                         const at::Tensor& in_weight_t, const std::optional<at::Tensor>& in_bias,
                         const at::Tensor& conv_taps, const std::optional<at::Tensor>& conv_bias,
                         const at::Tensor& x_proj_weight_t, const at::Tensor& dt_proj_weight_t, const at::Tensor& A,
                         const at::Tensor& D, const at::Tensor& dt_bias, const at::Tensor& out_weight_t,
                         const std::optional<at::Tensor>& out_bias, int64_t out_features, int64_t isa) {
  const ConvStepKernelTable* conv_k = conv_step_table(isa, kOp);
  const StateUpdateKernelTable* update_k = update_table(isa);
  TORCH_CHECK(hidden.dim() == 2, kOp, ": hidden must be (batch, d_model), got ", hidden.sizes());
  TORCH_CHECK(conv_state.dim() == 3 && ssm_state.dim() == 3 && A.dim() == 2 && dt_proj_weight_t.dim() == 2, kOp,
              ": conv_state, ssm_state must be 3-d and A, dt_proj_weight_t 2-d");
  const int64_t batch = hidden.size(0), d_model = hidden.size(1);
  const int64_t di = conv_state.size(1), K = conv_state.size(2), N = A.size(1), R = dt_proj_weight_t.size(0);
  check_f32("hidden", hidden, {batch, d_model});
  check_f32("conv_state", conv_state, {batch, di, K});
  check_f32("ssm_state", ssm_state, {batch, di, N});
  check_weight_t("in_weight_t", in_weight_t, d_model, 2 * di, conv_k->width);
  if (in_bias) check_f32("in_bias", *in_bias, {2 * di});
  check_f32("conv_taps", conv_taps, {di, K});
  if (conv_bias) check_f32("conv_bias", *conv_bias, {di});
  check_weight_t("x_proj_weight_t", x_proj_weight_t, di, R + 2 * N, conv_k->width);
  check_weight_t("dt_proj_weight_t", dt_proj_weight_t, R, di, conv_k->width);
  check_f32("A", A, {di, N});
  check_f32("D", D, {di});
  check_f32("dt_bias", dt_bias, {di});
  TORCH_CHECK(out_features >= 1, kOp, ": out_features must be >= 1, got ", out_features);
  check_weight_t("out_weight_t", out_weight_t, di, out_features, conv_k->width);
  if (out_bias) check_f32("out_bias", *out_bias, {out_features});
  TORCH_CHECK(K >= 1 && (K == 1 || conv_state.stride(2) == 1) && (N <= 1 || ssm_state.stride(2) == 1), kOp,
              ": conv_state and ssm_state must have unit stride along their last axis (they are updated in place)");
  TORCH_CHECK(conv_taps.is_contiguous() && A.is_contiguous() && D.is_contiguous() && dt_bias.is_contiguous() &&
                  (!conv_bias || conv_bias->is_contiguous()) && (!in_bias || in_bias->is_contiguous()) &&
                  (!out_bias || out_bias->is_contiguous()),
              kOp, ": conv_taps, the biases, A and D must be contiguous");
  TORCH_CHECK(hidden.stride(1) == 1 || d_model == 1, kOp, ": hidden must have unit stride along d_model");

  const at::TensorOptions f32 = hidden.options();
  // in_proj: x and z are the column halves of one (batch, 2 d_inner) product, read in place
  at::Tensor xz = at::empty({batch, 2 * di}, f32);
  gemm(conv_k, batch, hidden.data_ptr<float>(), hidden.stride(0), in_weight_t, 2 * di, in_bias, xz.data_ptr<float>(),
       2 * di);

  at::Tensor xc = at::empty({batch, di}, f32);
  ConvStepParams cp{};
  cp.batch = batch; cp.dim = di; cp.K = K;
  cp.window = conv_state.data_ptr<float>(); cp.w_sb = conv_state.stride(0); cp.w_sd = conv_state.stride(1);
  cp.x = xz.data_ptr<float>(); cp.x_sb = 2 * di;
  cp.taps = conv_taps.data_ptr<float>();
  cp.bias = conv_bias ? conv_bias->data_ptr<float>() : nullptr;
  cp.out = xc.data_ptr<float>();
  // one row is ~d_inner * K multiply-adds: split only when a block is worth a thread
  const int64_t conv_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, di * K));
  if (batch > 0 && di > 0)
    at::parallel_for(0, batch, conv_grain, [&](int64_t begin, int64_t end) { conv_k->run(cp, begin, end); });

  // x_proj -> (dt_low, B, C); dt_proj without its bias (the update adds it before the softplus)
  const int64_t n_dbl = R + 2 * N;
  at::Tensor x_dbl = at::empty({batch, n_dbl}, f32);
  gemm(conv_k, batch, xc.data_ptr<float>(), di, x_proj_weight_t, n_dbl, std::nullopt, x_dbl.data_ptr<float>(), n_dbl);
  at::Tensor dt = at::empty({batch, di}, f32);
  gemm(conv_k, batch, x_dbl.data_ptr<float>(), n_dbl, dt_proj_weight_t, di, std::nullopt, dt.data_ptr<float>(), di);

  at::Tensor y = at::empty({batch, di}, f32);
  StateUpdateParams p{};
  p.batch = batch; p.dim = di; p.N = N;
  p.state = ssm_state.data_ptr<float>(); p.state_sb = ssm_state.stride(0); p.state_sd = ssm_state.stride(1);
  p.indices = nullptr;
  p.x = xc.data_ptr<float>(); p.x_sb = di;
  p.dt = dt.data_ptr<float>(); p.dt_sb = di;
  p.z = xz.data_ptr<float>() + di; p.z_sb = 2 * di;
  p.B = x_dbl.data_ptr<float>() + R; p.B_sb = n_dbl;
  p.C = x_dbl.data_ptr<float>() + R + N; p.C_sb = n_dbl;
  p.A = A.data_ptr<float>();
  p.D = D.data_ptr<float>();
  p.dt_bias = dt_bias.data_ptr<float>();
  p.softplus = true;
  p.out = y.data_ptr<float>();
  if (batch > 0 && di > 0) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, di * N));  // as state_update
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) { update_k->run(p, begin, end); });
  }
  at::Tensor out = at::empty({batch, out_features}, f32);
  gemm(conv_k, batch, y.data_ptr<float>(), di, out_weight_t, out_features, out_bias, out.data_ptr<float>(),
       out_features);
  return out;
}

}  // namespace

void rows_gemm_parallel(const ConvStepKernelTable* k, const RowsGemmParams& g, int64_t batch) {
  const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, g.K * g.n_pad));
  if (batch > 0) at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) { k->gemm(g, b0, b1); });
}

const ConvStepKernelTable* conv_step_table(int64_t isa, const char* op) {
  return m2rec_cpu::required_variant_table(op, isa, M2REC_AVX512_OR_NULL(conv_step_kernels_avx512),
                                           M2REC_AVX2_OR_NULL(conv_step_kernels_avx2),
                                           &conv_step_kernels_generic);
}

}  // namespace m2rec_mamba_step

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("mamba_step(Tensor hidden, Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor in_weight_t, "
        "Tensor? in_bias, Tensor conv_taps, Tensor? conv_bias, Tensor x_proj_weight_t, Tensor dt_proj_weight_t, "
        "Tensor A, Tensor D, Tensor dt_bias, Tensor out_weight_t, Tensor? out_bias, int out_features, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("mamba_step", &m2rec_mamba_step::mamba_step_op);
}
