// Torch-facing side of the compiled one-step selective scan: the op torch.ops.m2rec_scan_cpu.state_update
// (a fragment of the scan's library, same ISA rule as the scan and the conv), input preparation (fp32,
// unit stride along the last axis; views are read in place), the ISA variant and at::parallel_for over
// batch rows. Python (m2rec_kernels/scan/ops.py) checks the arguments first (the public function).
//
// The state is updated in place when it is fp32 with unit stride along N (any row / channel strides);
// otherwise (bf16 / fp16 state, or another layout) its rows are worked on in an fp32 copy and written
// back rounded, after the output has been formed from the fp32 values (as the reference does).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu_isa.h"
#include "state_update_api.h"

namespace m2rec_state_update {
namespace {

const StateUpdateKernelTable* table(int64_t isa) {
  return m2rec_cpu::required_variant_table("m2rec_scan_cpu.state_update", isa, M2REC_AVX512_OR_NULL(state_update_kernels_avx512),
                                           M2REC_AVX2_OR_NULL(state_update_kernels_avx2),
                                           &state_update_kernels_generic);
}

// fp32 with unit stride along the last axis: t itself when it already is (a slice of in_proj's or
// x_proj's output, say), else a contiguous fp32 copy.
at::Tensor rows_f32(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat && (t.size(-1) <= 1 || t.stride(-1) == 1)) return t;
  return t.to(at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor state_update_op(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                           const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                           const std::optional<at::Tensor>& dt_bias,
                           const std::optional<at::Tensor>& state_batch_indices, bool dt_softplus, int64_t isa) {
  const StateUpdateKernelTable* k = table(isa);
  TORCH_CHECK(state.device().is_cpu(), "m2rec_scan_cpu.state_update: tensors must be on the CPU");
  const int64_t batch = x.size(0), dim = x.size(1), N = A.size(1);
  at::Tensor xf = rows_f32(x), dtf = rows_f32(dt), Bf = rows_f32(B), Cf = rows_f32(C);
  at::Tensor zf = z.has_value() ? rows_f32(*z) : at::Tensor();
  at::Tensor Af = A.to(at::kFloat).contiguous();
  at::Tensor Df = D.has_value() ? D->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor biasf = dt_bias.has_value() ? dt_bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor idx = state_batch_indices.has_value() ? state_batch_indices->to(at::kLong).contiguous() : at::Tensor();

  const bool in_place = state.scalar_type() == at::kFloat && (N <= 1 || state.stride(2) == 1);
  at::Tensor work;       // the fp32 states the kernel updates
  at::Tensor work_idx;   // its row per batch row (pool form), < 0 = padding
  if (in_place) {
    work = state;
    work_idx = idx;
  } else if (idx.defined()) {  // this step's rows of the pool, in fp32, in batch order
    work = state.index_select(0, idx.clamp_min(0)).to(at::kFloat).contiguous();
    work_idx = at::where(idx >= 0, at::arange(batch, idx.options()), idx);
  } else {
    work = state.to(at::kFloat).contiguous();
  }

  at::Tensor out = at::empty({batch, dim}, xf.options().dtype(at::kFloat));
  StateUpdateParams p{};
  p.batch = batch; p.dim = dim; p.N = N;
  p.state = work.data_ptr<float>(); p.state_sb = work.stride(0); p.state_sd = work.stride(1);
  p.indices = work_idx.defined() ? work_idx.data_ptr<int64_t>() : nullptr;
  p.x = xf.data_ptr<float>(); p.x_sb = xf.stride(0);
  p.dt = dtf.data_ptr<float>(); p.dt_sb = dtf.stride(0);
  p.z = ptr_or_null(zf); p.z_sb = zf.defined() ? zf.stride(0) : 0;
  p.B = Bf.data_ptr<float>(); p.B_sb = Bf.stride(0);
  p.C = Cf.data_ptr<float>(); p.C_sb = Cf.stride(0);
  p.A = Af.data_ptr<float>();
  p.D = ptr_or_null(Df);
  p.dt_bias = ptr_or_null(biasf);
  p.softplus = dt_softplus;
  p.out = out.data_ptr<float>();
  if (batch > 0 && dim > 0) {
    // rows of ~dim * N exps each: split only when a row block is worth a thread (~16k state updates)
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, dim * N));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) { k->run(p, begin, end); });
  }

  if (!in_place) {  // write the updated rows back, rounded to the state's dtype
    if (idx.defined()) {
      at::Tensor rows = (idx >= 0).nonzero().select(1, 0);
      state.index_copy_(0, idx.index_select(0, rows), work.index_select(0, rows).to(state.scalar_type()));
    } else {
      state.copy_(work);
    }
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace
}  // namespace m2rec_state_update

TORCH_LIBRARY_FRAGMENT(m2rec_scan_cpu, m) {
  m.def("state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? dt_bias, Tensor? state_batch_indices, bool dt_softplus, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(m2rec_scan_cpu, CPU, m) {
  m.impl("state_update", &m2rec_state_update::state_update_op);
}
