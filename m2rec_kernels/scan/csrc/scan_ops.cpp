// Torch-facing side of the compiled CPU scan: the ops registered as torch.ops.m2rec_scan_cpu.*, input
// preparation (fp32, unit stride along L), the choice of the ISA variant, at::parallel_for over the
// kernels' tasks and the fixed-order sums of their partial results. Python (m2rec_kernels/scan/cpu.py)
// checks the arguments first and owns the autograd Function.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <functional>
#include <numeric>
#include <string>
#include <tuple>

#include "cpu_isa.h"
#include "scan_api.h"

namespace m2rec_scan {
namespace {

using m2rec_cpu::cpu_has;
using m2rec_cpu::kAvx2;
using m2rec_cpu::kAvx512;
using m2rec_cpu::kGeneric;

// The variant's kernels, or nullptr when it is not in this library or the CPU lacks the instructions.
const KernelTable* table_or_null(int64_t isa) {
  return m2rec_cpu::variant_table(isa, M2REC_AVX512_OR_NULL(kernels_avx512), M2REC_AVX2_OR_NULL(kernels_avx2),
                       &kernels_generic);
}

const KernelTable* table(int64_t isa) {
  const KernelTable* t = table_or_null(isa);
  TORCH_CHECK(t != nullptr, "m2rec_scan_cpu: ISA variant ", isa,
              " is not in this build or not supported by this CPU");
  return t;
}

// fp32 (batch, dim, L) with unit stride along L (rows, mamba's layout) or along dim (time-major, the
// transpose of a (batch, L, dim) tensor); any other layout is copied into rows.
at::Tensor seq_f32(const at::Tensor& t) {
  at::Tensor x = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
  if (x.size(2) <= 1 || x.stride(2) == 1 || x.size(1) <= 1 || x.stride(1) == 1) return x;
  return x.contiguous();
}
bool time_major(const at::Tensor& x) { return x.size(2) > 1 && x.stride(2) != 1; }
at::Tensor contig_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }
float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

SeqIn seq_in(const at::Tensor& t) {
  SeqIn s;
  if (t.defined()) { s.data = t.data_ptr<float>(); s.sb = t.stride(0); s.sr = t.stride(1); s.st = t.stride(2); }
  return s;
}
// B or C: (batch, N, L), or grouped (batch, G, N, L) with the group stride in sg; any strides.
SeqIn bc_in(const at::Tensor& t) {
  SeqIn s = seq_in(t.dim() == 4 ? t.select(1, 0) : t);
  if (t.dim() == 4) s.sg = t.stride(1);
  return s;
}
int64_t bc_groups(const at::Tensor& t) { return t.dim() == 4 ? t.size(1) : 1; }

SeqOut seq_out(const at::Tensor& t) {
  SeqOut s;
  if (t.defined()) { s.data = t.data_ptr<float>(); s.sb = t.stride(0); s.sr = t.stride(1); s.st = t.stride(2); }
  return s;
}

// A new fp32 (batch, dim, L) tensor in the layout of ``like`` (so outputs follow their inputs).
at::Tensor seq_new(const at::Tensor& like, int64_t batch, int64_t dim, int64_t L, bool zero) {
  auto f32 = like.options().dtype(at::kFloat);
  if (time_major(like)) {
    return (zero ? at::zeros({batch, L, dim}, f32) : at::empty({batch, L, dim}, f32)).transpose(1, 2);
  }
  return zero ? at::zeros({batch, dim, L}, f32) : at::empty({batch, dim, L}, f32);
}

struct Inputs {  // tensors kept alive while the kernels read them
  at::Tensor u, delta, A, B, C, D, z, bias, lengths, delta_weight;
};

Inputs prepare(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
               const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& lengths) {
  TORCH_CHECK(u.device().is_cpu(), "m2rec_scan_cpu: tensors must be on the CPU");
  Inputs in;
  in.u = seq_f32(u);
  in.delta = seq_f32(delta);
  in.A = contig_f32(A);
  in.B = B.scalar_type() == at::kFloat ? B : B.to(at::kFloat);  // any strides
  in.C = C.scalar_type() == at::kFloat ? C : C.to(at::kFloat);
  if (D.has_value()) in.D = contig_f32(*D);
  if (z.has_value()) in.z = seq_f32(*z);
  if (delta_bias.has_value()) in.bias = contig_f32(*delta_bias);
  if (lengths.has_value()) in.lengths = lengths->to(at::kLong).contiguous();
  return in;
}

ScanParams params_for(const Inputs& in, const KernelTable* k, bool softplus) {
  ScanParams p{};
  p.batch = in.u.size(0);
  p.dim = in.u.size(1);
  p.L = in.u.size(2);
  p.N = in.A.size(1);
  TORCH_CHECK(in.B.dim() >= 3 && in.C.dim() >= 3,
              "m2rec_scan_cpu: B and C must be (batch, N, L) or grouped (batch, G, N, L); time-invariant "
              "(dim, N) is not supported");
  p.B_groups = bc_groups(in.B);
  p.C_groups = bc_groups(in.C);
  TORCH_CHECK(p.B_groups > 0 && p.C_groups > 0 && p.dim % p.B_groups == 0 && p.dim % p.C_groups == 0,
              "m2rec_scan_cpu: the groups of B and C must divide dim");
  // a block never straddles a group of B or C: segments of gcd(channels per group) channels
  p.B_group = p.dim > 0 ? p.dim / p.B_groups : 1;
  p.C_group = p.dim > 0 ? p.dim / p.C_groups : 1;
  p.seg = std::gcd(p.B_group, p.C_group);
  p.seg_blocks = (p.seg + k->width - 1) / k->width;
  p.n_blocks = p.dim > 0 ? p.dim / p.seg * p.seg_blocks : 0;
  p.n_chunks = (p.L + k->chunk - 1) / k->chunk;
  p.u = seq_in(in.u);
  p.delta = seq_in(in.delta);
  p.z = seq_in(in.z);
  p.B = bc_in(in.B);
  p.C = bc_in(in.C);
  p.A = in.A.data_ptr<float>();
  p.D = ptr_or_null(in.D);
  p.delta_bias = ptr_or_null(in.bias);
  p.lengths = in.lengths.defined() ? in.lengths.data_ptr<int64_t>() : nullptr;
  p.softplus = softplus;
  if (in.delta_weight.defined()) {
    p.delta_weight = in.delta_weight.data_ptr<float>();
    p.delta_rank = in.delta_weight.size(1);
  }
  return p;
}

void run_tasks(const ScanParams& p, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t n_tasks = p.batch * p.n_blocks;
  if (n_tasks == 0 || p.L == 0) return;
  at::parallel_for(0, n_tasks, 1, fn);
}

// out[m] = sum_k part[k][m] in the order k = 0, 1, ... whatever the number of threads.
at::Tensor fixed_order_sum(const at::Tensor& part, at::IntArrayRef out_shape) {
  at::Tensor out = at::zeros(out_shape, part.options());
  const int64_t K = part.size(0), M = out.numel();
  if (K == 0 || M == 0) return out;
  const float* src = part.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, M, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t k = 0; k < K; ++k) {
      const float* row = src + k * M;
      for (int64_t m = begin; m < end; ++m) dst[m] += row[m];
    }
  });
  return out;
}

