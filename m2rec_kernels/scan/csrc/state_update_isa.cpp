// The one-step selective scan (streaming inference: one new token per row), compiled once per ISA like
// scan_isa.cpp (the build defines one of M2REC_ISA_AVX512 / _AVX2 / _GENERIC). Semantics: state_update_api.h,
// exactly selective_state_update_ref (m2rec_kernels/scan/reference.py), itself mamba_ssm's
// ops/triton/selective_state_update.py.
//
// Per batch row: one vector pass over the channels for delta (bias, softplus) and the gate silu(z);
// then per channel, the N states in vectors of W lanes (the state's unit-stride axis, so the state is
// read and written in place with plain vector moves): decay = 2^(delta A log2 e) (the scan's exp,
// exp2_product where fast_exp_ok allows it), s = decay s + (delta x) B,
// and sum_n s C accumulated in a vector, reduced across lanes once per channel. The output is formed
// from the fp32 state before any rounding to the state's storage dtype (the binding does that), as the
// reference and mamba's Triton kernel do.
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "simd.h"
#include "state_update_api.h"

namespace {

using m2rec_state_update::StateUpdateParams;

constexpr int W = Vec::W;


// delta[d] and gate[d] of one batch row, W channels at a time.
void row_prologue(const StateUpdateParams& p, int64_t b, float* delta, float* gate) {
  const float* dt = p.dt + b * p.dt_sb;
  const float* z = p.z ? p.z + b * p.z_sb : nullptr;
  for (int64_t d0 = 0; d0 < p.dim; d0 += W) {
    const int lanes = static_cast<int>(p.dim - d0 < W ? p.dim - d0 : W);
    Vec v = load_n(dt + d0, lanes);
    if (p.dt_bias) v = v + load_n(p.dt_bias + d0, lanes);
    if (p.softplus) v = softplus(v);
    store_n(v, delta + d0, lanes);
    if (z) {
      Vec zv = load_n(z + d0, lanes);
      store_n(zv * sigmoid(zv), gate + d0, lanes);
    }
  }
}

// One channel's N states (full vectors only when kFull; else the last vector holds N % W lanes): the
// vector of lane partials of sum_n s C. a2 = A log2 e: decay = 2^(delta a2), by exp2_product when
// fast_exp_ok allows it (kFast), as the scan forms its decays.
template <bool kFull, bool kFast>
inline Vec channel_partials(float* s, const float* a2, const float* Bp, const float* Cp, int64_t N, float dlt,
                            float dx) {
  const Vec dv = Vec::bcast(dlt), dxv = Vec::bcast(dx);
  Vec acc = Vec::zero();
  int64_t n = 0;
  for (; n + W <= N; n += W) {
    const Vec a = Vec::load(a2 + n);
    const Vec decay = kFast ? exp2_product(dv, a) : exp2(dv * a);
    Vec st = fma(decay, Vec::load(s + n), dxv * Vec::load(Bp + n));
    st.store(s + n);
    acc = fma(st, Vec::load(Cp + n), acc);
  }
  if (!kFull) {
    const int lanes = static_cast<int>(N - n);
    const Vec a = Vec::load(a2 + n);
    const Vec decay = kFast ? exp2_product(dv, a) : exp2(dv * a);
    Vec st = fma(decay, load_n(s + n, lanes), dxv * Vec::load(Bp + n));
    store_n(st, s + n, lanes);
    acc = fma(st, Vec::load(Cp + n), acc);
  }
  return acc;
}

// One channel's N states (full vectors only when kFull; else the last vector holds N % W lanes), its
// output sum_n s C reduced across lanes.
template <bool kFull, bool kFast>
inline float channel_step(float* s, const float* a2, const float* Bp, const float* Cp, int64_t N, float dlt,
                          float dx) {
  return sum_lanes(channel_partials<kFull, kFast>(s, a2, Bp, Cp, N, dlt, dx));
}

// Channels in groups of W: each channel's lane partials are kept and the W channels' sums formed at
// once by lane_sums (a transposing tree, ~3 instructions per channel) instead of one reduction per
// channel, whose shuffles cost about as much as the channel's own work at N = 32 (streaming at batch 64:
// ~10% of the step's state update); the D skip and the gate then run as vectors. The rest one by one.
template <bool kFull, bool kFast>
void row_channels(const StateUpdateParams& p, float* state, const float* a2, int64_t padded_n, const float* Bp,
                  const float* Cp, const float* x, const float* delta, const float* gate, float* out) {
  alignas(64) float partials[W * W];
  alignas(64) float sums[W];
  int64_t d0 = 0;
  for (; d0 + W <= p.dim; d0 += W) {
    for (int c = 0; c < W; ++c) {
      const int64_t d = d0 + c;
      channel_partials<kFull, kFast>(state + d * p.state_sd, a2 + d * padded_n, Bp, Cp, p.N, delta[d],
                                     delta[d] * x[d]).store(partials + c * W);
    }
    lane_sums(partials, sums);
    Vec o = Vec::load(sums);
    if (p.D) o = fma(Vec::load(x + d0), Vec::load(p.D + d0), o);
    if (p.z) o = o * Vec::load(gate + d0);
    o.store(out + d0);
  }
  for (int64_t d = d0; d < p.dim; ++d) {
    const float y = channel_step<kFull, kFast>(state + d * p.state_sd, a2 + d * padded_n, Bp, Cp, p.N, delta[d],
                                               delta[d] * x[d]);
    const float o = p.D ? y + x[d] * p.D[d] : y;
    out[d] = p.z ? o * gate[d] : o;
  }
}

void run(const StateUpdateParams& p, int64_t begin, int64_t end) {
  const int64_t N = p.N, dim = p.dim;
  const int64_t padded_n = (N + W - 1) / W * W;
  const int64_t padded_d = (dim + W - 1) / W * W;
  std::vector<float> scratch(2 * padded_d + 2 * padded_n + dim * padded_n, 0.0f);
  float* delta = scratch.data();
  float* gate = delta + padded_d;
  float* Bp = gate + padded_d;  // this row's B and C, zero-padded to whole vectors
  float* Cp = Bp + padded_n;
  float* a2 = Cp + padded_n;    // A log2 e, rows zero-padded to padded_n
  // (bounds seeded from the first element, so the loop body has no first-element test to keep it
  // from vectorising)
  float a2lo = dim > 0 && N > 0 ? p.A[0] * kLog2e : 0.0f, a2hi = a2lo;
  for (int64_t d = 0; d < dim; ++d)
    for (int64_t n = 0; n < N; ++n) {
      const float v = p.A[d * N + n] * kLog2e;
      a2[d * padded_n + n] = v;
      a2lo = v < a2lo ? v : a2lo;  // NaN: fast_exp_ok decides either way
      a2hi = v > a2hi ? v : a2hi;
    }
  const bool full = N % W == 0;
  for (int64_t b = begin; b < end; ++b) {
    float* out = p.out + b * dim;
    const int64_t row = p.indices ? p.indices[b] : b;
    if (row < 0) {  // padding row of the pool form
      memset(out, 0, sizeof(float) * dim);
      continue;
    }
    row_prologue(p, b, delta, gate);
    float dlo = delta[0], dhi = delta[0];
    for (int64_t d = 1; d < dim; ++d) {
      dlo = delta[d] < dlo ? delta[d] : dlo;
      dhi = delta[d] > dhi ? delta[d] : dhi;
    }
    const bool fast = fast_exp_ok(dlo, dhi, a2lo, a2hi);
    memcpy(Bp, p.B + b * p.B_sb, sizeof(float) * N);
    memcpy(Cp, p.C + b * p.C_sb, sizeof(float) * N);
    const float* x = p.x + b * p.x_sb;
    float* state = p.state + row * p.state_sb;
    if (full && fast) row_channels<true, true>(p, state, a2, padded_n, Bp, Cp, x, delta, gate, out);
    else if (full) row_channels<true, false>(p, state, a2, padded_n, Bp, Cp, x, delta, gate, out);
    else if (fast) row_channels<false, true>(p, state, a2, padded_n, Bp, Cp, x, delta, gate, out);
    else row_channels<false, false>(p, state, a2, padded_n, Bp, Cp, x, delta, gate, out);
  }
}

}  // namespace

namespace m2rec_state_update {

#if defined(M2REC_ISA_AVX512)
#define M2REC_STATE_UPDATE_KERNELS_FN state_update_kernels_avx512
#define M2REC_ISA_NAME "avx512"
#elif defined(M2REC_ISA_AVX2)
#define M2REC_STATE_UPDATE_KERNELS_FN state_update_kernels_avx2
#define M2REC_ISA_NAME "avx2"
#else
#define M2REC_STATE_UPDATE_KERNELS_FN state_update_kernels_generic
#define M2REC_ISA_NAME "generic"
#endif

const StateUpdateKernelTable* M2REC_STATE_UPDATE_KERNELS_FN() {
  static const StateUpdateKernelTable table = {M2REC_ISA_NAME, W, &run};
  return &table;
}

}  // namespace m2rec_state_update
