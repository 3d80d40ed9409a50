// Torch-facing side of the compiled causal depthwise conv1d: the ops torch.ops.m2rec_conv_cpu.*, input
// preparation (fp32, time-major), the ISA variant, at::parallel_for over the kernels' tasks and the
// fixed-order sums of the per-row weight and bias gradients. Python (m2rec_kernels/conv/cpu.py) checks
// the arguments first and owns the autograd Function. Same library and ISA rule as the scan.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <tuple>

#include "conv_api.h"
#include "cpu_isa.h"

namespace m2rec_conv {
namespace {

const ConvKernelTable* table(int64_t isa) {
  return m2rec_cpu::required_variant_table("m2rec_conv_cpu", isa, M2REC_AVX512_OR_NULL(conv_kernels_avx512),
                                           M2REC_AVX2_OR_NULL(conv_kernels_avx2),
                                           &conv_kernels_generic);
}

// A (batch, dim, L) sequence tensor is time-major when its channels have unit stride (the transpose of
// a (batch, L, dim) tensor); the kernels read those in place.
bool time_major(const at::Tensor& x) { return x.size(1) <= 1 || x.stride(1) == 1; }

// fp32 and time-major: x itself when it already is, else a (batch, L, dim) copy seen as (batch, dim, L).
at::Tensor time_major_f32(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat && time_major(x)) return x;
  at::Tensor f = at::empty({x.size(0), x.size(2), x.size(1)}, x.options().dtype(at::kFloat));
  return f.copy_(x.transpose(1, 2)).transpose(1, 2);
}

at::Tensor new_time_major(const at::Tensor& like) {
  return at::empty({like.size(0), like.size(2), like.size(1)}, like.options().dtype(at::kFloat)).transpose(1, 2);
}

// A result computed time-major, returned in the dtype and layout of ``like`` (the op's input).
at::Tensor like_input(const at::Tensor& out, const at::Tensor& like) {
  at::Tensor r = out.scalar_type() == like.scalar_type() ? out : out.to(like.scalar_type());
  return time_major(like) ? r : r.contiguous();
}

ConvParams params_for(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, bool silu, int width) {
  ConvParams p{};
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.L = x.size(2);
  p.K = w.size(1);
  const int64_t n_blocks = (p.dim + width - 1) / width;
  p.group = std::min<int64_t>(n_blocks, 8) * width;  // 8 vectors of channels per task
  p.n_groups = (p.dim + p.group - 1) / p.group;
  p.x = x.data_ptr<float>();
  p.x_sb = x.stride(0);
  p.x_st = x.stride(2);
  p.weight = w.data_ptr<float>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.silu = silu;
  return p;
}

void run_tasks(const ConvParams& p, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t n_tasks = p.batch * p.n_groups;
  if (n_tasks == 0 || p.L == 0) return;
  at::parallel_for(0, n_tasks, 1, fn);
}

// out[m] = sum_b part[b][m], b = 0, 1, ... in order whatever the number of threads.
at::Tensor sum_rows(const at::Tensor& part) {
  at::Tensor out = at::zeros({part.size(1), part.size(2)}, part.options());
  if (part.numel() == 0) return out;
  const int64_t B = part.size(0), M = out.numel();
  const float* src = part.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t m = 0; m < M; ++m) dst[m] += src[b * M + m];
  return out;
}

at::Tensor forward_op(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      bool silu, int64_t isa) {
  const ConvKernelTable* k = table(isa);
  TORCH_CHECK(x.device().is_cpu(), "m2rec_conv_cpu: tensors must be on the CPU");
  at::Tensor xf = time_major_f32(x);
  at::Tensor wf = weight.to(at::kFloat).contiguous();
  at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = new_time_major(xf);
  ConvParams p = params_for(xf, wf, bf, silu, k->width);
  p.y = y.data_ptr<float>();
  p.y_sb = y.stride(0);
  p.y_st = y.stride(2);
  run_tasks(p, [&](int64_t begin, int64_t end) { k->forward(p, begin, end); });
  return like_input(y, x);
}

// (dx, dweight, dbias): dx in x's dtype and layout, dweight (dim, K) and dbias (dim,) in their inputs'
// dtypes (dbias empty without a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool silu,
    const at::Tensor& dy, int64_t isa) {
  const ConvKernelTable* k = table(isa);
  at::Tensor xf = time_major_f32(x);
  at::Tensor wf = weight.to(at::kFloat).contiguous();
  at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dyf = time_major_f32(dy);
  at::Tensor dx = new_time_major(xf);
  ConvParams p = params_for(xf, wf, bf, silu, k->width);
  auto f32 = xf.options().dtype(at::kFloat);
  at::Tensor dw_part = at::zeros({p.batch, p.dim, p.K}, f32);
  at::Tensor db_part = bias.has_value() ? at::zeros({p.batch, p.dim, 1}, f32) : at::Tensor();
  p.dy = dyf.data_ptr<float>();
  p.dy_sb = dyf.stride(0);
  p.dy_st = dyf.stride(2);
  p.dx = dx.data_ptr<float>();
  p.dx_sb = dx.stride(0);
  p.dx_st = dx.stride(2);
  p.dw_part = dw_part.data_ptr<float>();
  p.db_part = db_part.defined() ? db_part.data_ptr<float>() : nullptr;
  run_tasks(p, [&](int64_t begin, int64_t end) { k->backward(p, begin, end); });
  at::Tensor dw = sum_rows(dw_part).to(weight.scalar_type());
  at::Tensor db = bias.has_value() ? sum_rows(db_part).view({p.dim}).to(bias->scalar_type()) : at::empty({0}, f32);
  return {like_input(dx, x), dw, db};
}

}  // namespace
}  // namespace m2rec_conv

TORCH_LIBRARY(m2rec_conv_cpu, m) {
  m.def("forward(Tensor x, Tensor weight, Tensor? bias, bool silu, int isa) -> Tensor");
  m.def("backward(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor dy, int isa) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(m2rec_conv_cpu, CPU, m) {
  m.impl("forward", &m2rec_conv::forward_op);
  m.impl("backward", &m2rec_conv::backward_op);
}