at::Tensor cast_like(const at::Tensor& x, const at::Tensor& like) {
  return x.scalar_type() == like.scalar_type() ? x : x.to(like.scalar_type());
}

// With delta_weight (dim, R), `delta` is the low-rank dt_low (batch, R, L) (see scan_api.h).
void check_low_rank(const at::Tensor& u, const at::Tensor& dt_low, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == u.size(1) && w.size(1) >= 1,
              "m2rec_scan_cpu.forward: delta_weight must be (dim=", u.size(1), ", R >= 1), got ", w.sizes());
  TORCH_CHECK(dt_low.dim() == 3 && dt_low.size(0) == u.size(0) && dt_low.size(1) == w.size(1) &&
                  dt_low.size(2) == u.size(2),
              "m2rec_scan_cpu.forward: with delta_weight, delta must be dt_low (batch, R, L) = (", u.size(0), ", ",
              w.size(1), ", ", u.size(2), "), got ", dt_low.sizes());
}

// mode: ForwardMode. Returns (out, last_state, ckpt): out (batch, dim, L) in u's dtype and memory layout,
// or (batch, dim) for kForwardFinal; last_state (batch, dim, N) fp32 when want_last or final (else empty); ckpt
// (batch, n_chunks, N, dim) fp32 for kForwardOutCkpt (else empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& lengths, bool softplus,
    int64_t mode, bool want_last, int64_t isa, const std::optional<at::Tensor>& delta_weight) {
  const KernelTable* k = table(isa);
  TORCH_CHECK(mode >= kForwardOut && mode <= kForwardFinal, "m2rec_scan_cpu.forward: bad mode ", mode);
  if (delta_weight.has_value()) check_low_rank(u, delta, *delta_weight);
  Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, lengths);
  if (delta_weight.has_value()) in.delta_weight = contig_f32(*delta_weight);
  ScanParams p = params_for(in, k, softplus);
  auto f32 = in.u.options().dtype(at::kFloat);
  const bool final_only = mode == kForwardFinal;
  const bool empty = p.batch * p.dim == 0 || p.L == 0;
  auto alloc = [&](at::IntArrayRef shape) { return empty ? at::zeros(shape, f32) : at::empty(shape, f32); };
  at::Tensor out = final_only ? alloc({p.batch, p.dim}) : seq_new(in.u, p.batch, p.dim, p.L, empty);
  at::Tensor last = (want_last || final_only) ? alloc({p.batch, p.dim, p.N}) : at::empty({0}, f32);
  at::Tensor ckpt = mode == kForwardOutCkpt ? alloc({p.batch, p.n_chunks, p.N, p.dim}) : at::empty({0}, f32);
  if (final_only) p.out_last = out.data_ptr<float>(); else p.out = seq_out(out);
  p.last_state = last.numel() ? last.data_ptr<float>() : nullptr;
  p.ckpt = ckpt.numel() ? ckpt.data_ptr<float>() : nullptr;
  run_tasks(p, [&](int64_t begin, int64_t end) { k->forward(p, static_cast<int>(mode), begin, end); });
  return {cast_like(out, u), last, ckpt};
}

