// The causal filter's streaming step (ring_filter_api.h), compiled once per ISA like scan_isa.cpp.
// One pass over a row's history: up to kBlocks vectors of channels are accumulated at once (a whole
// history row of d = 64 with AVX-512), so each history row is read once from memory and the taps
// (M x d, shared by the batch) stay in L1/L2. No index tensor of ages and no (batch, M, d) product is
// formed, which the PyTorch form (gather the taps, multiply, sum) needs. The walk over the slots is
// split at the newest slot, so the age needs no modulo: ages slot, slot - 1, ..., 0, then M - 1, ...
#include <stdlib.h>
#include <string.h>

#include "ring_filter_api.h"
#include "simd.h"

namespace {

using m2rec_ring_filter::RingFilterParams;

constexpr int W = Vec::W;
constexpr int kBlocks = 4;  // vectors of channels accumulated together


// acc[j] += sum over slots s in [s0, s1) of h[s][j-th vector] * taps[age0 - (s - s0)][j-th vector].
template <int kNb>
inline void accumulate(Vec* acc, const float* h, int64_t h_ss, const float* taps, int64_t d, int64_t s0,
                       int64_t s1, int64_t age0) {
  for (int64_t s = s0; s < s1; ++s) {
    const float* hs = h + s * h_ss;
    const float* ts = taps + (age0 - (s - s0)) * d;
    for (int j = 0; j < kNb; ++j) acc[j] = fma(Vec::load(hs + j * W), Vec::load(ts + j * W), acc[j]);
  }
}

// Channels [c0, c0 + kNb * W), all full vectors.
template <int kNb>
inline void full_blocks(const RingFilterParams& p, const float* h, const float* taps, int64_t slot, float* y) {
  Vec acc[kNb];
  for (int j = 0; j < kNb; ++j) acc[j] = Vec::zero();
  accumulate<kNb>(acc, h, p.h_ss, taps, p.d, 0, slot + 1, slot);         // ages slot .. 0
  accumulate<kNb>(acc, h, p.h_ss, taps, p.d, slot + 1, p.M, p.M - 1);    // ages M - 1 .. slot + 1
  for (int j = 0; j < kNb; ++j) acc[j].store(y + j * W);
}

// The last, partial vector of channels (lanes < W).
inline void partial_block(const RingFilterParams& p, const float* h, const float* taps, int64_t slot, float* y,
                          int lanes) {
  Vec acc = Vec::zero();
  for (int64_t s = 0; s < p.M; ++s) {
    const int64_t age = s <= slot ? slot - s : slot - s + p.M;
    acc = fma(load_n(h + s * p.h_ss, lanes), load_n(taps + age * p.d, lanes), acc);
  }
  store_n(acc, y, lanes);
}

void run(const RingFilterParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.d;
  for (int64_t b = begin; b < end; ++b) {
    float* h = p.history + b * p.h_sb;
    const int64_t slot = p.positions[b] % p.M;
    memcpy(h + slot * p.h_ss, p.x + b * p.x_sb, sizeof(float) * d);
    float* y = p.y + b * d;
    int64_t c = 0;
    for (; c + kBlocks * W <= d; c += kBlocks * W) full_blocks<kBlocks>(p, h + c, p.taps + c, slot, y + c);
    const int64_t full_left = (d - c) / W;
    if (full_left == 3) full_blocks<3>(p, h + c, p.taps + c, slot, y + c);
    if (full_left == 2) full_blocks<2>(p, h + c, p.taps + c, slot, y + c);
    if (full_left == 1) full_blocks<1>(p, h + c, p.taps + c, slot, y + c);
    c += full_left * W;
    if (c < d) partial_block(p, h + c, p.taps + c, slot, y + c, static_cast<int>(d - c));
  }
}

}  // namespace

namespace m2rec_ring_filter {

#if defined(M2REC_ISA_AVX512)
#define M2REC_RING_FILTER_KERNELS_FN ring_filter_kernels_avx512
#define M2REC_ISA_NAME "avx512"
#elif defined(M2REC_ISA_AVX2)
#define M2REC_RING_FILTER_KERNELS_FN ring_filter_kernels_avx2
#define M2REC_ISA_NAME "avx2"
#else
#define M2REC_RING_FILTER_KERNELS_FN ring_filter_kernels_generic
#define M2REC_ISA_NAME "generic"
#endif

const RingFilterKernelTable* M2REC_RING_FILTER_KERNELS_FN() {
  static const RingFilterKernelTable table = {M2REC_ISA_NAME, W, &run};
  return &table;
}

}  // namespace m2rec_ring_filter
