// The op torch.ops.m2rec_scan_cpu.fusion_ffn_step: the rest of an M2Rec layer's streaming step after its
// branches, in one call — gated_fusion at one position (DESIGN §2.3: alpha = softmax(cat(branches) ·
// gate_weight^T + gate_bias), LayerNorm(h + sum_i alpha_i branch_i)), then the FFN in eval mode
// (LayerNorm(f + W2 · GELU(W1 · f)), m2rec/layers/feed_forward.py). The same ATen ops as the Python form
// (m2rec/layers/m2rec_layer.py, M2RecLayer.step_unchecked), without a Python call per op: at batch 64,
// d 64 their dispatch cost more than their arithmetic (DESIGN §10, "Streaming"). Any floating dtype;
// Python calls it for fp32 and fp64 CPU rows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace m2rec_fusion_step {
namespace {

constexpr const char* kOp = "m2rec_scan_cpu.fusion_ffn_step";

at::Tensor fusion_ffn_step_op(at::TensorList branches, const at::Tensor& h, const at::Tensor& gate_weight,
                              const at::Tensor& gate_bias, const at::Tensor& norm_weight, const at::Tensor& norm_bias,
                              double norm_eps, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                              const at::Tensor& b2, const at::Tensor& ffn_norm_weight,
                              const at::Tensor& ffn_norm_bias, double ffn_norm_eps) {
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
  const at::Tensor alpha = at::softmax(at::linear(at::cat(branches, 1), gate_weight, gate_bias), -1);  // (batch, k)
  at::Tensor mixed = h.clone();
  for (int64_t i = 0; i < k; ++i) mixed.addcmul_(branches[i], alpha.narrow(1, i, 1));
  const at::Tensor fused = at::layer_norm(mixed, {d}, norm_weight, norm_bias, norm_eps);
  at::Tensor inner = at::linear(at::gelu(at::linear(fused, w1, b1)), w2, b2);
  return at::layer_norm(inner.add_(fused), {d}, ffn_norm_weight, ffn_norm_bias, ffn_norm_eps);
}

}  // namespace
}  // namespace m2rec_fusion_step

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("fusion_ffn_step(Tensor[] branches, Tensor h, Tensor gate_weight, Tensor gate_bias, Tensor norm_weight, "
        "Tensor norm_bias, float norm_eps, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor ffn_norm_weight, "
        "Tensor ffn_norm_bias, float ffn_norm_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("fusion_ffn_step", &m2rec_fusion_step::fusion_ffn_step_op);
}