// Gradients w.r.t. (u, delta, A, B, C, D, z, delta_bias), each in its input's dtype; empty for an
// absent input. dout / dlast may be absent (no gradient reaches out / the last state).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
backward_op(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
            const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
            const std::optional<at::Tensor>& delta_bias, const std::optional<at::Tensor>& lengths,
            bool softplus, const at::Tensor& ckpt, const std::optional<at::Tensor>& dout,
            const std::optional<at::Tensor>& dlast, int64_t isa) {
  const KernelTable* k = table(isa);
  Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, lengths);
  ScanParams p = params_for(in, k, softplus);
  auto f32 = in.u.options().dtype(at::kFloat);
  const bool empty = p.batch * p.dim == 0 || p.L == 0;
  TORCH_CHECK(empty || (ckpt.scalar_type() == at::kFloat && ckpt.is_contiguous() &&
                        ckpt.numel() == p.batch * p.n_chunks * p.N * p.dim),
              "m2rec_scan_cpu.backward: the checkpoints do not match the inputs");
  at::Tensor dout_f, dlast_f;
  if (dout.has_value()) {
    dout_f = seq_f32(*dout);
    p.dout = seq_in(dout_f);
  }
  if (dlast.has_value()) {
    dlast_f = contig_f32(*dlast);
    p.dlast = dlast_f.data_ptr<float>();
  }
  p.ckpt = empty ? nullptr : ckpt.data_ptr<float>();
  auto alloc = [&](at::IntArrayRef shape) { return empty ? at::zeros(shape, f32) : at::empty(shape, f32); };
  at::Tensor du = seq_new(in.u, p.batch, p.dim, p.L, empty);  // gradients in their inputs' layouts
  at::Tensor ddelta = seq_new(in.delta, p.batch, p.dim, p.L, empty);
  at::Tensor dz = in.z.defined() ? seq_new(in.z, p.batch, p.dim, p.L, empty) : at::Tensor();
  at::Tensor dA_part = at::zeros({p.batch, p.dim, p.N}, f32);
  at::Tensor dD_part = in.D.defined() ? at::zeros({p.batch, p.dim}, f32) : at::Tensor();
  at::Tensor dbias_part = in.bias.defined() ? at::zeros({p.batch, p.dim}, f32) : at::Tensor();
  // per block of each group (scan_api.h), summed below into (batch, G, N, L)
  at::Tensor dB_part = at::zeros({p.B_group / p.seg * p.seg_blocks, p.batch, p.B_groups, p.N, p.L}, f32);
  at::Tensor dC_part = at::zeros({p.C_group / p.seg * p.seg_blocks, p.batch, p.C_groups, p.N, p.L}, f32);
  p.du = seq_out(du);
  p.ddelta = seq_out(ddelta);
  p.dz = seq_out(dz);
  p.dA_part = dA_part.data_ptr<float>();
  p.dD_part = ptr_or_null(dD_part);
  p.dbias_part = ptr_or_null(dbias_part);
  p.dB_part = dB_part.data_ptr<float>();
  p.dC_part = dC_part.data_ptr<float>();
  run_tasks(p, [&](int64_t begin, int64_t end) { k->backward(p, begin, end); });

  at::Tensor dA = fixed_order_sum(dA_part, {p.dim, p.N});
  at::Tensor dB = fixed_order_sum(dB_part, {p.batch, p.B_groups, p.N, p.L}).view(B.sizes());
  at::Tensor dC = fixed_order_sum(dC_part, {p.batch, p.C_groups, p.N, p.L}).view(C.sizes());
  at::Tensor dD = dD_part.defined() ? cast_like(fixed_order_sum(dD_part, {p.dim}), *D) : at::empty({0}, f32);
  at::Tensor dbias = dbias_part.defined() ? cast_like(fixed_order_sum(dbias_part, {p.dim}), *delta_bias)
                                          : at::empty({0}, f32);
  return {cast_like(du, u), cast_like(ddelta, delta), cast_like(dA, A), cast_like(dB, B), cast_like(dC, C),
          dD, dz.defined() ? cast_like(dz, *z) : at::empty({0}, f32), dbias};
}

