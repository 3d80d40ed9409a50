// The op torch.ops.m2rec_scan_cpu.fusion_ffn_step: the rest of an M2Rec layer's streaming step after its
// branches, in one call — gated_fusion at one position (DESIGN §2.3: alpha = softmax(cat(branches) ·
// gate_weight^T + gate_bias), LayerNorm(h + sum_i alpha_i branch_i)), then the FFN in eval mode
// (LayerNorm(f + W2 · GELU(W1 · f)), m2rec/layers/feed_forward.py). The same ATen ops as the Python form
// (m2rec/layers/m2rec_layer.py, M2RecLayer.step_unchecked), without a Python call per op: at batch 64,
// d 64 their dispatch cost more than their arithmetic (DESIGN §10, "Streaming"). Any floating dtype;
// Python calls it for fp32 and fp64 CPU rows. With w1_t and w2_t (fp32: the FFN weights' transposes,
// columns zero-padded to whole vectors) the gate, the LayerNorms, the FFN's products and GELU run on the
// step kernels of mamba_step_isa.cpp instead of ATen's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "mamba_step_api.h"

namespace m2rec_fusion_step {
namespace {

constexpr const char* kOp = "m2rec_scan_cpu.fusion_ffn_step";

at::Tensor fusion_ffn_step_op(at::TensorList branches, const at::Tensor& h, const at::Tensor& gate_weight,
                              const at::Tensor& gate_bias, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                              double norm_eps, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                              const at::Tensor& b2, const at::Tensor& ffn_norm_weight,
                              const at::Tensor& ffn_norm_bias, double ffn_norm_eps,
                              const std::optional<at::Tensor>& w1_t, const std::optional<at::Tensor>& w2_t,
                              int64_t isa) {
  const int64_t k = static_cast<int64_t>(branches.size());
  TORCH_CHECK(k >= 1, kOp, ": needs at least one branch");
  TORCH_CHECK(h.dim() == 2, kOp, ": h must be (batch, d), got ", h.sizes());
  const int64_t d = h.size(1);
  for (const at::Tensor& b : branches)
    TORCH_CHECK(b.sizes() == h.sizes() && b.scalar_type() == h.scalar_type(), kOp,
                ": every branch must be (batch, d) = ", h.sizes(), " in ", h.scalar_type(), ", got ", b.sizes(),
                " in ", b.scalar_type());
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.size(0) == k && gate_weight.size(1) == k * d, kOp,
              ": gate_weight must be (", k, ", ", k * d, "), got ", gate_weight.sizes());
  TORCH_CHECK(w1_t.has_value() == w2_t.has_value(), kOp, ": give both w1_t and w2_t or neither");
  if (!w1_t) {
    const at::Tensor alpha = at::softmax(at::linear(at::cat(branches, 1), gate_weight, gate_bias), -1);  // (batch, k)
    at::Tensor mixed = h.clone();
    for (int64_t i = 0; i < k; ++i) mixed.addcmul_(branches[i], alpha.narrow(1, i, 1));
    const at::Tensor fused = at::layer_norm(mixed, {d}, norm_weight, norm_bias, norm_eps);
    at::Tensor inner = at::linear(at::gelu(at::linear(fused, w1, b1)), w2, b2);
    return at::layer_norm(inner.add_(fused), {d}, ffn_norm_weight, ffn_norm_bias, ffn_norm_eps);
  }
  TORCH_CHECK(h.scalar_type() == at::kFloat, kOp, ": w1_t / w2_t are for fp32 rows, got ", h.scalar_type());
  for (const at::Tensor* t : {&gate_weight, &gate_bias, &norm_weight, &norm_bias, &ffn_norm_weight, &ffn_norm_bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), kOp,
                ": with w1_t / w2_t the gate and LayerNorm parameters must be contiguous fp32, got ", t->scalar_type());
  TORCH_CHECK(gate_bias.numel() == k && norm_weight.numel() == d && norm_bias.numel() == d &&
                  ffn_norm_weight.numel() == d && ffn_norm_bias.numel() == d,
              kOp, ": gate_bias must hold ", k, " values and the LayerNorm parameters ", d);
  // The gate and the first LayerNorm by the step kernels' row loops (mamba_step_isa.cpp, gate_norm: a
  // dozen ATen calls on (64, 64) rows cost more than this arithmetic): alpha = softmax(gate_weight ·
  // cat(branches) + gate_bias), LayerNorm(h + sum_i alpha_i branch_i).
  // Rows are read in place when their elements are adjacent (any row stride: the step's h and semantic
  // stream are column halves of one gathered table row); a copy otherwise.
  auto rows_of = [](const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); };
  const at::Tensor hc = rows_of(h);
  std::vector<at::Tensor> bc;
  std::vector<const float*> bp;
  std::vector<int64_t> b_sr;
  for (const at::Tensor& b : branches) {
    bc.push_back(rows_of(b));
    bp.push_back(bc.back().data_ptr<float>());
    b_sr.push_back(bc.back().stride(0));
  }
  const m2rec_mamba_step::ConvStepKernelTable* kt = m2rec_mamba_step::conv_step_table(isa, kOp);
  const int64_t rows = h.size(0);
  at::Tensor fused = at::empty({rows, d}, hc.options());
  m2rec_mamba_step::GateNormParams gp{};
  gp.k = k; gp.d = d;
  gp.branches = bp.data(); gp.branch_sr = b_sr.data();
  gp.h = hc.data_ptr<float>(); gp.h_sr = hc.stride(0);
  gp.gate_weight = gate_weight.data_ptr<float>(); gp.gate_bias = gate_bias.data_ptr<float>();
  gp.norm_weight = norm_weight.data_ptr<float>(); gp.norm_bias = norm_bias.data_ptr<float>();
  gp.eps = static_cast<float>(norm_eps);
  gp.out = fused.data_ptr<float>();
  if (rows > 0 && d > 0) kt->gate_norm(gp, 0, rows);
  // fp32 with the weights' padded transposes: the two products and the GELU by the step kernels
  // (mamba_step_isa.cpp; at batch 64 torch's BLAS and GELU cost 2x these)
  const int64_t batch = rows, inner_n = w1.size(0);
  auto check_t = [&](const char* name, const at::Tensor& t, const at::Tensor& b, int64_t K, int64_t n) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.is_contiguous() && t.size(0) == K &&
                    t.size(1) >= n && t.size(1) % kt->width == 0,
                kOp, ": ", name, " must be a contiguous fp32 (", K, ", n_pad) matrix, n_pad >= ", n,
                " a multiple of ", kt->width, ", got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == n, kOp, ": the bias beside ",
                name, " must be ", n, " contiguous fp32 values");
  };
  check_t("w1_t", *w1_t, b1, d, inner_n);
  check_t("w2_t", *w2_t, b2, inner_n, d);
  const at::Tensor& f = fused;
  at::Tensor inner = at::empty({batch, inner_n}, f.options());
  m2rec_mamba_step::RowsGemmParams g{};
  g.K = d; g.n = inner_n; g.n_pad = w1_t->size(1); g.in = f.data_ptr<float>(); g.in_sb = d;
  g.wt = w1_t->data_ptr<float>(); g.bias = b1.data_ptr<float>(); g.out = inner.data_ptr<float>(); g.out_sb = inner_n;
  m2rec_mamba_step::rows_gemm_parallel(kt, g, batch);
  kt->gelu(inner.data_ptr<float>(), batch * inner_n);
  at::Tensor out = at::empty({batch, d}, f.options());
  g.K = inner_n; g.n = d; g.n_pad = w2_t->size(1); g.in = inner.data_ptr<float>(); g.in_sb = inner_n;
  g.wt = w2_t->data_ptr<float>(); g.bias = b2.data_ptr<float>(); g.out = out.data_ptr<float>(); g.out_sb = d;
  m2rec_mamba_step::rows_gemm_parallel(kt, g, batch);
  if (d > 0)
    kt->residual_norm(out.data_ptr<float>(), f.data_ptr<float>(), batch, d, ffn_norm_weight.data_ptr<float>(),
                      ffn_norm_bias.data_ptr<float>(), static_cast<float>(ffn_norm_eps));
  return out;
}

}  // namespace
}  // namespace m2rec_fusion_step

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("fusion_ffn_step(Tensor[] branches, Tensor h, Tensor gate_weight, Tensor gate_bias, Tensor norm_weight, "
        "Tensor norm_bias, float norm_eps, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor ffn_norm_weight, "
        "Tensor ffn_norm_bias, float ffn_norm_eps, Tensor? w1_t, Tensor? w2_t, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("fusion_ffn_step", &m2rec_fusion_step::fusion_ffn_step_op);
}