// Vector width of the variant when it runs here, else 0.
int64_t isa_width(int64_t isa) {
  const KernelTable* t = table_or_null(isa);
  return t ? t->width : 0;
}

// The kernels' exp on a float tensor (accuracy tests): the scan's decay path or the general exp.
at::Tensor vector_exp_op(const at::Tensor& x, int64_t isa, bool scan_path) {
  const KernelTable* k = table(isa);
  at::Tensor xf = contig_f32(x);
  at::Tensor y = at::empty_like(xf);
  k->exp(xf.data_ptr<float>(), y.data_ptr<float>(), xf.numel(), scan_path);
  return y;
}

}  // namespace
}  // namespace m2rec_scan

TORCH_LIBRARY(m2rec_scan_cpu, m) {
  m.def("forward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? lengths, bool softplus, int mode, bool want_last, int isa, "
        "Tensor? delta_weight=None) -> (Tensor, Tensor, Tensor)");
  m.def("backward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? lengths, bool softplus, Tensor ckpt, Tensor? dout, Tensor? dlast, "
        "int isa) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("vector_exp(Tensor x, int isa, bool scan_path) -> Tensor");
  m.def("isa_width(int isa) -> int", &m2rec_scan::isa_width);  // no tensor argument: catch-all
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("forward", &m2rec_scan::forward_op);
  m.impl("backward", &m2rec_scan::backward_op);
  m.impl("vector_exp", &m2rec_scan::vector_exp_op);
}
